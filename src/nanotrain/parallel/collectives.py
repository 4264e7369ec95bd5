"""Every collective nano-train issues, in one file: plain functions over a named `Group`, and the
autograd-aware pairs of tensor and sequence parallelism (Megatron-LM, Shoeybi et al. 2019;
Korthikanti et al. 2022).

Groups and the meter. A `Group` is a torch process group with its name in the layout ("tp",
"dp", "pp", "ep", "edp", "embd", "world"), its size, this process's rank in it, and the run's
communication meter (monitoring/comm.py's CommMeter, or None). ParallelState builds one per
kind (parallel/state.py); the functions below take it, call torch.distributed, and report
(group name, message bytes, seconds blocked) to the meter while it counts (one training step at
a time), wrapping an async call's handle so that its wait() is timed too. So the meter sees every
collective without touching torch.distributed, and code that never counts pays one attribute test.
A raw torch ProcessGroup is accepted as well (tests build their own): it is reported nowhere.

    function              torch.distributed call                         message bytes (metered)
    all_reduce            all_reduce                                     the tensor
    all_gather            all_gather (a list of parts)                   the gathered parts
    all_gather_into       all_gather_single / all_gather_into_tensor     the gathered output
    reduce_scatter        reduce_scatter_single / reduce_scatter_tensor  the input
    all_to_all_single     all_to_all_single                              what this rank hands over
    batch_isend_irecv     batch_isend_irecv (pipeline p2p)               what this rank sends
    broadcast             broadcast                                      the tensor
    all_gather_object     all_gather_object                              not metered (a pickle)

    barrier               barrier                                        not metered (no data)

Left direct on torch.distributed: creating and destroying groups, get_rank/get_world_size,
all outside these functions. Every call above is recorded in InFlight while it blocks (an async
one while its handle's wait() blocks): the watchdog names it when a step stalls.

Autograd pairs. Each tp collective is paired with its mirror in backward, so autograd computes
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
inserts the same collectives through DTensor redistributions; torch.profiler records the
same calls as `record_param_comms` events.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..compiling import eager
from ..recompute import recomputing

SEQ_DIM = 1

# torch 2.13 names the single-tensor collectives *_single; older releases only *_tensor. Resolved once.
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_ALL_GATHER_INTO = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True, eq=False)
class Group:
    """One process group of the layout, by name (eq=False: hashed by identity, as a process group)."""

    name: str
    pg: dist.ProcessGroup | None  # None: the default (world) group
    size: int = 1
    rank: int = 0
    meter: Any = None  # monitoring.comm.CommMeter: told about each collective while it counts


def size(group) -> int:
    """Ranks in `group` (a Group, a torch process group, or None: one process)."""
    if group is None:
        return 1
    return group.size if isinstance(group, Group) else dist.get_world_size(group)


def rank(group) -> int:
    if group is None:
        return 0
    return group.rank if isinstance(group, Group) else dist.get_rank(group)


def _pg(group):
    return group.pg if isinstance(group, Group) else group


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class CollectiveError(RuntimeError):
    """A collective failed because another rank is gone (dead, or stalled past parallel.timeout_s):
    one line naming the collective and this rank, instead of gloo's traceback on every survivor."""


def _lost(e: BaseException, label: tuple[str, str]) -> BaseException:
    """The CollectiveError for a transport failure (gloo's and NCCL's are RuntimeErrors whose text
    names them), else `e` itself: a bug stays a bug."""
    text = str(e)
    if not (isinstance(e, getattr(dist, "DistError", ())) or any(
            w in text for w in ("gloo", "NCCL", "Connection reset", "Connection closed", "Timed out", "timed out"))):
        return e
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return CollectiveError(f"rank {rank}: {label[0]}({label[1]}) failed: {first[:200]} -- another rank died or stalled "
                           "(its own log says why); with checkpoint.resume=auto, running the job again (or torchrun "
                           "--max-restarts) continues from the newest checkpoint.")


class InFlight:
    """The collective this process is blocked in, if any: what the watchdog (runtime/watchdog.py)
    names when a step stalls (torch's NCCL flight recorder keeps the same record, for CUDA only).
    Written by the calling thread, read by the watchdog's; a tuple assignment is atomic in CPython."""

    now: tuple[str, str, float] | None = None  # (op, group name, since: time.monotonic())


def in_flight() -> tuple[str, str, float] | None:
    return InFlight.now


class _Watched:
    """An async collective's handle whose wait() is recorded in InFlight (and metered: `work` may be
    the meter's timed handle)."""

    def __init__(self, work, label: tuple[str, str]):
        self.work, self.label = work, label

    def wait(self, *args, **kwargs):
        InFlight.now = (*self.label, time.monotonic())
        try:
            return self.work.wait(*args, **kwargs)
        except RuntimeError as e:
            raise _lost(e, self.label) from None
        finally:
            InFlight.now = None

    def __getattr__(self, name):  # is_completed(), get_future(), ...
        return getattr(self.work, name)


