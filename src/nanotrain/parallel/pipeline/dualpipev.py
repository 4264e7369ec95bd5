"""DualPipeV (DeepSeek, 2025): DualPipe cut in half, two chunks per rank in a V.

Rank r holds global chunks r and 2 pp - 1 - r (stage.py draws the V): a micro-batch
goes down the ranks through their chunk 0 ("phase 0") and back up through their
chunk 1 ("phase 1"), so rank 0 both embeds and computes the loss, and the last rank
hands its chunk 0's output to its own chunk 1 without a message.

The order on rank r, in DeepSeek's eight steps (deepseek-ai/DualPipe, dualpipev.py;
"F0" is a forward through chunk 0, "B1" a backward through chunk 1, each of the next
micro-batch of that chunk):

  1  F0 x 2 (pp - r - 1)          fill phase 0
  2  (F0 F1) x (r + 1)            the first micro-batches turn round at the V's tip
  3  (B1 W1 F1) x (pp - r - 1)    first backwards, their W run at once
  4  (F0 B1 F1 B0) x (m - 2 pp + r + 1)   steady state: each forward paired with a backward
  5  (B1 F1 B0) x (pp - r - 1)
  6  (B1 B0) x (r + 1)            drain; from half-way on, the Ws are put off ...
  7  (W B0) x (pp - r - 1)        ... and run where the rank would wait for a gradient
  8  W x (r + 1)

A pair "F0 B1" is one micro-batch's forward next to another's backward: DualPipe
runs them side by side so that one's all-to-all hides behind the other's compute.
Where experts are spread over ranks the runner does the same with two
threads (runner.py); elsewhere the pair runs in turn, and still keeps every rank busy:
the play-through (F, B, W one unit each, a whole backward two) idles 5.9% of the step
at pp = 4, m = 8, against 1F1B's 27.3% and interleaved 1F1B's 15.8%. It needs
m >= 2 pp micro-batches. `python -m nanotrain.parallel.pipeline dualpipev 4 8` prints the
play-through (a / b: the rank's chunk 0 / 1); docs/pipeline_parallel.md draws it.

torch.distributed.pipelining's ScheduleDualPipeV is the library version.
"""

from __future__ import annotations

from collections import deque

from .actions import Action


def dualpipev_order(rank: int, pp: int, v: int, m: int) -> list[Action]:
    assert v == 2, "DualPipeV runs two chunks per rank"
    if m < 2 * pp:
        raise ValueError(f"DualPipeV needs at least 2 pp = {2 * pp} micro-batches per step, got {m}")
    order: list[Action] = []
    nxt_f, nxt_b = [0, 0], [0, 0]  # next micro-batch of each chunk's forward / backward
    put_off: deque[tuple[int, int]] = deque()  # backwards whose W waits, oldest first

    def F(k: int) -> None:
        order.append(Action("F", k, nxt_f[k]))
        nxt_f[k] += 1

    def B(k: int, split: bool = False) -> None:
        order.append(Action("B", k, nxt_b[k]))
        if split:
            put_off.append((k, nxt_b[k]))
        nxt_b[k] += 1

    def W() -> None:
        k, i = put_off.popleft()
        order.append(Action("W", k, i))

    fill = pp - rank - 1
    for _ in range(2 * fill):  # 1
        F(0)
    for _ in range(rank + 1):  # 2
        F(0), F(1)
    for _ in range(fill):  # 3
        B(1, split=True), W(), F(1)
    for _ in range(m - 2 * pp + rank + 1):  # 4
        F(0), B(1), F(1), B(0)
    for _ in range(fill):  # 5
        B(1), F(1), B(0)
    split = False
    for i in range(rank + 1):  # 6: the second half of the drain splits its backwards
        half = i == (rank + 1) // 2
        split = split or (half and rank % 2 == 1)
        B(1, split)
        split = split or (half and rank % 2 == 0)
        B(0, split)
    for _ in range(fill):  # 7
        W(), B(0, split=True)
    while put_off:  # 8
        W()
    return order

