"""Persistent low-bit weights: chosen linear layers keep their weight in fp8 or NF4 between steps.

A recipe (recipes.py) quantises a weight inside each GEMM and throws the result away;
here the *stored* weight is low-bit, as with Transformer Engine's fp8 model parameters
or QLoRA's NF4 base weights. The model holds only the codes and their scales; every
forward dequantises them for the GEMM; the gradient of that dequantised copy goes to
the optimizer, which keeps the trainable fp32 master and re-quantises it into the codes
after each step (parallel/zero.py, stage 0: a low-bit weight's master is not sharded).

    format  codes                                        bytes / value   scales
    fp8     e4m3 (torch.float8_e4m3fn)                   1               fp32, per tensor or per channel (row)
    nf4     16 levels at the quantiles of N(0, 1)        0.5 (2 per byte) fp32 absmax, per tensor or per channel
            (Dettmers et al. 2023, QLoRA), normalised to [-1, 1]

Per channel means one scale per output row: a row of W is one output feature, whose
range can differ from its neighbours' by orders of magnitude. Under tensor parallelism
a shard keeps its own scales (per channel: the same rows; per tensor: the shard's amax).

Which weights: precision.lowbit.weights, patterns on parameter names as in the
precision policy (glob, or a regex after "re:"), and precision.lowbit.exclude.
"""

from __future__ import annotations

import torch
from torch import nn

from ..module_spec import mark
from ..params import declare, spec
from .formats import E4M3, quantize

# The NF4 levels (QLoRA, appendix E; bitsandbytes' NF4 table).
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
_TINY = torch.finfo(torch.float32).tiny


class LowBitWeight:
    """The codes and scales of one weight of logical shape `shape`; store() writes them from an
    fp32 tensor, dequantize() reads them back as fp32. `param`: the model's parameter it stands
    for, which receives the dequantised weight's gradient (compute_weight)."""

    def __init__(self, fmt: str, scaling: str, shape: torch.Size, device: torch.device,
                 param: nn.Parameter | None = None):
        if fmt not in ("fp8", "nf4") or scaling not in ("tensor", "channel"):
            raise ValueError(f"low-bit weights: format {fmt!r}, scaling {scaling!r}: use fp8|nf4 and tensor|channel")
        self.fmt, self.scaling, self.shape = fmt, scaling, torch.Size(shape)
        numel = self.shape.numel()
        if fmt == "fp8":
            self.codes = torch.zeros(self.shape, dtype=torch.float8_e4m3fn, device=device)
        else:
            self.codes = torch.zeros((numel + 1) // 2, dtype=torch.uint8, device=device)  # two 4-bit codes a byte
        rows = self.shape[0] if scaling == "channel" else 1
        self.scale = torch.ones(rows, 1, device=device)
        self.param = param

    def _amax(self, w: torch.Tensor) -> torch.Tensor:
        w2 = w.reshape(self.scale.shape[0], -1)
        return w2.abs().amax(dim=1, keepdim=True).clamp(min=_TINY)

    @torch.no_grad()
    def store(self, w: torch.Tensor) -> None:
        w = w.float()
        amax = self._amax(w)
        rows = w.reshape(self.scale.shape[0], -1)
        if self.fmt == "fp8":
            self.scale.copy_(amax / E4M3.max)
            self.codes.copy_(quantize(rows / self.scale, E4M3).reshape(self.shape).to(torch.float8_e4m3fn))
        else:
            self.scale.copy_(amax)
            idx = torch.bucketize((rows / self.scale).reshape(-1), _NF4_MIDPOINTS.to(w.device)).to(torch.uint8)
            if idx.numel() % 2:
                idx = torch.cat([idx, idx.new_zeros(1)])
            self.codes.copy_(idx[0::2] | (idx[1::2] << 4))

    def dequantize(self) -> torch.Tensor:
        rows = self.scale.shape[0]
        if self.fmt == "fp8":
            values = self.codes.float().reshape(rows, -1)
        else:
            idx = torch.stack([self.codes & 0xF, self.codes >> 4], dim=1).reshape(-1)[:self.shape.numel()]
            values = NF4_LEVELS.to(self.codes.device)[idx.long()].reshape(rows, -1)
        return (values * self.scale).reshape(self.shape)

    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scale.numel() * self.scale.element_size()

    def compute_weight(self) -> torch.Tensor:
        """The weight for this forward's GEMM: dequantised, its gradient becoming the parameter's.
        The parameter's own values are a placeholder; the optimizer's gradient hook takes its
        gradient and drops it, as any other's (so the model never holds a full-precision weight
        between steps)."""
        w = self.dequantize()
        if torch.is_grad_enabled() and self.param is not None and self.param.requires_grad:
            w = _GradientToParameter.apply(self.param, w)
        return w


class _GradientToParameter(torch.autograd.Function):
    """w itself, forward; backward, w's gradient goes to `param` (of w's shape), whose values play no
    part: autograd then accumulates it into param.grad and runs param's gradient hooks."""

    @staticmethod
    def forward(ctx, param: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def apply_lowbit(model: nn.Module, p) -> list[str]:
    """Give each chosen linear layer's weight a LowBitWeight (`spec(param).lowbit`, and the
    layer's record: module_spec(module).lowbit); the optimizer moves the values into it. Returns
    the parameter names chosen, which the model's record keeps as its lowbit_weights."""
    from .policy import matches, runs_gemms

    lb = p.lowbit  # precision.lowbit
    if not lb.weights:
        return []
    chosen, names = [], {id(t): n for n, t in model.named_parameters()}
    for name, module in model.named_modules():
        # A linear layer's one weight (the experts' stacked weights stay in the recipe's format).
        if not (runs_gemms(module) and isinstance(module, nn.Linear)):
            continue
        weight, pname = module.weight, f"{name}.weight"
        if not any(matches(pat, pname) for pat in lb.weights) or any(matches(pat, pname) for pat in lb.exclude):
            continue
        if spec(weight).pipeline_shared or names.get(id(weight)) != pname:  # the head's copy
            raise ValueError(f"precision.lowbit.weights matches {pname}, which is tied to the embedding: "
                             "add it to precision.lowbit.exclude.")
        lowbit = LowBitWeight(lb.format, lb.scaling, weight.shape, weight.device, weight)
        mark(module, lowbit=lowbit)
        declare(weight, lowbit=lowbit)
        chosen.append(pname)
    if not chosen:
        raise ValueError(f"precision.lowbit.weights={lb.weights} matches no linear layer's weight "
                         "(names as in `nanotrain inspect` or precision_policy.json, e.g. 'layers.*.mlp.*').")
    mark(model, lowbit_weights=tuple(chosen))
    return chosen
