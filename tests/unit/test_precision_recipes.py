"""GEMM recipes against fp32, and the policy that assigns them to modules."""

import pytest
import torch

from nanotrain.config import ConfigError, load_config
from nanotrain.module_spec import module_spec
from nanotrain.precision.policy import apply_policy, describe_policy, recipe_name_for
from nanotrain.precision.recipes import (MXFP4, NVFP4, DelayedScaling, Fp8DeepSeek, Fp8Tensorwise, hadamard_16,
                                        scaled_mm_available, use_scaled_mm)

G = torch.Generator().manual_seed(0)
X = torch.randn(64, 256, generator=G)
W = torch.randn(96, 256, generator=G) * 0.05
DY = torch.randn(64, 96, generator=G)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def run(recipe, x=X, device="cpu"):
    """(y, dx, dW) of y = x Wᵀ under the recipe (recipe None: fp32), back on the CPU."""
    xr, wr = x.to(device, copy=True).requires_grad_(), W.to(device, copy=True).requires_grad_()
    y = xr @ wr.t() if recipe is None else recipe.linear(xr, wr, None, None)
    y.backward(DY.to(device))
    return y.detach().cpu(), xr.grad.cpu(), wr.grad.cpu()


# Relative (Frobenius) error bounds: a format with m mantissa bits rounds each operand to
# within 2^-(m+1) relative, about 2^-m / sqrt(12) RMS; the errors of a long dot product
# partly average out. e4m3 (m=3): measured ~0.037; e5m2 (m=2) gradients ~0.059; e2m1
# (m=1) ~0.14-0.18. The bounds leave ~30% headroom and grow as the formats shrink.
BOUNDS = {"fp8_tensorwise": (0.05, 0.08, 0.08), "fp8_deepseek": (0.05, 0.05, 0.05),
          "nvfp4": (0.2, 0.23, 0.23), "mxfp4": (0.22, 0.22, 0.22)}


@pytest.mark.parametrize("recipe", [Fp8Tensorwise(), Fp8DeepSeek(), NVFP4(), MXFP4()], ids=lambda r: r.name)
def test_forward_and_backward_against_fp32(recipe):
    exact = run(None)
    got = run(recipe)
    errors = [rel(g, e) for g, e in zip(got, exact)]
    assert all(0 < err <= bound for err, bound in zip(errors, BOUNDS[recipe.name])), errors


def test_fp8_tensorwise_is_the_float8_product():
    """Independent definition: cast to torch's e4m3 after dividing by amax/448, multiply back, fp32 GEMM."""
    def q(t):
        s = t.abs().max() / 448
        return (t / s).to(torch.float8_e4m3fn).float() * s

    y, _, _ = run(Fp8Tensorwise())
    assert torch.allclose(y, q(X) @ q(W).t(), rtol=1e-6, atol=1e-6)


def test_blockwise_scaling_contains_an_outlier_channel():
    """DeepSeek-V3's reason for 1x128 tiles: an outlier channel (here 10^6 x the rest) sets the
    scale of its own tiles only. With one scale per tensor the other values fall into e4m3's
    subnormals and lose most of their bits; per tile they keep e4m3's usual ~3.7% error."""
    x = X.clone()
    x[:, 7] *= 1e6
    rest = slice(128, 256)  # the tiles without the outlier
    err = {r.name: rel(r.quant(x, "x", None)[:, rest], x[:, rest]) for r in (Fp8Tensorwise(), Fp8DeepSeek())}
    assert err["fp8_deepseek"] < 0.05 < 0.3 < err["fp8_tensorwise"], err


def test_hadamard_transform_cancels_in_the_product():
    a, b = torch.randn(5, 40), torch.randn(7, 40)  # 40: padded to 48 inside
    signs = torch.where(torch.rand(16) < 0.5, -1.0, 1.0)
    ha, hb = hadamard_16(a, signs), hadamard_16(b, signs)
    assert torch.allclose(ha @ hb.t(), a @ b.t(), atol=1e-5)
    assert not torch.allclose(ha[:, :40], a)


def test_delayed_scaling_uses_the_history():
    d = DelayedScaling(history_len=3)
    amaxes = [d.amax("x", torch.tensor([v])).item() for v in (2.0, 1.0, 5.0, 1.0, 1.0, 1.0, 1.0)]
    # step 1: no history, its own amax; then the max of the last 3 steps before this one.
    assert amaxes == [2.0, 2.0, 2.0, 5.0, 5.0, 5.0, 1.0]
    q, _ = Fp8Tensorwise().quant(torch.tensor([1.0, 10.0]), "x", d.at("w1")), None
    assert torch.isfinite(q).all()


