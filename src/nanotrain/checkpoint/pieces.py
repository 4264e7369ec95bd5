"""Pieces: what one rank holds of a logical (single-process) tensor, and where it sits in it.

A checkpoint never stores "rank 3's tensor". It stores boxes of logical tensors:

    model/layers.0.attn.wo.weight  shape [64, 64]
        rank 0 holds [0:64, 0:32]   (tp rank 0 of a row-parallel weight)
        rank 1 holds [0:64, 32:64]

Saving writes each box once; loading under another layout asks, for every box the new
rank holds, which saved boxes overlap it (storage.CheckpointReader.fill). The same
functions list the pieces for saving and the destinations for loading, so whatever a
layout can hold it can also restore.

ZeRO slices are flat ranges of a bucket, not boxes of a parameter: a flat range of a
row-major tensor splits into at most 2·ndim - 1 boxes (flat_range_boxes), each of them a
contiguous run of the range, so a ZeRO rank's moments are pieces too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..parallel import collectives
from ..params import shard_part, shards_of, spec


@dataclass
class Piece:
    name: str  # logical name: "model/<param>", "optim/exp_avg/<param>", "optim/step", "rng/torch/rank3"
    tensor: torch.Tensor  # this rank's data; shape == sizes. Loading writes into it in place
    offsets: tuple[int, ...]  # where the box starts in the logical tensor
    shape: tuple[int, ...]  # the logical tensor's shape

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def key(self) -> tuple:
        return (self.name, self.offsets, self.sizes)


def whole(name: str, t: torch.Tensor) -> Piece:
    """A tensor every rank holds whole (a replicated parameter, a step counter)."""
    return Piece(name, t, (0,) * t.dim(), tuple(t.shape))


def sharded(name: str, t: torch.Tensor, shard, local_offsets: tuple[int, ...] | None = None,
            local_shape: tuple[int, ...] | None = None) -> Piece | None:
    """A box of a tensor-/expert-parallel shard: `t` sits at `local_offsets` of this rank's
    shard (of shape `local_shape`), which is part `shard.rank` of `shard.world` along shard.dim
    (a tuple of shards: along each of their dims). A shard that ends in padding (a padded
    vocabulary: Shard.size) gives the box cut at the logical tensor's end, or None if the box is
    all padding."""
    local_shape = tuple(local_shape or t.shape)
    offsets = list(local_offsets or (0,) * t.dim())
    shape = list(local_shape)
    for one in shards_of(shard):
        dim = one.dim % len(shape)
        offsets[dim] += one.rank * local_shape[dim]
        shape[dim] = one.full_size(local_shape[dim])
        keep = min(t.shape[dim], shape[dim] - offsets[dim])
        if keep <= 0:
            return None
        if keep < t.shape[dim]:
            t = t.narrow(dim, 0, keep)
    return Piece(name, t, tuple(offsets), tuple(shape))


Box = tuple[tuple[int, ...], tuple[int, ...], int]  # (offsets, sizes, flat position of its first element)


def flat_range_boxes(shape: tuple[int, ...], start: int, end: int) -> list[Box]:
    """The boxes (offsets, sizes, flat start) that make up elements [start, end) of a
    row-major tensor of `shape`, in order; each box is a contiguous run of the range."""
    if start >= end:
        return []
    if len(shape) == 0:
        return [((), (), 0)]
    inner = 1
    for s in shape[1:]:
        inner *= s
    first, last = start // inner, (end - 1) // inner
    if start % inner == 0 and end % inner == 0 or len(shape) == 1:  # whole rows only
        return [((first,) + (0,) * (len(shape) - 1), (last - first + 1,) + tuple(shape[1:]), start)]
    boxes = []

    def row(i: int, a: int, b: int):  # part of row i: recurse into it
        for offs, sizes, s in flat_range_boxes(shape[1:], a - i * inner, b - i * inner):
            boxes.append(((i,) + offs, (1,) + sizes, s + i * inner))

    if first == last:
        row(first, start, end)
        return boxes
    head_end = (first + 1) * inner
    if start % inner:
        row(first, start, head_end)
        first += 1
    tail_start = last * inner
    full_end = tail_start if end % inner else end
    if first * inner < full_end:
        boxes.append(((first,) + (0,) * (len(shape) - 1), ((full_end // inner) - first,) + tuple(shape[1:]),
                      first * inner))
    if end % inner:
        row(last, tail_start, end)
    return boxes


def flat_pieces(name: str, flat: torch.Tensor, p: nn.Parameter, start: int, end: int) -> list[Piece]:
    """Pieces of a flat buffer `flat` that holds elements [start, end) of parameter p's
    (local, possibly sharded) tensor, as boxes of the logical tensor."""
    shard = spec(p).shard
    out = []
    for offsets, sizes, s in flat_range_boxes(tuple(p.shape), start, end):
        n = 1
        for x in sizes:
            n *= x
        piece = sharded(name, flat[s - start:s - start + n].view(sizes), shard, offsets, tuple(p.shape))
        if piece is not None:  # None: padding only
            out.append(piece)
    return out


def model_pieces(model: nn.Module, skip: set[str] = frozenset()) -> list[Piece]:
    """Every persistent tensor of the model (parameters and buffers) under its single-process name;
    `skip`: the names whose full-precision value the optimizer holds and saves (master copies)."""
    pieces = [sharded("model/" + name, t.detach(), spec(t).shard)
              for name, t in model.state_dict(keep_vars=True).items() if name not in skip]
    return [p for p in pieces if p is not None]  # None: a shard of nothing but padding


# ---------------------------------------------------------------------------
# Whole tensors across ranks (verify, init_from, HF export).
# ---------------------------------------------------------------------------

def gather_full(t: torch.Tensor, shard, groups) -> torch.Tensor:
    """The full tensor from every rank's shard (`shard`: params.Shard, a tuple of them, or None;
    `groups`: the process group of each Shard.axis, e.g. ParallelState.groups(), or one group for
    all), without the padding of a padded vocabulary: the single-process tensor."""
    t = t.detach()
    splits = shards_of(shard)
    if not splits:
        return t.clone()
    for one in splits:  # one axis at a time: each gather makes the tensor whole along one dim
        group = groups[one.axis] if isinstance(groups, dict) else groups
        parts = [torch.empty_like(t) for _ in range(one.world)]
        collectives.all_gather(parts, t.contiguous(), group)
        t = torch.cat(parts, dim=one.dim).narrow(one.dim, 0, one.full_size(t.shape[one.dim]))
    return t


def assemble(pieces: list[Piece], group) -> dict[str, torch.Tensor]:
    """The whole tensors that every rank's `pieces` are boxes of, on every rank of `group` (the
    world: under ZeRO-2 and 3 a gradient is cut over dp as well as tp, ep and pp): each box written
    into its tensor, zeros where no rank holds any. Boxes that overlap (a replicated parameter, on
    every tp rank) hold the same values; the last rank's stays."""
    mine = [(p.name, p.offsets, p.shape, p.tensor.detach().to("cpu", copy=True))
            for p in pieces]  # a copy: a view would pickle its whole buffer
    parts = [mine] * collectives.size(group)
    if len(parts) > 1:
        collectives.all_gather_object(parts, mine, group)
    whole: dict[str, torch.Tensor] = {}
    for name, offsets, shape, t in (box for part in parts for box in part):
        full = whole.setdefault(name, torch.zeros(shape, dtype=t.dtype))
        box = full
        for dim, (start, n) in enumerate(zip(offsets, t.shape)):
            box = box.narrow(dim, start, n)
        box.copy_(t)
    return whole


def local_slice(full: torch.Tensor, shard) -> torch.Tensor:
    """This rank's part of a whole tensor (zero-padded where its shard ends in padding)."""
    return shard_part(full, shard)


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Whole tensors by name -> this rank's shards of them (strict: every tensor must be there)."""
    own = model.state_dict(keep_vars=True)
    model.load_state_dict({name: local_slice(state[name], spec(own[name]).shard)
                           for name in own if name in state}, strict=True)


def merge_over_pipeline(part: dict, pp_group) -> dict:
    """Every pipeline stage's part of a dict, merged by key on every rank of the pp group
    (each stage holds different layers)."""
    if collectives.size(pp_group) == 1:
        return part
    parts = [None] * collectives.size(pp_group)
    collectives.all_gather_object(parts, part, pp_group)
    merged: dict = {}
    for p in parts:
        merged.update(p)
    return merged
