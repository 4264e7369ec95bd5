"""Divergence: what a step whose gradient norm is not finite does (monitoring.nonfinite).

    stop      end the run at the first one (the engine's check at the next logging step)
    skip      leave weights and optimizer state as they were (the optimizer skips the update) and go on
    rollback  skip it, reload the newest checkpoint, skip the batches since that checkpoint (the data
              that led to the spike, as PaLM's restarts do: Chowdhery et al. 2022, section 5.1), go on

skip and rollback end in a TrainingError after monitoring.max_skipped_steps non-finite steps in a
row (rollback: that many roll-backs to the same checkpoint): a run that keeps diverging must not
keep saving checkpoints of a broken model and exit 0. Every message ends with a hint that is true
for the run's config.
"""

from __future__ import annotations

import math

from ..config import Config


class TrainingError(RuntimeError):
    """The run cannot go on (it diverged, or a rank stalled): one line, the cause and what to do."""


def hint(cfg: Config) -> str:
    """What to change, from this run's config (a hint to enable clipping when it is on would mislead)."""
    o, s, m = cfg.optimizer, cfg.schedule, cfg.monitoring
    ways = [f"lower optimizer.lr (now {o.lr:g})"]
    if o.grad_clip == 0:
        ways.append("enable optimizer.grad_clip (e.g. 1.0)")
    if s.warmup_steps < 100:
        ways.append(f"lengthen schedule.warmup_steps (now {s.warmup_steps})")
    if cfg.precision.recipe == "fp16":
        ways.append("train in bf16 (precision.recipe=bf16), whose range is fp32's")
    if m.nonfinite == "stop":
        ways.append("set monitoring.nonfinite=rollback to reload the newest checkpoint and skip the batches")
    ways.append("or resume from an earlier checkpoint (--checkpoint.resume=PATH)")
    return ", ".join(ways[:-1]) + " " + ways[-1]


class NonFiniteGuard:
    """Counts non-finite steps in a row (skip) and roll-backs to one checkpoint (rollback). Under
    fp16 the loss scaler skips overflowing steps itself (precision/loss_scaling.py): the guard
    stands aside."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.mode = "scaler" if cfg.precision.recipe == "fp16" else cfg.monitoring.nonfinite
        self.limit = cfg.monitoring.max_skipped_steps
        self.in_row: list[int] = []  # the steps skipped since the last good one
        self.rollbacks: tuple[int, int] = (-1, 0)  # (checkpoint step, roll-backs to it in a row)

    def after_step(self, step: int, skipped: bool) -> bool:
        """skip and rollback: count a skipped step (raises at the limit); True when the run is to roll back."""
        if self.mode not in ("skip", "rollback"):
            return False
        if not skipped:
            self.good()
            return False
        self.skipped(step)
        return self.mode == "rollback"

    def check_finite(self, losses: dict[int, float], norms: dict[int, float]) -> None:
        """stop: raise at the first step whose loss or gradient norm is not finite, naming it (under
        skip, rollback and fp16 such a step's update was skipped instead)."""
        if self.mode != "stop":
            return
        for step in sorted(losses):
            if not (math.isfinite(losses[step]) and math.isfinite(norms[step])):
                what = "loss" if not math.isfinite(losses[step]) else "gradient norm"
                raise nonfinite_error(what, losses[step] if what == "loss" else norms[step], step, self.cfg)

    def good(self) -> None:
        self.in_row.clear()

    def skipped(self, step: int) -> None:
        """Raise once `limit` steps in a row were skipped."""
        self.in_row.append(step)
        if len(self.in_row) >= self.limit:
            raise TrainingError(
                f"the gradient norm was not finite at {len(self.in_row)} steps in a row "
                f"({self.in_row[0]}-{self.in_row[-1]}; monitoring.max_skipped_steps={self.limit}): the run diverged. "
                f"{hint(self.cfg)}.")

    def rolled_back(self, to_step: int, bad_step: int) -> None:
        """Raise once the run rolled back to the same checkpoint `limit` times in a row."""
        ckpt, n = self.rollbacks
        self.rollbacks = (to_step, n + 1 if ckpt == to_step else 1)
        self.in_row.clear()
        if self.rollbacks[1] >= self.limit:
            raise TrainingError(
                f"rolled back to the checkpoint of step {to_step} {self.rollbacks[1]} times in a row (the last for "
                f"step {bad_step}; monitoring.max_skipped_steps={self.limit}): the run keeps diverging. "
                f"{hint(self.cfg)}.")


def nonfinite_error(what: str, value: float, step: int, cfg: Config) -> TrainingError:
    return TrainingError(f"{what} became {value} at step {step}: {hint(cfg)}.")
