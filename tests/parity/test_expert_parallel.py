"""Expert parallelism vs one process: DeepSeekModel with dense and MoE layers, bias balancing on,
fp32, 10 steps; tolerance 1e-5 relative as in test_tp_dp.py."""

import pytest

from test_deepseek_layouts import config
from nanotrain.verify import verify


@pytest.mark.parametrize("layout, extra", [
    ("ep=2,dp=2", []),
    ("ep=4,dp=4", []),
    ("ep=2,dp=2,tp=2", []),
    ("ep=2,dp=4,micro=1", []),
    ("ep=2,dp=2", ["--model.mtp_depth=1"]),  # the MTP block's MoE is expert-parallel and balanced too
])
def test_expert_parallel_matches_one_process(tmp_path, layout, extra):
    report = verify(config(tmp_path, "--model.aux_loss_coef=0.01", *extra), layout, steps=10, tolerance=1e-5)
    assert report.ok, report.table(layout)
