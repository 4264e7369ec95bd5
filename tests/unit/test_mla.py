"""Multi-head latent attention and YaRN: equal to transformers' DeepSeek-V3 / Llama in fp32.

Everything is built locally from tiny configs with random weights; nothing is downloaded."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.models.deepseek_v3.modeling_deepseek_v3 import (  # noqa: E402
    DeepseekV3Attention, DeepseekV3RotaryEmbedding)
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

from nanotrain.models.mla import MLAttention  # noqa: E402
from nanotrain.module_spec import mark  # noqa: E402
from nanotrain.models.documents import Positions  # noqa: E402
from nanotrain.models.rope import deinterleave, rope_cache, rotary_tables, yarn_mscale  # noqa: E402

D, H, KV_RANK, NOPE, ROPE, V, MAX_POS, T = 64, 4, 16, 8, 4, 8, 64, 32
THETA = 10000.0
DEFAULT = {"rope_type": "default", "rope_theta": THETA}
YARN = {"rope_type": "yarn", "rope_theta": THETA, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
HF_TO_OURS = {"q_proj": "wq", "q_a_proj": "wq_a", "q_a_layernorm": "q_norm", "q_b_proj": "wq_b",
              "kv_a_proj_with_mqa": "wkv_a", "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b", "o_proj": "wo"}


def our_scaling(rope_parameters: dict) -> dict | None:
    """transformers' rope_parameters -> rope.py's `scaling` (None for plain RoPE)."""
    p = rope_parameters
    if p["rope_type"] == "default":
        return None
    return {"type": p["rope_type"], "factor": p["factor"],
            "original_max_position": p["original_max_position_embeddings"],
            **{k: p[k] for k in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim") if k in p}}


def hf_attention(q_lora_rank: int, rope_parameters: dict, interleave: bool, seed: int):
    cfg = transformers.DeepseekV3Config(
        hidden_size=D, num_attention_heads=H, num_key_value_heads=H, q_lora_rank=q_lora_rank or None,
        kv_lora_rank=KV_RANK, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=V,
        max_position_embeddings=MAX_POS, rope_parameters=dict(rope_parameters), rope_interleave=interleave)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    attn = DeepseekV3Attention(cfg, layer_idx=0).float().eval()
    with torch.no_grad():  # HF initialises RMSNorm weights to 1: randomise them, so a swapped norm shows
        for name, p in attn.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 1.5)
    return cfg, attn


def ours_from_hf(hf, q_lora_rank: int, rope_parameters: dict, interleaved: bool, permute_rope_rows: bool = False):
    ours = MLAttention(D, H, q_lora_rank, KV_RANK, NOPE, ROPE, V, norm_eps=1e-6, init_std=0.02, out_std=0.02,
                       rope_scaling=our_scaling(rope_parameters), rope_interleaved=interleaved).eval()
    state = {HF_TO_OURS[name.split(".")[0]] + ".weight": w.clone() for name, w in hf.state_dict().items()}
    if permute_rope_rows:  # convert interleaved rope weights once, instead of at every forward
        perm = deinterleave(torch.arange(ROPE))
        wkv_a = state["wkv_a.weight"]
        wkv_a[KV_RANK:] = wkv_a[KV_RANK:][perm]
        wq = state["wq_b.weight" if q_lora_rank else "wq.weight"].view(H, NOPE + ROPE, -1)
        wq[:, NOPE:] = wq[:, NOPE:][:, perm]
    ours.load_state_dict(state, strict=True)
    return ours


def causal_mask(t: int) -> torch.Tensor:
    # Eager attention adds the mask to the logits: [batch, 1, q, k], -inf above the diagonal.
    return torch.full((t, t), float("-inf")).triu(1)[None, None]


CASES = [  # (q_lora_rank, rope_parameters, HF rope_interleave, our rope_interleaved, permute our rope rows)
    pytest.param(32, DEFAULT, True, True, False, id="qlora-rope-interleaved"),
    pytest.param(0, DEFAULT, True, True, False, id="noqlora-rope-interleaved"),
    pytest.param(32, YARN, True, True, False, id="qlora-yarn-interleaved"),
    pytest.param(0, YARN, True, True, False, id="noqlora-yarn-interleaved"),
    pytest.param(32, YARN, True, False, True, id="qlora-yarn-permuted-weights"),
    pytest.param(32, YARN, False, False, False, id="qlora-yarn-rotate-half"),
]


@pytest.mark.parametrize("q_lora_rank,rope_parameters,hf_interleave,interleaved,permute", CASES)
def test_matches_hf_deepseek_v3_attention(q_lora_rank, rope_parameters, hf_interleave, interleaved, permute):
    cfg, hf = hf_attention(q_lora_rank, rope_parameters, hf_interleave, seed=q_lora_rank)
    ours = ours_from_hf(hf, q_lora_rank, rope_parameters, interleaved, permute)
    assert ours.softmax_scale == pytest.approx(hf.scaling, rel=1e-12)
    x = torch.randn(2, T, D, generator=torch.Generator().manual_seed(1))
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    position_embeddings = DeepseekV3RotaryEmbedding(cfg)(x, torch.arange(T)[None])
    want = hf(x_hf, position_embeddings, causal_mask(T))[0]
    got = ours(x_ours, Positions(rotary_tables(ROPE, MAX_POS, THETA, our_scaling(rope_parameters))))
    assert (got - want).abs().max().item() <= 1e-5
    want.square().sum().backward()
    got.square().sum().backward()
    assert (x_ours.grad - x_hf.grad).abs().max().item() <= 1e-4


def test_causal_masking():
    """Changing token t never changes an output at a position before t."""
    _, hf = hf_attention(32, YARN, True, seed=3)
    ours = ours_from_hf(hf, 32, YARN, True)
    rope = Positions(rotary_tables(ROPE, MAX_POS, THETA, our_scaling(YARN)))
    x = torch.randn(2, T, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = ours(x, rope)
        for t in (0, 7, T - 1):
            x2 = x.clone()
            x2[:, t] += 1.0
            out = ours(x2, rope)
            torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
            assert not torch.allclose(out[:, t], base[:, t])


def test_core_dtype_under_autocast():
    """bf16 projections with an fp32 RoPE + attention core stay close to all-fp32."""
    _, hf = hf_attention(32, YARN, True, seed=4)
    ours = ours_from_hf(hf, 32, YARN, True)
    rope = Positions(rotary_tables(ROPE, MAX_POS, THETA, our_scaling(YARN)))
    x = torch.randn(2, T, D, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = ours(x, rope)
        mark(ours, core_dtype=torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ours(x, rope)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("extra", [{}, {"mscale": 0.707, "mscale_all_dim": 1.0}],
                         ids=["mscale-default", "mscale-ratio"])
def test_yarn_rope_cache_matches_hf(extra):
    params = {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0, "original_max_position_embeddings": 16,
              **extra}
    cfg = transformers.LlamaConfig(hidden_size=D, num_attention_heads=H, max_position_embeddings=MAX_POS,
                                   rope_parameters=dict(params))
    head_dim = D // H
    want_cos, want_sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1), torch.arange(MAX_POS)[None])
    cos, sin = rope_cache(head_dim, MAX_POS, 500000.0, our_scaling(params))
    assert (cos - want_cos[0]).abs().max().item() <= 1e-6
    assert (sin - want_sin[0]).abs().max().item() <= 1e-6


def test_rope_cache_without_scaling_unchanged():
    head_dim, n, theta = 16, 64, 500000.0
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(n, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = rope_cache(head_dim, n, theta)
    assert torch.equal(cos, angles.cos().float()) and torch.equal(sin, angles.sin().float())


def test_yarn_mscale():
    assert yarn_mscale(1.0) == 1.0 and yarn_mscale(0.5, 2.0) == 1.0
    assert yarn_mscale(40.0, 0.707) == pytest.approx(0.1 * 0.707 * 3.6888794541139363 + 1.0)
