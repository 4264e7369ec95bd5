"""The split-backward schedules (ZB-H1, DualPipeV) vs one process: fp32, 10 steps, 1e-5.

Same measure as test_pipeline_layouts.py: every step's loss, the step-1 gradients of every
parameter (merged over the stages by name) and the gradient norms. Splitting a backward into B
and W changes when the weights' gradients are computed, not their arithmetic, so the differences
are the ~1e-7 of a reordered sum. Each schedule runs at pp=2 and pp=4: alone, with tp=2 and
sequence parallelism, with dp=2 under ZeRO-1 and ZeRO-2 (whose hooks fire in the last W), and on
the tiny DeepSeek (MLA, experts over ep=2)."""

import pytest

from conftest import CORPUS
from nanotrain.config import load_config

from test_deepseek import TINY  # noqa: E402  (tests/unit is on sys.path through conftest)
from test_pipeline_layouts import config  # noqa: E402
from test_tp_dp import check_layout  # noqa: E402

TOL = 1e-5

# DualPipeV needs 2 pp micro-batches per rank and 2 pp chunks of layers: at pp=4, 8 layers and
# 8 micro-batches of one sequence. At the 4-layer model's lr (3e-3) this one's gradient norm jumps
# 100-fold by step 10, and any reordering of sums (1F1B's too) grows to 1e-3 there: lr 1e-3.
PP4 = ["--model.n_layers=8", "--train.micro_batch_size=1", "--optimizer.lr=1e-3"]
LAYOUTS = {
    "pp2": ("pp=2", []),
    "pp4": ("pp=4", PP4),
    "tp2_pp2_sp": ("tp=2,pp=2,sp", []),
    "tp2_pp4_sp": ("tp=2,pp=4,sp", PP4),
    "pp2_dp2_zero1": ("pp=2,dp=2,micro=1,zero=1", []),
    "pp2_dp2_zero2": ("pp=2,dp=2,micro=1,zero=2", []),
    "pp4_dp2_zero1": ("pp=4,dp=2,micro=1,zero=1", [*PP4, "--train.batch_size=16"]),
    "pp4_dp2_zero2": ("pp=4,dp=2,micro=1,zero=2", [*PP4, "--train.batch_size=16"]),
}
SLOW = {"tp2_pp4_sp", "pp4_dp2_zero1", "pp4_dp2_zero2"}  # 8 processes on the CI's 2 cores


def cases():
    for schedule in ("zb_h1", "dualpipev"):
        for name in LAYOUTS:
            marks = [pytest.mark.slow] if name in SLOW else []
            yield pytest.param(schedule, name, id=f"{schedule}-{name}", marks=marks)


@pytest.mark.parametrize("schedule,name", list(cases()))
def test_split_schedule_matches_one_process(tmp_path, schedule, name):
    layout, extra = LAYOUTS[name]
    check_layout(config(tmp_path, f"--parallel.pp_schedule={schedule}", *extra), layout, TOL)


def deepseek(tmp_path, *extra):
    return load_config(None, [*TINY, f"--data.path={CORPUS}", f"--data.prepared_dir={tmp_path / 'prep'}",
                              f"--train.out_dir={tmp_path / 'run'}", "--train.seq_len=16", "--train.batch_size=8",
                              "--schedule.warmup_steps=2", "--optimizer.lr=3e-3", "--model.bias_update_rate=0.01",
                              "--logging.progress=none", *extra])


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["zb_h1", "dualpipev"])
@pytest.mark.parametrize("pp", [2, 4])
def test_split_schedule_deepseek_experts_over_ep2(tmp_path, schedule, pp):
    """MLA and routed experts whose all-to-alls run in B (the input's path), their weights in W."""
    layers = 2 * pp if schedule == "dualpipev" else pp
    cfg = deepseek(tmp_path, f"--model.n_layers={layers}", f"--parallel.pp_schedule={schedule}",
                   f"--train.batch_size={8 * pp // 2}")
    check_layout(cfg, f"pp={pp},dp=2,ep=2,micro=1", TOL)


@pytest.mark.parametrize("extra,named", [
    (["--train.recompute=full"], "train.recompute='full'"),
    (["--train.recompute=selective"], "train.recompute='selective'"),
    (["--parallel.dp=2", "--optimizer.zero_stage=3"], "optimizer.zero_stage=3"),
    (["--train.compile=true"], "train.compile=true"),
    (["--parallel.pp=4", "--train.batch_size=6", "--train.micro_batch_size=1"], "at least 2 x parallel.pp = 8"),
])
def test_split_schedules_refuse_what_they_cannot_run(tmp_path, extra, named):
    """Refused before any process starts, naming the key and the fix."""
    from nanotrain.config import ConfigError

    schedule = "dualpipev" if "at least" in named else "zb_h1"
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)")):
        config(tmp_path, "--parallel.pp=2", f"--parallel.pp_schedule={schedule}", "--model.n_layers=8", *extra)


def test_dualpipev_fills_its_micro_batches(tmp_path):
    """train.micro_batch_size = 0 under DualPipeV: the largest micro-batch giving 2 pp of them."""
    cfg = load_config(None, [f"--data.path={CORPUS}", "--parallel.pp=2", "--parallel.pp_schedule=dualpipev",
                             "--train.batch_size=12", "--model.n_layers=4"])
    assert cfg.train.micro_batch_size == 3 and cfg.train.grad_accum_steps(1) == 4
