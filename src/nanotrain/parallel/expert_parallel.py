"""Expert parallelism (GShard, Lepikhin et al. 2020; DeepSeek-V3 §3.2): the routed experts are
split over the ep group, and tokens travel to their experts and back with two all-to-alls.

    rank 0 (experts 0-3)                               rank 1 (experts 4-7)
    tokens ─route─► sorted by expert ─┐          ┌─ sorted by expert ◄─route─ tokens
                                      ├ all-to-all┤
    experts 0-3 on tokens from 0 and 1┘          └ experts 4-7 on tokens from 0 and 1
    ... then the reverse all-to-all returns each output to the rank its token came from.

Each rank's tokens are different (ep groups are carved out of the data-parallel ranks),
so the per-expert token counts are exchanged first (an all-to-all of E integers) to size
the second. Dropless: every routed token is processed (no capacity factor).

The expert weights are one logical tensor [E, ...] per matrix, of which rank r holds
experts [r*E/ep, (r+1)*E/ep): `Shard(dim=0, axis="ep")`, so initialisation and
checkpoints see the single-process tensor (the layer, models/moe.ExpertParallelMoE, declares
it and calls expert_parallel_forward below). Their gradients sync over the
expert-data-parallel group (ranks holding the same experts), not over dp.
(torch offers no expert-parallel module; torchtitan's MoE uses the same two
all-to-alls around a grouped GEMM.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import MoEPrecisionConfig
from ..precision.formats import E4M3
from ..precision.scaling import blockwise
from .collectives import Group, all_to_all_single
from .state import ParallelState


@dataclass(frozen=True)
class ExpertParallel:
    group: Group  # parallel/collectives.py
    rank: int
    size: int
    dispatch_fp8: bool = False  # precision.moe.dispatch_fp8: tokens travel to the experts in e4m3
    combine_fp8: bool = False  # precision.moe.combine_fp8: expert outputs travel back in e4m3
    # The same ranks, for backward's all-to-alls (None: `group`): a forward and a backward can run
    # side by side in two threads (DualPipeV, pipeline/runner.py), each in its own group's order.
    backward_group: Group | None = None


def expert_parallel(ps: ParallelState, moe: MoEPrecisionConfig) -> ExpertParallel | None:
    """parallelize()'s second step: what the MoE layers are built with (None: ep = 1, every expert
    on every rank). The group of ranks that split the experts between them, and the all-to-alls'
    formats (precision.moe)."""
    if ps.ep == 1:
        return None
    return ExpertParallel(ps.ep_group, ps.ep_rank, ps.ep, moe.dispatch_fp8, moe.combine_fp8, ps.ep_backward_group)


def exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    all_to_all_single(out, x.contiguous(), group, out_splits, in_splits)
    return out


def exchange_fp8(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """The same exchange with each row sent as e4m3 bytes plus one fp32 scale per 128 values
    (DeepSeek-V3's fp8 dispatch, §3.3): 1 + 4/128 bytes per value instead of 4. The receiver
    gets exactly the 1x128-tile quantisation of what was sent (precision.scaling.blockwise)."""
    q, scale = blockwise(x, E4M3, (1, 128))
    tiles = scale[..., ::128].contiguous()  # one scale per tile (blockwise expands them)
    payload = q.to(torch.float8_e4m3fn).view(torch.uint8)  # q is on the e4m3 grid: the cast is exact
    got = exchange(payload, out_splits, in_splits, group).view(torch.float8_e4m3fn).float()
    got_tiles = exchange(tiles, out_splits, in_splits, group)
    return (got * got_tiles.repeat_interleave(128, dim=-1)[..., :x.shape[-1]]).to(x.dtype)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; backward is the same exchange, reversed. With fp8
    the forward exchange is quantised; the backward one (gradients) stays full precision."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group, fp8: bool = False, backward_group=None):
        ctx.splits, ctx.group = (out_splits, in_splits), backward_group or group
        return (exchange_fp8 if fp8 else exchange)(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return exchange(grad, in_splits, out_splits, ctx.group), None, None, None, None, None


def combine_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the expert outputs travel back in: the same on every rank, whatever tokens it got.
    Under autocast the experts' GEMMs give the autocast dtype, but a rank whose experts received no
    token computes nothing and would send (and expect back) its input's dtype: gloo matches messages
    by their bytes, and the mismatched element size aborts the job (the router sends a micro-batch's
    every token to one rank's experts now and then early in training)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def all_to_all(x, out_splits, in_splits, group, fp8: bool = False, backward_group=None):
    return _AllToAll.apply(x, out_splits, in_splits, group, fp8, backward_group)


def expert_parallel_forward(experts, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor,
                            ep: ExpertParallel) -> torch.Tensor:
    """Run the routed experts on this rank's tokens, sorted by expert (numbered rank-major),
    where `experts` (models/moe.ExpertMLP) holds this rank's E/ep of them: count, dispatch,
    compute, combine (the diagram above). Returns the outputs in x_sorted's order."""
    ep_size, nl, g = ep.size, tokens_per_expert.numel() // ep.size, ep.group
    # 1. How many tokens go from each rank to each expert: send[r, e] = ours for rank r's expert e.
    send = tokens_per_expert.view(ep_size, nl)
    recv = torch.empty_like(send)
    all_to_all_single(recv, send.contiguous(), g)
    send_rows, recv_rows = send.tolist(), recv.tolist()  # [dest][expert], [source][expert]
    in_splits, out_splits = [sum(r) for r in send_rows], [sum(r) for r in recv_rows]
    # 2. Dispatch: x_sorted is already grouped by destination rank (experts are numbered rank-major).
    received = all_to_all(x_sorted, out_splits, in_splits, g, ep.dispatch_fp8, ep.backward_group)  # source-major
    # 3. Regroup source-major -> expert-major, run the local experts, and back.
    chunks = received.split([c for row in recv_rows for c in row])
    x_local = torch.cat([chunks[s * nl + e] for e in range(nl) for s in range(ep_size)])
    y_local = experts(x_local, [sum(recv_rows[s][e] for s in range(ep_size)) for e in range(nl)])
    y_chunks = y_local.split([recv_rows[s][e] for e in range(nl) for s in range(ep_size)])
    y_source_major = torch.cat([y_chunks[e * ep_size + s] for s in range(ep_size) for e in range(nl)])
    # 4. Combine: return each output to the rank (and sorted position) its token came from.
    return all_to_all(y_source_major.to(combine_dtype(x_sorted)), in_splits, out_splits, g, ep.combine_fp8,
                      ep.backward_group)
