"""Feed-forward blocks: MLP with GELU (GPT-2) and GatedMLP with SwiGLU (Shazeer 2020, Llama)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..layers import Linear


def ffn_width(cfg: ModelConfig) -> int:
    """d_ff from the config, or the usual default: 4d for GELU, 8d/3 (rounded up to 64) for SwiGLU,
    which keeps SwiGLU's three matrices at the parameter count of GELU's two."""
    if cfg.d_ff:
        return cfg.d_ff
    if cfg.mlp == "gelu":
        return 4 * cfg.d_model
    return 64 * math.ceil(8 * cfg.d_model / 3 / 64)


class MLP(nn.Module):
    """x -> W2 gelu(W1 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d_ff = ffn_width(cfg)
        self.w1 = Linear(cfg.d_model, d_ff, cfg.bias, cfg.init_std)
        self.w2 = Linear(d_ff, cfg.d_model, cfg.bias, cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class GatedMLP(nn.Module):
    """x -> W2 (silu(W1 x) * W3 x): SwiGLU, the gate W1 and the up projection W3 side by side."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d_ff = ffn_width(cfg)
        self.w1 = Linear(cfg.d_model, d_ff, cfg.bias, cfg.init_std)
        self.w3 = Linear(cfg.d_model, d_ff, cfg.bias, cfg.init_std)
        self.w2 = Linear(d_ff, cfg.d_model, cfg.bias, cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def make_mlp(cfg: ModelConfig) -> nn.Module:
    return MLP(cfg) if cfg.mlp == "gelu" else GatedMLP(cfg)
