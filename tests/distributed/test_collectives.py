"""TP/SP collectives in a 2-process gloo world: forward and backward against hand-computed values.

Rank r holds x_r = (r + 1) * ones([1, 4, 2]) (batch 1, seq 4, hidden 2) and backpropagates
a gradient g_r = (10 * (r + 1)) * ones(output shape), so every expected value is a small sum."""

import pytest
import torch
import torch.distributed as dist

from nanotrain.parallel import collectives as C
from nanotrain.parallel.launch import run_world
from nanotrain.params import spec

WORLD = 2


def _run(name):
    r = dist.get_rank()
    x = torch.full((1, 4, 2), float(r + 1), requires_grad=True)
    y = getattr(C, name)(x, dist.group.WORLD)
    y.backward(torch.full_like(y, 10.0 * (r + 1)))
    return y.detach(), x.grad


def collective_results(name):
    return run_world(_run, WORLD, name)


def full(shape, v):
    return torch.full(shape, float(v))


# (collective, expected output on rank r, expected input grad on rank r)
CASES = {
    # identity forward; backward sums the two grads 10 + 20
    "copy_to_region": (lambda r: full((1, 4, 2), r + 1), lambda r: full((1, 4, 2), 30)),
    # forward sums 1 + 2; backward passes the grad through
    "reduce_from_region": (lambda r: full((1, 4, 2), 3), lambda r: full((1, 4, 2), 10 * (r + 1))),
    # keep this rank's half of the last dim; backward gathers both ranks' grads (10 | 20)
    "split_last": (lambda r: full((1, 4, 1), r + 1),
                   lambda r: torch.cat([full((1, 4, 1), 10), full((1, 4, 1), 20)], -1)),
    # gather last dim [1 | 2]; backward keeps this rank's half of its own grad
    "gather_last": (lambda r: torch.cat([full((1, 4, 2), 1), full((1, 4, 2), 2)], -1),
                    lambda r: full((1, 4, 2), 10 * (r + 1))),
    # sequence split: rank r keeps positions [2r, 2r+2); backward all-gathers along seq
    "scatter_seq": (lambda r: full((1, 2, 2), r + 1),
                    lambda r: torch.cat([full((1, 2, 2), 10), full((1, 2, 2), 20)], 1)),
    # all-gather along seq; backward reduce-scatters: sum of both grads (30), own positions
    "gather_seq": (lambda r: torch.cat([full((1, 4, 2), 1), full((1, 4, 2), 2)], 1),
                   lambda r: full((1, 4, 2), 30)),
    # reduce-scatter along seq: sum (3) of own positions; backward all-gathers the grads
    "reduce_scatter_seq": (lambda r: full((1, 2, 2), 3),
                           lambda r: torch.cat([full((1, 2, 2), 10), full((1, 2, 2), 20)], 1)),
}


@pytest.mark.parametrize("name", CASES)
def test_collective_forward_and_backward(name):
    expect_y, expect_grad = CASES[name]
    for r, (y, grad) in enumerate(collective_results(name)):
        torch.testing.assert_close(y, expect_y(r), rtol=0, atol=0)
        torch.testing.assert_close(grad, expect_grad(r), rtol=0, atol=0)


def _ranks_and_groups():
    from nanotrain.parallel.layout import Layout
    from nanotrain.parallel.state import init_parallel

    s = init_parallel(Layout(tp=2, dp=2, pp=2))
    members = {name: dist.get_process_group_ranks(getattr(s, f"{name}_group").pg) for name in ("tp", "dp", "pp")}
    return s.rank, (s.tp_rank, s.dp_rank, s.pp_rank), members


def test_rank_layout_matches_megatron_order():
    """rank = tp_rank + tp * (dp_rank + dp * pp_rank); groups as in parallel/state.py's picture."""
    results = run_world(_ranks_and_groups, 8)
    for rank, (t, d, p), members in results:
        assert rank == t + 2 * (d + 2 * p)
        assert members["tp"] == [rank - t, rank - t + 1]
        assert members["dp"] == [t + 4 * p, t + 2 + 4 * p]
        assert members["pp"] == [t + 2 * d, t + 2 * d + 4]


def _tp_init(cfg_dict):
    from nanotrain.checkpoint import gather_full
    from nanotrain.config import Config
    from nanotrain.models import build_model
    from nanotrain.parallel.tensor_parallel import TensorParallel

    cfg = Config.from_dict(cfg_dict)
    tp = TensorParallel(dist.group.WORLD, dist.get_rank(), dist.get_world_size(), sequence_parallel=True)
    model = build_model(cfg.model, tp)
    model.init_weights(seed=5)
    shards = {n: tuple(p.shape) for n, p in model.named_parameters()}
    return shards, {n: gather_full(p, spec(p).shard, dist.group.WORLD) for n, p in model.named_parameters()}


def test_tp_shards_are_slices_of_the_single_process_init():
    import dataclasses

    from nanotrain.config import ModelConfig
    from nanotrain.models import build_model

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
    ref = build_model(cfg)
    ref.init_weights(seed=5)
    for shards, full in run_world(_tp_init, 2, {"model": dataclasses.asdict(cfg)}):
        assert shards["layers.0.attn.wq.weight"] == (16, 32) and shards["layers.0.attn.wo.weight"] == (32, 16)
        assert shards["tok_emb.weight"] == (32, 32)
        for name, p in ref.named_parameters():
            assert torch.equal(full[name], p.detach()), name


def _metered():
    """The named groups report each collective's bytes to the run's meter while it counts, and only
    then; torch.distributed itself is left as it is."""
    from nanotrain.monitoring.comm import CommMeter

    meter = CommMeter()
    original = dist.all_reduce
    group = C.Group("dp", dist.group.WORLD, dist.get_world_size(), dist.get_rank(), meter)
    t = torch.ones(8)
    C.all_reduce(t, group)  # not counting: nothing recorded
    with meter.counting():
        assert dist.all_reduce is original
        C.all_reduce(t, group)  # 32 bytes
        out = torch.empty(16)
        C.all_gather_into(out, torch.ones(8), group, async_op=True).wait()  # the gathered 64 bytes
        C.reduce_scatter(torch.empty(4), torch.ones(8), group)  # the input's 32 bytes
    return dict(meter.bytes), set(meter.seconds), t


def test_groups_report_to_the_meter_without_patching():
    for nbytes, timed, t in run_world(_metered, WORLD):
        assert nbytes == {"dp": 32 + 64 + 32} and timed == {"dp"}
        assert torch.equal(t, torch.full((8,), 4.0))  # both all-reduces ran
