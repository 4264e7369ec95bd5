"""Every precision recipe trains: 200 steps of a small TransformerModel on the shipped
corpus end within 5% of the bf16 run's loss.

Measured (this config, mean train loss of steps 191-200 / val loss at 200): bf16
2.546 / 2.573, fp32 2.538 / 2.581, fp16 2.537 / 2.571, fp8_tensorwise (delayed) 2.539 / 2.572,
fp8_deepseek 2.505 / 2.543, nvfp4 2.559 / 2.602, mxfp4 2.517 / 2.549: all within 1.2%.
"""

import pytest

from conftest import straight_and_resumed, tiny_config
from nanotrain.runtime import RuntimeEngine

# One pytest-xdist worker runs this file (make test: --dist loadgroup): its module-scoped
# fixture runs once, not once per worker.
pytestmark = pytest.mark.xdist_group("precision_training")

ARGS = ["--train.max_steps=200", "--train.eval_interval=200", "--train.eval_steps=8", "--model.d_model=64",
        "--model.n_heads=4", "--train.seq_len=32", "--train.batch_size=8", "--schedule.decay_steps=200",
        "--schedule.warmup_steps=20", "--optimizer.lr=3e-3", "--checkpoint.save_final=false"]


def train(tmp, recipe, *flags):
    result = RuntimeEngine(tiny_config(tmp / recipe, f"--precision.recipe={recipe}", *ARGS, *flags)).run()
    return sum(result.losses[s] for s in range(191, 201)) / 10, result.val_losses[200]


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    return train(tmp_path_factory.mktemp("bf16"), "bf16")


@pytest.mark.parametrize("recipe", ["fp32", "fp16", "fp8_tensorwise", "fp8_deepseek", "nvfp4", "mxfp4"])
def test_recipe_trains_like_bf16(recipe, bf16, tmp_path):
    loss, val = train(tmp_path, recipe)
    assert loss == pytest.approx(bf16[0], rel=0.05) and val == pytest.approx(bf16[1], rel=0.05)
    assert loss < 2.9  # it learned (step 1: 4.2)
    assert (loss, val) != bf16  # the recipe did change the arithmetic


STORAGE = {  # weights, master and optimizer state in low precision, under the bf16 recipe
    "bf16-params-fp32-master": ["--precision.param_dtype=bf16", "--precision.grad_dtype=bf16"],
    "bf16-master-stochastic-all-bf16": ["--precision.param_dtype=bf16", "--precision.master_dtype=bf16",
                                        "--precision.master_rounding=stochastic", "--precision.grad_dtype=bf16",
                                        "--precision.exp_avg_dtype=bf16", "--precision.exp_avg_sq_dtype=bf16"],
    "nf4-weights": ["--precision.lowbit.weights=layers.*.weight", "--precision.lowbit.format=nf4"],
}


@pytest.mark.parametrize("name", list(STORAGE))
def test_low_precision_storage_trains_like_bf16(name, bf16, tmp_path):
    loss, val = train(tmp_path, "bf16", *STORAGE[name])
    print(f"{name}: {loss:.3f} / {val:.3f} (bf16 {bf16[0]:.3f} / {bf16[1]:.3f})")
    assert loss == pytest.approx(bf16[0], rel=0.05) and val == pytest.approx(bf16[1], rel=0.05)
    assert (loss, val) != bf16


@pytest.mark.parametrize("recipe", ["fp8_tensorwise", "nvfp4"])
def test_low_bit_resume_is_bit_exact(recipe, make_config):
    """The amax histories (delayed scaling) and the stochastic-rounding generator travel in
    the checkpoint: a resumed run rounds exactly as the uninterrupted one."""
    common = [f"--precision.recipe={recipe}", "--checkpoint.interval=5", "--schedule.decay_steps=20"]
    straight, resumed = straight_and_resumed(make_config, *common)
    assert {s: resumed.losses[s] for s in range(6, 11)} == {s: straight.losses[s] for s in range(6, 11)}


@pytest.mark.parametrize("rounding", ["kahan", "stochastic"])
def test_a_bf16_master_resumes_bit_exact(rounding, make_config):
    """A bf16 master keeps what its rounding needs across a checkpoint: Kahan's compensation
    buffer (optim/kahan/...) or the stochastic-rounding generator, so a resumed run's losses
    equal the uninterrupted run's exactly."""
    common = ["--precision.recipe=bf16", "--precision.param_dtype=bf16", "--precision.master_dtype=bf16",
              f"--precision.master_rounding={rounding}", "--checkpoint.interval=5", "--schedule.decay_steps=20"]
    straight, resumed = straight_and_resumed(make_config, *common)
    assert {s: resumed.losses[s] for s in range(6, 11)} == {s: straight.losses[s] for s in range(6, 11)}