def _metered(group, nbytes: int, call, op: str = "collective"):
    """Run `call` (a torch.distributed call on `group`), recorded in InFlight while it blocks; while
    the group's meter counts, report its bytes and the seconds spent in it, and time the wait() of
    the handle(s) it returns."""
    label = (op, group.name if isinstance(group, Group) else "world" if group is None else "custom")
    meter = group.meter if isinstance(group, Group) else None
    InFlight.now = (*label, time.monotonic())
    counting = meter is not None and meter.on
    start = time.perf_counter()
    try:
        if counting:
            with meter.blocked():
                out = call()
        else:
            out = call()
    except RuntimeError as e:
        raise _lost(e, label) from None
    finally:
        InFlight.now = None
        if counting:  # a block recomputed in backward: real traffic, labelled
            meter.add(group.name + ("_recompute" if recomputing() else ""), nbytes, time.perf_counter() - start,
                      start)
    if out is None:
        return out
    if meter is not None and meter.on:
        out = [meter.timed(w, group.name) for w in out] if isinstance(out, list) else meter.timed(out, group.name)
    return [_Watched(w, label) for w in out] if isinstance(out, list) else _Watched(out, label)


def all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM, async_op: bool = False):
    """In place over `group`; a group of one (None: one process) leaves t as it is. Returns t, or
    with async_op the handle to wait() on (None for a group of one: nothing to wait for). The one
    all-reduce of the code: the step's sums, the gradient buckets and the autograd pairs below."""
    if size(group) == 1:
        return None if async_op else t
    work = _metered(group, _nbytes([t]), lambda: dist.all_reduce(t, op=op, group=_pg(group), async_op=async_op),
                    "all_reduce")
    return work if async_op else t


def all_gather(parts: list[torch.Tensor], t: torch.Tensor, group) -> None:
    _metered(group, _nbytes(parts), lambda: dist.all_gather(parts, t, group=_pg(group)), "all_gather")


def all_gather_into(out: torch.Tensor, t: torch.Tensor, group, async_op: bool = False):
    """Every rank's `t`, end to end, into `out` (size x t's numel)."""
    return _metered(group, _nbytes([out]), lambda: _ALL_GATHER_INTO(out, t, group=_pg(group), async_op=async_op),
                    "all_gather")


def reduce_scatter(out: torch.Tensor, t: torch.Tensor, group, async_op: bool = False):
    """Sum `t` over the group and keep this rank's 1/size of dim 0 in `out`."""
    return _metered(group, _nbytes([t]), lambda: _REDUCE_SCATTER(out, t, group=_pg(group), async_op=async_op),
                    "reduce_scatter")


def all_to_all_single(out: torch.Tensor, t: torch.Tensor, group, out_splits=None, in_splits=None) -> None:
    _metered(group, _nbytes([t]), lambda: dist.all_to_all_single(out, t, out_splits, in_splits, group=_pg(group)),
             "all_to_all")


def batch_isend_irecv(sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]], group) -> list:
    """Post the sends and receives (tensor, peer's global rank) together; one handle per op, sends first."""
    ops = [dist.P2POp(dist.isend, t, peer, _pg(group)) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, peer, _pg(group)) for t, peer in recvs]
    return _metered(group, _nbytes([t for t, _ in sends]), lambda: dist.batch_isend_irecv(ops), "send/recv")


def broadcast(t: torch.Tensor, src: int, group) -> None:
    _metered(group, _nbytes([t]), lambda: dist.broadcast(t, src=src, group=_pg(group)), "broadcast")


def all_gather_object(objs: list, obj, group) -> None:
    """Python objects (pickled): bookkeeping outside the step, not metered."""
    _metered(None, 0, lambda: dist.all_gather_object(objs, obj, group=_pg(group)), "all_gather_object")


def barrier(group=None) -> None:
    """No data: not metered, but recorded in InFlight (a rank that never arrives stalls here).
    One process (no process group started): nothing to wait for. The one barrier of the code."""
    if dist.is_initialized():
        _metered(group, 0, lambda: dist.barrier(group=_pg(group)), "barrier")


# -- the tensor / sequence-parallel pairs ------------------------------------------------------

def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    return x if size(group) == 1 else all_reduce(x.contiguous(), group)


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} into {n} equal parts")
    return x.chunk(n, dim=dim)[rank(group)].contiguous()


def _gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = size(group)
    if n == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(n)]
    all_gather(parts, x.contiguous(), group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum over the group, then keep this rank's chunk of `dim`, in one collective."""
    n = size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"cannot reduce-scatter dim {dim} of size {x.shape[dim]} over {n} ranks")
    # The collective splits dim 0: move `dim` to the front, scatter, move it back.
    src = x.movedim(dim, 0).contiguous()
    out = torch.empty((src.shape[0] // n, *src.shape[1:]), dtype=x.dtype, device=x.device)
    reduce_scatter(out, src, group)
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
    # Eager under train.compile (a graph break at each call): the communication stays these plain
    # functions, with their metering (Python state: the meter's counters), instead of being traced
    # into functional collectives inside the graph (compiling.py).
    @eager
    def collective(x: torch.Tensor, group) -> torch.Tensor:
        return _Collective.apply(x, group, forward_fn, backward_fn) if size(group) > 1 else x
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
