"""Pipeline parallelism: split the layers into stages, stream micro-batches through them.

Read in this order:
    stage.py        which layers each rank holds (Stage, pipeline_stage, partition_layers)
    gpipe.py        all forwards, then all backwards
    one_f_one_b.py  1F1B: warm-up, one forward / one backward, cool-down
    interleaved.py  1F1B over v chunks per rank
    zero_bubble.py  ZB-H1: 1F1B with each backward split into B (input) and W (weights)
    dualpipev.py    DualPipeV: two chunks per rank in a V, forwards paired with backwards
    actions.py      a schedule as per-rank action orders, played in time slots
    split_backward.py  B now, W later: the autograd graph cut at the weights
    runner.py       executes one rank's slots: compute, then batched send/recv
    timeline.py     measured intervals, bubble fraction, the timeline picture

One batch through pp stages keeps all but one stage idle at any time; cutting the
batch into m micro-batches lets the stages work on different micro-batches at
once. Gradients of every micro-batch accumulate into the stage's parameters and
the optimizer steps afterwards, exactly as with gradient accumulation. Because
the loss is sum(CE) / (token count of the *global* batch), the sum of the
micro-batch losses is the global mean loss and the accumulated gradients are the
single-process gradients of the same parameters (same names, same values).

(torch.distributed.pipelining is the library version: PipelineStage, Schedule1F1B,
ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble, ScheduleDualPipeV; bench/pp.py
times ours against it.)
"""

from __future__ import annotations

from collections.abc import Callable

from .actions import Action, Timetable, cached_timetable, loop_placement, timetable
from .dualpipev import dualpipev_order
from .gpipe import gpipe_order
from .interleaved import interleaved_order
from .one_f_one_b import one_f_one_b_order
from .stage import Stage, chunk_layers, layer_costs, partition_layers, pipeline_stage
from .zero_bubble import zb_h1_order

# parallel.pp_schedule -> order(rank, pp, v, m)
SCHEDULES: dict[str, Callable[[int, int, int, int], list[Action]]] = {
    "gpipe": gpipe_order, "1f1b": one_f_one_b_order, "interleaved": interleaved_order, "zb_h1": zb_h1_order,
    "dualpipev": dualpipev_order}


def chunks_per_rank(name: str, v: int) -> int:
    """Chunks each rank holds: DualPipeV's two, else parallel.pp_virtual_stages."""
    return 2 if name == "dualpipev" else v


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


def check_chunks(name: str, v: int) -> list[str]:
    """Whether schedule `name` runs v (parallel.pp_virtual_stages) chunks per rank, as messages that
    name the fix (empty: fine). check_schedule's first rule, on its own for `nanotrain inspect`: its
    layout's vp (parallel/layout.py) meets the config's schedule in no validated config."""
    if name == "dualpipev":  # the V is 2 chunks whatever v says (chunks_per_rank): 1, the default, or 2
        return [] if v in (1, 2) else [f"parallel.pp_schedule='dualpipev' runs 2 chunks per rank (a V), not "
                                       f"parallel.pp_virtual_stages={v}: leave pp_virtual_stages at 1."]
    if name == "interleaved":
        return [] if v >= 2 else ["parallel.pp_schedule='interleaved' needs parallel.pp_virtual_stages >= 2 "
                                  "(chunks per rank); with 1 it is plain 1F1B: set pp_schedule='1f1b'."]
    return [] if v == 1 else [f"parallel.pp_virtual_stages={v} needs parallel.pp_schedule='interleaved' ({name} "
                              "runs one chunk per rank): set pp_virtual_stages=1 or pp_schedule='interleaved'."]


def check_schedule(name: str, pp: int, v: int, m: int, n_layers: int) -> list[str]:
    """What is wrong with this combination, as messages that name the fix (empty: fine).
    v: parallel.pp_virtual_stages as configured."""
    if name not in SCHEDULES:
        return [f"parallel.pp_schedule={name!r} is not a schedule: use one of {', '.join(SCHEDULES)}."]
    errors = check_chunks(name, v)
    if name == "dualpipev":
        if m < 2 * pp:
            errors.append(f"DualPipeV needs at least 2 x parallel.pp = {2 * pp} micro-batches per step, got {m} "
                          "(train.batch_size / (parallel.dp x train.micro_batch_size)): lower "
                          "train.micro_batch_size or raise train.batch_size.")
    elif name == "interleaved" and m % pp:
        errors.append(f"interleaved 1F1B needs the micro-batches per step ({m} = train.batch_size / "
                      f"(parallel.dp x train.micro_batch_size)) to be a multiple of parallel.pp={pp}: "
                      "change train.micro_batch_size or train.batch_size.")
    v = chunks_per_rank(name, v)
    if n_layers < pp * v:
        errors.append(f"model.n_layers={n_layers} cannot fill parallel.pp={pp} x pp_virtual_stages={v} = "
                      f"{pp * v} chunks (each needs a layer): lower pp or pp_virtual_stages.")
    return errors


def textbook_bubble(pp: int, m: int, v: int = 1, name: str = "1f1b") -> float:
    """Idle fraction of a step, with a backward twice a forward and free communication.

    GPipe and 1F1B: (pp - 1) / (m + pp - 1). Interleaving makes fill and drain v times
    shorter: Narayanan et al. give the bubble as (1/v) (pp - 1) / m of the compute time,
    i.e. (pp - 1) / (v m + pp - 1) of the step, about the 1F1B fraction divided by v.
    The split schedules' is their play-through's (timeline.timetable_timelines: F, B and W
    one unit each). For ZB-H1 with m >= pp that is pp - 1 idle units per rank beside 3 m of
    work, (pp - 1) / (3 m + pp - 1); DualPipeV has no short formula."""
    if name in ("zb_h1", "dualpipev"):
        from .timeline import measured_bubble, timetable_timelines
        return measured_bubble(timetable_timelines(cached_timetable(name, pp, chunks_per_rank(name, v), m)))
    return (pp - 1) / (v * m + pp - 1)


__all__ = ["Action", "Stage", "pipeline_stage", "SCHEDULES", "Timetable", "cached_timetable", "check_chunks",
           "check_schedule", "chunk_ids", "chunk_layers", "chunks_per_rank", "layer_costs", "partition_layers",
           "schedule_stage", "textbook_bubble", "timetable"]
