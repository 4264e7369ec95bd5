"""GPipe (Huang et al. 2019): all forwards, then all backwards.

Timeline for pp = 4, m = 8 (Fi / Bi = forward / backward of micro-batch i):

  rank 0 |F1 F2 F3 F4 F5 F6 F7 F8 .  .  .  .  .  .  B8 B7 B6 B5 B4 B3 B2 B1|
  rank 1 |.  F1 F2 F3 F4 F5 F6 F7 F8 .  .  .  .  B8 B7 B6 B5 B4 B3 B2 B1 . |
  rank 2 |.  .  F1 F2 F3 F4 F5 F6 F7 F8 .  .  B8 B7 B6 B5 B4 B3 B2 B1 .  . |
  rank 3 |.  .  .  F1 F2 F3 F4 F5 F6 F7 F8 B8 B7 B6 B5 B4 B3 B2 B1 .  .  . |

Idle ("bubble"): the (pp - 1) slots of fill and of drain on every rank, a fraction
(pp - 1) / (m + pp - 1) of the step. Memory: every rank keeps all m micro-batches'
activations until the backwards start. Backwards run newest first, so the last
rank can start its first backward right after its last forward.
"""

from __future__ import annotations

from .actions import Action


def gpipe_order(rank: int, pp: int, v: int, m: int) -> list[Action]:
    assert v == 1, "GPipe runs one chunk per rank"
    return [Action("F", 0, i) for i in range(m)] + [Action("B", 0, i) for i in reversed(range(m))]
