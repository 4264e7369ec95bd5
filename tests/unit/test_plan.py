"""`nanotrain plan`: the step-time model against published runs, the search's candidates against the
config checks and inspect's figures, the played schedule against the unit play-through, and the
command's interface (docs/planning.md)."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace

import pytest

from nanotrain.cli import main
from nanotrain.config import load_config
from nanotrain.inspection.cluster import PRESETS, Cluster, load_cluster
from nanotrain.inspection.comm import comm_per_step
from nanotrain.inspection.memory import Plan, RankModelView, memory_per_rank, rank_model
from nanotrain.inspection.plan import FIELDS, Request, config_errors, make_plan, search
from nanotrain.inspection.steptime import Cost, pipeline_makespan
from nanotrain.inspection.validation import table
from nanotrain.parallel.layout import Layout
from nanotrain.parallel.pipeline import cached_timetable
from nanotrain.parallel.pipeline.schedules import timed_play

# -- published runs ----------------------------------------------------------------------------------


def test_korthikanti_table5_each_within_10_percent():
    rows = table("korthikanti-t5")
    assert len(rows) == 8
    for r in rows:
        assert abs(r["error"]) <= 0.10, (r["name"], r["measured_s"], r["predicted_s"])


def test_megatron_readme_h100_median_10_each_20_percent():
    rows = table("megatron-readme-h100")
    assert len(rows) == 9
    errors = [abs(r["error"]) for r in rows]
    assert statistics.median(errors) <= 0.10, errors
    assert max(errors) <= 0.20, [(r["name"], round(r["error"], 3)) for r in rows]


def test_breakdown_sums_to_the_step():
    for r in table("korthikanti-t5")[:2]:
        p = r["prediction"]
        assert sum(p["breakdown"].values()) == pytest.approx(p["step_s"])
        assert 0 < p["mfu"] <= p["hfu"] < 1


# -- the played schedule -------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule,v", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb_h1", 1),
                                        ("dualpipev", 2)])
def test_timed_play_with_unit_costs_is_the_play_through(schedule, v):
    """Every action one unit: the timed play is the unit timetable the runner is built from."""
    unit = cached_timetable(schedule, 4, v, 8)
    makespan, busy = timed_play(schedule, 4, v, 8, lambda r, a, split: 1.0, lambda s, d: 0.0)
    assert makespan == unit.n_slots
    assert 1 - sum(busy) / (4 * makespan) == pytest.approx(unit.bubble())


@pytest.mark.parametrize("schedule,v", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2)])
def test_a_backward_twice_the_forward_keeps_the_textbook_bubble(schedule, v):
    makespan, busy = timed_play(schedule, 4, v, 8, lambda r, a, split: 2.0 if a.kind == "B" else 1.0,
                                lambda s, d: 0.0)
    assert 1 - sum(busy) / (4 * makespan) == pytest.approx((4 - 1) / (v * 8 + 4 - 1))


def test_long_steps_are_extended_at_the_steady_pace():
    """A step of many micro-batches, played in full and played short then extended, takes as long."""
    plan = Plan(Layout(pp=4, micro=1), micro_batches=96, pp_schedule="1f1b")
    chunks = [[(Cost(1.0 + 0.1 * r), Cost(2.0), Cost())] for r in range(4)]
    full, _ = pipeline_makespan(plan, chunks, 0.05, cap=1000)
    short, _ = pipeline_makespan(plan, chunks, 0.05, cap=8)
    assert short == pytest.approx(full, rel=1e-9)


# -- the search ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_request():
    cfg = load_config("configs/deepseek_tiny.toml", ["--model.vocab_size=65"])
    cfg.precision.recipe = "bf16"
    m = cfg.model
    m.max_seq_len = 256
    m.aux_loss_coef = 0.0
    small = replace(PRESETS["h100"], accelerator=replace(PRESETS["h100"].accelerator, hbm_bytes=0.02e9))
    return Request(m, cfg, small, 8, 32, 256, {}, top=50)


def test_search_keeps_only_valid_fitting_layouts(tiny_request):
    out = search(tiny_request)
    assert out["candidates"]
    capacity = tiny_request.cluster.accelerator.hbm_bytes
    for c in out["candidates"]:
        lay = c["layout"]
        assert lay["tp"] * lay["cp"] * lay["pp"] * lay["dp"] == 8
        plan = make_plan(tiny_request, lay["tp"], lay["cp"], lay["pp"], lay["dp"], lay["ep"], lay["etp"], lay["zero"],
                         lay["micro"], c["schedule"] if lay["pp"] > 1 else "1f1b", lay["vp"], c["recompute"])
        assert config_errors(tiny_request, plan) == []
        assert c["fits"] and c["memory_per_rank_gb"] * 1e9 <= capacity
    speeds = [c["tokens_per_s_per_gpu"] for c in out["candidates"]]
    assert speeds == sorted(speeds, reverse=True)
    assert out["not_fitting"] and not any(c["fits"] for c in out["not_fitting"])


@pytest.mark.parametrize("layout", [Layout(tp=2, pp=2, dp=2, ep=2, sp=True, zero=3, micro=1),
                                    Layout(pp=2, vp=2, dp=4, ep=4, zero=1, micro=2),
                                    Layout(tp=2, cp=2, dp=2, ep=2, etp=2, zero=2, micro=1)])
def test_plan_memory_and_bytes_are_inspects(tiny_request, layout):
    """The planner's one-block-per-kind model gives memory_per_rank and comm_per_step exactly what the
    whole rank model gives, which tests/distributed/test_inspection_world.py checks against measured."""
    m, precision = tiny_request.m, tiny_request.cfg.precision
    schedule = "interleaved" if layout.vp > 1 else "1f1b"
    plan = Plan(layout, seq_len=64, micro_batches=4, pp_schedule=schedule, pp_virtual_stages=layout.vp)
    whole, view = rank_model(m, plan), RankModelView(m, plan)
    assert memory_per_rank(m, plan, precision, "cpu", view) == memory_per_rank(m, plan, precision, "cpu", whole)
    for stage in range(plan.pp):
        assert comm_per_step(m, plan, precision, stage, view) == comm_per_step(m, plan, precision, stage, whole)


@pytest.mark.slow
def test_deepseek_v3_on_2048_h100_searches_in_a_minute():
    """The search is one thread of Python: its CPU time is what it takes on a quiet core (the suite's
    other worker shares the wall clock)."""
    started = time.process_time()
    out = _plan_json(["--config", "configs/deepseek_v3.toml", "--hardware", "h100", "--gpus", "2048",
                      "--global-batch", "15360", "--seq-len", "4096", "--dtype", "fp8"])
    assert time.process_time() - started < 60
    assert len(out["candidates"]) == 10 and all(c["fits"] for c in out["candidates"])


# -- the command ---------------------------------------------------------------------------------------


def _plan_json(args: list[str], capsys=None) -> dict:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["plan", *args, "--json"]) == 0
    return json.loads(buf.getvalue())


def test_json_has_exactly_the_keys():
    out = _plan_json(["--config", "configs/deepseek_tiny.toml", "--model.vocab_size=65", "--hardware", "a100",
                      "--gpus", "8", "--global-batch", "16", "--seq-len", "256", "--top", "3"])
    assert list(out) == [*FIELDS, "candidates"]
    assert set(out["layout"]) == {"tp", "cp", "pp", "vp", "dp", "ep", "etp", "sp", "zero", "micro"}
    assert len(out["candidates"]) == 3 and all(list(c) == list(FIELDS) for c in out["candidates"])
    assert out["candidates"][0]["step_s"] == out["step_s"]


def test_fixed_layout_is_kept():
    out = _plan_json(["--config", "configs/deepseek_tiny.toml", "--model.vocab_size=65", "--hardware", "h100",
                      "--gpus", "8", "--global-batch", "16", "--seq-len", "256", "--layout", "tp=2,ep=2,zero=1",
                      "--recompute", "selective"])
    for c in out["candidates"]:
        assert (c["layout"]["tp"], c["layout"]["ep"], c["layout"]["zero"], c["recompute"]) == (2, 2, 1, "selective")


@pytest.mark.parametrize("args,words", [
    (["--gpus", "7"], "no layout of this model splits 7 GPUs"),
    (["--layout", "tp=3"], "no layout"),
    (["--layout", "tq=2"], "unknown key 'tq'"),
    (["--hardware", "a100", "--dtype", "fp8"], "no fp8 matmul peak"),
    (["--hardware", "tpu"], "not a preset"),
    (["--gpus", "0"], "--gpus 0 is out of range"),
])
def test_bad_input_is_one_line(args, words, capsys):
    base = {"--config": "configs/shakespeare_char.toml", "--hardware": "h100", "--gpus": "8",
            "--global-batch": "16", "--seq-len": "256"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    argv = ["plan", "--model.vocab_size=65"] + [x for kv in base.items() for x in kv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and "\n" not in err


def test_cluster_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[cluster]\nbase = "a100"\ngpus_per_node = 4\nscale_out_bandwidth = 12.5e9\n'
                 '[accelerator]\nhbm_bytes = 40e9\n')
    c = load_cluster(str(f))
    assert (c.gpus_per_node, c.scale_out_bandwidth, c.accelerator.hbm_bytes) == (4, 12.5e9, 40e9)
    assert c.link(1, 8) == (c.scale_out_bandwidth * c.scale_out_efficiency, c.scale_out_latency_s)  # 8 > 4 per node
    f.write_text('[cluster]\ngpus_per_nod = 4\n')
    with pytest.raises(Exception, match="unknown key 'gpus_per_nod'"):
        load_cluster(str(f))


def test_placement_follows_the_rank_order():
    c: Cluster = PRESETS["h100"]
    assert c.placement(1, 8) == (1, 8)  # tp=8: one node
    assert c.placement(1, 16) == (2, 8)  # tp=16 crosses nodes
    assert c.placement(8, 4) == (4, 1)  # a dp group beside tp=8: one rank per node
    assert c.link(1, 8)[0] > c.link(1, 16)[0]


def test_inspect_without_a_pipeline_ignores_vp(capsys):
    """pp = 1 has no chunks: a vp the schedule could not run is ignored, as the runtime ignores it, and
    the fit search's pp step starts from one chunk per rank (it hit 1F1B's assert)."""
    assert main(["inspect", "--config", "configs/shakespeare_char.toml", "--model.vocab_size=65",
                 "--layout", "dp=4,vp=2,micro=1", "--gpu-memory", "0.0001"]) == 0
    assert "does **not** fit" in capsys.readouterr().out


def test_a_tie_is_explained_by_memory_not_by_an_empty_reason():
    """Two layouts the step model cannot tell apart (the same breakdown): the line says they tie and
    why the first is listed first, instead of "0.0% faster than the runner-up: ."."""
    from nanotrain.inspection.plan import explain

    entry = {"layout": {"tp": 1, "dp": 1, "zero": 0}, "schedule": "1f1b", "recompute": "none", "step_s": 2.0,
             "breakdown": {"compute": 1.5, "tp": 0.5}, "memory_per_rank_gb": 10.0, "fits": True}
    runner_up = {**entry, "layout": {**entry["layout"], "zero": 1}, "memory_per_rank_gb": 12.5}
    line = explain([entry, runner_up])
    assert line == ("best (zero=0 vs 1) and the runner-up predict the same step; the best is listed first for "
                    "its memory per rank (10.00 vs 12.50 GB)."), line
    faster = {**runner_up, "step_s": 2.5, "breakdown": {"compute": 1.5, "tp": 1.0}}
    assert explain([entry, faster]).startswith("best (zero=0 vs 1) is 25.0% faster than the runner-up: tp -20.0%")
