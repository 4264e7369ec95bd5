"""Context parallelism: the sequence split over the cp group, attention as a ring.

Each rank keeps 1/cp of every sequence. Everything but attention is per token, so it runs on the
local tokens as is; attention needs every earlier token's key and value. The ring passes them
around: each rank keeps its queries, and the key/value chunks travel rank to rank, one hop per
step, while each rank attends its queries to the chunk it holds and merges the partial results
with their log-sum-exp (the online softmax of flash attention, across ranks):

    step 0        step 1        step 2        step 3          cp = 4, rank r holds KV of rank
    r0: KV0       r0: KV3       r0: KV2       r0: KV1         (r - step) mod cp
    r1: KV1  ──►  r1: KV0  ──►  r1: KV3  ──►  r1: KV2         send to r + 1, receive from r - 1
    ...

    merge:  lse = log(exp(lse_a) + exp(lse_b));  out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b

Causal load balance (the zigzag split). Cut the sequence into 2·cp chunks; rank r holds chunks
r and 2cp-1-r, so every rank has one early and one late chunk:

    chunks    0   1   2   3   4   5   6   7        cp = 4
    rank      0   1   2   3   3   2   1   0

At step 0 a rank attends its two chunks to themselves: causal, in global order, which is local
order. At a later step it holds rank src's chunks, and the causal mask leaves one block of the
same size whichever side src is on (Brandon et al. 2023, "Striped Attention"; the zigzag of
ring-flash-attention and Megatron's cp):

    src < r:  both local query chunks see src's early chunk whole, its late chunk not at all
    src > r:  only the late query chunk sees src's chunks, both whole

so every rank computes the same [c x 2c] block per step, with no mask at all.

Backward is written out (not autograd through the ring): it replays the ring with the final out
and lse (the flash-attention backward of each block needs only those), and the key/value
gradients travel with their chunk and take one more hop home. Bytes per attention layer and
rank, with k and v of H_kv·d each per token and N local tokens: forward (cp - 1) hops of k and v;
backward (cp - 1) hops of k and v and cp hops of their gradients (nanotrain inspect counts the
same). torch's counterpart is torch.distributed.tensor.experimental.context_parallel (a ring of
all-gathers or of send/recv around SDPA's flash kernels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..compiling import eager
from ..module_spec import ATTENTION, LATENT_ATTENTION, mark, module_spec
from .collectives import Group, batch_isend_irecv, rank as group_rank, size as group_size
from .state import ParallelState


@dataclass(frozen=True)
class ContextParallel:
    """The cp group and the global rank of each cp rank (the ring's send/recv peers)."""

    group: Group | None
    rank: int
    size: int
    peers: tuple[int, ...]

    @classmethod
    def of(cls, group, peers: list[int] | None = None) -> "ContextParallel":
        n = group_size(group)
        return cls(group, group_rank(group), n, tuple(peers if peers is not None else range(n)))


def apply_context_parallel(model: nn.Module, ps: ParallelState) -> None:
    """parallelize()'s third step (cp > 1): every attention core runs as a ring over the cp group,
    and the model computes the positions of this rank's zigzag tokens (their records' cp,
    module_spec.py). The data gives each rank those tokens (runtime/components.TokenData)."""
    if ps.cp == 1:
        return
    cp = ContextParallel.of(ps.cp_group, [ps.global_rank(cp_rank=c) for c in range(ps.cp)])
    mark(model, cp=cp)
    for module in model.modules():
        if module_spec(module).kind in (ATTENTION, LATENT_ATTENTION):
            mark(module, cp=cp)


# -- the zigzag split ------------------------------------------------------------------------

def zigzag_index(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """The global positions rank `rank` holds, in order: chunks rank and 2cp-1-rank."""
    if seq_len % (2 * cp):
        raise ValueError(f"train.seq_len={seq_len} is not divisible by 2 x parallel.cp = {2 * cp}: the zigzag "
                         "split cuts each sequence into 2·cp equal chunks. Use a multiple of it.")
    c = seq_len // (2 * cp)
    first = torch.arange(rank * c, (rank + 1) * c, device=device)
    last = torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c, device=device)
    return torch.cat([first, last])


def zigzag_split(x: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's tokens of x along `dim` (the sequence)."""
    return x.index_select(dim, zigzag_index(x.shape[dim], cp, rank, x.device))


# -- one block of attention, with its log-sum-exp ------------------------------------------------

def _expand(kv: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, Hkv, T, d] -> [B, H, T, d] (GQA: each KV head serves H / Hkv query heads)."""
    return kv if kv.shape[1] == heads else kv.repeat_interleave(heads // kv.shape[1], dim=1)


def _fold(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The gradient of _expand: sum over the query heads that shared a KV head."""
    B, H, T, d = grad.shape
    return grad if H == kv_heads else grad.view(B, kv_heads, H // kv_heads, T, d).sum(2)


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _flash(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether a block runs in the CPU flash kernel, which returns each row's log-sum-exp and takes
    the final out and lse in its backward (equal q/k and v head sizes only: MLA's are not). On CUDA,
    and for MLA, the block is written out below (the same arithmetic, scores materialised)."""
    return _CPU_FLASH is not None and q.device.type == "cpu" and q.shape[-1] == v.shape[-1]


def _masked_scores(q, ke, scale: float, causal: bool) -> torch.Tensor:
    """q ke^T scale, -inf above the diagonal when causal (ke: the keys expanded to q's heads)."""
    s = torch.matmul(q, ke.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s


def _block(q, k, v, scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T scale) v over one block, and each row's log-sum-exp (fp32)."""
    ke, ve = _expand(k, q.shape[1]), _expand(v, q.shape[1])
    if _flash(q, v):
        return _CPU_FLASH(q.contiguous(), ke.contiguous(), ve.contiguous(), 0.0, causal, scale=scale)
    s = _masked_scores(q, ke, scale, causal)
    lse = torch.logsumexp(s, dim=-1)
    return torch.matmul(torch.exp(s - lse.unsqueeze(-1)), ve), lse


def _block_backward(dout, q, k, v, out, lse, scale: float, causal: bool):
    """Gradients of one block given the *final* out and lse of its rows (flash attention's
    backward: P = exp(S - lse) is the block's share of the whole softmax)."""
    kv_heads = k.shape[1]
    ke, ve = _expand(k, q.shape[1]), _expand(v, q.shape[1])
    if _flash(q, v):
        dq, dk, dv = _CPU_FLASH_BACKWARD(dout.contiguous(), q.contiguous(), ke.contiguous(), ve.contiguous(),
                                         out.contiguous(), lse.contiguous(), 0.0, causal, scale=scale)
        return dq, _fold(dk, kv_heads), _fold(dv, kv_heads)
    p = torch.exp(_masked_scores(q, ke, scale, causal) - lse.unsqueeze(-1))
    dv = torch.matmul(p.transpose(-1, -2), dout)
    dp = torch.matmul(dout, ve.transpose(-1, -2))
    ds = p * (dp - (dout * out).sum(-1, keepdim=True)) * scale
    dq = torch.matmul(ds, ke)
    dk = torch.matmul(ds.transpose(-1, -2), q)
    return dq, _fold(dk, kv_heads), _fold(dv, kv_heads)


def _merge(out, lse, part_out, part_lse):
    """Fold a partial result into the running one (rows already seen: out, lse)."""
    new = torch.logaddexp(lse, part_lse)
    return out * torch.exp(lse - new).unsqueeze(-1) + part_out * torch.exp(part_lse - new).unsqueeze(-1), new


# -- the ring ------------------------------------------------------------------------------------

class _Ring:
    """Pass tensors one hop round the ring: to cp rank + 1, from cp rank - 1 (posted early,
    waited for when needed)."""

    def __init__(self, cp: ContextParallel):
        self.cp = cp
        self.next = cp.peers[(cp.rank + 1) % cp.size]
        self.prev = cp.peers[(cp.rank - 1) % cp.size]

    def start(self, tensors: list[torch.Tensor]):
        tensors = [t.contiguous() for t in tensors]  # (k and v arrive as transposed views)
        bufs = [torch.empty_like(t) for t in tensors]
        works = batch_isend_irecv([(t, self.next) for t in tensors], [(b, self.prev) for b in bufs], self.cp.group)
        return works, bufs

    @staticmethod
    def finish(pending) -> list[torch.Tensor]:
        works, bufs = pending
        for w in works:
            w.wait()
        return bufs


def _visible(step: int, cp: ContextParallel) -> str:
    """Which block of the held chunks the local queries see at this step (module docstring)."""
    if step == 0:
        return "causal"
    src = (cp.rank - step) % cp.size
    return "early kv" if src < cp.rank else "late q"


def _fp32(t: torch.Tensor):
    """The ring's arithmetic is fp32 whatever the model's autocast (MLA's core runs under it): autocast
    would run the written-out blocks' matmuls and log-sum-exps in bf16, and so merge bf16 lse (off by
    up to 0.02), where one process's attention (SDPA) computes bf16 inputs in fp32 and rounds once."""
    return torch.autocast(t.device.type, enabled=False)


class RingAttention(torch.autograd.Function):
    """q [B, H, N, d_qk], k [B, Hkv, N, d_qk], v [B, Hkv, N, d_v]: this rank's N = 2c zigzag
    tokens. Returns softmax attention over every earlier token of the whole sequence."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, cp: ContextParallel):
        with _fp32(q):
            return RingAttention._forward(ctx, q, k, v, scale, cp)

    @staticmethod
    def backward(ctx, dout):
        with _fp32(dout):
            return RingAttention._backward(ctx, dout)

    @staticmethod
    def _forward(ctx, q, k, v, scale: float, cp: ContextParallel):
        dtype = q.dtype
        q32, k32, v32 = q.float(), k.float(), v.float()
        c = q.shape[2] // 2
        ring = _Ring(cp)
        held = [k32, v32]
        pending = ring.start(held) if cp.size > 1 else None  # the next chunk travels while this one is used
        out, lse = _block(q32, k32, v32, scale, causal=True)
        for step in range(1, cp.size):
            hk, hv = held = ring.finish(pending)
            if step < cp.size - 1:  # (cp - 1 hops: the last chunk held is not passed on)
                pending = ring.start(held)
            if _visible(step, cp) == "early kv":  # both query chunks see the held early chunk whole
                o, l = _block(q32, hk[:, :, :c], hv[:, :, :c], scale, causal=False)
                out, lse = _merge(out, lse, o, l)
            else:  # the late query chunk sees both held chunks whole
                o, l = _block(q32[:, :, c:], hk, hv, scale, causal=False)
                late_out, late_lse = _merge(out[:, :, c:], lse[:, :, c:], o, l)
                out = torch.cat([out[:, :, :c], late_out], dim=2)
                lse = torch.cat([lse[:, :, :c], late_lse], dim=2)
        ctx.save_for_backward(q32, k32, v32, out, lse)
        ctx.scale, ctx.cp, ctx.dtype = scale, cp, dtype
        return out.to(dtype)

    @staticmethod
    def _backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        scale, cp = ctx.scale, ctx.cp
        dout = dout.float()
        c = q.shape[2] // 2
        ring = _Ring(cp)
        dq, dk, dv = _block_backward(dout, q, k, v, out, lse, scale, causal=True)
        held = [k, v, dk, dv]  # a chunk's gradient travels with the chunk, gathering each rank's part
        for step in range(1, cp.size):
            hk, hv, gk_sum, gv_sum = held = ring.finish(ring.start(held))
            if _visible(step, cp) == "early kv":
                gq, gk, gv = _block_backward(dout, q, hk[:, :, :c], hv[:, :, :c], out, lse, scale, causal=False)
                dq += gq
                gk_sum[:, :, :c] += gk
                gv_sum[:, :, :c] += gv
            else:
                gq, gk, gv = _block_backward(dout[:, :, c:], q[:, :, c:], hk, hv, out[:, :, c:], lse[:, :, c:],
                                             scale, causal=False)
                dq[:, :, c:] += gq
                gk_sum += gk
                gv_sum += gv
        dk, dv = held[2:]
        if cp.size > 1:  # one more hop: each gradient back to the rank whose chunk it is
            dk, dv = ring.finish(ring.start([dk, dv]))
        d = ctx.dtype
        return dq.to(d), dk.to(d), dv.to(d), None, None


@eager  # under train.compile: send/recv and a hand-written backward (compiling.py)
def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: ContextParallel,
                   scale: float | None = None) -> torch.Tensor:
    """Causal attention of this rank's zigzag tokens over the whole sequence (RingAttention)."""
    return RingAttention.apply(q, k, v, scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]), cp)
