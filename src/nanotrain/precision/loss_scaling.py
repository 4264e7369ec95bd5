"""Dynamic loss scaling for fp16 (Micikevicius et al. 2018, "Mixed Precision Training").

fp16 has 5 exponent bits: gradients below 2^-24 flush to zero, and many real gradients
live there. Multiplying the loss by a scale S multiplies every gradient by S (backward
is linear), lifting them into range; the optimizer divides by S again before it uses
them. Too large an S overflows to inf instead, so S is adjusted as training goes:

    a step whose gradients hold an inf or NaN (anywhere, on any rank) is skipped, and
    after `hysteresis` such steps S is multiplied by `backoff`;
    after `growth_interval` clean steps in a row S is multiplied by `growth`.

The engine applies S by dividing the loss denominator by it; the optimizers divide it
out of the gradients in the same pass as clipping, and detect the overflow from the
global gradient norm, which every rank computes over every rank's gradients, so all
ranks skip the same steps. (torch.amp.GradScaler is the library version; Megatron's
DynamicGradScaler adds the hysteresis used here.)
"""

from __future__ import annotations

from typing import Any


class LossScaler:
    def __init__(self, init_scale: float = 2.0 ** 16, growth_interval: int = 1000, backoff: float = 0.5,
                 growth: float = 2.0, hysteresis: int = 2, min_scale: float = 1.0):
        self.scale = float(init_scale)
        self.growth_interval, self.backoff, self.growth = growth_interval, backoff, growth
        self.hysteresis, self.min_scale = hysteresis, min_scale
        self.clean_steps = 0  # since the last overflow or growth
        self.hysteresis_left = hysteresis
        self.skipped = 0  # steps skipped so far in the run

    def update(self, overflow: bool, step: int) -> None:
        """After each step: `overflow` says whether it was skipped."""
        if overflow:
            self.skipped += 1
            self.clean_steps = 0
            self.hysteresis_left -= 1
            if self.hysteresis_left <= 0:
                if self.scale <= self.min_scale:
                    raise FloatingPointError(
                        f"step {step}: fp16 gradients overflow even at the minimum loss scale {self.min_scale:g}: the "
                        "model's values exceed fp16's range. Use precision.recipe=bf16, or lower optimizer.lr.")
                self.scale = max(self.scale * self.backoff, self.min_scale)
                self.hysteresis_left = self.hysteresis
            return
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale *= self.growth
            self.clean_steps = 0
            self.hysteresis_left = self.hysteresis

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "hysteresis_left": self.hysteresis_left,
                "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self.clean_steps = float(state["scale"]), int(state["clean_steps"])
        self.hysteresis_left, self.skipped = int(state["hysteresis_left"]), int(state["skipped"])
