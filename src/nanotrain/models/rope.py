"""Rotary position embedding (RoPE, Su et al. 2021), with YaRN context extension.

Each pair of channels in a query/key head is rotated by an angle proportional
to the token's position, so q.k depends only on the *relative* distance.
We use the "rotate half" layout (channel i pairs with i + head_dim/2), the
convention of Llama in Hugging Face transformers, so weights convert as-is.

YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large
Language Models") stretches a model trained on `original_max_position` tokens
to `factor` times as many. Per frequency it blends two choices:

    high frequencies (many rotations within the original window): keep as-is
        ("extrapolate"): they encode local order, which is already learned;
    low frequencies (less than one rotation): divide by `factor`
        ("interpolate", Position Interpolation): unseen angles would be out of
        distribution, squeezed ones are not;
    in between: a linear ramp over the channel index (the paper's gamma).

and scales the logits by a temperature: cos/sin are multiplied by
sqrt(1/t) = 0.1 ln(factor) + 1 (the paper's "mscale"), so q.k grows by its
square. DeepSeek-V2/V3 split that factor between cos/sin and the softmax
scale (mscale / mscale_all_dim; see mla.py).
"""

from __future__ import annotations

import math

import torch


def rope_cache(head_dim: int, max_seq_len: int, theta: float = 10000.0,
               scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_seq_len, head_dim] (each frequency appears twice: both halves).

    `scaling` (None: plain RoPE) = {"type": "yarn", "factor", "original_max_position",
    optional "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"}.
    """
    if scaling is None:
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        attention_factor = 1.0
    else:
        kind = scaling.get("type", scaling.get("rope_type"))
        if kind != "yarn":
            raise ValueError(f"unsupported rope scaling type {kind!r} (only 'yarn')")
        inv_freq = yarn_inv_freq(head_dim, theta, scaling["factor"], scaling["original_max_position"],
                                 scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1,
                                 scaling.get("truncate", True))
        attention_factor = yarn_attention_factor(scaling)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    # YaRN's temperature rides on cos/sin: both q and k get it, so q.k gets its square.
    return (angles.cos() * attention_factor).float(), (angles.sin() * attention_factor).float()


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """sqrt(1/t) of the YaRN paper (eq. 22 with DeepSeek's extra multiplier): 0.1*mscale*ln(factor) + 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(scaling: dict) -> float:
    """The factor on cos/sin, as transformers' _compute_yarn_parameters chooses it.

    With both mscale and mscale_all_dim (DeepSeek) it is their ratio, which is 1 when
    they are equal: DeepSeek then puts the whole temperature into the softmax scale."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, mscale, mscale_all_dim = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


def yarn_inv_freq(head_dim: int, theta: float, factor: float, original_max_position: int,
                  beta_fast: float = 32, beta_slow: float = 1, truncate: bool = True) -> torch.Tensor:
    """Per-pair inverse frequencies [head_dim/2] (float64), blended between original and /factor."""
    def correction_dim(num_rotations: float) -> float:
        # The (fractional) pair index whose wavelength fits `num_rotations` times into the
        # original window: 2*pi*theta^(2d/D) = L / r  solved for d.
        return head_dim * math.log(original_max_position / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    # Pairs below `low` rotate more than beta_fast times (keep), above `high` less than beta_slow (scale).
    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    interpolation = extrapolation / factor
    return extrapolation * (1 - ramp) + interpolation * ramp  # ramp 0: high frequency, kept


def rotary_tables(head_dim: int, max_seq_len: int, theta: float = 10000.0,
                  scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables a model holds for apply_rope: rope_cache's cos, and its sin with the first half
    negated (the sign of rotate_half, put in the table once instead of into every call)."""
    cos, sin = rope_cache(head_dim, max_seq_len, theta, scaling)
    half = head_dim // 2
    return cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def rope_tables(rope: tuple[torch.Tensor, torch.Tensor], seq_len: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The first seq_len rows of rotary_tables' (cos, signed sin), in dtype; tables already
    gathered per token ([B, 1, T, d]: positions that restart in each document, documents.py)
    as they are."""
    if rope[0].dim() == 4:
        return rope[0].to(dtype), rope[1].to(dtype)
    return rope[0][:seq_len].to(dtype), rope[1][:seq_len].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [batch, heads, seq, head_dim]; cos/signed_sin [seq, head_dim] (or [batch, 1, seq, head_dim])
    from rope_tables.

    The textbook form is x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1]: the
    halves swapped (a roll by head_dim/2) with the first negated, and the sign can ride on
    sin instead (rotary_tables). One roll and one addcmul then replace chunk, neg, cat, mul and
    add: at nanoGPT's CPU size (head_dim 32, 64 positions) RoPE's forward and backward are a few
    hundred microseconds of per-op overhead per layer, and this cuts about a third of them."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE layout -> rotate-half layout: [x0, x1, x2, x3, ...] -> [x0, x2, ..., x1, x3, ...].

    DeepSeek's checkpoints (and Meta's original Llama code, GPT-J) rotate adjacent pairs
    (2i, 2i+1); rotate_half pairs (i, i + d/2). Moving the even channels to the front
    half turns the first pairing into the second, so apply_rope(deinterleave(x)) rotates
    exactly as DeepSeek does, only with its output channels in the rotate-half order.
    Queries and keys are reordered alike, so q.k is unchanged (transformers'
    apply_rotary_pos_emb_interleave returns the same reordered output). The same
    permutation applied once to the rows of the projection that produces x gives
    weights that need no reordering at run time."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
