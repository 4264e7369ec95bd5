"""A store-key prefix that every worker of one torchrun round agrees on, on any number of machines.

Under torchrun the agents share one TCPStore across restarts (parallel/state.py says why a
process group then needs a prefix of the round's own). The agents agree on the rendezvous round,
but do not tell their workers; TORCHELASTIC_RESTART_COUNT is each agent's own count, and two
agents disagree on it after a worker dies on one machine: that agent counts a failure, while the
other may restart its healthy workers as a membership change, which it does not count (pytorch
issue 108158). So the workers settle the round among themselves, in the store.

What they can rely on: an agent starts its new workers only after the rendezvous of the new round
has completed, and every agent joins it only after stopping its old workers. So when a worker of
round k runs, no worker of an earlier round is alive to write to the store, though their keys are
still there. The handshake:

    rank 0:   epoch = store.add("epoch", 1)          a number no earlier round used
              wait for "epoch<epoch>/rank<r>" of every other rank r
              set  "epoch<epoch>/go" = the tokens they wrote
    rank r:   e = the value of "epoch" now           this round's, or (rank 0 not there yet) an old one
              set  "epoch<e>/rank<r>" = a token of its own (random, never used before)
              wait for "epoch<e>/go": holding its token -> e is this round's epoch
                                      without it (an old round's) or "epoch" moved on -> read again

A stale epoch cannot pass: its `go` (if an old rank 0 wrote one) lists the old workers' tokens,
never this worker's fresh one. A fresh epoch's keys are written only by this round's workers.
"""

from __future__ import annotations

import datetime
import time
import uuid

import torch.distributed as dist

EPOCH = "nanotrain/epoch"
POLL_S = 0.01


def round_prefix(store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta) -> str:
    """The prefix this round's process group writes its keys under: "nanotrain/epoch<n>", the
    same n on every rank of the round, a new n every round."""
    if rank == 0:
        epoch = store.add(EPOCH, 1)
        others = [f"{EPOCH}{epoch}/rank{r}" for r in range(1, world_size)]
        if others:
            store.wait(others, timeout)
        store.set(f"{EPOCH}{epoch}/go", ",".join(store.get(k).decode() for k in others))
        return f"{EPOCH}{epoch}"
    token, deadline = uuid.uuid4().hex, time.monotonic() + timeout.total_seconds()
    while time.monotonic() < deadline:
        epoch = store.add(EPOCH, 0)  # read without changing it
        if epoch and _admitted(store, epoch, rank, token, deadline):
            return f"{EPOCH}{epoch}"
        time.sleep(POLL_S)
    raise TimeoutError(f"rank {rank} waited {timeout.total_seconds():.0f} s for rank 0 to start this round "
                       "(parallel.timeout_s): is rank 0's process running?")


def _admitted(store: dist.Store, epoch: int, rank: int, token: str, deadline: float) -> bool:
    """Whether rank 0 admitted this worker to `epoch` (False: an old round's epoch; read again)."""
    store.set(f"{EPOCH}{epoch}/rank{rank}", token)
    go = f"{EPOCH}{epoch}/go"
    while time.monotonic() < deadline:
        if store.check([go]):
            return token in store.get(go).decode().split(",")
        if store.add(EPOCH, 0) != epoch:  # rank 0 of this round has started a new epoch
            return False
        time.sleep(POLL_S)
    return False
