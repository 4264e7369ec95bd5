"""Low-bit formats and their scaling, against independent definitions: torch's own float8
casts, grids decoded from bit patterns, and per-block loops written out longhand."""

import math

import pytest
import torch

from nanotrain.precision import E2M1, E4M3, E5M2, blockwise, grid, mxfp4, nvfp4, quantize, quantize_e8m0, tensorwise


def torch_grid(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of a torch float8 dtype, from all 256 bit patterns."""
    values = torch.arange(256, dtype=torch.uint8).view(dtype).double()
    return torch.unique(values[torch.isfinite(values)])


def log_uniform(n: int, lo: float, hi: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp(torch.empty(n).uniform_(math.log(lo), math.log(hi), generator=g))
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return mag * sign


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_grid_matches_torch_float8(fmt):
    assert torch.equal(grid(fmt), torch_grid(fmt.torch_dtype))
    assert grid(fmt).max().item() == fmt.max


def test_e2m1_grid():
    assert grid(E2M1).tolist() == [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_nearest_equals_torch_cast_in_range(fmt):
    x = log_uniform(200_000, fmt.min_subnormal / 4, fmt.max)
    g = grid(fmt).float()
    ties = (g[1:] + g[:-1]) / 2  # every midpoint: round half to even decides
    x = torch.cat([x, ties, -ties, torch.zeros(1)])
    assert torch.equal(quantize(x, fmt), x.to(fmt.torch_dtype).float())


def test_e2m1_nearest_and_ties_to_even():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    # The even neighbour is the one whose last mantissa bit is 0.
    assert quantize(ties, E2M1).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert quantize(-ties, E2M1).tolist() == [-0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0]
    x = torch.empty(10_000).uniform_(-6, 6, generator=torch.Generator().manual_seed(1))
    g = grid(E2M1).float()
    nearest = g[(x[:, None] - g[None, :]).abs().argmin(dim=1)]
    assert torch.equal(quantize(x, E2M1), nearest)


@pytest.mark.parametrize("fmt", [E4M3, E5M2, E2M1])
def test_saturation_and_specials(fmt):
    x = torch.tensor([fmt.max * 1.01, -fmt.max * 3, 1e30, float("inf"), float("-inf"), float("nan"), 0.0, -0.0])
    y = quantize(x, fmt)
    assert y[:5].tolist() == [fmt.max, -fmt.max, fmt.max, fmt.max, -fmt.max]
    assert math.isnan(y[5]) and y[6] == 0 and y[7] == 0


def test_subnormals():
    s = E4M3.min_subnormal  # 2^-9
    x = torch.tensor([0.4 * s, 0.6 * s, 1.5 * s, 2.5 * s, 7 * s, 8 * s])
    assert (quantize(x, E4M3) / s).tolist() == [0, 1, 2, 2, 7, 8]
    assert E2M1.min_subnormal == 0.5 and quantize(torch.tensor([0.3]), E2M1).item() == 0.5


@pytest.mark.parametrize("fmt", [E4M3, E2M1])
def test_stochastic_rounding_is_unbiased_between_neighbours(fmt):
    g = grid(fmt).float()
    x = torch.tensor([0.3, -1.1, 2.7, 5.5]) if fmt is E2M1 else torch.tensor([0.3, -1.1, 2.7, 300.0, 0.001])
    n = 40_000
    samples = quantize(x.repeat(n, 1), fmt, "stochastic", torch.Generator().manual_seed(0))
    lo = g[torch.searchsorted(g, x, right=True) - 1]
    hi = g[torch.searchsorted(g, x)]
    assert ((samples == lo) | (samples == hi)).all()
    p_up = (x - lo) / (hi - lo)  # the chance of rounding up
    sd = torch.sqrt(p_up * (1 - p_up) / n) * (hi - lo)
    assert ((samples.mean(0) - x).abs() <= 5 * sd + 1e-7).all()
    nearest = quantize(x.repeat(n, 1), fmt).mean(0)
    assert ((nearest - x).abs() >= (samples.mean(0) - x).abs()).all()  # nearest is biased, stochastic not


def test_tensorwise_current_and_delayed():
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(2)) * 30
    q, s = tensorwise(x, E4M3)
    assert torch.equal(s, (x.abs().max() / 448).expand_as(x))
    assert torch.equal(q, (x / s).to(torch.float8_e4m3fn).float())
    assert q.abs().max().item() == 448
    q2, s2 = tensorwise(x, E4M3, margin=2)  # headroom: the largest value maps to 448 / 4
    assert q2.abs().max().item() == 112
    stale = x.abs().max() / 2  # a delayed-scaling amax below this step's: the top saturates
    q3, _ = tensorwise(x, E4M3, amax=stale)
    assert q3.abs().max().item() == 448 and (q3.abs() == 448).sum() > 1


def loop_blockwise(x, fmt, b0, b1):
    """Block scaling written out: for every block, its amax, its scale, its rounded values."""
    q, s = torch.zeros_like(x), torch.zeros_like(x)
    for i in range(0, x.shape[0], b0):
        for j in range(0, x.shape[1], b1):
            blk = x[i:i + b0, j:j + b1]
            scale = max(blk.abs().max().item(), torch.finfo(torch.float32).tiny) / fmt.max
            s[i:i + b0, j:j + b1] = scale
            q[i:i + b0, j:j + b1] = quantize(blk / scale, fmt)
    return q, s


@pytest.mark.parametrize("block", [(1, 128), (128, 128)])
def test_deepseek_blockwise_scaling(block):
    x = torch.randn(260, 300, generator=torch.Generator().manual_seed(3))
    x[:, 130:140] *= 1000  # an outlier channel raises only its own tiles' scales
    q, s = blockwise(x, E4M3, block)
    q_ref, s_ref = loop_blockwise(x, E4M3, *block)
    assert torch.equal(s, s_ref) and torch.equal(q, q_ref)
    err = (q * s - x).abs()
    assert (err <= torch.maximum(x.abs() * 2 ** -4, s * E4M3.min_subnormal / 2) * (1 + 1e-6)).all()
    if block == (1, 128):  # per-tile: the outlier's tile is coarse, the other tiles of the row are not
        assert err[:, :128].max() < err[:, 128:256].max() / 100


def test_nvfp4_two_level_scales():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(4)) * 5
    q, s = nvfp4(x)
    s_tensor = x.abs().max() / (6 * 448)
    for i in range(8):
        for j in range(0, 64, 16):
            blk = x[i, j:j + 16]
            s_block = quantize(blk.abs().max() / 6 / s_tensor, E4M3)  # stored in e4m3
            assert torch.equal(s[i, j:j + 16], (s_block * s_tensor).expand(16))
            assert torch.equal(q[i, j:j + 16], quantize(blk / (s_block * s_tensor), E2M1))
    assert set(q.unique().tolist()) <= set(grid(E2M1).tolist())
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(6))
    q2, s2 = nvfp4(w, two_d=True)  # 16x16 blocks (weights): one scale for 16 rows too
    s_tensor = w.abs().max() / (6 * 448)
    for i in range(0, 32, 16):
        for j in range(0, 64, 16):
            s_block = quantize(w[i:i + 16, j:j + 16].abs().max() / 6 / s_tensor, E4M3)
            assert torch.equal(s2[i:i + 16, j:j + 16], (s_block * s_tensor).expand(16, 16))


def test_mxfp4_power_of_two_scales():
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(5)) * 3
    q, s = mxfp4(x)
    for i in range(4):
        for j in range(0, 96, 32):
            blk = x[i, j:j + 32]
            scale = 2.0 ** (math.floor(math.log2(blk.abs().max().item())) - 2)
            assert torch.equal(s[i, j:j + 32], torch.full((32,), scale))
            assert torch.equal(q[i, j:j + 32], quantize(blk / scale, E2M1))
    assert torch.equal(torch.log2(s), torch.log2(s).round())  # e8m0: powers of two only
    assert quantize_e8m0(torch.tensor([3.0, 0.7, 1e-45])).tolist() == [2.0, 0.5, 2.0 ** -127]


def test_block_padding_and_zero_blocks():
    x = torch.zeros(3, 20)
    x[0, :5] = torch.tensor([1.0, -2.0, 3.0, 0.5, 0.25])
    for fn in (lambda t: blockwise(t, E4M3), nvfp4, mxfp4):
        q, s = fn(x)
        assert q.shape == x.shape and torch.isfinite(s).all() and (s > 0).all()
        assert torch.equal(q[1:], torch.zeros(2, 20))  # all-zero blocks stay zero
