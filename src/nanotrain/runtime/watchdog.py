"""The watchdog: a step that does not finish ends the job, naming the rank that stalled.

A rank that stops (SIGSTOP, a hung file system, a swapping node) or dies leaves every other
rank blocked in its next collective: gloo would wait parallel.timeout_s, silently. Each rank
runs a thread that

  - every second, publishes a heartbeat to the job's rendezvous store:
        nanotrain/heartbeat/<rank> = {step, phase, the collective it is blocked in, time}
    (a stopped or dead process publishes nothing: its heartbeat ages);
  - when the current phase (a training step, an evaluation batch, a save) has run longer than
    the limit, reads every rank's heartbeat, prints who was where, and exits the process with
    EXIT_STALLED, so that torchrun ends the job (and, with --max-restarts, restarts it from the
    newest checkpoint: checkpoint.resume=auto).

The limit is train.step_timeout_s, or 10 x the median training step and at least 60 s; before
three steps are measured (compile, warm-up) it is parallel.timeout_s. torch's NCCL watchdog
(TORCH_NCCL_ASYNC_ERROR_HANDLING, the flight recorder) does this for CUDA; gloo has none.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time

import torch.distributed as dist

from ..parallel.collectives import in_flight

EXIT_STALLED = 3
KEY = "nanotrain/heartbeat/{}"
MIN_LIMIT_S = 60.0


def _store():
    """The default group's store (torchrun's or the launcher's TCPStore); None without a group."""
    if not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # a private API: without it the watchdog still names this rank's own wait
        return None


class Watchdog:
    def __init__(self, rank: int, world_size: int, step_timeout_s: float, startup_limit_s: float,
                 on_exit=lambda: None, period_s: float = 1.0):
        self.rank, self.world_size = rank, world_size
        self.fixed = step_timeout_s or None  # train.step_timeout_s; None: from the median step
        self.limit = self.fixed or startup_limit_s
        self.on_exit, self.period = on_exit, min(period_s, self.limit / 4)
        self.store = _store() if world_size > 1 else None
        self.step, self.phase, self.since = 0, "start-up", time.monotonic()
        self.phase_limit: float | None = None  # a phase with its own limit (a save: parallel.timeout_s)
        self.steps: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="nanotrain-watchdog", daemon=True)

    def __enter__(self) -> "Watchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    # -- the training loop's side --------------------------------------------------

    def beat(self, step: int, phase: str, limit: float | None = None) -> None:
        """A new phase starts ("train", "eval", "save"): its clock starts now."""
        self.step, self.phase, self.phase_limit, self.since = step, phase, limit, time.monotonic()

    def step_took(self, seconds: float) -> None:
        self.steps.append(seconds)
        if self.fixed is None and len(self.steps) >= 3:
            self.limit = max(MIN_LIMIT_S, 10 * statistics.median(self.steps[-50:]))

    # -- the thread ----------------------------------------------------------------------

    def _watch(self) -> None:
        self._publish()
        while not self._stop.wait(self.period):
            elapsed = time.monotonic() - self.since
            if elapsed > (self.phase_limit or self.limit):
                self._fire(elapsed)
            self._publish()

    def _heartbeat(self) -> dict:
        flight = in_flight()
        waiting = None if flight is None else f"{flight[0]}({flight[1]}) for {time.monotonic() - flight[2]:.0f} s"
        return {"step": self.step, "phase": self.phase, "waiting": waiting, "time": time.time(), "pid": os.getpid()}

    def _publish(self) -> None:
        if self.store is not None:
            try:
                self.store.set(KEY.format(self.rank), json.dumps(self._heartbeat()))
            except Exception:  # the store's host is gone: the job is ending anyway
                pass

    def _others(self) -> dict[int, dict] | None:
        """Every rank's last heartbeat; None when the store does not answer within 5 s (its host,
        rank 0 or torchrun's agent, is the one that stalled)."""
        if self.store is None:
            return {}
        found: dict[int, dict] = {}

        def read():
            for r in range(self.world_size):
                if r != self.rank and self.store.check([KEY.format(r)]):
                    found[r] = json.loads(self.store.get(KEY.format(r)))
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout=5)
        return None if reader.is_alive() else found

    def _fire(self, elapsed: float) -> None:
        print(self.report(elapsed, self._heartbeat(), self._others()), file=sys.stderr, flush=True)
        self.on_exit()
        os._exit(EXIT_STALLED)

    def report(self, elapsed: float, mine: dict, others: dict[int, dict] | None) -> str:
        limit = self.phase_limit or self.limit
        how = ("parallel.timeout_s, for a save" if self.phase_limit else "train.step_timeout_s" if self.fixed else
               f"10 x the median step of {statistics.median(self.steps[-50:]):.2f} s, at least {MIN_LIMIT_S:.0f} s"
               if len(self.steps) >= 3 else "parallel.timeout_s, until 3 steps are timed")
        lines = [f"watchdog: rank {self.rank}'s {mine['phase']} of step {mine['step']} has run {elapsed:.0f} s "
                 f"(limit {limit:.0f} s: {how})"
                 + (f", blocked in {mine['waiting']}" if mine["waiting"] else ", not in a collective")]
        stalled = []
        if others is None:
            lines.append("  the rendezvous store does not answer: its host (rank 0, or torchrun's agent) stalled")
            stalled.append(0)
        now = time.time()
        for r in range(self.world_size):
            if r == self.rank or others is None:
                continue
            beat = others.get(r)
            if beat is None:
                lines.append(f"  rank {r}: no heartbeat at all: it stalled or died before the training loop")
                stalled.append(r)
                continue
            age = now - beat["time"]
            state = f"in {beat['waiting']}" if beat["waiting"] else "not in a collective"
            lines.append(f"  rank {r} (pid {beat['pid']}): {beat['phase']} of step {beat['step']}, {state}; "
                         f"last heartbeat {age:.0f} s ago")
            if age > max(10 * self.period, 5.0) or (beat["waiting"] is None and mine["waiting"] is not None):
                stalled.append(r)
        who = (f"rank {', '.join(map(str, stalled))} stalled (stopped, hung or dead)" if stalled else
               f"rank {self.rank} itself did not progress")
        lines.append(f"  -> {who}. Ending this process (exit {EXIT_STALLED}) so that the job ends; under torchrun "
                     "--max-restarts it restarts from the newest checkpoint (checkpoint.resume=auto).")
        return "\n".join(lines)
