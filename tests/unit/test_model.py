"""TransformerModel: causality, layout-invariant init, loss normalisation, shapes."""

import dataclasses

import pytest
import torch

from nanotrain.config import ModelConfig
from nanotrain.layers import Linear, Shard, init_parameters
from nanotrain.models import TransformerModel
from nanotrain.precision.policy import set_attention_core
from nanotrain.params import declare

VARIANTS = {
    "llama": dict(norm="rmsnorm", mlp="swiglu", pos_emb="rope", n_kv_heads=2),
    "gpt2": dict(norm="layernorm", mlp="gelu", pos_emb="learned", bias=True, tie_embeddings=False),
}


def tiny(**kw) -> TransformerModel:
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, **kw)
    model = TransformerModel(cfg)
    model.init_weights(seed=7)
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_shape_and_loss(variant):
    model = tiny(**VARIANTS[variant])
    x = torch.randint(0, 50, (3, 16))
    assert model(x).shape == (3, 16, 50)
    loss = model(x, x.roll(-1, 1))
    assert loss.ndim == 0 and 2.5 < loss.item() < 5.5  # near ln(50)=3.9 at init


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_masking(variant):
    """Changing token t never changes a logit at a position before t."""
    model = tiny(**VARIANTS[variant]).eval()
    x = torch.randint(0, 50, (2, 16))
    base = model(x)
    for t in (0, 5, 15):
        x2 = x.clone()
        x2[:, t] = (x2[:, t] + 1) % 50
        out = model(x2)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(out[:, t], base[:, t])


def test_init_is_deterministic_and_name_keyed():
    a, b = tiny(), tiny()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    c = TransformerModel(a.cfg)
    c.init_weights(seed=8)
    assert not torch.equal(a.layers["0"].attn.wq.weight, c.layers["0"].attn.wq.weight)
    # Two matrices of the same shape get different values: the name is part of the seed.
    assert not torch.equal(a.layers["0"].attn.wq.weight, a.layers["1"].attn.wq.weight)


def test_init_of_a_shard_is_the_slice_of_the_full_tensor():
    """DESIGN invariant 1: a rank holding slice r of a weight gets exactly that slice of the
    single-process tensor (here a 'column-parallel' split of the output dim into 4)."""
    full = torch.nn.Module()
    full.proj = Linear(32, 64)
    init_parameters(full, seed=3)
    for rank in range(4):
        part = torch.nn.Module()
        part.proj = Linear(32, 16)
        declare(part.proj.weight, shard=Shard(dim=0, rank=rank, world=4))
        init_parameters(part, seed=3)
        assert torch.equal(part.proj.weight, full.proj.weight[rank * 16:(rank + 1) * 16])


def test_loss_normalised_by_global_token_count():
    """Summing micro-batch losses divided by the global count equals the full-batch mean:
    the gradient of accumulation is the gradient of the global mean loss."""
    model = tiny()
    x = torch.randint(0, 50, (4, 16))
    y = x.roll(-1, 1)
    y[0, :5] = -100  # ignored targets are excluded from the count
    full = model(x, y)
    denom = (y != -100).sum()
    parts = sum(model(x[i:i + 1], y[i:i + 1], loss_denominator=denom) for i in range(4))
    torch.testing.assert_close(parts, full, rtol=1e-6, atol=0)


def test_tied_embeddings_share_one_tensor():
    model = tiny(tie_embeddings=True)
    assert model.head.weight is model.tok_emb.weight
    names = [n for n, _ in model.named_parameters()]
    assert "head.weight" not in names and "tok_emb.weight" in names
    untied = tiny(tie_embeddings=False)
    assert untied.num_params() == model.num_params() + 50 * 32


def test_gqa_matches_repeated_kv_heads():
    """GQA with 2 KV heads equals MHA whose K/V projections repeat each KV head for its query group."""
    gqa = tiny(n_kv_heads=2).eval()
    mha = TransformerModel(dataclasses.replace(gqa.cfg, n_kv_heads=4)).eval()
    mha.load_state_dict({k: v for k, v in gqa.state_dict().items() if ".wk." not in k and ".wv." not in k},
                        strict=False)
    hd = 8
    with torch.no_grad():
        for name in ("wk", "wv"):
            for i in ("0", "1"):
                w = getattr(gqa.layers[i].attn, name).weight.view(2, hd, 32)
                getattr(mha.layers[i].attn, name).weight.copy_(w.repeat_interleave(2, dim=0).reshape(32, 32))
    x = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-5)


def test_attention_core_dtype_policy():
    """core_dtype=fp32 under bf16 autocast: outputs stay bf16-level close to the fp32 model; with
    no autocast, the fp32 model is untouched (the core never turns autocast on by itself)."""
    model = tiny(**VARIANTS["llama"])
    x = torch.randint(0, 50, (2, 16))
    ref = model(x)
    set_attention_core(model, torch.float32)
    assert torch.equal(model(x), ref)  # fp32 run: identical
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def test_rope_roll_form_matches_hf_rotate_half():
    """apply_rope's roll-and-signed-sin form rotates as transformers' Llama apply_rotary_pos_emb
    (x * cos + rotate_half(x) * sin), forward and backward, to fp32 rounding."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    from nanotrain.models.rope import apply_rope, rope_cache, rope_tables, rotary_tables
    torch.manual_seed(0)
    B, H, T, hd = 2, 3, 10, 16
    q, k = (torch.randn(B, H, T, hd, dtype=torch.float64, requires_grad=True) for _ in range(2))
    cos, sin = (t.double() for t in rope_cache(hd, 32))  # HF's tables
    want_q, want_k = llama.apply_rotary_pos_emb(q, k, cos[:T][None], sin[:T][None])
    got_q, got_k = (apply_rope(x, *rope_tables(rotary_tables(hd, 32), T, torch.float64)) for x in (q, k))
    torch.testing.assert_close(got_q, want_q, rtol=0, atol=1e-15)
    torch.testing.assert_close(got_k, want_k, rtol=0, atol=1e-15)
    g = torch.randn(B, H, T, hd, dtype=torch.float64)
    want = torch.autograd.grad(want_q, q, g)[0]
    torch.testing.assert_close(torch.autograd.grad(got_q, q, g)[0], want, rtol=0, atol=1e-15)