def policy_model():
    cfg = load_config(None, ["--model.n_layers=2", "--model.vocab_size=64", "--model.max_seq_len=64",
                             "--precision.recipe=nvfp4", "--precision.overrides=layers.1.*=fp8_deepseek,re:w2$=bf16"])
    from nanotrain.models import build_model
    model = build_model(cfg.model)
    model.init_weights(0)
    return model, cfg.precision


def test_policy_assigns_recipes_by_pattern():
    model, p = policy_model()
    chosen = apply_policy(model, p)
    assert chosen["layers.0.attn.wq"] == "nvfp4" and chosen["layers.1.attn.wq"] == "fp8_deepseek"
    assert chosen["layers.0.mlp.w2"] == chosen["layers.1.mlp.w2"] == "bf16"  # the last match wins
    assert chosen["head"] == "bf16"  # low_bit_exclude
    layer = model.layers["0"]
    assert module_spec(layer.attn.wq).gemm_recipe is module_spec(layer.mlp.w1).gemm_recipe  # one NVFP4 object
    assert "nvfp4: 6 module(s)" in describe_policy(chosen)  # wq wk wv wo w1 w3
    x = torch.randint(0, 64, (2, 16))
    loss = model(x, x)
    loss.backward()
    assert torch.isfinite(loss) and model.layers["0"].attn.wq.weight.grad is not None
    assert recipe_name_for("head", p) == "bf16"


def test_policy_config_errors():
    with pytest.raises(ConfigError, match="must be 'pattern=recipe'"):
        load_config(None, ["--precision.overrides=head=fp9"])
    with pytest.raises(ConfigError, match="not a valid regex"):
        load_config(None, ["--precision.overrides=re:(head=bf16"])
    with pytest.raises(ConfigError, match="precision.recipe='fp6'"):
        load_config(None, ["--precision.recipe=fp6"])


def test_delayed_scaling_records_training_gemms_only():
    """Through the layer: forward and backward GEMMs add to their histories; an evaluation
    forward (no grad) reads them and adds nothing."""
    d = DelayedScaling(history_len=4)
    recipe = Fp8Tensorwise()
    x, w = X.clone().requires_grad_(), W.clone().requires_grad_()
    for _ in range(2):
        recipe.linear(x, w, None, d).backward(DY)
    with torch.no_grad():
        recipe.linear(X * 100, W, None, d)
    assert set(d.histories) == {"x", "w", "dy", "w_t", "dy_t", "x_t"}
    assert all((h > 0).sum() == 2 for h in d.histories.values())
    assert d.histories["x"][0] == X.abs().max()  # not the evaluation's 100x


def test_fp8_custom_granularities():
    from nanotrain.precision.recipes import Fp8Custom, scaled
    from nanotrain.precision import E4M3, quantize

    # The DeepSeek-V3 choice, spelled out, is the fp8_deepseek recipe exactly.
    assert all(torch.equal(a, b) for a, b in zip(run(Fp8Custom("tile", "block", "tile")), run(Fp8DeepSeek())))
    # Per channel: one scale per row (the reduction dimension is last), from that row's amax.
    rows = scaled(X, E4M3, "channel")
    for i in (0, 17, 63):
        s = X[i].abs().max() / 448
        assert torch.equal(rows[i], quantize(X[i] / s, E4M3) * s)
    exact = run(None)
    for gran in ("tensor", "channel", "tile", "block"):
        errors = [rel(g, e) for g, e in zip(run(Fp8Custom(gran, gran, gran)), exact)]
        assert max(errors) < 0.05, (gran, errors)
    e5m2 = [rel(g, e) for g, e in zip(run(Fp8Custom(grad_format="e5m2")), exact)]
    assert e5m2[0] < 0.05 and 0.05 < e5m2[1] < 0.08  # gradients lose a mantissa bit
    sr = run(Fp8Custom(grad_rounding="stochastic"))
    nearest = run(Fp8Custom())
    assert torch.equal(sr[0], nearest[0]) and not torch.equal(sr[1], nearest[1])  # only gradients change


def test_training_log_names_every_modules_recipe(make_config):
    import json

    from nanotrain.runtime import RuntimeEngine

    result = RuntimeEngine(make_config("--precision.recipe=mxfp4", "--precision.overrides=layers.1.mlp.*=fp32",
                                       "--train.max_steps=2", "--schedule.decay_steps=20")).run()
    policy = json.loads((result.out_dir / "precision_policy.json").read_text())
    assert policy["layers.0.mlp.w1"] == "mxfp4" and policy["layers.1.mlp.w2"] == "fp32" and policy["head"] == "bf16"
    assert len(policy) == 2 * 7 + 1  # wq wk wv wo w1 w2 w3 per block, and the head


