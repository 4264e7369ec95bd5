"""Autograd-aware collectives for tensor and sequence parallelism (Megatron-LM, Shoeybi et al. 2019;
Korthikanti et al. 2022).

Each collective is paired with its mirror in backward, so autograd computes
the right gradient through a sharded layer:

    forward                      backward                    used where
    identity                     all-reduce      (f)         entering a column-parallel matmul
    all-reduce                   identity        (g)         leaving a row-parallel matmul
    split last dim               all-gather last dim         scatter a replicated tensor
    all-gather last dim          split last dim              gather column-parallel outputs
    split seq dim                all-gather seq dim          entering the sequence-parallel region
    all-gather seq dim           reduce-scatter seq dim      SP -> TP region (before column matmuls)
    reduce-scatter seq dim       all-gather seq dim          TP -> SP region (after row matmuls)

Tensors are [batch, seq, hidden]; the sequence dim is 1. With a group of size
one every function is the identity. (torch.distributed.tensor's
`parallelize_module` with Colwise/RowwiseParallel and SequenceParallel styles
inserts the same collectives through DTensor redistributions.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

SEQ_DIM = 1


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _size(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} into {n} equal parts")
    return x.chunk(n, dim=dim)[_rank(group)].contiguous()


def _gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


# torch 2.13 renamed reduce_scatter_tensor to reduce_scatter_single; older releases have only the former.
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum over the group, then keep this rank's chunk of `dim`, in one collective."""
    n = _size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"cannot reduce-scatter dim {dim} of size {x.shape[dim]} over {n} ranks")
    # The collective splits dim 0: move `dim` to the front, scatter, move it back.
    src = x.movedim(dim, 0).contiguous()
    out = torch.empty((src.shape[0] // n, *src.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_single(out, src, group=group)
    return out.movedim(0, dim).contiguous()


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SplitLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, -1, ctx.group), None


class _GatherLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, -1, ctx.group), None


class _ScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, SEQ_DIM, ctx.group), None


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's copy of the full sequence fed a different shard of the next
        # matmul, so each contributes a partial gradient: sum them, keep our rows.
        return _reduce_scatter(grad, SEQ_DIM, ctx.group), None


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, SEQ_DIM, ctx.group), None


def copy_to_region(x, group):
    """f: identity forward, all-reduce backward."""
    return _CopyToRegion.apply(x, group) if _size(group) > 1 else x


def reduce_from_region(x, group):
    """g: all-reduce forward, identity backward."""
    return _ReduceFromRegion.apply(x, group) if _size(group) > 1 else x


def split_last(x, group):
    return _SplitLast.apply(x, group) if _size(group) > 1 else x


def gather_last(x, group):
    return _GatherLast.apply(x, group) if _size(group) > 1 else x


def scatter_seq(x, group):
    return _ScatterSeq.apply(x, group) if _size(group) > 1 else x


def gather_seq(x, group):
    return _GatherSeq.apply(x, group) if _size(group) > 1 else x


def reduce_scatter_seq(x, group):
    return _ReduceScatterSeq.apply(x, group) if _size(group) > 1 else x
