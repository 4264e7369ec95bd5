"""ZeRO-3 (Rajbhandari et al. 2020, P_os+g+p; FSDP's FULL_SHARD): the parameters are sharded over
data parallelism too. Each rank keeps 1/dp of every bucket of parameters (experts: 1/expert-dp),
and a block's whole parameters exist only while the block runs:

    forward     gather(block 0) gather(block 1) gather(block 2) ...
                  [block 0 fwd]   [block 1 fwd]   [block 2 fwd]
                 free 0 ┘          free 1 ┘          ...
    backward                   ... gather(block 1) gather(block 0)
                                     [block 1 bwd]   [block 0 bwd]
                                     reduce-scatter 1 ┘ free 1     reduce-scatter 0, free 0

    prefetch: the gather of the next block (forward: i + 1, backward: i - 1) is posted as soon
    as the current one has arrived, so it travels while the current block computes.

This object is the optimizer's parameter storage at stage 3 (zero.WholeWeights at 0-2): where
the weights live (`store`), how the updated slices get back (`write_back`, no all-gather: the
next forward gathers), and what checkpoints and the monitor read (`weight_parts`).

The units. Each transformer block of this rank (model.layers, a pipeline stage's only) is one
unit: its parameters are laid out in buckets of their own (data_parallel.bucket_layout with
`units`), so one unit's gather is its buckets' all-gathers. Everything else (embeddings, the
final norm, the head, DeepSeek's MTP module) is the root unit, gathered for the whole forward
of the model and again for its backward, as FSDP's root.

Gathered and freed, in place. Each bucket has two tensors: `b.flat`, this rank's slice (the
only persistent copy, and the optimizer's: the master is this slice when the dtypes agree), and
`full[b]`, the whole bucket, whose parameters are views of it (`store`). Freeing resizes full's storage to
zero bytes; gathering resizes it back and all-gathers into it. The parameters' views, and any
tensor autograd saved from them for backward, point at that storage all along, so nothing needs
re-binding, and between its forward and its backward a block holds no parameter memory
(torch's FSDP2 frees and refills storage the same way).

When. Hooks on each unit's module:
  forward pre-hook   acquire (gather, or wait for the prefetch); prefetch the next unit.
  forward hook       release (free when no one else holds it); and, if a backward will come,
                     a hook on the output's gradient, which acquires the unit again when
                     backward reaches it and prefetches the unit before it.
  gradients          reduce-scattered as at stage 2 (zero2.py); a hook on each parameter counts
                     them (on_grad): when all of a unit's have arrived, it is released.
  backward's end     what is still held for backward (a parameter that got no gradient: an
                     expert no token chose) is released (end_backward).
Recomputation (recompute.py) runs a block's forward again inside its backward, while the block
is held for backward: those hooks do nothing then.

Order. Every rank must post the same collectives in the same order on a group. The gathers run
on a group of their own (ParallelState.dp_gather_group, edp_gather_group): their order is the
order of the hooks, the same on every rank, whatever order the gradients' reduce-scatters on
dp take.

(torch's version: FSDP2, torch.distributed.fsdp.fully_shard on each block and then on the root;
bench/zero.py compares the two.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..compiling import eager
from ..recompute import recomputing, unrecorded
from . import collectives
from .data_parallel import FlatBucket


def units_of(model: nn.Module) -> dict[nn.Parameter, int]:
    """Parameter -> its unit: 1 + the position of its block in model.layers, or 0 for the root."""
    out = {p: 0 for p in model.parameters()}
    for i, block in enumerate(model.layers.values()):
        for p in block.parameters():
            out[p] = i + 1
    return out


@dataclass(eq=False)
class Unit:
    """One module's buckets, gathered and freed together."""

    module: nn.Module
    buckets: list[FlatBucket]
    params: frozenset
    holders: int = 0  # who needs the whole parameters now: a forward, a backward
    gathering: list = field(default_factory=list)  # the all-gathers in flight (a prefetch)
    gathered: bool = False  # the storage is allocated (and filled once `gathering` is done)
    arrived: int = 0  # gradients of this backward
    backward_holds: int = 0


