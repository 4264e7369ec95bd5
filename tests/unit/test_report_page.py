"""`nanotrain report` of a pipeline run made here: the planner's predicted step (--hardware cpu) beside
the measured one, part by part, and both pipeline timelines, in a real browser (tests/unit/browser.py)."""

import dataclasses
import json
import re

import pytest

from browser import Browser
from conftest import tiny_config
from nanotrain.cli import main
from nanotrain.config import Config
from nanotrain.parallel.launch import run_world
from nanotrain.runtime import RuntimeEngine

pytestmark = [pytest.mark.xdist_group("browser"), pytest.mark.world]


def _train(cfg_dict) -> None:
    RuntimeEngine(Config.from_dict(cfg_dict)).run()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    d = tmp_path_factory.mktemp("report_page")
    cfg = tiny_config(d, "--parallel.pp=2", "--train.micro_batch_size=1", "--train.max_steps=6",
                      "--train.eval_interval=0", "--logging.log_interval=2", "--logging.timeline_step=4",
                      "--checkpoint.save_final=false", "--monitoring.probe_batch=0")
    run_world(_train, 2, dataclasses.asdict(cfg))
    out = d / "report.html"
    assert main(["report", cfg.train.out_dir, "--out", str(out)]) == 0
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', out.read_text(), re.S)
                      .group(1).replace("<\\/", "</"))
    b = Browser(out)
    yield data["runs"][0], b, cfg.train.out_dir
    b.close()


def numbers(b, where: str) -> dict:
    return b.evaluate(f"Object.fromEntries([...document.querySelectorAll('{where} .num')]"
                      ".map(e => [e.dataset.field, Number(e.dataset.value)]))")


def test_loads_offline_without_errors(report):
    _, b, _ = report
    assert b.errors == [] and b.outside_requests() == []


def test_predicted_beside_measured(report):
    run, b, _ = report
    p, m = run["predicted"], run["measured"]
    assert p["layout"]["pp"] == 2 and p["schedule"] == "1f1b" and p["cluster"].startswith("cpu (measured, 2 ")
    rows = run["side_by_side"]
    assert rows[-1] == ["step", p["step_s"] * 1e3, m["step_ms"]]
    # The planner's parts regrouped as the run times them add up to its step.
    assert sum(r[1] for r in rows[:3]) == pytest.approx(p["step_s"] * 1e3)
    shown = numbers(b, ".side")
    assert [shown[f"predicted:{j}"] for j, r in enumerate(rows) if r[1] is not None] == \
        [r[1] for r in rows if r[1] is not None]
    assert [shown[f"measured:{j}"] for j in range(len(rows))] == [r[2] for r in rows]
    assert numbers(b, "#predicted-bar-0 + .legend") == {k: v * 1e3 for k, v in p["breakdown"].items()}
    # How close the two are is tests/unit/test_cpu_plan.py's question, on a quiet machine; here
    # (a 2-process world on 2 shared cores) only that both are there.
    assert p["step_s"] > 0 and m["step_ms"] > 0


def test_both_timelines_are_drawn_alike(report):
    run, b, _ = report
    measured = [e for e in run["timeline"]["events"] if e[1] in "FBW"]
    assert {e[0] for e in measured} == {0, 1} and run["timeline"]["step"] == 4
    assert b.evaluate("document.querySelectorAll('#measured-timeline-0 rect').length") == len(measured) + 2
    planned = sum(len(r["kind"]) for r in run["predicted"]["timetable"]["ranks"])
    assert b.evaluate("document.querySelectorAll('#predicted-timeline-0 rect').length") == planned + 2


def test_screenshot_is_not_blank(report):
    _, b, _ = report
    pixels = b.screenshot("#steps")
    assert pixels.shape[0] > 200 and pixels[..., :3].std() > 0.1


def test_no_predict_leaves_it_out(report, tmp_path):
    assert main(["report", report[2], "--out", str(tmp_path / "plain.html"), "--no-predict"]) == 0
    plain = (tmp_path / "plain.html").read_text()
    assert '"predicted":null' in plain and '"why_not":"not asked for"' in plain
