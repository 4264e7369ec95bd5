"""A pipeline schedule by name: its per-rank orders, where its chunks sit, and its play-throughs.

    parallel.pp_schedule -> SCHEDULES[name](rank, pp, v, m): the rank's order of F, B and W actions
                         -> chunk_ids(name, pp, v): the global chunk of each rank's local chunk
                         -> cached_timetable: the orders played in unit slots (what the runner runs)
                         -> timed_play: the same orders played with times (what `nanotrain plan` models)
                         -> schedule_stage: the layers each rank holds

The orders come from one module per schedule (gpipe.py ... dualpipev.py), the mechanics of playing
them from actions.py, the balanced cut into chunks from stage.py. What a schedule asks of the sizes
(micro-batches, chunks per rank, layers) is checked with the config's rules (config/rules.py:
check_schedule), so that validating a config needs no pipeline code.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from .actions import Action, Timetable, forward_only_order, loop_placement, needs, timetable
from .dualpipev import dualpipev_order
from .gpipe import gpipe_order
from .interleaved import interleaved_order
from .one_f_one_b import one_f_one_b_order
from .stage import Stage, chunk_layers
from .zero_bubble import zb_h1_order

# parallel.pp_schedule -> order(rank, pp, v, m); the names are the config's PP_SCHEDULES (config/sections.py)
SCHEDULES: dict[str, Callable[[int, int, int, int], list[Action]]] = {
    "gpipe": gpipe_order, "1f1b": one_f_one_b_order, "interleaved": interleaved_order, "zb_h1": zb_h1_order,
    "dualpipev": dualpipev_order}


def chunk_ids(name: str, pp: int, v: int) -> list[list[int]]:
    """ids[rank][k]: the global chunk of rank's local chunk k under this schedule (stage.py)."""
    if name == "dualpipev":
        return [[r, 2 * pp - 1 - r] for r in range(pp)]  # the V
    return loop_placement(pp, v)


def schedule_stage(name: str, n_layers: int, pp: int, v: int, rank: int, costs: list[float] | None = None) -> Stage:
    """What pipeline rank `rank` runs under schedule `name`: its chunks' layers (the balanced
    partition, stage.py) and their global indices (the placement). The runtime cuts the model to
    it (pipeline_stage); `nanotrain inspect` plans with it."""
    ids = chunk_ids(name, pp, v)
    chunks = chunk_layers(n_layers, pp, v, costs, ids)[rank]
    return Stage(rank, pp, tuple(tuple(c) for c in chunks), tuple(ids[rank]))


@lru_cache(maxsize=64)
def cached_timetable(schedule: str, pp: int, v: int, m: int, forward_only: bool = False) -> Timetable:
    """The unit-slot play-through of a schedule's orders (actions.timetable), once per shape: the
    runner asks for it every step. forward_only: evaluation's order, the chunks in model order."""
    placement = chunk_ids(schedule, pp, v)
    if forward_only:
        orders = [forward_only_order(ids, m) for ids in placement]
    else:
        orders = [SCHEDULES[schedule](r, pp, v, m) for r in range(pp)]
    return timetable(orders, v, placement)


def timed_play(schedule: str, pp: int, v: int, m: int, cost, hop, record: list | None = None
               ) -> tuple[float, list[float]]:
    """Play the schedule's real orders (the ones the runner executes) with times instead of unit
    slots: each rank runs its actions in order, each as soon as the rank is free and its inputs
    have arrived. cost(rank, action, split) -> seconds of compute (exposed communication included),
    where split says that a B computes only the input's gradient (a W follows with the weights')
    and that a W has work left (on the model's first chunk a B runs whole: Timetable.split);
    hop(src_rank, dst_rank) -> seconds for the activation or gradient to travel (0 on one rank).
    Returns (makespan, busy seconds of each rank): the bubble is what lies between them.
    record: a list that receives each action as it is played, (rank, kind, local chunk, mb, start,
    end): the timetable `nanotrain plan --html` draws.
    nanotrain plan's step-time model (inspection/steptime.py) uses it, so every schedule's bubble
    comes out of the schedule itself."""
    placement = chunk_ids(schedule, pp, v)
    orders = [SCHEDULES[schedule](r, pp, v, m) for r in range(pp)]
    n_chunks = pp * v
    rank_of = {c: r for r, ids in enumerate(placement) for c in ids}
    finish: dict[tuple[str, int, int], float] = {}
    free = [0.0] * pp
    busy = [0.0] * pp
    pos = [0] * pp
    split = [{(a.chunk, a.mb) for a in order if a.kind == "W" and placement[r][a.chunk] != 0}
             for r, order in enumerate(orders)]
    remaining = sum(map(len, orders))
    while remaining:
        progressed = False
        for r in range(pp):
            while pos[r] < len(orders[r]):  # run this rank until it waits on another
                a = orders[r][pos[r]]
                c = placement[r][a.chunk]
                ready = free[r]
                for kind, cc, mb in needs(a.kind, c, a.mb, n_chunks, r):
                    done = finish.get((kind, cc, mb))
                    if done is None:
                        break
                    src = rank_of[cc]
                    ready = max(ready, done + (hop(src, r) if src != r else 0.0))
                else:
                    t = cost(r, a, (a.chunk, a.mb) in split[r])
                    finish[(a.kind, c, a.mb)] = free[r] = ready + t
                    if record is not None:
                        record.append((r, a.kind, a.chunk, a.mb, ready, ready + t))
                    busy[r] += t
                    pos[r] += 1
                    remaining -= 1
                    progressed = True
                    continue
                break
        if not progressed:
            raise ValueError(f"pipeline schedule {schedule} cannot proceed: every rank waits")
    return max(free), busy
