"""Communication, measured around the real collectives: bytes and seconds per parallel group.

Every collective the project issues goes through parallel/collectives.py, which takes a named
`Group`; the run's one `CommMeter` is handed to the groups when they are built (parallel/state.py,
init_parallel). While the meter counts (`with meter.counting():`, around each training step, so
evaluation and checkpoint traffic stay out), each collective adds its message size to the group
it ran on (tp, dp, pp, ep, edp, embd; "world" for the default group) and the seconds the caller
spent blocked in it. Nothing in torch.distributed is replaced. An async call
(async_op=True: the data-parallel buckets overlapping backward, ZeRO's reduce-scatter, the
pipeline's sends and receives) counts its launch and then the time its wait() blocks. So what
is measured is the exposed communication, the time the step could not compute: a transfer
hidden behind the backward costs nothing, and a pipeline stage waiting for its neighbour's
activations (the bubble) shows as pp time. On CUDA, NCCL runs on its own stream and these
host-side times show only the launches; timing the GPU's side needs CUDA events (or
torch.profiler). torch.profiler records the same calls as `record_param_comms` events; this
keeps the counting in a few readable lines and runs on every step. (An earlier version patched
the torch.distributed functions for the length of each step; explicit groups need no patching.)

Bytes are the message size as nccl-tests reports it: the tensor an all-reduce sums, the whole
gathered output of an all-gather, the whole input of a reduce-scatter, what this rank hands to
an all-to-all (its own share included), what it sends to a pipeline neighbour. The bytes that
cross the wire per rank follow from them: 2(n-1)/n of the size for a ring all-reduce, (n-1)/n
for an all-gather, reduce-scatter or all-to-all, all of it for a send
(inspection/comm.py estimates both).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager


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
    """Bytes and seconds per group name, added by parallel/collectives.py while `on`."""

    def __init__(self):
        self.bytes: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)
        self.on = False

    @contextmanager
    def counting(self):
        """Count the collectives issued while the block runs (a training step)."""
        before, self.on = self.on, True
        try:
            yield self
        finally:
            self.on = before

    def add(self, group: str, nbytes: int, seconds: float) -> None:
        self.bytes[group] += nbytes
        self.seconds[group] += seconds  # the call itself (all of it, if blocking)

    def timed(self, work, group: str) -> _TimedWork:
        return _TimedWork(work, self, group)

    def reset(self) -> None:
        for d in (self.bytes, self.seconds):
            d.clear()
