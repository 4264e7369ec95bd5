"""Ring attention (parallel/context_parallel.py) in gloo worlds of 2 and 4: each rank's zigzag
tokens get the outputs and the q/k/v gradients of full causal attention over the whole sequence
(1e-5, fp32), with GQA and with MLA's unequal q/k and v head sizes, and under bf16 autocast the
fp32 results rounded once; and the zigzag split gives every rank the same work."""

import pytest
import torch
import torch.nn.functional as F

from nanotrain.parallel.context_parallel import zigzag_index, zigzag_split
from nanotrain.parallel.launch import run_world

TOL = 1e-5


def _inputs(B=2, H=4, Hkv=2, T=32, d_qk=16, d_v=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, d_qk, generator=g), torch.randn(B, Hkv, T, d_qk, generator=g),
            torch.randn(B, Hkv, T, d_v, generator=g), torch.randn(B, H, T, d_v, generator=g))


def _ring(shape: dict):
    import torch.distributed as dist

    from nanotrain.parallel.context_parallel import ContextParallel, ring_attention

    cp = ContextParallel.of(dist.group.WORLD)
    q, k, v, dout = (zigzag_split(t, cp.size, cp.rank, dim=2).requires_grad_() for t in _inputs(**shape))
    out = ring_attention(q, k, v, cp)
    out.backward(dout.detach())
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("shape", [{"Hkv": 4, "d_v": 16}, {"Hkv": 2, "d_v": 8}], ids=["mha", "gqa_mla_dims"])
def test_ring_attention_equals_full_causal_attention(cp, shape):
    q, k, v, dout = (t.requires_grad_() for t in _inputs(**shape))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref.backward(dout)
    results = run_world(_ring, cp, shape)
    for rank, (out, dq, dk, dv) in enumerate(results):
        for got, want in ((out, ref), (dq, q.grad), (dk, k.grad), (dv, v.grad)):
            want = zigzag_split(want.detach(), cp, rank, dim=2)
            torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)


def _ring_under_autocast(shape: dict):
    """_ring with bf16 q, k, v and the ring called under bf16 autocast, as a bf16 model calls it."""
    import torch.distributed as dist

    from nanotrain.parallel.context_parallel import ContextParallel, ring_attention

    cp = ContextParallel.of(dist.group.WORLD)
    q, k, v, dout = (zigzag_split(t.bfloat16(), cp.size, cp.rank, dim=2) for t in _inputs(**shape))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ring_attention(q, k, v, cp)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def test_ring_attention_under_bf16_autocast_is_fp32_attention_rounded_once():
    """In a bf16 model the ring still computes in fp32 (as one process's attention does: SDPA upcasts
    bf16 to fp32 inside) and rounds its results once: each output and gradient is the fp32 attention
    of the same bf16 values within bf16's rounding (2^-9 of its norm). Autocast must not reach the
    ring's blocks, written out for MLA's unequal head sizes: it ran their matmuls and log-sum-exps in
    bf16 (an lse off by up to 0.02) and the merges of those lse in bf16; measured 8e-3 of the output,
    and DeepSeek's step-1 gradient norm 15x one process's own bf16 rounding spread under cp=2."""
    shape = {"Hkv": 2, "d_v": 8}  # MLA's head sizes
    q, k, v, dout = (t.bfloat16().float() for t in _inputs(**shape))  # the bf16 values, in fp32
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref.backward(dout)
    for rank, (out, dq, dk, dv) in enumerate(run_world(_ring_under_autocast, 2, shape)):
        for name, got, want in (("out", out, ref), ("dq", dq, q.grad), ("dk", dk, k.grad), ("dv", dv, v.grad)):
            want = zigzag_split(want.detach(), 2, rank, dim=2)
            rel = ((got.float() - want).norm() / want.norm()).item()
            assert got.dtype == torch.bfloat16 and rel <= 2.0 ** -9, (rank, name, rel)


def test_zigzag_gives_each_rank_an_early_and_a_late_chunk():
    assert zigzag_index(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert zigzag_index(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    # Causal work (pairs j <= i) per rank is equal.
    work = [sum(int(i) + 1 for i in zigzag_index(64, 4, r)) for r in range(4)]
    assert len(set(work)) == 1
    with pytest.raises(ValueError, match="not divisible by 2 x parallel.cp"):
        zigzag_index(30, 4, 0)
