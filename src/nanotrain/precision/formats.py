"""Low-bit floating-point formats, emulated exactly in fp32.

A format with E exponent bits and M mantissa bits holds, for each exponent e in its
range, the 2^M values (1 + k/2^M) · 2^e (normal), plus the subnormals k/2^M · 2^emin
near zero. Rounding a real number to the format is: find its binade, the spacing of
the grid there (2^(e - M), fixed at 2^(emin - M) for subnormals), and round x/spacing
to an integer. That is all this file does; the values stay fp32 tensors, so a matmul
of rounded operands is the hardware's low-bit GEMM with fp32 accumulation.

    format     E  M  bias  largest   smallest normal  smallest subnormal  inf/NaN
    e4m3 (fn)  4  3   7    448       2^-6             2^-9                NaN only (S.1111.111)
    e5m2       5  2  15    57344     2^-14            2^-16               IEEE inf and NaN
    e2m1       2  1   1    6         1                0.5                 neither (fp4)
    e8m0       8  0  127   2^127     2^-127           -                   NaN (scale format, powers of 2 only)

Out-of-range values saturate to ±largest (what Transformer Engine and the DeepSeek-V3
kernels do after scaling; a plain cast to torch.float8_e4m3fn would give NaN). NaN
stays NaN, and ±inf saturates, like any other overflow.

Rounding: "nearest" is round-half-to-even (IEEE's default; torch.round does it).
"stochastic" rounds up with probability equal to the distance from the grid point
below, so the rounded value is unbiased: E[round(x)] = x. The NVFP4 recipe uses it for
gradients, where many small updates would otherwise round away.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FloatFormat:
    name: str
    exp_bits: int
    man_bits: int
    bias: int
    max: float  # largest finite value
    torch_dtype: torch.dtype | None = None  # torch's own dtype for it, where one exists (for tests)

    @property
    def min_exp(self) -> int:
        """Exponent of the smallest normal value (also the subnormals' exponent)."""
        return 1 - self.bias

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.min_exp - self.man_bits)


E4M3 = FloatFormat("e4m3", 4, 3, 7, 448.0, torch.float8_e4m3fn)
E5M2 = FloatFormat("e5m2", 5, 2, 15, 57344.0, torch.float8_e5m2)
E2M1 = FloatFormat("e2m1", 2, 1, 1, 6.0)
FORMATS = {f.name: f for f in (E4M3, E5M2, E2M1)}


def quantize(x: torch.Tensor, fmt: FloatFormat, rounding: str = "nearest",
             generator: torch.Generator | None = None) -> torch.Tensor:
    """x rounded to the grid of `fmt` (fp32 in, fp32 out), saturating at ±fmt.max."""
    x = x.float()
    a = x.abs()
    # The binade of |x|: 2^e <= |x| < 2^(e+1); below the normals the spacing stays that of emin.
    _, e = torch.frexp(a)  # a = m * 2^e with m in [0.5, 1): the binade's exponent is e - 1
    e = torch.clamp(e - 1, min=fmt.min_exp)
    spacing = torch.ldexp(torch.ones_like(x), e - fmt.man_bits)
    scaled = x / spacing  # exact: a power-of-two division
    if rounding == "nearest":
        steps = torch.round(scaled)  # half to even
    elif rounding == "stochastic":
        # The generator may live on the CPU (the recipes' own): draw there, use on x's device.
        u = torch.rand(x.shape, generator=generator, device=generator.device if generator else x.device).to(x.device)
        steps = torch.floor(scaled + u)
    else:
        raise ValueError(f"rounding={rounding!r}: use 'nearest' or 'stochastic'")
    y = torch.clamp(steps * spacing, -fmt.max, fmt.max)
    return torch.where(torch.isnan(x), x, y)


def grid(fmt: FloatFormat) -> torch.Tensor:
    """Every finite value of the format, sorted, decoded from its bit patterns (the
    independent definition the tests compare quantize() with)."""
    values = set()
    for exp_code in range(2 ** fmt.exp_bits):
        for man_code in range(2 ** fmt.man_bits):
            frac = man_code / 2 ** fmt.man_bits
            v = frac * 2.0 ** fmt.min_exp if exp_code == 0 else (1 + frac) * 2.0 ** (exp_code - fmt.bias)
            if v <= fmt.max:  # e4m3fn's S.1111.111 is NaN; e5m2's top exponent is inf/NaN
                values.update((v, -v))
    return torch.tensor(sorted(values), dtype=torch.float64)


def quantize_e8m0(x: torch.Tensor) -> torch.Tensor:
    """Power-of-two scales (MX's E8M0): 2^floor(log2 x), for x > 0, exponent within [-127, 127]."""
    _, e = torch.frexp(x.float())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), torch.clamp(e - 1, -127, 127))
