"""Causal multi-head self-attention with grouped-query attention (GQA) and RoPE.

n_kv_heads == n_heads is classic multi-head attention; fewer KV heads
(Ainslie et al. 2023) let groups of query heads share one key/value head,
shrinking the KV cache. The softmax(QK^T/sqrt(d))V itself runs in PyTorch's
fused scaled_dot_product_attention.

The module's record (module_spec.py) carries what parallelize() decided for it: `cp`, the
core as a ring over the context-parallel group, and `core_dtype`, which lets the precision
policy run RoPE and the attention core in a dtype other than the surrounding autocast one. On
CPUs without AMX, PyTorch's bf16 flash-attention backward is ~3x slower than its fp32 one, so
the "auto" policy keeps the core in fp32 there (precision/policy.attention_core_dtype).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..module_spec import ATTENTION, mark, module_spec
from ..parallel.context_parallel import ring_attention
from ..parallel.tensor_parallel import TensorParallel, column_linears, enter_columns, row_linear
from .documents import Positions
from .rope import apply_rope, rope_tables


class Attention(nn.Module):
    """With tensor parallelism each rank holds n_heads/tp query heads and n_kv_heads/tp KV
    heads: wq/wk/wv are column-parallel (split by heads), wo row-parallel. With context
    parallelism (its record's cp, set by parallelize) the core runs as a ring over the cp group."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None = None):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.dropout = cfg.dropout
        mark(self, kind=ATTENTION)  # a ring under cp, in the precision policy's core dtype (module_spec.py)
        self.probe = None  # probe(self, q, k, scale): set by the training monitor to see q and k
        std = cfg.init_std
        # Separate q/k/v weights (not one fused qkv matrix): with GQA their widths differ, and a
        # tensor-parallel split then cuts each one by heads. Under tp they share one entry into
        # the region (column_linears): one collective for the three, as a fused QKV.
        self.tp = tp
        self.wq, self.wk, self.wv = column_linears(
            cfg.d_model, [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim,
                          self.n_kv_heads * self.head_dim], cfg.bias, std, tp)
        # GPT-2's scaled init: residual-branch outputs shrink with depth so the
        # residual stream's variance stays O(1) after 2*n_layers additions.
        self.wo = row_linear(self.n_heads * self.head_dim, cfg.d_model, cfg.bias, std / math.sqrt(2 * cfg.n_layers), tp)

    def forward(self, x: torch.Tensor, pos: Positions) -> torch.Tensor:
        # Head counts come from the projection widths, so a projection that holds
        # only some heads (tensor parallel) gives a block that computes only those;
        # T comes from q, as with sequence parallelism x holds only T/tp positions.
        x = enter_columns(x, self.tp)  # under tp: gathered (sp) or copied, once for q, k and v
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        B, T = q.shape[:2]
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, T, hd]
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)
        out_dtype, spec = v.dtype, module_spec(self)
        if spec.core_dtype is not None:
            q, k, v = q.to(spec.core_dtype), k.to(spec.core_dtype), v.to(spec.core_dtype)
        if pos.rope is not None:
            cos, sin = rope_tables(pos.rope, T, q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.probe is not None:  # monitoring (monitoring/internals.py) on a logging step
            self.probe(self, q, k, self.head_dim ** -0.5)
        # With a core dtype, autocast must be off here: it would cast q, k, v back down.
        no_autocast = torch.autocast(x.device.type, enabled=False)
        with no_autocast if spec.core_dtype is not None else contextlib.nullcontext():
            if spec.cp is not None:  # this rank's zigzag tokens against the whole sequence, as a ring
                y = ring_attention(q, k, v, spec.cp)
            else:
                y = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=pos.attention_mask(q.dtype), is_causal=pos.mask is None,
                    dropout_p=self.dropout if self.training else 0.0,
                    enable_gqa=q.shape[1] != k.shape[1],
                )
        return self.wo(y.to(out_dtype).transpose(1, 2).reshape(B, T, -1))
