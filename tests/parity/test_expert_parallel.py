"""Expert parallelism vs one process: DeepSeekModel with dense and MoE layers, bias balancing on,
fp32, 10 steps; tolerance 1e-5 relative as in test_tp_dp.py."""

import pytest

from test_deepseek_layouts import config
from test_tp_dp import check_layout


@pytest.mark.parametrize("layout, extra", [
    ("ep=2,dp=2", []),
    ("ep=4,dp=4", []),
    ("ep=2,dp=2,tp=2", []),
    ("ep=2,dp=4,micro=1", []),
    ("ep=2,dp=2", ["--model.mtp_depth=1"]),  # the MTP block's MoE is expert-parallel and balanced too
])
def test_expert_parallel_matches_one_process(tmp_path, layout, extra):
    check_layout(config(tmp_path, "--model.aux_loss_coef=0.01", *extra), layout, 1e-5)


def _train_dropping(cfg_dict):
    import json

    from nanotrain.config import Config
    from nanotrain.runtime import RuntimeEngine

    result = RuntimeEngine(Config.from_dict(cfg_dict)).run()
    rows = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    return result.losses, [r for r in rows if "loss" in r]


def test_capacity_factor_under_expert_parallelism_drops_and_logs(tmp_path):
    """With a capacity factor, which tokens drop depends on the layout (capacity is per rank),
    so this checks the mechanism runs and reports, not parity."""
    import dataclasses
    import math

    from nanotrain.parallel.launch import run_world

    cfg = config(tmp_path, "--parallel.ep=2", "--parallel.dp=2", "--model.moe_capacity_factor=0.5",
                 "--train.max_steps=3", "--logging.log_interval=1", "--schedule.decay_steps=10")
    losses, rows = run_world(_train_dropping, 2, dataclasses.asdict(cfg))[0]
    assert all(math.isfinite(v) for v in losses.values())
    assert rows[-1]["moe/layer1/dropped_tokens"] > 0
