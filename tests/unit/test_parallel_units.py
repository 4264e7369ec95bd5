"""Single-process pieces of the parallel code: layout checks, clipping arithmetic, verify's verdict."""

import pytest
import torch

from nanotrain.parallel.data_parallel import clip_coef, grad_norm
from nanotrain.parallel.layout import Layout
from nanotrain.parallel.state import ParallelState, check_layout
from nanotrain.verify import SPREAD_MARGIN, Report, compare, grad_floor, rel_diff


def test_world_size_must_match_the_layout():
    with pytest.raises(ValueError, match=r"tp=2 x parallel.pp=1 x parallel.dp=2 = 4, but the world has 2"):
        check_layout(Layout(tp=2, dp=2), world_size=2)
    with pytest.raises(ValueError, match="parallel.ep=3 must divide parallel.dp=4"):
        check_layout(Layout(dp=4, ep=3), world_size=4)


def test_coordinates_follow_megatron_order():
    s = ParallelState(Layout(tp=2, dp=2, pp=2), rank=6)
    assert (s.tp, s.dp, s.pp, s.world_size) == (2, 2, 2, 8)  # read from the one layout
    assert (s.tp_rank, s.dp_rank, s.pp_rank) == (0, 1, 1)
    assert s.global_rank(tp_rank=1) == 7 and s.prev_stage_rank == 2 and s.next_stage_rank is None


def test_clip_matches_torch_exactly_on_one_rank():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for pa, pb in zip(a, b):
        pa.grad = torch.randn_like(pa) * 3
        pb.grad = pa.grad.clone()
    ours = grad_norm(a, [p.grad for p in a])  # the optimizer's norm and clipping (parallel/zero.py)
    torch._foreach_mul_([p.grad for p in a], clip_coef(ours, 1.0))
    ref = torch.nn.utils.clip_grad_norm_(b, 1.0)
    assert torch.equal(ours, ref)
    assert all(torch.equal(pa.grad, pb.grad) for pa, pb in zip(a, b))


def test_verdict():
    good = Report([(1, 4.0, 4.0, 0.0)], ("w", 1e-7), 1e-5)
    assert good.ok
    assert not Report([(1, 4.0, 4.1, 0.025)], ("w", 1e-7), 1e-5).ok
    assert not Report([(1, 4.0, 4.0, 0.0)], ("w", 1e-3), 1e-5).ok


def test_verdict_past_step_1_reads_the_rounding_spread():
    """Step 1 (the same parameters on both sides) is held to the tolerance whatever the spread; a
    later step to the tolerance or SPREAD_MARGIN x the measured spread, whichever is larger."""
    rows = [(1, 4.0, 4.0, 0.0), (2, 3.9, 3.9, 1e-7)]
    late = Report(rows, ("w", 1e-7), 1e-5, {1: 1e-7, 2: 1.5e-5})
    assert not late.ok and late.over() == [2]
    late.spread = {1: 1e-5, 2: 1e-5}  # rounding alone moved step 2 by 1e-5 on one process
    assert late.ok and late.limit(2) == SPREAD_MARGIN * 1e-5 and late.limit(1) == 1e-5
    assert "limit" in late.table("x").splitlines()[0]
    late.norm_diffs[2] = 3e-5  # beyond twice the spread
    assert not late.ok and late.over() == [2]
    early = Report(rows, ("w", 1e-7), 1e-5, {1: 1.5e-5, 2: 0.0}, spread={1: 1.0, 2: 1.0})
    assert not early.ok and early.over() == [1]


def test_gradient_measure_floors_vanishing_gradients_and_still_sees_bugs():
    """verify's gradient measure: |a - b| / max(|b|, u·G/tol). A gradient that is zero in exact
    arithmetic and rounding noise in both runs (the key bias) passes; a wrong value in a tensor
    far below the floor (a small bias, halved as by a missing reduction) still fails."""
    g = torch.Generator().manual_seed(0)
    ref = {"w": torch.randn(64, 64, generator=g), "bias": torch.randn(64, generator=g) * 1e-4,
           "key_bias": torch.randn(64, generator=g) * 1e-10}
    G = float(torch.sqrt(sum(t.double().pow(2).sum() for t in ref.values())))
    floor = grad_floor(ref, 1e-5)
    assert floor == pytest.approx(2.0 ** -24 * G / 1e-5)
    rounded = {"w": ref["w"] * (1 + 1e-7 * torch.randn(64, 64, generator=g)), "bias": ref["bias"] * (1 + 1e-7),
               "key_bias": torch.randn(64, generator=g) * 1e-10}  # noise: not even the sign agrees
    assert rel_diff(rounded["key_bias"], ref["key_bias"], 0.0) > 0.5  # against its own norm: O(1)
    run = {"losses": {1: 4.0}, "grad_norms": {1: G}}
    report = compare({**run, "grads": ref}, {**run, "grads": rounded}, 1e-5)
    assert report.ok and report.worst_grad[1] < 1e-6, report.table("x")
    buggy = dict(rounded, bias=ref["bias"] * 0.5)  # 1e-4 of the weight's scale, far below the floor
    report = compare({**run, "grads": ref}, {**run, "grads": buggy}, 1e-5)
    assert not report.ok and report.worst_grad[0] == "bias", report.table("x")


def test_reference_runs_are_shared_by_config_not_by_folder(make_config, tmp_path):
    """verify.reference_run: a second call whose config differs only in where it writes and where its
    tokens are prepared returns the first run (its folder is never written); any other difference
    trains again."""
    import dataclasses

    from nanotrain.verify import reference_config, reference_run

    cfg = make_config("--train.max_steps=3", "--schedule.warmup_steps=1")
    runs: dict = {}
    first = reference_run(dataclasses.asdict(reference_config(cfg, 3, str(tmp_path / "a"))), runs)
    moved = dataclasses.asdict(reference_config(cfg, 3, str(tmp_path / "b")))
    moved["data"]["prepared_dir"] = str(tmp_path / "elsewhere")
    assert reference_run(moved, runs) is first and not (tmp_path / "b").exists()
    reseeded = dataclasses.asdict(reference_config(cfg, 3, str(tmp_path / "c")))
    reseeded["train"]["seed"] += 1
    other = reference_run(reseeded, runs)
    assert len(runs) == 2 and (tmp_path / "c").exists() and other["losses"] != first["losses"]
