"""Feed-forward blocks: MLP with GELU (GPT-2) and GatedMLP with SwiGLU (Shazeer 2020, Llama)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..parallel.tensor_parallel import TensorParallel, column_linear, column_linears, enter_columns, row_linear


def ffn_width(cfg: ModelConfig) -> int:
    return cfg.ffn_width()


class MLP(nn.Module):
    """x -> W2 gelu(W1 x). Tensor parallel: W1 column-parallel, W2 row-parallel (d_ff split)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None = None):
        super().__init__()
        d_ff = ffn_width(cfg)
        self.w1 = column_linear(cfg.d_model, d_ff, cfg.bias, cfg.init_std, tp)
        self.w2 = row_linear(d_ff, cfg.d_model, cfg.bias, cfg.init_std / math.sqrt(2 * cfg.n_layers), tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class GatedMLP(nn.Module):
    """x -> W2 (silu(W1 x) * W3 x): SwiGLU, the gate W1 and the up projection W3 side by side.
    Under tp W1 and W3 enter the region together: one collective for both (column_linears)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None = None):
        super().__init__()
        d_ff = ffn_width(cfg)
        self.tp = tp
        self.w1, self.w3 = column_linears(cfg.d_model, [d_ff, d_ff], cfg.bias, cfg.init_std, tp)
        self.w2 = row_linear(d_ff, cfg.d_model, cfg.bias, cfg.init_std / math.sqrt(2 * cfg.n_layers), tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = enter_columns(x, self.tp)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def make_mlp(cfg: ModelConfig, tp: TensorParallel | None = None) -> nn.Module:
    return MLP(cfg, tp) if cfg.mlp == "gelu" else GatedMLP(cfg, tp)
