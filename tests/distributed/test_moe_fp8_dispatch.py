"""fp8 expert-parallel dispatch and combine: what arrives is exactly the 1x128-tile e4m3
quantisation of what was sent, in about a quarter of the bytes; a model trained with it
stays close to one trained without."""

import dataclasses

import pytest
import torch

from nanotrain.parallel.launch import run_world
from test_resume_across_layouts import _train, run_config


def _exchange(n_rows):
    import torch.distributed as dist

    from nanotrain.parallel.expert_parallel import exchange, exchange_fp8
    from nanotrain.precision import E4M3, blockwise

    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(sum(n_rows[rank]), 200, generator=g) * torch.logspace(-2, 2, 200)  # spread magnitudes
    out_splits = [n_rows[src][rank] for src in range(2)]
    exact = exchange(x, out_splits, n_rows[rank], None)
    got = exchange_fp8(x, out_splits, n_rows[rank], None)
    q, s = blockwise(x, E4M3, (1, 128))
    sent = exchange(q * s, out_splits, n_rows[rank], None)  # what the quantisation of the sender gives
    return torch.equal(got, sent), ((got - exact).norm() / exact.norm()).item()


def test_fp8_exchange_delivers_the_quantised_rows():
    n_rows = [[3, 5], [4, 0]]  # rows rank r sends to rank 0 and rank 1 (an empty split included)
    for equal, err in run_world(_exchange, 2, n_rows):
        assert equal and 0 < err < 0.05  # e4m3 per 128-value tile: ~3% relative
    payload = 200 * 1 + 2 * 4  # e4m3 bytes + one fp32 scale per 128-value tile (2 tiles of 200)
    assert payload / (200 * 4) < 0.27


def test_training_with_fp8_dispatch_stays_close(tmp_path):
    from test_deepseek import TINY  # noqa: E402

    def losses(out, *extra):
        cfg = run_config(tmp_path, out, *TINY, "--schedule.decay_steps=8", "--train.max_steps=8", "--parallel.dp=2",
                         "--parallel.ep=2", *extra)
        return run_world(_train, 2, dataclasses.asdict(cfg))[0]

    plain = losses("plain")
    fp8 = losses("fp8", "--precision.moe.dispatch_fp8=true", "--precision.moe.combine_fp8=true")
    assert fp8 != plain  # the exchange did change the numbers
    for step in range(1, 9):
        assert fp8[step] == pytest.approx(plain[step], rel=0.01), step
