"""Preemption: SIGTERM (a scheduler reclaiming the node) or SIGINT (Ctrl-C) ends the run at a
step boundary with a checkpoint, instead of losing everything since the last interval save.

    signal on any rank ──> handler sets a flag (nothing else is safe inside a handler)
    end of every step  ──> all ranks agree: max of the flags over the world (one tiny all-reduce)
    someone was signalled ──> every rank saves the same step, the run returns; exit 128 + signal
    a second signal    ──> exit at once, without saving (the user means it)

The agreement is what makes the checkpoint whole: a signal reaches ranks at different moments
(torchrun forwards its own SIGTERM to every worker; `kill` reaches one), and a save is a
collective that every rank must enter at the same step. Megatron-LM's --exit-signal-handler
does the same with an all-gather per iteration.

torchrun, on SIGTERM or SIGINT, sends SIGTERM to every worker and gives them a grace period
before SIGKILL (torch.distributed.elastic: 30 s by default): the step in flight and the save
must fit in it. The Ctrl-C that a terminal sends to the whole process group reaches the
workers as SIGINT and, a moment later, as torchrun's SIGTERM: a second signal within
`SAME_EVENT_S` of the first is taken as the same event, not as "exit now".
"""

from __future__ import annotations

import os
import signal
import threading
import time

import torch

from ..parallel import collectives

SIGNALS = (signal.SIGTERM, signal.SIGINT)
SAME_EVENT_S = 2.0


class Preemption:
    """Handlers for SIGTERM and SIGINT while the training loop runs (a context manager)."""

    def __init__(self, world, rank: int = 0, on_exit=lambda: None):
        self.world, self.rank, self.on_exit = world, rank, on_exit
        self.signum: int | None = None
        self.at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum, self.at = signum, time.monotonic()
            if self.rank == 0:
                os.write(2, f"{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint "
                            "(send it again to exit at once, without saving)\n".encode())
            return
        if time.monotonic() - self.at < SAME_EVENT_S:
            return
        os.write(2, f"rank {self.rank}: second {signal.Signals(signum).name}: exiting now, without saving\n".encode())
        self.on_exit()
        os._exit(128 + signum)

    def agreed(self) -> int:
        """The signal any rank received (0: none), the same on every rank. Collective."""
        if collectives.size(self.world) == 1:
            return self.signum or 0
        flag = torch.tensor([self.signum or 0], dtype=torch.int32)
        collectives.all_reduce(flag, self.world, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 143 for SIGTERM, 130 for SIGINT."""
    return 128 + signum
