"""DeepSeekModel (MLA, dense + MoE layers, bias balancing on) under tp and dp vs one process.

Same tolerance as test_tp_dp.py: 1e-5 relative on losses, step-1 gradients and gradient norms.
Balancing matters here: the router biases are updated from the load summed over the whole
global batch, so every layout must select the same experts at every step."""

import pytest

from conftest import CORPUS
from nanotrain.config import load_config

from test_deepseek import TINY  # noqa: E402  (tests/unit is on sys.path through conftest)
from test_tp_dp import check_layout  # noqa: E402


def config(tmp_path, *extra):
    return load_config(None, [*TINY, f"--data.path={CORPUS}", f"--data.prepared_dir={tmp_path / 'prep'}",
                              f"--train.out_dir={tmp_path / 'run'}", "--train.seq_len=16", "--train.batch_size=8",
                              "--schedule.warmup_steps=2", "--optimizer.lr=3e-3", "--model.bias_update_rate=0.01",
                              "--logging.progress=none", *extra])


@pytest.mark.parametrize("layout, extra", [
    ("dp=2", ["--model.aux_loss_coef=0.01"]),
    ("dp=2,micro=2", ["--model.aux_loss_coef=0.01"]),
    ("tp=2", ["--model.aux_loss_coef=0.01"]),
    ("tp=2,dp=2,sp", []),
    ("tp=2,dp=2,ep=2,sp", []),  # experts whole on each tp rank, fed its sequence shard: tp-summed grads
])
def test_deepseek_layout_matches_one_process(tmp_path, layout, extra):
    check_layout(config(tmp_path, *extra), layout, 1e-5)
