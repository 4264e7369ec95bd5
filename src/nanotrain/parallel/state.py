"""ParallelState: every process group of a run, in one object (no module-level globals), and the
run's Layout (parallel/layout.py), from which its sizes are read.

Rank layout (Megatron's order tp-cp-ep-dp-pp): tp varies fastest, then cp, then dp, then pp.

    rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))

    world 8 = tp 2 x dp 2 x pp 2:

            pp stage 0            pp stage 1
          tp0   tp1             tp0   tp1
    dp0  [ 0  ,  1 ]           [ 4  ,  5 ]
    dp1  [ 2  ,  3 ]           [ 6  ,  7 ]

    tp groups: {0,1} {2,3} {4,5} {6,7}   ranks that split one layer's matrices
    dp groups: {0,2} {1,3} {4,6} {5,7}   ranks that hold the same shard, different data
    pp groups: {0,4} {1,5} {2,6} {3,7}   ranks that hold consecutive stages
    (embedding groups: the first and last rank of each pp group, for tied embeddings)

Context parallelism sits next to tp: the cp ranks of a group hold the same weights and the same
rows of the batch, each 1/cp of every sequence (parallel/context_parallel.py):

    world 8 = tp 2 x cp 2 x dp 2:

              cp0         cp1
          tp0   tp1   tp0   tp1
    dp0  [ 0  ,  1 ,   2  ,  3 ]
    dp1  [ 4  ,  5 ,   6  ,  7 ]

    cp groups: {0,2} {1,3} {4,6} {5,7}         the ring of one sequence's chunks
    dp groups: {0,2,4,6} {1,3,5,7}             every replica of a weight: dp x cp ranks, whose
                                               gradients (and ZeRO's shards) are summed over all of them

Expert parallelism is carved out of the dp dimension (ep divides dp):
dp_rank = edp_rank * ep + ep_rank, so ep groups are runs of ep consecutive dp
ranks, and the expert-data-parallel group links the ranks that hold the same
experts (and their cp ranks). Expert parameters sync over expert-dp, all others over dp.

Each kind of group is built by listing its rank sets and handing them to
torch.distributed.new_subgroups_by_enumeration (every process creates every
group, in the same order, as the collective API requires). A DeviceMesh of
shape (pp, dp, tp) would give the same groups; writing the lists out shows
the layout. Each is held as a collectives.Group (its name, size, this rank, and the run's
communication meter), which is what every collective of the project takes.

Restarts (`torchrun --max-restarts N`): by default torchrun's agent hosts one TCPStore for the
whole job and every round of workers joins it (TORCHELASTIC_USE_AGENT_STORE=True; the store is
created once, in the first rendezvous round: torch/distributed/elastic/rendezvous/
dynamic_rendezvous.py next_rendezvous, and static_tcp_rendezvous.py likewise). A process group
writes its connection details under fixed keys (gloo: each rank's address for each peer, under
"default_pg/0//cpu//0/<rank>"), so after a restart a new worker can read the address a dead worker of
the previous round left there, connect to a closed port, and fail ("Gloo connectFullMesh
failed ... Connection refused"; NCCL fails the same way on a stale unique id: pytorch/pytorch
issue 135712). init_parallel therefore joins that shared store under a prefix of the round's own,
so each round starts with no keys. The prefix is one every worker of the round agrees on, on one
machine or many, settled in the store by a handshake (parallel/rounds.py): torchrun's
TORCHELASTIC_RESTART_COUNT is each agent's own count, which two agents need not agree on.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch.distributed as dist

from .collectives import Group
from .layout import Layout
from .rounds import round_prefix


@dataclass
class ParallelState:
    # The run's layout (parallel/layout.py): the sizes live there alone; tp, pp, dp, ep and
    # world_size below read it.
    layout: Layout = Layout()
    rank: int = 0
    tp_group: Group | None = None
    cp_group: Group | None = None  # context parallel: the ring (parallel/context_parallel.py)
    # Every replica of a weight: the dp ranks, and under context parallelism their cp ranks too
    # (Megatron's data-parallel group "with context parallel"): gradients, ZeRO, the loss sum.
    dp_group: Group | None = None
    pp_group: Group | None = None
    ep_group: Group | None = None
    # The ep ranks again, for the all-to-alls of backward (metered as "ep"): DualPipeV runs one
    # micro-batch's forward beside another's backward (pipeline/runner.py), and each thread's
    # collectives keep one order on every rank only on a group of their own.
    ep_backward_group: Group | None = None
    edp_group: Group | None = None  # expert-data-parallel
    # First and last pipeline rank of each pipeline: they sum the gradients of tied
    # embedding copies (parallel/pipeline/stage.py). None unless pp > 1.
    embd_group: Group | None = None
    # ZeRO-3 only: the dp and expert-dp ranks again, for the parameters' all-gathers (parallel/zero3.py).
    # A group of their own keeps them in one order on every rank, whatever order the gradients'
    # reduce-scatters on dp/edp take (an expert with no tokens on one rank posts its bucket late).
    dp_gather_group: Group | None = None
    edp_gather_group: Group | None = None
    world_group: Group | None = None  # every rank (the default group)
    meter: object = None  # monitoring.comm.CommMeter given to init_parallel: every group reports to it

    # -- sizes (the layout's) ----------------------------------------------------

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def cp(self) -> int:
        return self.layout.cp

    @property
    def pp(self) -> int:
        return self.layout.pp

    @property
    def dp(self) -> int:
        return self.layout.dp

    @property
    def ep(self) -> int:
        return self.layout.ep

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    # -- coordinates ------------------------------------------------------------

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def cp_rank(self) -> int:
        return self.rank // self.tp % self.cp

    @property
    def dp_rank(self) -> int:
        """Which rows of the global batch this rank trains on (its cp ranks: the same rows)."""
        return self.rank // (self.tp * self.cp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.cp * self.dp)

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.ep

    @property
    def edp_rank(self) -> int:
        return self.dp_rank // self.ep

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def global_rank(self, tp_rank: int | None = None, dp_rank: int | None = None, pp_rank: int | None = None,
                    cp_rank: int | None = None) -> int:
        """The global rank at these coordinates (each defaults to this process's own)."""
        t = self.tp_rank if tp_rank is None else tp_rank
        d = self.dp_rank if dp_rank is None else dp_rank
        p = self.pp_rank if pp_rank is None else pp_rank
        c = self.cp_rank if cp_rank is None else cp_rank
        return t + self.tp * (c + self.cp * (d + self.dp * p))

    @property
    def next_stage_rank(self) -> int | None:
        return None if self.is_last_stage else self.global_rank(pp_rank=self.pp_rank + 1)

    @property
    def prev_stage_rank(self) -> int | None:
        return None if self.is_first_stage else self.global_rank(pp_rank=self.pp_rank - 1)

    def groups(self) -> dict[str, Group | None]:
        """The group of each sharding axis (see params.Shard.axis)."""
        return {"tp": self.tp_group, "ep": self.ep_group}

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tp}, cp {self.cp_rank}/{self.cp}, "
                f"dp {self.dp_rank}/{self.dp}, "
                f"pp {self.pp_rank}/{self.pp}, ep {self.ep_rank}/{self.ep}")


