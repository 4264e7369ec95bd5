"""Persistent low-bit weights (precision/lowbit.py): codes, scales, training, checkpoints."""

import pytest
import torch

from conftest import straight_and_resumed, tiny_config
from nanotrain.checkpoint import CheckpointReader
from nanotrain.module_spec import module_spec
from nanotrain.precision.lowbit import NF4_LEVELS, LowBitWeight
from nanotrain.runtime import RuntimeEngine
from nanotrain.params import spec


def _weight(rows=24, cols=40, decades=4):
    return torch.randn(rows, cols) * torch.logspace(-decades, 0, rows).unsqueeze(1)  # rows 10^decades apart


@pytest.mark.parametrize("scaling", ["tensor", "channel"])
def test_fp8_codes_are_torch_e4m3_of_the_scaled_weight(scaling):
    w = _weight()
    store = LowBitWeight("fp8", scaling, w.shape, w.device)
    store.store(w)
    amax = w.abs().amax(dim=1, keepdim=True) if scaling == "channel" else w.abs().max()
    scale = amax / 448.0
    assert torch.equal(store.codes, (w / scale).to(torch.float8_e4m3fn))  # torch's own cast (no overflow here)
    assert torch.equal(store.dequantize(), store.codes.float() * scale)
    assert store.nbytes() == w.numel() + 4 * (w.shape[0] if scaling == "channel" else 1)


@pytest.mark.parametrize("scaling", ["tensor", "channel"])
def test_nf4_codes_are_the_nearest_level_packed_two_per_byte(scaling):
    w = _weight(7, 9)  # an odd number of values: the last byte is half used
    store = LowBitWeight("nf4", scaling, w.shape, w.device)
    store.store(w)
    absmax = w.abs().amax(dim=1, keepdim=True) if scaling == "channel" else w.abs().max()
    normed = (w / absmax).reshape(-1)
    nearest = (normed[:, None] - NF4_LEVELS[None, :]).abs().argmin(dim=1)  # brute force over the 16 levels
    unpacked = torch.stack([store.codes & 0xF, store.codes >> 4], 1).reshape(-1)[:w.numel()]
    assert torch.equal(unpacked.long(), nearest)
    assert torch.allclose(store.dequantize(), (NF4_LEVELS[nearest].reshape(w.shape) * absmax))
    assert store.codes.numel() == (w.numel() + 1) // 2


def test_per_channel_scales_keep_small_rows():
    """A row 10^6 smaller than the largest: one scale per tensor puts it below e4m3's smallest
    subnormal (2^-9 of 448), so it is lost; per-channel keeps it at e4m3's relative precision."""
    w = _weight(decades=6)
    errors = {}
    for scaling in ("tensor", "channel"):
        store = LowBitWeight("fp8", scaling, w.shape, w.device)
        store.store(w)
        errors[scaling] = ((store.dequantize() - w).norm(dim=1) / w.norm(dim=1))[0].item()
    assert errors["channel"] < 0.04 < 0.3 < errors["tensor"]


ARGS = ["--train.max_steps=8", "--train.eval_interval=8", "--train.eval_steps=2", "--precision.recipe=bf16",
        "--precision.lowbit.weights=layers.*.weight", "--checkpoint.save_final=true"]


@pytest.mark.parametrize("fmt", ["fp8", "nf4"])
def test_lowbit_weights_train_and_the_model_keeps_only_codes(fmt, tmp_path):
    engine = RuntimeEngine(tiny_config(tmp_path, *ARGS, f"--precision.lowbit.format={fmt}"))
    result = engine.run()
    model, opt = engine.model, engine.optimizer
    lowbit = [(n, p) for n, p in model.named_parameters() if spec(p).lowbit is not None]
    assert lowbit and all(n.startswith("layers.") for n, _ in lowbit)
    chosen = module_spec(model).lowbit_weights
    assert "head.weight" not in chosen and "tok_emb.weight" not in chosen
    for name, p in lowbit:
        assert p.untyped_storage().nbytes() == 4  # one element: the parameter keeps its shape, not its values
        b = opt.reducer._bucket_of[p]
        off = opt.reducer._offset_of[p]
        master = b.flat[off:off + p.numel()].view(p.shape)  # the optimizer's fp32 master
        again = type(spec(p).lowbit)(fmt, "channel", p.shape, p.device)
        again.store(master)
        assert torch.equal(spec(p).lowbit.codes, again.codes)  # the codes are the quantised updated master
    numel = sum(p.numel() for _, p in lowbit)
    per_value = 1 if fmt == "fp8" else 0.5
    assert opt.state_bytes()["params"] < sum(p.numel() * 4 for p in model.parameters()) - numel * (4 - per_value) + \
        numel  # scales only on top
    assert result.losses[8] < result.losses[1]
    # the checkpoint holds the fp32 masters under the model's names, so any reader gets real weights
    reader = CheckpointReader(sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1])
    name, p = lowbit[0]
    b, off = opt.reducer._bucket_of[p], opt.reducer._offset_of[p]
    assert torch.equal(reader.full(f"model/{name}"), b.flat[off:off + p.numel()].view(p.shape))


def test_lowbit_resume_is_bit_exact(make_config):
    common = ["--precision.lowbit.weights=layers.*.weight", "--precision.lowbit.format=nf4",
              "--checkpoint.interval=5", "--schedule.decay_steps=20"]
    straight, resumed = straight_and_resumed(make_config, *common)
    assert {s: resumed.losses[s] for s in range(6, 11)} == {s: straight.losses[s] for s in range(6, 11)}


def test_a_pattern_that_matches_nothing_is_named(tmp_path):
    from nanotrain.config import ConfigError
    with pytest.raises(ConfigError, match="matches no linear layer"):
        RuntimeEngine(tiny_config(tmp_path, "--precision.lowbit.weights=nothing.*")).run()
