"""inspection/cpu_measure.py: the alpha-beta fit, the GEMM timings and the gloo sweep against direct timings."""

import math
import statistics
import time

import pytest
import torch
import torch.distributed as dist

from nanotrain.inspection import cpu_measure as M
from nanotrain.parallel.launch import run_world

MB = 2 ** 20


def test_fit_recovers_a_known_line_through_noise():
    alpha, beta = 50e-6, 1.5e9
    noise = [1.1, 0.92, 1.05, 0.9, 1.08, 0.95, 1.1, 0.93]  # +-10%, as a quiet machine gives
    points = [(s, (alpha + s / beta) * e) for s, e in zip(M.SIZES, noise)]
    a, b = M.fit_alpha_beta(points)
    assert a == pytest.approx(alpha, rel=0.2) and b == pytest.approx(beta, rel=0.2)
    fit = {"alpha_s": a, "bytes_per_s": b}
    for s, t in points:  # the relative fit is good at 1 KiB as at 16 MiB, not only where the seconds are
        assert 0.8 < M.predict_seconds(fit, s) / t < 1.25


def test_fit_keeps_alpha_non_negative_and_beta_positive():
    # Pure bandwidth, the small sizes a little below the line: unconstrained, the intercept would be
    # negative (a message that takes negative time); the fit goes through the origin instead.
    points = [(1024, 0.9e-6), (65536, 6e-5), (MB, 1e-3), (16 * MB, 1.6e-2)]
    a, b = M.fit_alpha_beta(points)
    assert a == 0.0 and b == pytest.approx(1.05e9, rel=0.1)
    # Flat (latency only, noisy): still a finite, positive bandwidth and the latency as alpha.
    a, b = M.fit_alpha_beta([(1024, 1e-3), (4096, 1.1e-3), (16384, 0.9e-3)])
    assert 0.8e-3 < a < 1.2e-3 and 0 < b < math.inf


def test_cores_sharing():
    assert M.threads_per_process(1, 2) == 2 and M.threads_per_process(2, 2) == 1 and M.threads_per_process(8, 2) == 1
    assert M.effective_rate(100.0, 2, 1, ncores=2) == 100.0  # two single-thread ranks on two cores: each alone
    assert M.effective_rate(100.0, 8, 1, ncores=2) == 25.0  # eight time-share two cores: a quarter each


def test_gemm_seconds_follow_the_flops_and_are_cached():
    saved = torch.get_num_threads()
    small = M.gemm_seconds(512, 256, 1024, torch.float32, 1)
    large = M.gemm_seconds(2048, 256, 1024, torch.float32, 1)  # 4x the FLOPs
    assert torch.get_num_threads() == saved  # the caller's threads restored
    assert 0 < small < 0.1 and 2 < large / small < 8
    t = time.perf_counter()
    assert M.gemm_seconds(2048, 256, 1024, "fp32", 1) == large  # the planner asks per GEMM: a dict hit
    assert time.perf_counter() - t < 1e-3
    rate = M.gemm_rate(torch.float32, 1, ((2048, 256, 1024),))
    assert rate == pytest.approx(2 * 2048 * 256 * 1024 / large)
    assert 1e9 < rate < 1e13  # a CPU core: GFLOP/s to a few TFLOP/s


def _all_reduce_seconds(nbytes: int, calls: int) -> float:
    """One rank: the median seconds of a plain dist.all_reduce of nbytes (fp32), after a warm-up."""
    t = torch.ones(nbytes // 4)
    dist.all_reduce(t)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        dist.all_reduce(t)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@pytest.mark.world
def test_gloo_fit_predicts_a_direct_4mb_all_reduce():
    """The fitted lines go through their own points (closely where bandwidth rules, 4 and 16 MiB, and in
    the median over all sizes: a single small size may sit a few times off when other work shares the
    cores), and the all-reduce's line predicts a plain 4 MB dist.all_reduce timed in another world
    within 3x. Timings on 2 cores shared with the rest of the suite swing when that work starts or
    stops between two worlds, so the whole measurement may run three times; the bounds stay."""
    sizes = (1024, 64 * 1024, MB, 4 * MB, 16 * MB)
    for _ in range(3):
        problems = _gloo_fit_problems(sizes)
        if not problems:
            return
    assert not problems, problems


def _gloo_fit_problems(sizes) -> list:
    table = M.measure_gloo(2, sizes=sizes, ops=("all_reduce", "send_recv"))
    problems = []
    for op, fit in table.items():
        assert fit["alpha_s"] >= 0 and 0 < fit["bytes_per_s"] < math.inf
        assert [s for s, _ in fit["points"]] == list(sizes)
        ratios = {s: M.predict_seconds(fit, s) / t for s, t in fit["points"]}
        if not all(0.5 < ratios[s] < 2 for s in (4 * MB, 16 * MB)) or \
                not 0.5 < statistics.median(ratios.values()) < 2:
            problems.append((op, ratios))
    predicted = M.predict_seconds(table["all_reduce"], 4 * MB)
    direct = max(run_world(_all_reduce_seconds, 2, 4 * MB, 5))  # the slower rank: when the collective ends
    if not 1 / 3 < predicted / direct < 3:
        problems.append(("direct 4 MB all-reduce", predicted, direct))
    return problems
