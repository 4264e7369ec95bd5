"""The figures a training-health monitor reports, as small functions on tensors.

Each is what a learner would compute by hand; tests/unit/test_monitoring.py checks them
against longhand definitions on small tensors. monitor.py applies them to a run, with
the cross-shard sums that make a figure the one-process value under any layout.
"""

from __future__ import annotations

import math

import torch


def ema(previous: float | None, value: float, beta: float = 0.9) -> float:
    """Exponential moving average; the first value starts it (no bias towards 0)."""
    return value if previous is None else beta * previous + (1 - beta) * value


def spike_ratio(loss: float, previous_ema: float | None) -> float:
    """loss / the EMA *before* this step: 1 on a smooth curve, > 1.5 or so on a spike."""
    return 1.0 if previous_ema is None or previous_ema == 0 else loss / previous_ema


def perplexity(loss: float) -> float:
    """exp(mean cross-entropy in nats): the effective number of choices per token."""
    return math.exp(min(loss, 700.0))  # (exp overflows a float above ~709)


def entropy(logits: torch.Tensor, dim: int = -1, normalised: bool = False) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) along dim; normalised: divided by log(n),
    so 1 is uniform and 0 one-hot. -inf logits (masked positions) take no part."""
    logp = torch.log_softmax(logits.float(), dim=dim)
    p = logp.exp()
    h = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(dim)
    if normalised:
        n = torch.isfinite(logits).sum(dim).clamp(min=2)  # the positions allowed (a causal row: its prefix)
        h = h / torch.log(n.float())
    return h


def top_k_mass(logits: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Probability mass of the k most likely outcomes: near 1 when the model is sure."""
    return torch.softmax(logits.float(), dim=dim).topk(min(k, logits.shape[dim]), dim=dim).values.sum(dim)


def rms(a: torch.Tensor) -> torch.Tensor:
    return a.float().pow(2).mean().sqrt()


def outlier_rate(a: torch.Tensor, k: float = 10.0) -> torch.Tensor:
    """Fraction of entries with |a| > k · RMS(a): massive activations (Sun et al. 2024) that
    low-precision formats and quantisation struggle with."""
    a = a.float()
    return (a.abs() > k * rms(a)).float().mean()


def quantiles(values: torch.Tensor, qs=(0.5, 0.95)) -> list[float]:
    """The qs quantiles of a 1-D tensor (linear interpolation, as numpy's default)."""
    return torch.quantile(values.double(), torch.tensor(qs, dtype=torch.float64)).tolist()


def update_ratio(update_norm: torch.Tensor, weight_norm: torch.Tensor) -> torch.Tensor:
    """||ΔW|| / ||W||: how far a step moved a tensor, relative to its size. Around 1e-3 is
    the usual healthy range for AdamW (Karpathy's rule of thumb); 1e-1 is too fast."""
    return update_norm / weight_norm.clamp(min=1e-12)


def clip_coefficient(grad_norm: float, max_norm: float) -> float:
    """What clipping multiplies the gradients by (torch.nn.utils.clip_grad_norm_'s formula)."""
    return 1.0 if max_norm <= 0 else min(1.0, max_norm / (grad_norm + 1e-6))
