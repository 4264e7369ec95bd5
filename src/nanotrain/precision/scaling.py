"""Scaling: fit a tensor's range into a low-bit format's, per tensor or per block.

A format has a fixed range (e4m3: ±448, e2m1: ±6), and activations and gradients do
not. So a tensor x is stored as q · s, where q holds grid values of the format and s is a
higher-precision scale. The recipes differ only in how many values share one s, and in
the format of s itself:

    recipe            values        one scale per              scale format
    fp8 tensorwise    e4m3 / e5m2   tensor (current amax, or   fp32
                                    the max of an amax history: delayed scaling)
    fp8 DeepSeek-V3   e4m3          1x128 tile (activations),  fp32
                                    128x128 block (weights)
    NVFP4             e2m1          1x16 block (or 16x16)      e4m3, times one fp32 per tensor
    MXFP4             e2m1          1x32 block                 e8m0 (a power of two)

Each function returns (q, s) with s already expanded to q's shape, so q * s is the
dequantised tensor, and a GEMM of dequantised operands in fp32 is the scaled low-bit
GEMM with fp32 accumulation. Blocks run along the last dimension (the GEMM's reduction
dimension), and a dimension that is not a multiple of the block is zero-padded for the
amax (zeros never raise it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .formats import E2M1, E4M3, FloatFormat, quantize, quantize_e8m0

_TINY = torch.finfo(torch.float32).tiny  # an all-zero block gets this amax: scale > 0, q = 0


def tensorwise(x: torch.Tensor, fmt: FloatFormat, amax: torch.Tensor | None = None, margin: int = 0,
               rounding: str = "nearest", generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One fp32 scale for the whole tensor: s = amax / (fmt.max / 2^margin).

    amax: the current |x|.max() if None (current scaling), or the value a delayed-scaling
    history gives (Transformer Engine: the max over the last precision.fp8.amax_history_len steps);
    a value of x above it saturates. margin: 2^margin of headroom below fmt.max."""
    amax = x.abs().max().float() if amax is None else amax.float()
    scale = torch.clamp(amax, min=_TINY) / (fmt.max / 2.0 ** margin)
    return quantize(x / scale, fmt, rounding, generator), scale.expand(x.shape)


def _blocks(x: torch.Tensor, b0: int, b1: int) -> tuple[torch.Tensor, tuple]:
    """x (..., R, C) zero-padded to multiples of (b0, b1) and viewed as (..., R/b0, b0, C/b1, b1)."""
    if x.dim() == 1:
        x = x.unsqueeze(0)
    *lead, rows, cols = x.shape
    pr, pc = -rows % b0, -cols % b1
    xp = F.pad(x, (0, pc, 0, pr))
    return xp.view(*lead, (rows + pr) // b0, b0, (cols + pc) // b1, b1), (rows, cols)


def _unblock(t: torch.Tensor, size: tuple, shape: torch.Size) -> torch.Tensor:
    *lead, nr, b0, nc, b1 = t.shape
    return t.reshape(*lead, nr * b0, nc * b1)[..., :size[0], :size[1]].reshape(shape)


def blockwise(x: torch.Tensor, fmt: FloatFormat, block: tuple[int, int] = (1, 128), rounding: str = "nearest",
              generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One fp32 scale per (block[0] x block[1]) block: s = block amax / fmt.max.
    DeepSeek-V3: (1, 128) tiles for activations and gradients, (128, 128) for weights."""
    xb, size = _blocks(x.float(), *block)
    amax = xb.abs().amax(dim=(-3, -1), keepdim=True).clamp(min=_TINY)
    scale = (amax / fmt.max).expand_as(xb)
    q = quantize(xb / scale, fmt, rounding, generator)
    return _unblock(q, size, x.shape), _unblock(scale, size, x.shape)


def nvfp4(x: torch.Tensor, rounding: str = "nearest", two_d: bool = False,
          generator=None, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4: e2m1 values in 1x16 blocks (16x16 with two_d, for weights), each block scale
    stored in e4m3, on top of one fp32 scale per tensor that brings the block scales
    into e4m3's range: s_tensor = amax / (6 · 448), s_block = e4m3(block amax / 6 / s_tensor)."""
    x = x.float()
    amax_tensor = x.abs().max() if amax is None else amax  # (amax: the whole tensor's, under tp)
    s_tensor = torch.clamp(amax_tensor, min=_TINY) / (E2M1.max * E4M3.max)
    xb, size = _blocks(x, 16 if two_d else 1, 16)
    block_amax = xb.abs().amax(dim=(-3, -1), keepdim=True)
    s_block = quantize(block_amax / E2M1.max / s_tensor, E4M3)  # the stored (rounded) block scale
    scale = torch.where(s_block > 0, s_block * s_tensor, torch.ones_like(s_block)).expand_as(xb)
    q = quantize(xb / scale, E2M1, rounding, generator)
    return _unblock(q, size, x.shape), _unblock(scale, size, x.shape)


def mxfp4(x: torch.Tensor, rounding: str = "nearest", generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 (OCP Microscaling): e2m1 values in 1x32 blocks sharing a power-of-two (e8m0)
    scale 2^(floor(log2 amax) - 2), 2 being e2m1's largest exponent; values the scale
    leaves above 6 saturate, as the spec says."""
    xb, size = _blocks(x.float(), 1, 32)
    amax = xb.abs().amax(dim=(-3, -1), keepdim=True).clamp(min=_TINY)
    scale = quantize_e8m0(amax / 4.0).expand_as(xb)  # 2^(floor(log2 amax) - 2), within e8m0's range
    q = quantize(xb / scale, E2M1, rounding, generator)
    return _unblock(q, size, x.shape), _unblock(scale, size, x.shape)
