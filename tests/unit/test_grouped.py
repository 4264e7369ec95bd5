"""Grouped expert GEMMs (models/grouped.py) against the per-expert loop they replace: both paths
(torch._grouped_mm and the padded batch), uneven and idle experts, no rows at all, autocast, and
the whole MoE layer's output and gradients (1e-6, fp32)."""

import pytest
import torch

from nanotrain.models.grouped import grouped_mm, grouped_mm_supported
from nanotrain.models.moe import ExpertMLP, LocalRoutedMoE

TOL = 1e-6


def close(a, b, tol=TOL):
    """Within tol of the reference, relative to its largest element (the kernels sum in another
    order: an element that cancels to near 0 differs by ~1e-7 of the tensor's scale)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert (a - b).abs().max() <= tol * b.abs().max(), float((a - b).abs().max() / b.abs().max())


def loop(x, w, counts):
    return torch.cat([xe @ we for xe, we in zip(x.split(counts), w.unbind(0))])


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("counts", [[3, 0, 7, 1], [0, 0, 5, 0], [4, 4, 4, 4]])
def test_grouped_mm_equals_the_loop(padded, counts):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(counts), 16, generator=g, requires_grad=True)
    w = torch.randn(len(counts), 16, 24, generator=g, requires_grad=True)
    if not padded:
        assert grouped_mm_supported(x, w)
    y = grouped_mm(x, w, counts, padded=padded)
    y.square().sum().backward()
    gx, gw = x.grad, w.grad
    x.grad = w.grad = None
    ref = loop(x, w, counts)
    ref.square().sum().backward()
    close(y, ref)
    close(gx, x.grad)
    close(gw, w.grad)
    for e, c in enumerate(counts):
        if c == 0:
            assert not gw[e].any()  # an idle expert's gradient is 0


def test_a_broadcast_gradient_is_taken():
    """y.sum().backward() hands _grouped_mm's backward a stride-0 gradient, which it refuses."""
    x = torch.randn(6, 16, requires_grad=True)
    w = torch.randn(2, 16, 8, requires_grad=True)
    grouped_mm(x, w, [2, 4]).sum().backward()
    ref_x, ref_w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loop(ref_x, ref_w, [2, 4]).sum().backward()
    close(x.grad, ref_x.grad)
    close(w.grad, ref_w.grad)


@pytest.mark.parametrize("padded", [False, True])
def test_no_rows_stays_connected(padded):
    x = torch.zeros(0, 8, requires_grad=True)
    w = torch.randn(2, 8, 8, requires_grad=True)
    y = grouped_mm(x, w, [0, 0], padded=padded)
    assert y.shape == (0, 8)
    y.sum().backward()  # the backward runs (an expert-parallel rank with no tokens still joins)
    assert w.grad is not None and not w.grad.any()


def test_misaligned_16_bit_rows_take_the_padded_path():
    x, w = torch.randn(5, 12).bfloat16(), torch.randn(2, 12, 8).bfloat16()
    assert not grouped_mm_supported(x, w)  # 12 bf16 = 24 bytes: not 16-byte aligned
    close(grouped_mm(x, w, [2, 3]).float(), loop(x, w, [2, 3]).float(), tol=1e-2)


def _experts(grouped: bool) -> ExpertMLP:
    torch.manual_seed(0)
    m = ExpertMLP(8, 32, 16, 0.02, 0.02)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)
    m.grouped = grouped
    return m


def test_expert_mlp_grouped_equals_loop_under_autocast():
    counts = [5, 0, 3, 9, 1, 0, 6, 2]
    x = torch.randn(sum(counts), 32)
    out = {}
    for grouped in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out[grouped] = _experts(grouped)(x, counts)
    assert out[True].dtype == out[False].dtype == torch.bfloat16
    torch.testing.assert_close(out[True], out[False], rtol=0.02, atol=0.02)  # bf16 sums in another order


def test_moe_layer_grouped_equals_loop():
    results = {}
    for grouped in (True, False):
        torch.manual_seed(0)
        moe = LocalRoutedMoE(32, 16, 2, 16, n_shared_experts=1)
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.1)
        moe.experts.grouped = grouped
        x = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y = moe(x)
        y.square().sum().backward()
        results[grouped] = (y, x.grad, {n: p.grad for n, p in moe.named_parameters()})
    (y1, gx1, g1), (y0, gx0, g0) = results[True], results[False]
    close(y1, y0)
    close(gx1, gx0)
    for name in g0:
        close(g1[name], g0[name])
