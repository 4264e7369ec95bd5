"""`nanotrain plan --html`: the page holds the planner's numbers (the same as --json's), and in a real
browser (headless Chromium, tests/unit/browser.py) it loads offline, sorts, filters, selects and
moves to a neighbour."""

import contextlib
import io
import json
import re
import time

import pytest

from browser import Browser
from nanotrain.cli import main
from nanotrain.inspection.memory import Plan
from nanotrain.inspection.plan import FIELDS
from nanotrain.inspection.steptime import Cost, pipeline_makespan, played_timetable
from nanotrain.parallel.layout import Layout

pytestmark = pytest.mark.xdist_group("browser")  # one Chromium at a time on a 2-core machine

# The tiny DeepSeek on 8 GPUs of 20 MB each: some layouts fit, many do not.
SMALL = ["--config", "configs/deepseek_tiny.toml", "--model.vocab_size=65", "--gpus", "8", "--global-batch", "32",
         "--seq-len", "256", "--top", "5"]


def page_json(path) -> dict:
    text = path.read_text()
    return json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S)
                      .group(1).replace("<\\/", "</"))


def plan(args: list[str]) -> dict:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        assert main(["plan", *args]) == 0
    return json.loads(buf.getvalue())


@pytest.fixture(scope="module")
def small_page(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan_page")
    (d / "cluster.toml").write_text('[cluster]\nbase = "h100"\n[accelerator]\nhbm_bytes = 0.02e9\n')
    path = d / "plan.html"
    out = plan([*SMALL, "--cluster", str(d / "cluster.toml"), "--json", "--html", str(path)])
    return path, out, page_json(path)


@pytest.fixture(scope="module")
def browser(small_page):
    b = Browser(small_page[0])
    yield b
    b.close()


def rows(b) -> list[str]:
    return b.evaluate("[...document.querySelectorAll('#candidates tbody tr')].map(r => r.dataset.id)")


@pytest.mark.parametrize("schedule, v", [("1f1b", 1), ("interleaved", 2), ("zb_h1", 1), ("dualpipev", 2)])
def test_the_drawn_timetable_is_the_step_models_play(schedule, v):
    """The timeline the page draws is the play the step time comes from: same makespan, and each
    rank busy for as long (the last rank's chunks cost more, as a head and loss make them)."""
    plan = Plan(Layout(pp=4, vp=v if schedule == "interleaved" else 1, micro=1), micro_batches=8,
                pp_schedule=schedule, pp_virtual_stages=v)
    chunks = [[(Cost(1.0 + (r == 3)), Cost(1.5), Cost(0.75))] * v for r in range(4)]
    makespan, busy = pipeline_makespan(plan, chunks, 0.1, cap=64)
    events = played_timetable(plan, chunks, 0.1, 8)
    assert max(e[5] for e in events) == pytest.approx(makespan)
    for r in range(4):
        assert sum(e[5] - e[4] for e in events if e[0] == r) == pytest.approx(busy[r])
    assert {(e[1], e[3]) for e in events} >= {(k, mb) for k in "FB" for mb in range(8)}


def test_page_numbers_are_the_json_ones(small_page):
    path, out, data = small_page
    by_id = {c["id"]: c for c in data["candidates"]}
    for c in out["candidates"]:  # every candidate --json prints is on the page, with the same numbers
        e = next(e for e in data["candidates"] if e["layout"] == c["layout"] and e["schedule"] == c["schedule"]
                 and e["recompute"] == c["recompute"])
        assert {k: e[k] for k in FIELDS} == c
    assert {c["source"] for c in data["candidates"]} == {"search", "what if"}
    assert any(not c["fits"] for c in data["candidates"]) and any(c["fits"] for c in data["candidates"])
    for c in data["candidates"]:
        assert c["neighbours"] or c["source"] == "what if"
        for n in c["neighbours"]:  # each delta is the difference of the two entries' numbers
            other = by_id[n["id"]]
            assert n["d_tokens_per_s_per_gpu"] == other["tokens_per_s_per_gpu"] - c["tokens_per_s_per_gpu"]
            assert n["d_memory_per_rank_gb"] == other["memory_per_rank_gb"] - c["memory_per_rank_gb"]
        assert sum(c["breakdown"].values()) == pytest.approx(c["step_s"])
        t = c["timetable"]
        assert len(t["ranks"]) == c["layout"]["pp"] and set("".join(r["kind"] for r in t["ranks"])) <= set("FBW")
        mbs = {mb for r in t["ranks"] for mb in r["mb"]}
        assert mbs == set(range(t["micro_batches"])) and t["micro_batches"] <= t["of"]
    assert path.stat().st_size < 2e6


def test_loads_offline_without_errors(browser):
    assert browser.errors == []
    assert browser.outside_requests() == []
    assert browser.requests and browser.requests[0].startswith("file:")


def test_rows_are_the_candidates_and_the_toggle_shows_the_rest(browser, small_page):
    data = small_page[2]["candidates"]
    assert sorted(rows(browser)) == sorted(c["id"] for c in data if c["fits"])
    browser.evaluate("document.getElementById('show-unfit').click()")
    assert sorted(rows(browser)) == sorted(c["id"] for c in data)
    browser.evaluate("document.getElementById('show-unfit').click()")


def test_sort_and_filter(browser, small_page):
    data = [c for c in small_page[2]["candidates"] if c["fits"]]
    fastest = [c["id"] for c in sorted(data, key=lambda c: -c["tokens_per_s_per_gpu"])]
    assert rows(browser) == fastest  # the default order
    browser.evaluate("document.querySelector('#candidates th[data-sort=memory_per_rank_gb]').click()")
    assert [c["memory_per_rank_gb"] for c in map({c["id"]: c for c in data}.get, rows(browser))] == \
        sorted((c["memory_per_rank_gb"] for c in data), reverse=True)
    browser.evaluate("document.querySelector('#candidates th[data-sort=memory_per_rank_gb]').click()")
    assert [c["memory_per_rank_gb"] for c in map({c["id"]: c for c in data}.get, rows(browser))] == \
        sorted(c["memory_per_rank_gb"] for c in data)
    zero = data[-1]["layout"]["zero"]
    browser.evaluate(f"(() => {{ const s = document.querySelector('select[data-axis=zero]'); s.value = '{zero}'; "
                     f"s.dispatchEvent(new Event('change')); }})()")
    assert sorted(rows(browser)) == sorted(c["id"] for c in data if c["layout"]["zero"] == zero)
    assert len(rows(browser)) < len(data)
    browser.evaluate("(() => { const s = document.querySelector('select[data-axis=zero]'); s.value = ''; "
                     "s.dispatchEvent(new Event('change')); })()")
    browser.evaluate("document.querySelector('#candidates th[data-sort=tokens_per_s_per_gpu]').click()")
    assert rows(browser) == fastest


def panel_numbers(b, where: str = "#numbers") -> dict:
    return b.evaluate(f"Object.fromEntries([...document.querySelectorAll('{where} .num')]"
                      ".map(e => [e.dataset.field, [Number(e.dataset.value), e.textContent]]))")


def test_a_row_click_shows_its_numbers(browser, small_page):
    data = {c["id"]: c for c in small_page[2]["candidates"]}
    target = rows(browser)[2]
    browser.evaluate(f"document.querySelector('#candidates tr[data-id=\"{target}\"] td').click()")
    assert browser.evaluate("document.getElementById('selected').dataset.id") == target
    shown = panel_numbers(browser)
    assert set(shown) == {"step_s", "tokens_per_s_per_gpu", "mfu", "hfu", "model_tflops_per_gpu", "memory_per_rank_gb"}
    for field, (value, text) in shown.items():
        assert value == data[target][field]
        number = float(text.replace(",", "").rstrip("%")) / (100 if text.endswith("%") else 1)
        assert number == pytest.approx(value, rel=2e-3, abs=5e-4 if text.endswith("%") else 0)
    step = {k: v for k, (v, _) in panel_numbers(browser, "#step-bar + .legend").items()}
    assert step == data[target]["breakdown"]
    memory = {k: v for k, (v, _) in panel_numbers(browser, "#memory-bar + .legend").items()}
    assert memory == data[target]["memory_by_kind_gb"]
    assert browser.evaluate("document.querySelectorAll('#timeline rect').length") >= \
        sum(len(r["kind"]) for r in data[target]["timetable"]["ranks"])


def test_what_if_moves_to_the_neighbour(browser, small_page):
    data = {c["id"]: c for c in small_page[2]["candidates"]}
    start = browser.evaluate("document.getElementById('selected').dataset.id")
    goes = browser.evaluate("document.querySelector('#whatif button').dataset.id")
    assert goes == data[start]["neighbours"][0]["id"] != start
    browser.evaluate("document.querySelector('#whatif button').click()")
    assert browser.evaluate("document.getElementById('selected').dataset.id") == goes
    assert panel_numbers(browser)["step_s"][0] == data[goes]["step_s"]


def test_panel_screenshot_is_not_blank(browser):
    pixels = browser.screenshot("#panel")
    assert pixels.shape[0] > 200 and pixels.shape[1] > 600
    assert pixels[..., :3].std() > 0.1  # a white or one-colour panel has ~0


@pytest.mark.slow
def test_deepseek_v3_page_under_2_mb_in_90_s(tmp_path):
    """The acceptance command of issue 42, in CPU time (the suite's other worker shares the wall clock)."""
    started = time.process_time()
    plan(["--config", "configs/deepseek_v3.toml", "--hardware", "h100", "--gpus", "2048", "--global-batch", "15360",
          "--seq-len", "4096", "--dtype", "fp8", "--json", "--html", str(tmp_path / "p.html")])
    assert time.process_time() - started < 90
    assert (tmp_path / "p.html").stat().st_size < 2e6
    assert len(page_json(tmp_path / "p.html")["candidates"]) > 20
