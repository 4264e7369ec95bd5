"""Pipeline parallelism: split the layers into stages, stream micro-batches through them.

Read in this order:
    stage.py        which layers each rank holds (Stage, pipeline_stage, partition_layers)
    gpipe.py        all forwards, then all backwards
    one_f_one_b.py  1F1B: warm-up, one forward / one backward, cool-down
    interleaved.py  1F1B over v chunks per rank
    zero_bubble.py  ZB-H1: 1F1B with each backward split into B (input) and W (weights)
    dualpipev.py    DualPipeV: two chunks per rank in a V, forwards paired with backwards
    actions.py      a schedule as per-rank action orders, played in time slots
    schedules.py    a schedule by name: its orders, chunk placement, play-throughs, each rank's stage
    split_backward.py  B now, W later: the autograd graph cut at the weights
    runner.py       executes one rank's slots: compute, then batched send/recv
    timeline.py     measured intervals, bubble fraction (and the textbook one), the timeline picture

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

This file only gathers the names other packages use. What a schedule asks of the sizes
(check_schedule, check_chunks, chunks_per_rank) is defined with the config's rules
(config/rules.py, config/sections.py), below the pipeline, so that validating a config needs
no pipeline code; it is named here too, where a reader of the pipeline looks for it.
"""

from ...config import check_chunks, check_schedule, chunks_per_rank
from .actions import Action, Timetable, timetable
from .schedules import SCHEDULES, cached_timetable, chunk_ids, schedule_stage, timed_play
from .stage import Stage, chunk_layers, layer_costs, partition_layers, pipeline_stage
from .timeline import textbook_bubble

__all__ = ["Action", "Stage", "pipeline_stage", "SCHEDULES", "Timetable", "cached_timetable", "check_chunks",
           "check_schedule", "chunk_ids", "chunk_layers", "chunks_per_rank", "layer_costs", "partition_layers",
           "schedule_stage", "textbook_bubble", "timed_play", "timetable"]
