"""GEMM recipes: how each of a linear layer's three matmuls quantises its two operands.

A linear layer y = x Wᵀ runs three GEMMs per step. Written with the reduction
dimension last in both operands (the layout every scaling block runs along):

    forward  y  = x   · Wᵀ     operands x   [M, K] and W   [N, K]   (reduce over K)
    dgrad    dx = dy  · W      operands dy  [M, N] and Wᵀ  [K, N]   (reduce over N)
    wgrad    dW = dyᵀ · x      operands dyᵀ [N, M] and xᵀ  [K, M]   (reduce over M, the tokens)

A recipe says, for each of the six operands, how to turn it into q · s (scaling.py).
`gemm(a, b)` is then (q_a s_a)(q_b s_b)ᵀ computed in fp32: on CPU that is exactly
what the low-bit tensor cores compute (products of grid values, fp32 accumulation),
and on CUDA the fp8 tensorwise recipe calls torch._scaled_mm instead.

    recipe           x (fwd)         W (fwd, dgrad)      dy (dgrad)         dyᵀ, xᵀ (wgrad)
    fp8_tensorwise   e4m3, tensor    e4m3, tensor        e5m2, tensor       e5m2 / e4m3, tensor
    fp8_deepseek     e4m3, 1x128     e4m3, 128x128       e4m3, 1x128        e4m3, 1x128 along tokens
    fp8_custom       e4m3, chosen    e4m3, chosen        chosen format, granularity and rounding
    nvfp4            e2m1, 1x16      e2m1, 1x16 (16x16)  e2m1, 1x16, SR     e2m1, 1x16, SR (+ Hadamard)
    mxfp4            e2m1, 1x32      e2m1, 1x32          e2m1, 1x32         e2m1, 1x32

(SR: stochastic rounding. Hadamard: the NVFP4 recipe's random Hadamard transform of
both wgrad operands along the token dimension, which spreads outliers over a block and
cancels in the product, since H Hᵀ = I.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..parallel import collectives
from ..parallel.pipeline.split_backward import running_half
from ..recompute import replayed
from .formats import E4M3, E5M2
from .scaling import blockwise, mxfp4, nvfp4, tensorwise

ROLES = ("x", "w", "dy", "w_t", "dy_t", "x_t")  # forward: (x, w); dgrad: (dy, w_t); wgrad: (dy_t, x_t)


@dataclass
class DelayedScaling:
    """Transformer Engine's delayed scaling: the scale comes from the largest amax of the
    last `history_len` steps, known before this step's tensor is (one fewer pass over it
    on hardware), and this step's amax joins the history afterwards. Evaluation (no grad)
    reads the history without adding to it: it must not change how training rounds.

    With delayed=False it only reduces the current amax (current scaling). `group`: the
    tensor-parallel group of a sharded layer. Each rank sees a shard of a weight (and, in a
    row-parallel layer, of the activations), so its own amax would give each shard its own
    scale and the layout would round differently from one process; as Transformer Engine
    does, the amax is the max over the group, so every shard uses the whole tensor's scale."""

    history_len: int = 16
    histories: dict[str, torch.Tensor] = field(default_factory=dict)
    delayed: bool = True
    group: object = None  # the tp group (parallel/collectives.Group), or None

    def amax(self, role: str, x: torch.Tensor, record: bool = True) -> torch.Tensor:
        """The amax this tensor is scaled by. A block recomputed in backward (train.recompute) reuses
        the one its first forward took and adds nothing to the history (recompute.replayed)."""
        return replayed(lambda: self._amax(role, x, record))

    def _amax(self, role: str, x: torch.Tensor, record: bool) -> torch.Tensor:
        current = x.detach().abs().max().float()
        if self.group is not None:
            collectives.all_reduce(current, self.group, dist.ReduceOp.MAX)
        if not self.delayed:
            return current
        hist = self.histories.get(role)
        if hist is None:  # the first step has no history: current scaling
            if record:
                self.histories[role] = torch.cat([current.reshape(1), current.new_zeros(self.history_len - 1)])
            return current
        if record:
            self.histories[role] = torch.cat([current.reshape(1), hist[:-1]])  # newest first
        return hist.max()

    def at(self, site: str) -> "_View":
        """The histories of one weight of a module that runs several (an expert layer's w1, w2, w3)."""
        return _View(self, site + "/")


