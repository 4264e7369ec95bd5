"""What a model is made of, before it runs: parameters per kind of module, and FLOPs per token.

The model is built on PyTorch's meta device: every parameter has its shape and dtype
but no storage, so DeepSeek-V3's 671B parameters take no memory and two seconds. The
counts are therefore the instantiated model's own tensors, whatever the config (one of
ours, or a Hugging Face config.json through models.hf.model_config_from_hf).

Kinds: embedding (token and position tables), attention (projections, MLA's low-rank
ones included), dense_mlp, routed_experts, shared_experts, router, norms, head (the output
projection; 0 when tied to the embedding), mtp (DeepSeek's multi-token prediction module).

Active parameters per token: everything but the routed experts, plus top_k / n_routed of
them (each token runs top_k experts). `active_matmul` leaves out the embedding tables:
a lookup reads one row, it multiplies nothing.

FLOPs per token (PaLM's model-FLOPs convention, as monitoring/mfu.py and the logged MFU):

    training = 6 · N_matmul + 6 · L · H · T · (d_qk + d_v)
    prefill  = 2 · N_matmul + 2 · L · H · (T+1)/2 · (d_qk + d_v) (forward over T tokens, causal:
                                                                 token t attends to t+1 positions)
    decode   = 2 · N_matmul + 2 · L · H · T · (d_qk + d_v)      (one token against T cached)

N_matmul counts each weight once per use by a token: every linear layer (the head too,
tied or not; twice with MTP, which reuses it), the router, top_k / n_routed of the routed
experts. The attention term is the scores QKᵀ (d_qk per head: head_dim, or MLA's
nope + rope) and PV (d_v); for training over the full T x T square as PaLM counts it (and
as the kernels compute it), which for a dense model with d_qk = d_v = d / H is PaLM's
12 · L · d · T. Prefill and decode count only the positions a causal mask lets through.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from ..config import ModelConfig
from ..layers import LayerNorm, Linear, RMSNorm

KINDS = ("embedding", "attention", "dense_mlp", "routed_experts", "shared_experts", "router", "norms", "head", "mtp")


def meta_model(cfg: ModelConfig, tp=None, ep=None) -> nn.Module:
    """The model with shapes and no storage (cfg: vocab_size and max_seq_len resolved)."""
    from ..models import build_model

    with torch.device("meta"):
        return build_model(cfg, tp, ep)


def kind_of(name: str, module: nn.Module | None = None) -> str:
    """The kind of a parameter (or module) from its name and type."""
    parts = name.split(".")
    if parts[0] == "mtp":
        return "mtp"
    if isinstance(module, (RMSNorm, LayerNorm)) or parts[0] == "norm" or \
            (len(parts) > 1 and parts[-2].endswith("norm")):
        return "norms"
    if parts[0] in ("tok_emb", "pos_emb"):
        return "embedding"
    if parts[0] == "head":
        return "head"
    if ".attn." in f".{name}.":
        return "attention"
    if ".experts." in f".{name}.":
        return "routed_experts"
    if ".shared_experts." in f".{name}.":
        return "shared_experts"
    if ".router." in f".{name}.":
        return "router"
    if ".mlp." in f".{name}.":
        return "dense_mlp"
    return "other"


def _top_k_fraction(cfg: ModelConfig) -> float:
    return cfg.moe_top_k / cfg.n_routed_experts if cfg.arch == "deepseek" and cfg.n_routed_experts else 1.0


def param_counts(model: nn.Module, cfg: ModelConfig) -> dict[str, dict[str, int]]:
    """{kind: {"total", "active"}}, plus "all": {"total", "active", "active_matmul"}."""
    total, active = Counter(), Counter()
    frac = _top_k_fraction(cfg)
    for name, p in model.named_parameters():  # a tied head appears once, as tok_emb.weight
        kind = kind_of(name)
        total[kind] += p.numel()
        active[kind] += round(p.numel() * frac) if kind == "routed_experts" else p.numel()
    out = {k: {"total": total[k], "active": active[k]} for k in KINDS if total[k] or k in ("embedding", "head")}
    out["all"] = {"total": sum(total.values()), "active": sum(active.values()),
                  "active_matmul": sum(active.values()) - active["embedding"] - active["mtp"]}
    return out


def matmul_params_per_token(model: nn.Module, cfg: ModelConfig) -> dict[str, float]:
    """Weights a token multiplies, per kind, counted once per use (see the module docstring)."""
    frac = _top_k_fraction(cfg)
    uses = Counter()
    for name, m in model.named_modules():
        if isinstance(m, Linear):
            uses[kind_of(name + ".weight")] += m.weight.numel()
        elif name.endswith("experts") and not name.endswith("shared_experts"):  # ExpertMLP: stacked weights
            uses["routed_experts"] += sum(p.numel() for p in m.parameters()) * frac
        elif name.endswith("router"):
            uses["router"] += m.weight.numel()
    if cfg.mtp_depth:  # the MTP module reuses the head once per depth
        uses["mtp"] += cfg.mtp_depth * model.head.weight.numel()
    return dict(uses)


def attention_dims(cfg: ModelConfig) -> tuple[int, int, int]:
    """(heads, d_qk, d_v) per attention layer."""
    if cfg.arch == "deepseek":
        return cfg.n_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    hd = cfg.d_model // cfg.n_heads
    return cfg.n_heads, hd, hd


def flops_per_token(model: nn.Module, cfg: ModelConfig, seq_len: int) -> dict:
    """Training, prefill and decode FLOPs per token at context seq_len, and training per kind."""
    uses = matmul_params_per_token(model, cfg)
    n = sum(uses.values())
    heads, dqk, dv = attention_dims(cfg)
    layers = cfg.n_layers + cfg.mtp_depth  # each MTP module has one block
    attn = layers * heads * seq_len * (dqk + dv)  # multiply-adds per token, forward
    per_kind = {k: 6.0 * v for k, v in uses.items()}
    per_kind["attention_scores"] = 6.0 * attn
    causal = attn * (seq_len + 1) / (2 * seq_len)  # prefill: the mean context is (T + 1) / 2
    return {"train": 6.0 * n + 6.0 * attn, "prefill": 2.0 * n + 2.0 * causal, "decode": 2.0 * n + 2.0 * attn,
            "matmul_params": n, "train_per_kind": per_kind}


def _sdpa_forward_flops(q_shape, k_shape, v_shape) -> int:
    """Scores and weighted sum over the full Tq x Tk square (GQA: H from the queries)."""
    b, h, tq, dq = q_shape
    tk, dv = k_shape[2], v_shape[3]
    return 2 * b * h * tq * tk * (dq + dv)


_REGISTERED = False


def register_cpu_sdpa_flops() -> None:
    """torch.utils.flop_counter counts the CUDA attention kernels but not the CPU one that
    F.scaled_dot_product_attention calls here: register its formula (backward = 2 x forward,
    the four matmuls dQ, dK, dV, dP), so FlopCounterMode sees attention on CPU too; and the
    grouped GEMMs' (torch._grouped_mm)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from torch.utils.flop_counter import register_flop_formula

    aten = torch.ops.aten

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _forward(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
        return _sdpa_forward_flops(q_shape, k_shape, v_shape)

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _backward(grad_shape, q_shape, k_shape, v_shape, *args, **kwargs) -> int:
        return 2 * _sdpa_forward_flops(q_shape, k_shape, v_shape)

    # The grouped expert GEMMs (models/grouped.py), which flop_counter does not know either:
    # [M, K] x [E, K, N] with rows in groups is 2MKN, as the experts' loop of matmuls; its
    # backward's weight gradient, [K, M] x [M, N] grouped along M into [E, K, N], is 2KMN.
    if hasattr(aten, "_grouped_mm"):
        @register_flop_formula(aten._grouped_mm)
        def _grouped(a_shape, b_shape, *args, **kwargs) -> int:
            return 2 * a_shape[-2] * a_shape[-1] * b_shape[-1]

    _REGISTERED = True
