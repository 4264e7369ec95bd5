"""Rotary position embedding (RoPE, Su et al. 2021).

Each pair of channels in a query/key head is rotated by an angle proportional
to the token's position, so q.k depends only on the *relative* distance.
We use the "rotate half" layout (channel i pairs with i + head_dim/2), the
convention of Llama in Hugging Face transformers, so weights convert as-is.
"""

from __future__ import annotations

import torch


def rope_cache(head_dim: int, max_seq_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_seq_len, head_dim] (each frequency appears twice: both halves)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [batch, heads, seq, head_dim]; cos/sin [seq, head_dim] for the positions of x, in x's dtype."""
    return x * cos + rotate_half(x) * sin