class ParameterSharding:
    """Stage 3's parameter storage: each rank keeps its slice of every bucket, and each unit's
    parameters are gathered and freed around its forward and backward (see the module docstring).
    `buckets`: the optimizer's (bucket_layout with units); `ps`: the ParallelState with the gather
    groups. Hooks registered here: forward hooks on each unit's module, a gradient hook on each
    parameter."""

    saves_model = True  # the model holds only slices: the optimizer saves the weights, from its masters

    def __init__(self, model: nn.Module, buckets: list[FlatBucket], ps):
        unit_of = units_of(model)
        modules = [model, *model.layers.values()]
        self.units: list[Unit] = []
        for i, module in enumerate(modules):
            mine = [b for b in buckets if unit_of[b.params[0]] == i]
            self.units.append(Unit(module, mine, frozenset(p for b in mine for p in b.params)))
        self._unit_of = {p: u for u in self.units for p in u.params}
        self.full: dict[FlatBucket, torch.Tensor] = {}  # the whole buckets, allocated while gathered
        # Bytes of whole parameters allocated now, the most at once, and the gathers posted (tests,
        # the memory plan: the root and at most two blocks, the current one and the prefetch).
        self.live_bytes = self.peak_bytes = self.gathers = 0
        self._groups = {id(b): ps.edp_gather_group if b.category[0] else ps.dp_gather_group for b in buckets}
        for i, u in enumerate(self.units):
            u.module.register_forward_pre_hook(lambda m, args, i=i: self._pre_forward(i))
            u.module.register_forward_hook(lambda m, args, out, i=i: self._post_forward(i, out))
        for p in self._unit_of:  # (the reducer's hook reads the gradient, never the freed parameter)
            p.register_post_accumulate_grad_hook(self.on_grad)

    # -- the optimizer's storage ---------------------------------------------------------------

    def store(self, b: FlatBucket, storage: torch.dtype, fp32: torch.Tensor) -> torch.Tensor:
        """Keep this rank's slice of b's values `fp32` as b.flat (in the storage dtype); the parameters
        become views of full[b], freed until gathered. Returns the slice's fp32 values."""
        b.flat = fp32[b.owned()].to(storage, copy=True)
        self.full[b] = torch.empty(b.numel, dtype=storage, device=fp32.device)
        for p, off in zip(b.params, b.offsets):
            p.data = self.full[b][off:off + p.numel()].view_as(p)
        self._release(b)
        return fp32[b.owned()].clone()  # only the slice is needed (and the whole would double the peak)

    def mine(self, b: FlatBucket) -> torch.Tensor:
        """This rank's part of b's storage: b.flat, the slice."""
        return b.flat

    def write_back(self, b: FlatBucket, master: torch.Tensor) -> None:
        """The updated slice, where the master is a copy of its own; no all-gather: the next forward gathers."""
        if master.dtype != b.flat.dtype:
            b.flat.copy_(master)

    def weight_parts(self, buckets: list[FlatBucket], names: dict) -> list[tuple[str, torch.Tensor]]:
        """(parameter name, this rank's part of its weights): summed over dp they make the whole."""
        return [(names[p], b.flat[lo:hi]) for b in buckets for p, lo, hi, _ in b.overlaps()]

    def nbytes(self, buckets: list[FlatBucket]) -> int:
        return sum(b.flat.numel() * b.flat.element_size() for b in buckets)

    def _release(self, b: FlatBucket) -> None:
        self.full[b].untyped_storage().resize_(0)

    # -- gather and free ------------------------------------------------------------------

    def _gather(self, u: Unit) -> None:
        """Allocate u's buckets and post their all-gathers (asynchronous: wait() collects them)."""
        if u.gathered:
            return
        with unrecorded():
            for b in u.buckets:
                full = self.full[b]
                full.untyped_storage().resize_(b.numel * full.element_size())
                self.live_bytes += b.numel * full.element_size()
                self.gathers += 1
                group = self._groups[id(b)]
                if b.size == 1:
                    full.copy_(b.flat)
                    continue
                # Not a change autograd should see: the saved views of these parameters wait
                # for exactly these values (FSDP2 does the same).
                with torch.autograd._unsafe_preserve_version_counter(full):
                    u.gathering.append(collectives.all_gather_into(full, b.flat, group, async_op=True))
        u.gathered = True
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _wait(self, u: Unit) -> None:
        for work in u.gathering:
            work.wait()
        u.gathering.clear()

    def _free(self, u: Unit) -> None:
        self._wait(u)  # never free storage an all-gather is still writing
        with unrecorded():
            for b in u.buckets:
                self._release(b)
                self.live_bytes -= b.numel * self.full[b].element_size()
        u.gathered = False

    def acquire(self, u: Unit) -> None:
        self._gather(u)
        self._wait(u)
        u.holders += 1

    def release(self, u: Unit) -> None:
        u.holders -= 1
        if u.holders == 0:
            self._free(u)

    def _prefetch(self, i: int) -> None:
        if 0 <= i < len(self.units):
            self._gather(self.units[i])

    # -- hooks ------------------------------------------------------------------------------

    @eager  # under train.compile: collectives and storage resizes stay outside the graph
    def _pre_forward(self, i: int) -> None:
        if recomputing():  # backward holds the block already
            return
        self.acquire(self.units[i])
        self._prefetch(i + 1)  # the next block (the root's next is block 0)

    @eager
    def _post_forward(self, i: int, out) -> None:
        if recomputing():
            return
        u = self.units[i]
        tensors = [t for t in (out if isinstance(out, (tuple, list)) else [out])
                   if torch.is_tensor(t) and t.requires_grad]
        if tensors:  # a backward will come through this unit: gather it again then
            torch.autograd.graph.register_multi_grad_hook(tensors, lambda grads, i=i: self._pre_backward(i),
                                                          mode="any")
        self.release(u)

    @eager
    def _pre_backward(self, i: int) -> None:
        u = self.units[i]
        self.acquire(u)
        u.backward_holds += 1
        # Backward runs the blocks last to first and the root (the head, the loss) before them.
        self._prefetch(len(self.units) - 1 if i == 0 else i - 1)

    def on_grad(self, p: nn.Parameter) -> None:
        """p's gradient of this backward is complete: when all of its unit's are, backward is done with it."""
        u = self._unit_of[p]
        u.arrived += 1
        if u.arrived == len(u.params) and u.backward_holds:
            u.arrived = 0
            u.backward_holds -= 1
            self.release(u)

    def end_backward(self) -> None:
        """After each backward: release what it still holds (parameters that got no gradient), and
        free prefetches that no one used (the next chunk of an interleaved pipeline stage)."""
        for u in self.units:
            while u.backward_holds:
                u.backward_holds -= 1
                self.release(u)
            u.arrived = 0
            if u.holders == 0 and u.gathered:
                self._free(u)