@dataclass
class _View:
    """Delayed scaling for one weight site, or read-only (an evaluation forward)."""

    scaling: DelayedScaling
    prefix: str = ""
    record: bool = True

    def amax(self, role: str, x: torch.Tensor) -> torch.Tensor:
        return self.scaling.amax(self.prefix + role, x, self.record)


class Recipe:
    """How to quantise each GEMM operand (see the table above). `name` as in precision.recipe."""

    name = "fp32"

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               state: DelayedScaling | None) -> torch.Tensor:
        """y = x Wᵀ + b with this recipe's three GEMMs (forward here, dgrad and wgrad in backward)."""
        if state is not None and not torch.is_grad_enabled():  # evaluation: read the amax history, add nothing
            state = _View(state.scaling, state.prefix, False) if isinstance(state, _View) else _View(state, "", False)
        return QuantizedLinear.apply(x, weight, bias, self, state)

    def quant(self, t: torch.Tensor, role: str, state: DelayedScaling | None) -> torch.Tensor:
        """t (reduction dimension last) as the dequantised q · s of this recipe."""
        return t

    def gemm(self, a: torch.Tensor, b: torch.Tensor, roles: tuple[str, str], state=None) -> torch.Tensor:
        return self.quant(a, roles[0], state) @ self.quant(b, roles[1], state).t()


class Fp8Tensorwise(Recipe):
    """e4m3 forward, e5m2 gradients (the "hybrid" format), one scale per tensor, `margin`
    powers of 2 of headroom. The amax comes from the state a module passes: delayed scaling
    or the tp-reduced current amax (DelayedScaling, given by policy.apply_policy), or with no
    state this tensor's own (current scaling)."""

    name = "fp8_tensorwise"

    def __init__(self, margin: int = 0, gemm: str = "auto"):
        self.margin, self.gemm_impl = margin, gemm

    def codes(self, t, role, state) -> tuple[torch.Tensor, torch.Tensor]:
        """(the fp8 grid values of t / s, in fp32; the one scale s)."""
        fmt = E5M2 if role.startswith("dy") else E4M3
        amax = state.amax(role, t) if state is not None else None  # delayed, or reduced over tp
        q, s = tensorwise(t, fmt, amax=amax, margin=self.margin)
        return q, s.reshape(-1)[:1]

    def quant(self, t, role, state):
        q, s = self.codes(t, role, state)
        return q * s

    def gemm(self, a, b, roles, state=None):
        """On hardware with fp8 GEMMs, torch._scaled_mm multiplies the fp8 codes and applies both
        scales to the fp32 accumulator; otherwise the emulation (the same grid values, so the
        same products, summed in another order)."""
        if not use_scaled_mm(self.gemm_impl, a, b):
            return super().gemm(a, b, roles, state)
        qa, sa = self.codes(a, roles[0], state)
        qb, sb = self.codes(b, roles[1], state)
        fa, fb = (E5M2 if r.startswith("dy") else E4M3 for r in roles)
        # a row-major [M, K], b column-major [K, N] (the transpose of our [N, K]), as cuBLASLt wants.
        try:
            return torch._scaled_mm(qa.to(fa.torch_dtype).contiguous(), qb.to(fb.torch_dtype).contiguous().t(),
                                    scale_a=sa, scale_b=sb, out_dtype=torch.float32)
        except RuntimeError as e:  # e.g. this build's CPU kernel on oneDNN limited below fp8 matmuls
            raise RuntimeError(f"precision.fp8.gemm=scaled_mm: torch._scaled_mm could not run a [{a.shape[0]}, "
                               f"{a.shape[1]}] x [{a.shape[1]}, {b.shape[0]}] fp8 GEMM on {a.device.type} "
                               f"({str(e).splitlines()[0]}): use precision.fp8.gemm=auto or emulated.") from e


_SCALED_MM_WORKS: dict[str, bool] = {}


