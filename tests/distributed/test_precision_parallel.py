"""Precision recipes under tensor parallelism and ZeRO: low-bit recipes train as they do on
one process, and an fp16 overflow on one rank makes every rank skip the step."""

import dataclasses

import pytest

from nanotrain.config import Config
from nanotrain.parallel.launch import run_world
from nanotrain.runtime import RuntimeEngine
from nanotrain.params import spec
from test_resume_across_layouts import SMALL, run_config

LAYOUT = ["--parallel.tp=2", "--parallel.dp=2", "--parallel.sequence_parallel=true"]


def _train(cfg_dict, inf_rank=None):
    """Train; with inf_rank, that rank's embedding output becomes inf in the forward of step 3
    (an fp16 overflow on one rank: its gradients turn inf/NaN and the sums carry them on)."""
    import torch.distributed as dist

    from nanotrain.runtime.components import default_components

    components = default_components()
    if inf_rank is not None:
        build, calls = components.model.build, []

        def poisoned(ctx):
            model = build(ctx)

            def hook(module, args, out):
                if not module.training:  # the probe batch's forwards (monitoring/probe.py) do not count
                    return out
                calls.append(1)
                return out * float("inf") if len(calls) == 3 and dist.get_rank() == inf_rank else out

            model.tok_emb.register_forward_hook(hook)
            return model

        components.model.build = poisoned
    engine = RuntimeEngine(Config.from_dict(cfg_dict), components)
    result = engine.run()
    return result.losses, engine.scaler.state_dict() if engine.scaler is not None else None


@pytest.mark.parametrize("recipe,zero", [("fp8_deepseek", 1), ("nvfp4", 2), ("fp8_tensorwise", 2)])
def test_low_bit_recipe_under_tp_and_zero(tmp_path, recipe, zero):
    def cfg(out, *extra):
        return run_config(tmp_path, out, *SMALL, f"--precision.recipe={recipe}", "--train.max_steps=12", *extra)

    one, _ = _train(dataclasses.asdict(cfg("one")))
    par, _ = run_world(_train, 4, dataclasses.asdict(cfg("par", *LAYOUT, f"--optimizer.zero_stage={zero}")))[0]
    assert par[12] < par[1] - 0.1  # it trains
    for step in (1, 6, 12):  # quantisation of tp shards differs from the whole tensor's: close, not equal
        assert par[step] == pytest.approx(one[step], rel=0.03), step


def test_fp16_overflow_on_one_rank_is_skipped_by_all(tmp_path):
    cfg = run_config(tmp_path, "par", *SMALL, *LAYOUT, "--optimizer.zero_stage=2", "--precision.recipe=fp16",
                     "--precision.loss_scale.init=1024", "--precision.loss_scale.hysteresis=1",
                     "--train.max_steps=6")
    results = run_world(_train, 4, dataclasses.asdict(cfg), 3)  # rank 3: tp rank 1 of dp rank 1
    for losses, scaler in results:
        assert scaler["skipped"] == 1 and scaler["scale"] == 512  # every rank skipped step 3
        assert losses[6] < losses[1]
        assert {s: losses[s] for s in (1, 2, 4, 5, 6)} == {s: results[0][0][s] for s in (1, 2, 4, 5, 6)}


def _max_rel(a, b, steps):
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in steps)


def _mlp_fp8_tensorwise(tp_size: int):
    """Column- then row-parallel linear (an MLP without its activation) under fp8_tensorwise,
    current scaling, on a weight whose first output rows are 100x the rest: y, and the full
    weight gradients."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from nanotrain.checkpoint import gather_full
    from nanotrain.config import FP8Config, PrecisionConfig
    from nanotrain.parallel.tensor_parallel import TensorParallel, column_linear, row_linear
    from nanotrain.precision.policy import apply_policy

    g = torch.Generator().manual_seed(0)
    w1, w2, x = torch.randn(32, 16, generator=g), torch.randn(16, 32, generator=g), torch.randn(6, 16, generator=g)
    w1[:16] *= 100  # tp rank 0's shard of w1 holds the large rows; its amax is 100x rank 1's
    tp = TensorParallel(dist.group.WORLD, dist.get_rank(), tp_size) if tp_size > 1 else None
    model = nn.Sequential(column_linear(16, 32, False, 0.02, tp), row_linear(32, 16, False, 0.02, tp))
    with torch.no_grad():
        for layer, full in zip(model, (w1, w2)):
            shard = spec(layer.weight).shard
            layer.weight.copy_(full if shard is None else full.chunk(tp_size, shard.dim)[shard.rank])
    apply_policy(model, PrecisionConfig(recipe="fp8_tensorwise", fp8=FP8Config(scaling="current"), low_bit_exclude=[]))
    xr = x.clone().requires_grad_()
    y = model(xr)
    y.square().sum().backward()
    grads = [gather_full(layer.weight.grad, spec(layer.weight).shard, dist.group.WORLD) for layer in model]
    return y.detach(), grads, xr.grad


def test_tensorwise_amax_is_reduced_over_tp():
    """Every shard of a weight (and of a row-parallel layer's input) is scaled by the whole
    tensor's amax, as Transformer Engine reduces it over the tp group, so tp=2 rounds every
    operand as one process does: only summation order is left. With per-shard amaxes rank 1's
    shard of w1 would be quantised on a 100x finer grid than on one process."""
    import torch

    one = run_world(_mlp_fp8_tensorwise, 1, 1)[0]
    two = run_world(_mlp_fp8_tensorwise, 2, 2)[0]
    for a, b in zip([two[0], *two[1], two[2]], [one[0], *one[1], one[2]]):  # y, dW1, dW2, dx
        torch.testing.assert_close(a, b, rtol=1e-4, atol=0)  # (measured: 3e-5 at most)


BF16_PARAMS = ["--precision.recipe=bf16", "--precision.param_dtype=bf16", "--precision.grad_dtype=bf16"]


@pytest.mark.parametrize("layout,zero", [(LAYOUT, 0), (LAYOUT, 2), (["--parallel.pp=2", "--parallel.dp=2"], 1)],
                         ids=["tp2-dp2-sp", "tp2-dp2-sp-zero2", "pp2-dp2-zero1"])
def test_bf16_parameters_with_fp32_masters_under_layouts(tmp_path, layout, zero):
    """bf16 parameters (the pipeline sends bf16 activations), fp32 masters sharded by ZeRO and
    all-gathered as bf16, bf16 gradients reduced over dp: the same run as on one process,
    up to bf16 summation order."""
    def cfg(out, *extra):
        return run_config(tmp_path, out, *SMALL, *BF16_PARAMS, "--train.max_steps=8", *extra)

    one, _ = _train(dataclasses.asdict(cfg("one")))
    par, _ = run_world(_train, 4, dataclasses.asdict(cfg("par", *layout, f"--optimizer.zero_stage={zero}")))[0]
    print(f"bf16 parameters {layout} zero={zero} vs one process, max relative loss difference:",
          _max_rel(par, one, range(1, 9)))
    assert par[8] < par[1] - 0.1
    assert _max_rel(par, one, range(1, 9)) < 0.01
