"""Master weights, master gradients and AdamW moments, each in its own dtype.

Mixed-precision training keeps several copies of what is logically one weight:

    model parameter   what forward and backward read        precision.param_dtype
    master weight     what the optimizer updates            precision.master_dtype
    master gradient   what is accumulated, reduced, clipped precision.grad_dtype
    exp_avg/exp_avg_sq AdamW's first and second moments     precision.exp_avg_dtype / exp_avg_sq_dtype

Who owns the master (precision.master_owner):

  optimizer (Megatron's and apex O2's layout): the model holds its parameters in
      param_dtype; the optimizer holds a master copy in master_dtype (sharded over dp under
      ZeRO) and, after each step, writes it back into the model (cast, or all-gathered in
      param_dtype by ZeRO). When the two dtypes are equal there is one copy, updated in place.
  module (torch.autocast's layout): the model's parameters *are* the master, stored in
      master_dtype; each GEMM casts its weight to the compute dtype as it runs, and no
      param_dtype copy persists. (This is what the bf16 recipe with the default dtypes does.)

A master weight in bf16 loses small updates: an update below half a unit in the last
place (2^-8 relative) rounds back to the old value, every step. Two remedies:

  stochastic   round up with probability equal to the distance from the value below,
               so the rounded weight is the exact one on average (formats.quantize).
  kahan        compensated summation: keep what the rounding lost, c = w_exact - w, in a
               second bf16 buffer and add it back before the next update (Kahan 1965;
               used for bf16 training by Zamirai et al. 2020 and by optimi's AdamW).

adamw_update() is torch.optim.AdamW's arithmetic (the same operations in the same order,
so with every dtype fp32 it gives torch's result), computed in fp32 whatever the storage
dtypes, and written back into each buffer with its rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .formats import FloatFormat, quantize

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# bf16 and fp16 as FloatFormats, so that formats.quantize rounds to them stochastically.
BF16 = FloatFormat("bf16", 8, 7, 127, float(torch.finfo(torch.bfloat16).max), torch.bfloat16)
FP16 = FloatFormat("fp16", 5, 10, 15, 65504.0, torch.float16)
_FORMATS = {torch.bfloat16: BF16, torch.float16: FP16}


@dataclass(frozen=True)
class Dtypes:
    """The dtypes of one run (see the table above); all fp32 by default."""

    storage: torch.dtype = torch.float32  # the model's parameters as stored in the model
    master: torch.dtype = torch.float32
    grad: torch.dtype = torch.float32
    exp_avg: torch.dtype = torch.float32
    exp_avg_sq: torch.dtype = torch.float32
    rounding: str = "nearest"  # how a bf16/fp16 master is written: nearest, stochastic or kahan

    @classmethod
    def from_config(cls, p) -> "Dtypes":
        storage = p.param_dtype if p.master_owner == "optimizer" else p.master_dtype
        return cls(DTYPES[storage], DTYPES[p.master_dtype], DTYPES[p.grad_dtype], DTYPES[p.exp_avg_dtype],
                   DTYPES[p.exp_avg_sq_dtype], p.master_rounding)

    @property
    def all_fp32(self) -> bool:
        return all(d == torch.float32 for d in (self.storage, self.master, self.grad, self.exp_avg, self.exp_avg_sq))

    @property
    def torch_adamw(self) -> bool:
        """torch.optim.AdamW can do it: fp32 masters and moments (gradients are cast at the step)."""
        return self.master == self.exp_avg == self.exp_avg_sq == torch.float32


def round_into(dst: torch.Tensor, value: torch.Tensor, rounding: str = "nearest",
               generator: torch.Generator | None = None) -> None:
    """dst <- value (fp32), rounded to dst's dtype: to nearest (a plain cast) or stochastically."""
    if rounding == "stochastic" and dst.dtype in _FORMATS:
        dst.copy_(quantize(value, _FORMATS[dst.dtype], "stochastic", generator))  # exact in dst's dtype
    else:
        dst.copy_(value)


class MixedAdamW:
    """AdamW over tensors of any of fp32/bf16/fp16, with moments in their own dtypes.

    The interface ZeroOptimizer uses of torch.optim.AdamW: param_groups (lists of master
    tensors with lr and weight_decay), state[master] = {step, exp_avg, exp_avg_sq}, step().
    The gradients come in `grads` (master -> gradient, any dtype; .grad must match the
    tensor's dtype). rounding: how a low-precision master is written back.
    """

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], eps: float,
                 exp_avg_dtype: torch.dtype = torch.float32, exp_avg_sq_dtype: torch.dtype = torch.float32,
                 rounding: str = "nearest", seed: int = 0):
        self.param_groups = [{"lr": lr, **g} for g in groups]
        self.betas, self.eps = betas, eps
        self.moment_dtypes = {"exp_avg": exp_avg_dtype, "exp_avg_sq": exp_avg_sq_dtype}
        self.rounding = rounding
        self.state: dict[torch.Tensor, dict] = {}
        self.compensation: dict[torch.Tensor, torch.Tensor] = {}  # kahan: what rounding lost, per master
        self.generator = torch.Generator().manual_seed(seed) if rounding == "stochastic" else None
        self.grads: dict[torch.Tensor, torch.Tensor] = {}

    def new_state(self, step: torch.Tensor, master: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"step": step.clone(), **{k: torch.zeros_like(master, dtype=d) for k, d in self.moment_dtypes.items()}}

    def kahan_buffer(self, master: torch.Tensor) -> torch.Tensor | None:
        """The compensation buffer of a low-precision master (created at its first use)."""
        if self.rounding != "kahan" or master.dtype == torch.float32:
            return None
        if master not in self.compensation:
            self.compensation[master] = torch.zeros_like(master)
        return self.compensation[master]

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        for group in self.param_groups:
            for p in group["params"]:
                grad = self.grads.pop(p, None)
                if grad is None:
                    continue
                state = self.state.setdefault(p, self.new_state(torch.zeros((), dtype=torch.float32), p))
                state["step"] += 1
                adamw_update(p, grad, state, float(state["step"]), group["lr"], beta1, beta2, self.eps,
                             group["weight_decay"], self.rounding, self.kahan_buffer(p), self.generator)


def adamw_update(p: torch.Tensor, grad: torch.Tensor, state: dict, step: float, lr: float, beta1: float,
                 beta2: float, eps: float, weight_decay: float, rounding: str = "nearest",
                 compensation: torch.Tensor | None = None, generator: torch.Generator | None = None) -> None:
    """One AdamW step on p, in fp32, as torch.optim.AdamW (foreach) computes it."""
    g = grad.float()
    w = p.float()
    if compensation is not None:
        w = w + compensation.float()  # the weight the rounding would have kept
    w.mul_(1 - lr * weight_decay)
    exp_avg = state["exp_avg"].float().lerp_(g, 1 - beta1)
    exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
    step_size = lr / (1 - beta1 ** step)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
    w.addcdiv_(exp_avg, denom, value=-step_size)
    state["exp_avg"].copy_(exp_avg)  # moments: to nearest (their errors do not accumulate the same way)
    state["exp_avg_sq"].copy_(exp_avg_sq)
    if compensation is not None:
        p.copy_(w)  # to nearest; the error goes into the compensation
        compensation.copy_(w - p.float())
    elif p.dtype != torch.float32:
        round_into(p, w, rounding, generator)
    else:
        p.copy_(w)