needs_scaled_mm = pytest.mark.skipif(not scaled_mm_available(torch.device("cpu")),
                                     reason="this torch build has no CPU kernel for torch._scaled_mm")


@needs_scaled_mm
def test_scaled_mm_path_is_the_emulation():
    """torch._scaled_mm (the hardware fp8 GEMM; this build also runs it on CPU) multiplies the
    same fp8 codes and applies the same scales: y, dx and dW equal the emulation's up to the
    order of the fp32 sums.

    Where the kernel itself refuses the product, the run names it and the test skips with its
    message: with oneDNN limited to AVX2 on a CPU with AMX (make test-avx2), once a bf16 matmul has
    run in the process, this build sends _scaled_mm to oneDNN, which then has no fp8 matmul."""
    emulated = run(Fp8Tensorwise(0, "emulated"))
    try:
        fp8 = run(Fp8Tensorwise(0, "scaled_mm"))
    except RuntimeError as e:
        if "torch._scaled_mm could not run" not in str(e):
            raise
        pytest.skip(str(e))
    for a, b in zip(fp8, emulated):
        assert rel(a, b) < 1e-6
    assert not use_scaled_mm("auto", X, W)  # auto: CUDA only (the CPU kernel is slower than the emulation)


@pytest.mark.skipif(not torch.cuda.is_available() or not scaled_mm_available(torch.device("cuda")),
                    reason="needs a CUDA GPU with fp8 matmuls (sm_89+); bench/gpu_check.sh runs it there")
def test_scaled_mm_on_cuda_is_the_cpu_emulation():
    """The hardware fp8 GEMM (cuBLAS through torch._scaled_mm, on the GPU) against the exact emulation
    on the CPU: the same e4m3/e5m2 codes and scales, so only the accumulation differs. Hopper's fp8
    tensor cores accumulate with about 14 bits of mantissa (DeepSeek-V3, section 3.3.2), not fp32's 23:
    relative error up to ~2^-14 ~ 6e-5 per partial sum of a 256-long dot product, hence the 1e-3 bound."""
    emulated = run(Fp8Tensorwise(0, "emulated"))
    fp8 = run(Fp8Tensorwise(0, "scaled_mm"), device="cuda")
    diffs = [rel(a, b) for a, b in zip(fp8, emulated)]
    print("cuda _scaled_mm vs cpu emulation, relative (y, dx, dW): " + ", ".join(f"{d:.2e}" for d in diffs))
    assert max(diffs) < 1e-3


@needs_scaled_mm
def test_scaled_mm_names_shapes_it_cannot_take():
    with pytest.raises(RuntimeError, match="multiples of 16"):
        Fp8Tensorwise(0, "scaled_mm").linear(torch.randn(5, 32), torch.randn(16, 32), None, None)


def test_the_tp_rounding_probe_splits_only_row_parallel_gemms():
    """verify's tp rounding probe (policy.SPLIT_K): a row-parallel GEMM on one process is computed as
    tp ranks compute it, K slices whose bf16 products are summed in bf16, bit for bit; the same sum
    in fp32 to rounding; a column GEMM as it is."""
    import torch

    from nanotrain.module_spec import module_spec
    from nanotrain.parallel.tensor_parallel import column_linear, row_linear
    from nanotrain.precision import policy

    torch.manual_seed(0)
    row, col = row_linear(64, 16, False, 0.02, None), column_linear(64, 16, False, 0.02, None)
    for m in (row, col):
        torch.nn.init.normal_(m.weight)
    assert module_spec(row).row_parallel and not module_spec(col).row_parallel
    x = torch.randn(8, 64)
    policy.SPLIT_K = 4
    try:
        with torch.autocast("cpu", torch.bfloat16):
            split, column = row(x), col(x)
            by_hand = sum((torch.nn.functional.linear(a, w) for a, w in zip(x.chunk(4, -1), row.weight.chunk(4, -1))),
                          torch.zeros(8, 16, dtype=torch.bfloat16))
            whole = torch.nn.functional.linear(x, row.weight)
        assert split.dtype == torch.bfloat16 and torch.equal(split, by_hand) and not torch.equal(split, whole)
        assert torch.equal(column, torch.nn.functional.linear(x.bfloat16(), col.weight.bfloat16()))
        assert torch.allclose(row(x), x @ row.weight.t(), rtol=1e-5, atol=1e-5)  # fp32: the same sum
    finally:
        policy.SPLIT_K = 1
