"""ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism", sec. 3): 1F1B with the backward split.

A backward is two jobs. B, the gradient of the chunk's input, is what the previous
rank waits for; W, the gradients of the weights, nobody waits for. 1F1B runs them as
one, so the previous rank idles through both. ZB-H1 runs B at once and puts W off:
rank r keeps r of its Ws back during the steady state (the last rank the most, since
every other rank's cool-down waits on its Bs) and runs them in the cool-down, where
1F1B idles. Play-through for pp = 4, m = 8 (F, B, W one slot each):

  rank 0 |F1 F2 F3 F4 .  .  .  B1 W1 F5 B2 W2 F6 B3 W3 F7 B4 W4 F8 B5 W5 B6 W6 B7 W7 B8 W8|
  rank 1 |.  F1 F2 F3 .  .  B1 F4 B2 W1 F5 B3 W2 F6 B4 W3 F7 B5 W4 F8 B6 W5 B7 W6 B8 W7 W8|
  rank 2 |.  .  F1 F2 .  B1 F3 B2 F4 B3 W1 F5 B4 W2 F6 B5 W3 F7 B6 W4 F8 B7 W5 B8 W6 W7 W8|
  rank 3 |.  .  .  F1 B1 F2 B2 F3 B3 F4 B4 W1 F5 B5 W2 F6 B6 W3 F7 B7 W4 F8 B8 W5 W6 W7 W8|

(`python -m nanotrain.parallel.pipeline zb_h1 4 8` prints it.) The idle slots
fall from 3 (pp - 1) per rank (1F1B, whose backward is B and W together) to about
pp - 1: the bubble is about a third of 1F1B's. Memory: a micro-batch's activations
live until its W, so rank r holds up to pp of them: 1F1B's peak (rank 0's), on every rank.

torch.distributed.pipelining's ScheduleInterleavedZeroBubble (v = 1 is ZB-H1) is the
library version; its weight gradient is split off the same way (split_backward.py).
"""

from __future__ import annotations

from .actions import Action


def zb_h1_order(rank: int, pp: int, v: int, m: int) -> list[Action]:
    assert v == 1, "ZB-H1 runs one chunk per rank"
    n_warmup = min(pp - rank - 1, m)
    held = min(rank, m - n_warmup)  # Ws this rank puts off until the cool-down
    order = [Action("F", 0, i) for i in range(n_warmup)]
    ws = iter(range(m))  # the Ws, oldest first

    def w() -> list[Action]:
        return [Action("W", 0, next(ws))]

    for i in range(m - n_warmup):  # steady state: F, B, and a W once `held` are waiting
        order += [Action("F", 0, i + n_warmup), Action("B", 0, i)] + (w() if i >= held else [])
    for i in range(m - n_warmup, m):  # cool-down: each B, then a W
        order += [Action("B", 0, i)] + w()
    return order + [Action("W", 0, i) for i in ws]

