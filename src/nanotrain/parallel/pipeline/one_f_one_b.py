"""1F1B (PipeDream-Flush, Narayanan et al. 2021): warm-up, steady state, cool-down.

Rank r runs pp - r - 1 warm-up forwards, then alternates one forward and one
backward, then drains the backwards left. Timeline for pp = 4, m = 8:

  rank 0 |F1 F2 F3 F4 .  .  .  B1 F5 B2 F6 B3 F7 B4 F8 B5 .  B6 .  B7 .  B8|
  rank 1 |.  F1 F2 F3 .  .  B1 F4 B2 F5 B3 F6 B4 F7 B5 F8 B6 .  B7 .  B8 . |
  rank 2 |.  .  F1 F2 .  B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 F8 B7 .  B8 .  . |
  rank 3 |.  .  .  F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7 F8 B8 .  .  . |

Same length and bubble as GPipe ((pp - 1) / (m + pp - 1)): 1F1B changes *memory*.
A micro-batch's activations are freed by its backward as early as possible, so
rank r keeps at most pp - r micro-batches alive (rank 0: pp, not m).
"""

from __future__ import annotations

from .actions import Action


def one_f_one_b_order(rank: int, pp: int, v: int, m: int) -> list[Action]:
    assert v == 1, "1F1B runs one chunk per rank (see interleaved.py for more)"
    n_warmup = min(pp - rank - 1, m)
    order = [Action("F", 0, i) for i in range(n_warmup)]
    # Steady state: forward micro-batch i + n_warmup, then backward micro-batch i (oldest first).
    for i in range(m - n_warmup):
        order += [Action("F", 0, i + n_warmup), Action("B", 0, i)]
    order += [Action("B", 0, i) for i in range(m - n_warmup, m)]  # cool-down
    return order