def scaled_mm_available(device: torch.device) -> bool:
    """Whether torch._scaled_mm runs fp8 GEMMs on this kind of device (CUDA with fp8 tensor
    cores, sm_89+; this build's CPU kernel), probed once with a tiny e4m3 x e5m2 product."""
    kind = device.type
    if kind not in _SCALED_MM_WORKS:
        try:
            a = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
            b = torch.ones(16, 16, device=device).to(torch.float8_e5m2)
            one = torch.ones(1, device=device)
            y = torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
            _SCALED_MM_WORKS[kind] = bool((y == 16).all())
        except (RuntimeError, AttributeError, NotImplementedError):
            _SCALED_MM_WORKS[kind] = False
    return _SCALED_MM_WORKS[kind]


def use_scaled_mm(choice: str, a: torch.Tensor, b: torch.Tensor) -> bool:
    """precision.fp8.gemm: "emulated", "scaled_mm" (an error where unavailable), or "auto":
    scaled_mm on CUDA where available and the shapes suit it (every dimension a multiple of
    16, as cuBLASLt requires), the emulation otherwise. (This build's CPU kernel gives the same
    result as the emulation but ran 2.6x slower in bench/precision.py, so auto leaves it out.)"""
    if choice == "emulated":
        return False
    fits = a.shape[0] % 16 == 0 and b.shape[0] % 16 == 0 and a.shape[1] % 16 == 0
    if choice == "scaled_mm":
        if not scaled_mm_available(a.device):
            raise RuntimeError(f"precision.fp8.gemm=scaled_mm, but torch._scaled_mm cannot run fp8 GEMMs on "
                               f"{a.device.type} here: use precision.fp8.gemm=auto or emulated.")
        if not fits:
            raise RuntimeError(f"precision.fp8.gemm=scaled_mm needs GEMM dimensions that are multiples of 16, "
                               f"got [{a.shape[0]}, {a.shape[1]}] x [{b.shape[0]}, {b.shape[1]}]ᵀ: use "
                               "precision.fp8.gemm=auto (emulates those) or change the model's widths or the "
                               "micro-batch tokens.")
        return True
    return fits and a.device.type == "cuda" and scaled_mm_available(a.device)


class Fp8DeepSeek(Recipe):
    """DeepSeek-V3's recipe: e4m3 everywhere; activations and gradients in 1x128 tiles
    along the reduction dimension (so in wgrad, along the tokens), weights in 128x128 blocks."""

    name = "fp8_deepseek"

    def quant(self, t, role, state):
        q, s = blockwise(t, E4M3, (128, 128) if role in ("w", "w_t") else (1, 128))
        return q * s


GRANULARITY = {"tile": (1, 128), "block": (128, 128)}  # "tensor" and "channel" (one row) are handled below


def scaled(t: torch.Tensor, fmt, granularity: str, rounding: str = "nearest", generator=None,
           amax: torch.Tensor | None = None) -> torch.Tensor:
    """t as q · s with one scale per tensor, per channel (a row: the GEMM's reduction dimension
    is last, so this is the rowwise scaling torchao calls per-channel), per 1x128 tile or per
    128x128 block."""
    if granularity == "tensor":
        q, s = tensorwise(t, fmt, amax=amax, rounding=rounding, generator=generator)
    else:
        block = (1, t.shape[-1]) if granularity == "channel" else GRANULARITY[granularity]
        q, s = blockwise(t, fmt, block, rounding, generator)
    return q * s


class Fp8Custom(Recipe):
    """fp8 with the granularity of each operand kind chosen: activations (x, and xᵀ in wgrad),
    weights, gradients (dy, dyᵀ); the gradients' format (e4m3 or e5m2) and rounding.
    fp8_deepseek is (tile, block, tile, e4m3); torchao's rowwise recipe is (channel, channel,
    channel)."""

    name = "fp8_custom"

    def __init__(self, x: str = "tile", w: str = "block", grad: str = "tile", grad_format: str = "e4m3",
                 grad_rounding: str = "nearest", seed: int = 0):
        self.granularity = {"x": x, "x_t": x, "w": w, "w_t": w, "dy": grad, "dy_t": grad}
        self.grad_fmt = E5M2 if grad_format == "e5m2" else E4M3
        self.grad_rounding = grad_rounding
        self.generator = torch.Generator().manual_seed(seed) if grad_rounding == "stochastic" else None

    def quant(self, t, role, state):
        grad = role.startswith("dy")
        tensor = self.granularity[role] == "tensor"
        amax = state.amax(role, t) if tensor and state is not None else None  # reduced over tp
        return scaled(t, self.grad_fmt if grad else E4M3, self.granularity[role],
                      self.grad_rounding if grad else "nearest", self.generator, amax)


