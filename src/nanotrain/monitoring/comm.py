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

import threading
import time
from collections import defaultdict
from contextlib import contextmanager


def union_length(spans) -> float:
    """Length of the union of (start, end) intervals (empty ones, end <= start, count nothing)."""
    total, reach = 0.0, float("-inf")
    for s, e in sorted(spans):
        s = max(s, reach)
        if e > s:
            total += e - s
            reach = e
    return total


class _TimedWork:
    """An async collective's handle: its wait() adds the time the caller spends blocked in it."""

    def __init__(self, work, meter: CommMeter, group: str):
        self._work, self._meter, self._group = work, meter, group

    def wait(self, *args, **kwargs):
        start = time.perf_counter()
        with self._meter.blocked():
            out = self._work.wait(*args, **kwargs)
        self._meter.add(self._group, 0, time.perf_counter() - start, start)
        return out

    def __getattr__(self, name):
        return getattr(self._work, name)


class CommMeter:
    """Bytes and seconds per group name, added by parallel/collectives.py while `on`.

    Two threads of one rank can compute and communicate at once: DualPipeV runs a forward and a
    backward side by side where experts are spread over ranks (pipeline/runner.py), and while one
    waits in its all-to-all the other computes. The runner marks each thread's compute
    (`computing`); a collective's blocked time that another thread spent computing is `hidden`,
    not exposed, and only the exposed rest goes into `seconds` (so the time split still adds up
    to the step)."""

    def __init__(self):
        self.bytes: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, float] = defaultdict(float)  # exposed: nothing else computed meanwhile
        self.hidden: dict[str, float] = defaultdict(float)  # blocked while another thread computed
        self.on = False
        self._lock = threading.Lock()
        self._open: dict[int, float] = {}  # thread -> since when it computes
        self._done: list[tuple[int, float, float]] = []  # (thread, start, end): recent compute spans

    @contextmanager
    def computing(self):
        """This thread computes for the block, except while it blocks in a collective."""
        tid = threading.get_ident()
        with self._lock:
            self._open[tid] = time.perf_counter()
        try:
            yield
        finally:
            self._close(tid)

    def _close(self, tid: int) -> None:
        with self._lock:
            start = self._open.pop(tid, None)
            if start is not None:
                self._done.append((tid, start, time.perf_counter()))
                del self._done[:-256]  # a collective overlaps only recent spans

    @contextmanager
    def blocked(self):
        """Around a blocking call (parallel/collectives.py): this thread does not compute meanwhile."""
        tid = threading.get_ident()
        was = tid in self._open
        if was:
            self._close(tid)
        try:
            yield
        finally:
            if was:
                with self._lock:
                    self._open[tid] = time.perf_counter()

    def _hidden(self, start: float, end: float) -> float:
        """Seconds of [start, end] during which another thread computed (the union of its spans)."""
        tid = threading.get_ident()
        with self._lock:
            spans = [(s, e) for t, s, e in self._done if t != tid] + [(s, end) for t, s in self._open.items() if t != tid]
        return union_length((max(s, start), min(e, end)) for s, e in spans)

    def add(self, group: str, nbytes: int, seconds: float, start: float | None = None) -> None:
        hidden = self._hidden(start, start + seconds) if start is not None and (self._open or self._done) else 0.0
        with self._lock:
            self.bytes[group] += nbytes
            self.seconds[group] += seconds - hidden  # the call itself (all of it, if blocking), less what hid it
            if hidden:
                self.hidden[group] += hidden

    @contextmanager
    def counting(self):
        """Count the collectives issued while the block runs (a training step)."""
        before, self.on = self.on, True
        try:
            yield self
        finally:
            self.on = before

    def timed(self, work, group: str) -> _TimedWork:
        return _TimedWork(work, self, group)

    def reset(self) -> None:
        for d in (self.bytes, self.seconds, self.hidden):
            d.clear()