def check_layout(layout: Layout, world_size: int) -> None:
    """Raise ValueError (with the fix) when the parallel sizes cannot tile this world."""
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    if layout.world_size != world_size:
        cp = f" x parallel.cp={layout.cp}" if layout.cp > 1 else ""
        raise ValueError(f"parallel.tp={tp}{cp} x parallel.pp={pp} x parallel.dp={dp} = {layout.world_size}, but the "
                         f"world has {world_size} processes: launch with --nproc-per-node {layout.world_size} or "
                         f"change the sizes so their product is {world_size}.")
    if layout.check():  # a Layout built in code, which no Config validated
        raise ValueError(" ".join(layout.check()))


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def init_parallel(layout: Layout, device_type: str = "cpu", meter=None, timeout_s: float = 300.0) -> ParallelState:
    """Join the process group started by torchrun (or the test launcher) and build every group.

    With a world of one and no torchrun environment, no process group is created:
    single-process runs need none. `meter` (monitoring.comm.CommMeter): the run's communication
    meter, which every group reports its collectives to while it counts. `timeout_s`
    (parallel.timeout_s): how long joining the group, and then any collective, may wait for the
    other ranks before it fails.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_layout(layout, world_size)
    if world_size == 1 and not dist.is_initialized():
        return ParallelState(layout)
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        _init_process_group(backend_for(device_type), timeout)
    state = ParallelState(layout, rank=dist.get_rank(), meter=meter,
                          world_group=Group("world", None, world_size, dist.get_rank(), meter))
    at = state.global_rank
    T, D, P, E, C = range(layout.tp), range(layout.dp), range(layout.pp), range(layout.ep), range(layout.cp)
    edp = range(layout.dp // layout.ep)
    # (Every list covers every cp rank, so every process creates the same groups.)
    groups = {
        "tp": [[at(t, d, q, c) for t in T] for q in P for d in D for c in C],
        "cp": [[at(t, d, q, c) for c in C] for q in P for d in D for t in T],
        "dp": [[at(t, d, q, c) for d in D for c in C] for q in P for t in T],
        "pp": [[at(t, d, q, c) for q in P] for t in T for d in D for c in C],
        "ep": [[at(t, k * layout.ep + e, q, c) for e in E] for q in P for t in T for k in edp for c in C],
        # the ranks that hold the same experts: the other expert-parallel groups, and their cp ranks
        "edp": [[at(t, k * layout.ep + e, q, c) for k in edp for c in C] for q in P for t in T for e in E],
    }
    if layout.zero == 3:
        groups["dp_gather"], groups["edp_gather"] = groups["dp"], groups["edp"]
    if layout.ep > 1:
        groups["ep_backward"] = groups["ep"]
    if layout.pp > 1:
        groups["embd"] = [[at(t, d, 0, c), at(t, d, layout.pp - 1, c)] for t in T for d in D for c in C]
    for name, ranks in groups.items():
        mine, _ = dist.new_subgroups_by_enumeration(ranks, timeout=timeout, backend=backend_for(device_type))
        group = Group("ep" if name == "ep_backward" else name, mine, dist.get_world_size(mine), dist.get_rank(mine),
                      meter)
        setattr(state, f"{name}_group", group)
    return state


def _init_process_group(backend: str, timeout: datetime.timedelta) -> None:
    """init_process_group from the environment (env://). Under a torchrun agent that shares its
    store across restarts, under a prefix of this round's own (see the module docstring)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend, timeout=timeout)
        return
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    store = dist.PrefixStore(round_prefix(store, rank, world_size, timeout), store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def destroy_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
