"""Pipeline parallelism: split the layers into stages, stream micro-batches through them.

Read in this order:
    stage.py        which layers each rank holds (Stage, pipeline_stage, partition_layers)
    gpipe.py        all forwards, then all backwards
    one_f_one_b.py  1F1B: warm-up, one forward / one backward, cool-down
    interleaved.py  1F1B over v chunks per rank
    actions.py      a schedule as per-rank action orders, played in time slots
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
ScheduleInterleaved1F1B; bench/pp.py times ours against it.)
"""

from __future__ import annotations

from collections.abc import Callable

from .actions import Action, Timetable, cached_timetable, timetable
from .gpipe import gpipe_order
from .interleaved import interleaved_order
from .one_f_one_b import one_f_one_b_order
from .stage import Stage, chunk_layers, layer_costs, partition_layers, pipeline_stage

# parallel.pp_schedule -> order(rank, pp, v, m)
SCHEDULES: dict[str, Callable[[int, int, int, int], list[Action]]] = {
    "gpipe": gpipe_order, "1f1b": one_f_one_b_order, "interleaved": interleaved_order}


def forward_only_order(rank: int, pp: int, v: int, m: int) -> list[Action]:
    """Evaluation: each micro-batch through every chunk, no backward."""
    return [Action("F", k, i) for i in range(m) for k in range(v)]


def check_schedule(name: str, pp: int, v: int, m: int, n_layers: int) -> list[str]:
    """What is wrong with this combination, as messages that name the fix (empty: fine)."""
    errors = []
    if name not in SCHEDULES:
        return [f"parallel.pp_schedule={name!r} is not a schedule: use one of {', '.join(SCHEDULES)}."]
    if name == "interleaved":
        if v < 2:
            errors.append("parallel.pp_schedule='interleaved' needs parallel.pp_virtual_stages >= 2 "
                          "(chunks per rank); with 1 it is plain 1F1B: set pp_schedule='1f1b'.")
        if m % pp:
            errors.append(f"interleaved 1F1B needs the micro-batches per step ({m} = train.batch_size / "
                          f"(parallel.dp x train.micro_batch_size)) to be a multiple of parallel.pp={pp}: "
                          "change train.micro_batch_size or train.batch_size.")
    elif v != 1:
        errors.append(f"parallel.pp_virtual_stages={v} needs parallel.pp_schedule='interleaved' "
                      f"({name} runs one chunk per rank): set pp_virtual_stages=1 or pp_schedule='interleaved'.")
    if n_layers < pp * v:
        errors.append(f"model.n_layers={n_layers} cannot fill parallel.pp={pp} x pp_virtual_stages={v} = "
                      f"{pp * v} chunks (each needs a layer): lower pp or pp_virtual_stages.")
    return errors


def textbook_bubble(pp: int, m: int, v: int = 1) -> float:
    """Idle fraction of a step: (pp - 1) / (m + pp - 1) for GPipe and 1F1B.

    Interleaving makes fill and drain v times shorter: Narayanan et al. give the bubble
    as (1/v) (pp - 1) / m of the compute time, i.e. (pp - 1) / (v m + pp - 1) of the
    step, which is about the 1F1B fraction divided by v (exactly so as m grows)."""
    return (pp - 1) / (v * m + pp - 1)


__all__ = ["Action", "Stage", "pipeline_stage", "SCHEDULES", "Timetable", "cached_timetable", "check_schedule",
           "chunk_layers", "forward_only_order", "layer_costs", "partition_layers", "textbook_bubble",
           "timetable"]
