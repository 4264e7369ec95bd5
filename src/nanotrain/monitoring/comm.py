"""Communication, measured around the real collectives: bytes and seconds per parallel group.

While a `CommMeter` is installed, the torch.distributed functions the parallel code calls
(all_reduce, all_gather, reduce-scatter, all-to-all, the pipeline's batched send/recv) are
wrapped: each call adds its message size to the group it ran on (tp, dp, pp, ep, edp, embd;
"world" for the default group) and the seconds the caller spent blocked in it. An async call
(async_op=True: the data-parallel buckets overlapping backward, ZeRO's reduce-scatter, the
pipeline's sends and receives) counts its launch and then the time its wait() blocks. So what
is measured is the exposed communication, the time the step could not compute: a transfer
hidden behind the backward costs nothing, and a pipeline stage waiting for its neighbour's
activations (the bubble) shows as pp time. On CUDA, NCCL runs on its own stream and these
host-side times show only the launches; timing the GPU's side needs CUDA events (or
torch.profiler). torch.profiler records the same calls as `record_param_comms` events; this
keeps the counting in a few readable lines and runs on every step.

Bytes are the message size as nccl-tests reports it: the tensor an all-reduce sums, the whole
gathered output of an all-gather, the whole input of a reduce-scatter, what this rank hands to
an all-to-all (its own share included), what it sends to a pipeline neighbour. The bytes that
cross the wire per rank follow from them: 2(n-1)/n of the size for a ring all-reduce, (n-1)/n
for an all-gather, reduce-scatter or all-to-all, all of it for a send
(inspection/comm.py estimates both).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.distributed as dist

# name -> (which positional argument, or keyword, holds the tensor whose size is the message)
WRAPPED = {
    "all_reduce": ("tensor", 0),
    "broadcast": ("tensor", 0),
    "all_gather": ("tensor_list", 0),  # the gathered list: its total is the message
    "all_gather_into_tensor": ("output_tensor", 0),
    "all_gather_single": ("output_tensor", 0),
    "reduce_scatter_tensor": ("input", 1),
    "reduce_scatter_single": ("input", 1),
    "all_to_all_single": ("input", 1),
    "batch_isend_irecv": ("p2p_op_list", 0),
}


def _nbytes(value) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        total = 0
        for v in value:
            if isinstance(v, dist.P2POp):
                total += _nbytes(v.tensor) if v.op in (dist.isend, dist.send) else 0  # sent bytes only
            else:
                total += _nbytes(v)
        return total
    return 0


class _TimedWork:
    """An async collective's handle: its wait() adds the time the caller spends blocked in it."""

    def __init__(self, work, meter: CommMeter, group: str):
        self._work, self._meter, self._group = work, meter, group

    def wait(self, *args, **kwargs):
        start = time.perf_counter()
        out = self._work.wait(*args, **kwargs)
        self._meter.seconds[self._group] += time.perf_counter() - start
        return out

    def __getattr__(self, name):
        return getattr(self._work, name)


class CommMeter:
    def __init__(self, names: dict[str, dist.ProcessGroup | None]):
        self.names = {id(g): n for n, g in names.items() if g is not None}
        self.bytes: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)
        self._depth = threading.local()

    @classmethod
    def for_state(cls, ps) -> CommMeter:
        return cls({"tp": ps.tp_group, "dp": ps.dp_group, "pp": ps.pp_group, "ep": ps.ep_group,
                    "edp": ps.edp_group, "embd": ps.embd_group})

    def group_name(self, group) -> str:
        return "world" if group is None else self.names.get(id(group), "other")

    def reset(self) -> None:
        for d in (self.bytes, self.seconds):
            d.clear()

    def _wrap(self, name: str, fn):
        key, position = WRAPPED[name]

        def metered(*args, **kwargs):
            depth = getattr(self._depth, "n", 0)
            if depth:  # a wrapped function that calls another (reduce_scatter_tensor -> _single)
                return fn(*args, **kwargs)
            if name == "batch_isend_irecv":
                ops = kwargs.get(key, args[0] if args else [])
                group = ops[0].group if ops else None
            else:
                group = kwargs.get("group", args[_group_position(name)] if len(args) > _group_position(name) else None)
            payload = kwargs.get(key, args[position] if len(args) > position else None)
            g = self.group_name(group)
            size = _nbytes(payload)
            self.bytes[g] += size
            start = time.perf_counter()
            self._depth.n = depth + 1
            try:
                out = fn(*args, **kwargs)
            finally:
                self._depth.n = depth
                self.seconds[g] += time.perf_counter() - start  # the call itself (all of it, if blocking)
            if out is None:
                return out
            if isinstance(out, list):  # batch_isend_irecv: one handle per op
                return [_TimedWork(w, self, g) for w in out]
            return _TimedWork(out, self, g)

        return metered

    @contextmanager
    def installed(self):
        """Wrap the torch.distributed functions while the block runs (then restore them)."""
        saved = {n: getattr(dist, n) for n in WRAPPED if hasattr(dist, n)}
        for n, fn in saved.items():
            setattr(dist, n, self._wrap(n, fn))
        try:
            yield self
        finally:
            for n, fn in saved.items():
                setattr(dist, n, fn)


def _group_position(name: str) -> int:
    """Where `group` sits among the positional arguments of each wrapped function."""
    return {"all_reduce": 2, "broadcast": 2, "all_gather": 2, "all_gather_into_tensor": 2, "all_gather_single": 2,
            "reduce_scatter_tensor": 3, "reduce_scatter_single": 3, "all_to_all_single": 4}.get(name, 99)
