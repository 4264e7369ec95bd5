"""parallel/rounds.py: the workers of one torchrun round agree on a store prefix that no earlier
round used, whatever an earlier round left in the shared store and whichever rank starts first."""

import datetime
import threading
import time

import pytest
import torch.distributed as dist

from nanotrain.parallel.rounds import EPOCH, round_prefix

TIMEOUT = datetime.timedelta(seconds=30)


@pytest.fixture
def server():
    """The agent's store: one TCPStore for the whole job, that every round's workers join."""
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def _round(server, world: int, first: int | None = None, head_start_s: float = 0.3) -> list[str]:
    """One round of `world` workers, each with its own client; `first` starts head_start_s early
    (the others, rank 0 among them, are still starting)."""
    found = [None] * world

    def worker(rank):
        client = dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=TIMEOUT)
        found[rank] = round_prefix(client, rank, world, TIMEOUT)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(world)]
    order = sorted(range(world), key=lambda r: r != first)
    for i, r in enumerate(order):
        threads[r].start()
        if i == 0 and first is not None:
            time.sleep(head_start_s)
    for t in threads:
        t.join(60)
    return found


def test_every_rank_of_a_round_gets_the_same_new_prefix(server):
    one, two = _round(server, 3), _round(server, 3)
    assert len(set(one)) == 1 and len(set(two)) == 1
    assert one[0] != two[0]


def test_a_rank_that_starts_before_rank_0_does_not_take_the_old_rounds_prefix(server):
    """The first round completed (its `go` is in the store); in the next, rank 2 reads the epoch
    before rank 0 has moved it on: it sees its token missing from the old `go` and waits."""
    old = _round(server, 3)
    new = _round(server, 3, first=2)
    assert len(set(new)) == 1 and new[0] != old[0]


def test_an_old_round_that_died_before_its_go_is_passed_over(server):
    """An earlier rank 0 moved the epoch on and died before admitting anyone (no `go`): a rank of
    the next round that reads that epoch first waits until rank 0 of its own round moves it on."""
    _round(server, 2)
    dead = server.add(EPOCH, 1)  # the dead round's rank 0
    new = _round(server, 2, first=1)
    assert new[0] == new[1] == f"{EPOCH}{dead + 1}"
