"""Multi-head latent attention (MLA; DeepSeek-V2 §2.1, used again in DeepSeek-V3).

The KV cache of multi-head attention holds 2 * n_heads * head_dim numbers per
token. MLA caches a low-rank latent instead:

    c_kv = RMSNorm(x W_DKV)              [kv_lora_rank]     compressed keys+values
    k_C, v = split(c_kv W_UKV)           per head           "nope" keys, values
    k_R = RoPE(x W_KR)                   [qk_rope_head_dim] decoupled rope key, one for all heads
    k = [k_C, k_R]                       per head

so a token costs kv_lora_rank + qk_rope_head_dim numbers. RoPE cannot act on
k_C: q_C.k_C = (q_C W_UK^T) . c_kv lets inference fold the key up-projection
into the query and attend over the cache directly, and a position-dependent
rotation between the two would forbid that. So position enters only through a
few extra "decoupled" channels (q_R, k_R) that carry RoPE, k_R shared by all
heads like a one-head MQA key. Queries take the same low-rank path
(q_lora_rank > 0), which saves activation memory in training, not cache:

    q = [q_C, RoPE(q_R)] = split(RMSNorm(x W_DQ) W_UQ)    (or x W_Q when q_lora_rank == 0)

The attention itself is ordinary causal softmax attention with qk dim
nope + rope and v dim v_head_dim, which need not be equal.

Hugging Face DeepseekV3Attention -> ours (same weights, same shapes):

    q_proj             -> wq        (q_lora_rank == 0; HF's q_lora_rank=None)
    q_a_proj           -> wq_a
    q_a_layernorm      -> q_norm
    q_b_proj           -> wq_b
    kv_a_proj_with_mqa -> wkv_a     rows: [kv_lora_rank compressed | qk_rope_head_dim k_R]
    kv_a_layernorm     -> kv_norm
    kv_b_proj          -> wkv_b     rows per head: [qk_nope_head_dim k_C | v_head_dim v]
    o_proj             -> wo

HF's config.rope_interleave (default True, as DeepSeek's checkpoints) means the
rope channels are stored in interleaved pairs: build with rope_interleaved=True
(or permute those rows once with rope.deinterleave's permutation). q_a_layernorm
and kv_a_layernorm use eps 1e-6 in HF whatever rms_norm_eps says; pass norm_eps=1e-6.
HF's attention_bias (False for DeepSeek) has no counterpart here.

Tensor parallelism splits heads: wq / wq_b / wkv_b are column-parallel, wo is
row-parallel; the down-projections wq_a / wkv_a and their norms are small and
replicated on every rank, and so is k_R, which every head reads.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import Linear, RMSNorm
from ..parallel.collectives import copy_to_region, gather_seq
from ..module_spec import LATENT_ATTENTION, mark, module_spec
from ..parallel.context_parallel import ring_attention
from ..parallel.tensor_parallel import TensorParallel, column_linear, row_linear
from ..recompute import mark_up_projection
from .documents import Positions
from .rope import apply_rope, deinterleave, rope_tables, yarn_mscale


class MLAttention(nn.Module):
    """Its record (module_spec) may set cp, the core as a ring (context parallel), and core_dtype."""

    def __init__(self, d_model: int, n_heads: int, q_lora_rank: int, kv_lora_rank: int,
                 qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, norm_eps: float,
                 init_std: float, out_std: float, rope_scaling: dict | None, tp: TensorParallel | None = None,
                 rope_interleaved: bool = False, dropout: float = 0.0):
        super().__init__()
        if tp is not None and n_heads % tp.size:
            raise ValueError(f"n_heads={n_heads} is not divisible by parallel.tp={tp.size}")
        self.q_lora_rank, self.kv_lora_rank = q_lora_rank, kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.qk_dim = qk_nope_head_dim + qk_rope_head_dim
        self.rope_interleaved, self.dropout, self.tp = rope_interleaved, dropout, tp
        mark(self, kind=LATENT_ATTENTION)  # a ring under cp (module_spec.py)
        if q_lora_rank > 0:
            self.wq_a = Linear(d_model, q_lora_rank, False, init_std)
            self.q_norm = RMSNorm(q_lora_rank, norm_eps)
            self.wq_b = column_linear(q_lora_rank, n_heads * self.qk_dim, False, init_std, tp)
        else:
            self.wq = column_linear(d_model, n_heads * self.qk_dim, False, init_std, tp)
            self.wq_a = self.q_norm = self.wq_b = None  # no compressed q (V2-Lite): wq alone
        # One down-projection makes both the latent and the shared rope key.
        self.wkv_a = Linear(d_model, kv_lora_rank + qk_rope_head_dim, False, init_std)
        self.kv_norm = RMSNorm(kv_lora_rank, norm_eps)
        self.wkv_b = column_linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), False, init_std, tp)
        self.wo = row_linear(n_heads * v_head_dim, d_model, False, out_std, tp)
        # train.recompute=selective recomputes the up-projections (their per-head outputs are far
        # larger than the compressed latents they come from), as DeepSeek-V3 does (recompute.py).
        for up in (self.wq_b, self.wkv_b):
            if up is not None:
                mark_up_projection(up)
        # YaRN's temperature: DeepSeek puts mscale(factor, mscale_all_dim) on both q and k
        # (hence squared) through the softmax scale, because only the rope channels see
        # cos/sin; it then leaves cos/sin a factor of mscale/mscale_all_dim (1 in V3).
        self.softmax_scale = self.qk_dim ** -0.5
        self.probe = None  # probe(self, q, k, scale): set by the training monitor to see q and k
        if rope_scaling is not None and rope_scaling.get("mscale_all_dim"):
            self.softmax_scale *= yarn_mscale(rope_scaling["factor"], rope_scaling["mscale_all_dim"]) ** 2

    def forward(self, x: torch.Tensor, pos: Positions) -> torch.Tensor:
        # Head counts come from the projection widths (tensor parallel: this rank's heads);
        # T comes from q, as with sequence parallelism x holds only T/tp positions.
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        B, T = q.shape[:2]
        q = q.view(B, T, -1, self.qk_dim).transpose(1, 2)  # [B, H, T, nope+rope]
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.wkv_b(self.kv_norm(c_kv)).view(B, T, -1, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k_pe = self._replicate(k_pe).unsqueeze(1)  # [B, 1, T, rope]: one head, shared by all
        out_dtype, spec = v.dtype, module_spec(self)
        if spec.core_dtype is not None:
            q_nope, q_pe, k_nope, k_pe, v = (t.to(spec.core_dtype) for t in (q_nope, q_pe, k_nope, k_pe, v))
        if self.rope_interleaved:
            q_pe, k_pe = deinterleave(q_pe), deinterleave(k_pe)
        cos, sin = rope_tables(pos.rope, T, q_pe.dtype)
        q = torch.cat([q_nope, apply_rope(q_pe, cos, sin)], dim=-1)
        k = torch.cat([k_nope, apply_rope(k_pe, cos, sin).expand(-1, k_nope.shape[1], -1, -1)], dim=-1)
        if self.probe is not None:  # monitoring (monitoring/internals.py) on a logging step
            self.probe(self, q, k, self.softmax_scale)
        # With a core dtype, autocast must be off here: it would cast q, k, v back down.
        no_autocast = torch.autocast(x.device.type, enabled=False)
        with no_autocast if spec.core_dtype is not None else contextlib.nullcontext():
            # v's head dim may differ from q/k's: CPU kernels take it; on CUDA the flash kernel
            # refuses it and SDPA picks memory-efficient or cuDNN attention instead (no padding).
            if spec.cp is not None:  # context parallel: a ring over the cp group
                y = ring_attention(q, k, v, spec.cp, scale=self.softmax_scale)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=pos.attention_mask(q.dtype),
                                                   is_causal=pos.mask is None, scale=self.softmax_scale,
                                                   dropout_p=self.dropout if self.training else 0.0)
        return self.wo(y.to(out_dtype).transpose(1, 2).reshape(B, T, -1))

    def _replicate(self, k_pe: torch.Tensor) -> torch.Tensor:
        """k_R enters every rank's heads, so under TP it needs what a column-parallel
        input gets: its gradient summed over the ranks' heads (copy_to_region), and
        under sequence parallelism the whole sequence first (gather_seq)."""
        if self.tp is None:
            return k_pe
        return gather_seq(k_pe, self.tp.group) if self.tp.sequence_parallel else copy_to_region(k_pe, self.tp.group)
