"""StepMeter: what the steps between two reports did, read at the report.

Each step's loss and gradient norm stay on the device until a logging step reads them all with
one host sync: on CUDA an .item() per step would stall the launch queue, so the next step's
kernels could not be queued while this one runs. The meter also times the training between
reports (evaluations and saves are left out: the engine restarts the clock after them), from
which tokens/s and the MFU are taken (monitoring/mfu.py).
"""

from __future__ import annotations

import time

import torch


class StepMeter:
    """Per-step losses and gradient norms, on the device until flush(); the training time."""

    def __init__(self, start_step: int):
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.mark, self.mark_step, self.train_time = time.perf_counter(), start_step, 0.0

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.pending.append((step, torch.stack([loss, grad_norm.to(loss)])))

    def flush(self, step: int) -> tuple[dict[int, float], dict[int, float], float]:
        """({step: loss}, {step: grad norm}) since the last flush, and seconds per step."""
        values = torch.stack([v for _, v in self.pending]).tolist()
        now = time.perf_counter()
        step_s = (now - self.mark) / (step - self.mark_step)
        self.train_time += now - self.mark
        losses = {s: v[0] for (s, _), v in zip(self.pending, values)}
        norms = {s: v[1] for (s, _), v in zip(self.pending, values)}
        self.pending.clear()
        self.mark, self.mark_step = now, step
        return losses, norms, step_s

    def restart(self) -> None:
        """After an evaluation or a save: the time until now is not training time."""
        self.mark = time.perf_counter()

    def rewind(self, step: int) -> None:
        """A roll-back to `step`: the pending losses are of steps that no longer happened."""
        self.pending.clear()
        self.mark, self.mark_step = time.perf_counter(), step
