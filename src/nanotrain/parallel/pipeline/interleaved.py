"""Interleaved 1F1B (Narayanan et al. 2021, sec. 2.2): v chunks per rank.

Each rank holds v non-adjacent chunks of layers (rank r: chunks r, r + pp, ...),
so a micro-batch visits every rank v times and each visit is 1/v of the work.
Fill and drain are made of these shorter pieces: the bubble shrinks to
(pp - 1) / (v m + pp - 1), about 1F1B's divided by v, at the price of v times
more messages.

Order on each rank (Megatron's): micro-batches go in groups of pp; a group runs
through chunk 0, then chunk 1, ... (forwards), and the backwards visit the
chunks in reverse. Rank r warms up with (pp - r - 1) * 2 + (v - 1) * pp
forwards, then alternates forward / backward, then drains. The slot play-through
(actions.timetable) for pp = 2, v = 2, m = 4; a / b: this rank's chunk 0 / 1, so
rank 0 holds chunks 0 and 2 of the model and rank 1 chunks 1 and 3 (the last):

  rank 0 |F1a F2a F1b F2b F3a B1b F4a B2b F3b B1a F4b B2a .   B3b .   B4b B3a B4a|
  rank 1 |.   F1a F2a F1b B1b F2b B2b F3a B1a F4a B2a F3b B3b F4b B4b B3a B4a .  |

18 slots for 16 actions per rank: bubble 2/18 = (pp - 1) / (v m + pp - 1), where
1F1B with the same layers (each action twice as long) idles 2 of 10 double slots.
(Pictures: docs/pipeline_parallel.md.) It needs m to be a multiple of pp, so that
every group fills the pipe.
"""

from __future__ import annotations

from .actions import Action


def interleaved_order(rank: int, pp: int, v: int, m: int) -> list[Action]:
    if m % pp:
        raise ValueError(f"interleaved 1F1B needs the micro-batch count ({m}) to be a multiple of pp ({pp})")
    total = m * v

    def action(kind: str, j: int) -> Action:
        # The j-th forward (or backward) of this rank: group of pp micro-batches, chunk, micro-batch.
        group, within = divmod(j, pp * v)
        k = within // pp
        return Action(kind, k if kind == "F" else v - 1 - k, group * pp + within % pp)

    n_warmup = min((pp - rank - 1) * 2 + (v - 1) * pp, total)
    order = [action("F", j) for j in range(n_warmup)]
    for j in range(total - n_warmup):
        order += [action("F", j + n_warmup), action("B", j)]
    order += [action("B", j) for j in range(total - n_warmup, total)]
    return order