class NVFP4(Recipe):
    """NVFP4: e2m1 in 1x16 blocks with e4m3 block scales and an fp32 tensor scale; gradients
    rounded stochastically; optionally 16x16 weight blocks (the same quantised weight for
    forward and dgrad) and a random Hadamard transform on the wgrad operands."""

    name = "nvfp4"

    def __init__(self, two_d_weights: bool = True, hadamard: bool = True, seed: int = 0):
        self.two_d, self.hadamard = two_d_weights, hadamard
        self.generator = torch.Generator().manual_seed(seed)  # stochastic rounding and Hadamard signs

    def quant(self, t, role, state):
        rounding = "stochastic" if role.startswith("dy") else "nearest"
        amax = state.amax(role, t) if state is not None else None  # the tensor scale's amax, reduced over tp
        q, s = nvfp4(t, rounding, two_d=self.two_d and role in ("w", "w_t"), generator=self.generator, amax=amax)
        return q * s

    def gemm(self, a, b, roles, state=None):
        if self.hadamard and roles == ("dy_t", "x_t"):
            signs = torch.where(torch.rand(16, generator=self.generator) < 0.5, -1.0, 1.0).to(a.device)
            a, b = hadamard_16(a, signs), hadamard_16(b, signs)
        return super().gemm(a, b, roles, state)


class MXFP4(Recipe):
    """MXFP4: e2m1 in 1x32 blocks with power-of-two scales, for every operand."""

    name = "mxfp4"

    def quant(self, t, role, state):
        q, s = mxfp4(t)
        return q * s


def hadamard_16(t: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """t's last dimension, in blocks of 16, times the random orthonormal matrix diag(signs)·H₁₆/4
    (zero-padded to a multiple of 16: the padding multiplies zeros in both operands)."""
    n = t.shape[-1]
    pad = -n % 16
    x = torch.nn.functional.pad(t, (0, pad)).reshape(*t.shape[:-1], -1, 16)
    x = (x * signs) @ _H16.to(x.device)  # the padded length stays: both operands carry it, and H Hᵀ = I over it
    return x.reshape(*t.shape[:-1], n + pad)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


_H16 = _sylvester(16)

RECIPES = {r.name: r for r in (Fp8Tensorwise, Fp8DeepSeek, Fp8Custom, NVFP4, MXFP4)}


class QuantizedLinear(torch.autograd.Function):
    """A linear layer whose three GEMMs go through a recipe, in fp32 with autocast off
    (the recipe decides every rounding). The output takes the autocast dtype if autocast
    is on (a low-bit GEMM writes bf16 on hardware too), else the input's."""

    @staticmethod
    def forward(ctx, x, weight, bias, recipe: Recipe, state):
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).float()
            y = recipe.gemm(x2, weight.float(), ("x", "w"), state)
            if bias is not None:
                y = y + bias.float()
        ctx.save_for_backward(x2, weight)
        ctx.recipe, ctx.state, ctx.has_bias = recipe, state, bias is not None
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y.reshape(*x.shape[:-1], -1).to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x2, weight = ctx.saved_tensors
        recipe, state = ctx.recipe, ctx.state
        # A backward split in two (parallel/pipeline/split_backward.py) runs this twice: the
        # input's GEMM in B, the weight's in W, each once, as autograd's own mm does.
        half = running_half()
        dx = dw = db = None
        with torch.autocast(dy.device.type, enabled=False):
            dy2 = dy.reshape(-1, dy.shape[-1]).float()
            if half != "weights":
                dx = recipe.gemm(dy2, weight.float().t(), ("dy", "w_t"), state)  # [M, N] x [K, N]ᵀ
                dx = dx.reshape(ctx.x_shape).to(ctx.x_dtype)
            if half != "input":
                dw = recipe.gemm(dy2.t(), x2.t(), ("dy_t", "x_t"), state).to(weight.dtype)  # [N, M] x [K, M]ᵀ
                db = dy2.sum(0) if ctx.has_bias else None
        return dx, dw, db, None, None
