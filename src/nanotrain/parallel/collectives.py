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

from ..compiling import eager

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


def _reduce_scatter_single(*args, **kwargs):
    """torch 2.13 renamed reduce_scatter_tensor to reduce_scatter_single; older releases have only
    the former. Looked up at each call, so that monitoring/comm.py's meter sees it."""
    return (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(*args, **kwargs)


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


def _identity(x: torch.Tensor, group) -> torch.Tensor:
    return x


def _all_reduce_copy(x: torch.Tensor, group) -> torch.Tensor:
    return _all_reduce(x.clone(), group)  # never reduce in place into a tensor autograd saved


class _Collective(torch.autograd.Function):
    """Applies `forward_fn` and, in backward, its mirror `backward_fn` (the table above)."""

    @staticmethod
    def forward(ctx, x, group, forward_fn, backward_fn):
        ctx.group, ctx.backward_fn = group, backward_fn
        return forward_fn(x, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward_fn(grad, ctx.group), None, None, None


def _pair(forward_fn, backward_fn, doc: str):
    # Eager under train.compile (a graph break at each call): the communication stays the plain
    # torch.distributed calls, which the communication meter wraps step by step (compiling.py).
    @eager
    def collective(x: torch.Tensor, group) -> torch.Tensor:
        return _Collective.apply(x, group, forward_fn, backward_fn) if _size(group) > 1 else x
    collective.__doc__ = doc
    return collective


def _split_last(x, group):
    return _split(x, -1, group)


def _gather_last(x, group):
    return _gather(x, -1, group)


def _split_seq(x, group):
    return _split(x, SEQ_DIM, group)


def _gather_seq(x, group):
    return _gather(x, SEQ_DIM, group)


def _reduce_scatter_seq(x, group):
    return _reduce_scatter(x, SEQ_DIM, group)


copy_to_region = _pair(_identity, _all_reduce_copy, "f: identity forward, all-reduce backward.")
reduce_from_region = _pair(_all_reduce_copy, _identity, "g: all-reduce forward, identity backward.")
split_last = _pair(_split_last, _gather_last, "Keep this rank's slice of the last dim; backward all-gathers.")
gather_last = _pair(_gather_last, _split_last, "All-gather the last dim; backward keeps this rank's slice.")
scatter_seq = _pair(_split_seq, _gather_seq, "Keep this rank's sequence chunk; backward all-gathers.")
# gather_seq's backward: every rank's copy of the full sequence fed a different shard of
# the next matmul, so each holds a partial gradient: sum them and keep our positions.
gather_seq = _pair(_gather_seq, _reduce_scatter_seq, "All-gather the sequence; backward reduce-scatters.")
reduce_scatter_seq = _pair(_reduce_scatter_seq, _gather_seq, "Reduce-scatter the sequence; backward all-gathers.")
