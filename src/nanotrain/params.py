"""What each parameter is, in one typed record: `ParamSpec`.

A parameter of a parallel model is more than its local tensor. The code around the
model has to know:

    who         needs                                        field
    init        how to draw the full tensor                  init, init_std
    checkpoint  which box of the logical tensor it holds     shard
    grad sync   which groups sum its gradient                shard (ep: expert-dp), sequence_parallel,
                                                             pipeline_shared
    grad norm   whether this copy counts                     shard (tp), pipeline_duplicate
    optimizer   where its value lives (codes + a master)     lowbit

Layers declare it when they create the parameter (layers.py, tensor_parallel.py, moe.py), the
model and the pipeline split add what they decide (sequence parallelism, the tied embedding's
copies), and everything else reads it through `spec(p)`: one record, so a typo is an
AttributeError instead of a silent default. The record is frozen; a change is a new record
(`declare(p, shard=...)`), which keeps "who decided this" in one call.

(Megatron sets loose attributes on the tensors: `tensor_model_parallel`, `allreduce`,
`sequence_parallel`, `shared`; torchtitan lets DTensor's placements carry the sharding and
FSDP's wrapping carry the rest. A dataclass on the parameter is the readable middle.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Shard:
    """This parameter holds slice `rank` of `world` equal parts of dim `dim` of the full tensor,
    split over the `axis` group ("tp": tensor parallel, "ep": expert parallel).

    `size`: the full tensor's length along `dim` when the parts add up to more (0: they add up
    to it exactly). The extra rows are padding at the end of the last parts (a vocabulary of 65
    split over tp=2 is held as 2 x 33 rows, row 65 padding): they belong to no logical tensor,
    so init leaves them zero, checkpoints and gathers leave them out."""

    dim: int
    rank: int
    world: int
    axis: str = "tp"
    size: int = 0

    def full_size(self, part: int) -> int:
        """The full tensor's length along dim, from the length of one part."""
        return self.size or part * self.world

    def span(self, part: int) -> tuple[int, int]:
        """[start, stop) of the full tensor's dim that this part holds (stop - start < part:
        the rest of the part is padding)."""
        full = self.full_size(part)
        return min(self.rank * part, full), min((self.rank + 1) * part, full)


@dataclass(frozen=True)
class ParamSpec:
    """One parameter's place in the logical model and in the parallel layout."""

    init: str | None = None  # "normal" | "ones" | "zeros"; None: not built by nanotrain.layers
    init_std: float = 0.0  # the normal init's standard deviation
    # None: whole on every rank of its replicas. A tuple: split along several dims over several
    # axes (an expert's matrices: experts over ep on dim 0, their width over tp: parallel.etp).
    shard: Shard | tuple[Shard, ...] | None = None
    # Applied to a sequence shard (norms, row-parallel biases, experts under sequence
    # parallelism): each tp rank's gradient is a partial sum, summed over tp after dp.
    sequence_parallel: bool = False
    # A copy of the tied embedding on the first and last pipeline stage: the copies' gradients
    # are summed over the embedding group; the last stage's copy (`pipeline_duplicate`) is not
    # counted again in the gradient norm.
    pipeline_shared: bool = False
    pipeline_duplicate: bool = False
    # Persistent low-bit storage (precision/lowbit.py's LowBitWeight): the model keeps codes,
    # the optimizer the full-precision master.
    lowbit: Any = None

    @property
    def shards(self) -> tuple[Shard, ...]:
        return shards_of(self.shard)

    @property
    def expert_parallel(self) -> bool:
        """An expert shard: its replicas are the expert-data-parallel group, not dp."""
        return any(s.axis == "ep" for s in self.shards)

    @property
    def tp_sharded(self) -> bool:
        return any(s.axis == "tp" for s in self.shards)

    def counts_in_norm(self, tp_rank: int) -> bool:
        """Whether this rank's copy counts in the global gradient norm: a tp shard on every tp
        rank (the shards add up to the whole), anything whole over tp (replicated parameters,
        experts) on tp rank 0 only, and never the last pipeline stage's copy of a tied embedding."""
        return not self.pipeline_duplicate and (tp_rank == 0 or self.tp_sharded)


def shards_of(shard: Shard | tuple[Shard, ...] | None) -> tuple[Shard, ...]:
    """A ParamSpec.shard as a tuple of the splits that matter (world > 1)."""
    if shard is None:
        return ()
    return tuple(s for s in (shard if isinstance(shard, tuple) else (shard,)) if s.world > 1)


def shard_part(full: torch.Tensor, shard: Shard | tuple[Shard, ...] | None) -> torch.Tensor:
    """The part of the full tensor that `shard` holds (each split of a tuple in turn), zero where
    the part runs past the full tensor (padding). Here, beside Shard, because both ends of a
    parameter's life cut a full tensor to a rank's box: init (layers.py) and loading a checkpoint
    under any layout (checkpoint/pieces.py)."""
    splits = shards_of(shard)
    if len(splits) != 1:
        for one in splits:
            full = shard_part(full, one)
        return full
    shard = splits[0]
    dim = shard.dim % full.dim()
    part = -(-full.shape[dim] // shard.world)  # padded parts: the full length rounded up to world parts
    start, stop = shard.span(part)
    piece = full.narrow(dim, start, stop - start)
    if stop - start == part:
        return piece.contiguous()
    shape = list(full.shape)
    shape[dim] = part
    out = full.new_zeros(shape)
    out.narrow(dim, 0, stop - start).copy_(piece)
    return out


UNDECLARED = ParamSpec()  # a parameter no nanotrain layer made: replicated, no init recipe


def spec(p: nn.Parameter) -> ParamSpec:
    """The parameter's record (UNDECLARED for a plain torch parameter)."""
    return vars(p).get("_spec", UNDECLARED)


def declare(p: nn.Parameter, **fields) -> nn.Parameter:
    """Set fields of p's record (the others keep their values); returns p."""
    p._spec = dataclasses.replace(spec(p), **fields)
    return p
