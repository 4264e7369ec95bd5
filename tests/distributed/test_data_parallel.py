"""Data-parallel gradient sync: buckets start their all-reduce during backward (overlap),
accumulation defers it, and the result is the sum of the ranks' gradients."""

import pytest
import torch
import torch.distributed as dist

from types import SimpleNamespace

from nanotrain.parallel.data_parallel import BucketedAllReduce, bucket_layout
from nanotrain.parallel.launch import run_world


def _reducer(params, dp_group, bucket_mb):
    """The data-parallel reducer of plain DDP (all-reduce), over dp_group; no other group."""
    groups = SimpleNamespace(dp_group=dp_group, edp_group=None, tp_group=None, embd_group=None)
    return BucketedAllReduce(bucket_layout(params, groups, sharded=False, bucket_mb=bucket_mb))


def _sync_run():
    r = dist.get_rank()
    torch.manual_seed(0)  # same weights on both ranks
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
    sync = _reducer(list(model.parameters()), dist.group.WORLD, bucket_mb=8 * 8 * 4 / 2**20)  # ~1 layer a bucket
    x = torch.full((2, 8), float(r + 1))

    with sync.backward_context(last=False):  # first micro-batch: accumulate only
        model(x).sum().backward()
    launched_early = [b.posted for b in sync.buckets]
    with sync.backward_context(last=True):  # last micro-batch
        model(x).sum().backward()
    launched = [b.posted for b in sync.buckets]  # before sync(): started by hooks
    sync.sync()
    return len(sync.buckets), launched_early, launched, [p.grad.clone() for p in model.parameters()]


def test_buckets_overlap_backward_and_sum_gradients():
    results = run_world(_sync_run, 2)
    n_buckets, early, launched, grads0 = results[0]
    assert n_buckets >= 4  # (weights and biases apart: a bucket never mixes weight decay)
    assert not any(early)  # accumulation: nothing sent
    assert all(launched)  # every bucket was already in flight when backward returned
    assert all(torch.equal(a, b) for a, b in zip(grads0, results[1][3]))  # ranks agree

    # Expected: the sum over ranks of each rank's two-micro-batch gradient, computed locally.
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
    for r in range(2):
        for _ in range(2):
            model(torch.full((2, 8), float(r + 1))).sum().backward()
    for g, p in zip(grads0, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=1e-6)


def _idle_experts_run(bucket_mb, autocast=False):
    """ep=2 (= dp=2): every token is routed to experts 0 and 1, which live on rank 0, so rank 1's
    experts get no token. Rank 1 must still take part in the backward all-to-alls and in
    the bucketed gradient sync, in the same order as rank 0. Under bf16 autocast rank 0's experts
    give bf16 outputs and rank 1 computes none: both must still exchange bf16 (gloo aborted the
    whole job on the size mismatch, in make train's demo)."""
    from nanotrain.models.moe import ExpertParallelMoE
    from nanotrain.parallel.expert_parallel import ExpertParallel

    torch.manual_seed(0)
    rank = dist.get_rank()
    group = dist.new_group([0, 1])  # ep
    moe = ExpertParallelMoE(16, 4, 2, 8, n_shared_experts=1, score_func="sigmoid",
                            ep=ExpertParallel(group, rank, 2))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(p.numel()))
    moe.router.expert_bias[:2] = 100.0  # selection only: experts 0 and 1 always win
    # Router and shared expert sync over dp: a group of its own (same ranks), as in ParallelState.
    sync = _reducer(list(moe.parameters()), dist.new_group([0, 1]), bucket_mb=bucket_mb)
    for _ in range(3):
        # requires_grad: the output of an earlier layer, as in a model
        x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(rank), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = moe(x)
        with sync.backward_context(last=True):
            y.float().square().sum().backward()
        sync.sync()
    idle = moe.experts.w1.grad is None or bool((moe.experts.w1.grad == 0).all())
    return {"experts_idle": idle, "router": moe.router.weight.grad}


@pytest.mark.parametrize("bucket_mb,autocast", [(25.0, False), (1e-4, False), (25.0, True)],
                         ids=["one_bucket", "bucket_per_parameter", "bf16_autocast"])
def test_rank_whose_experts_get_no_tokens_keeps_in_step(bucket_mb, autocast):
    out = run_world(_idle_experts_run, 2, bucket_mb, autocast, timeout_s=60)  # a rank skipping a collective hangs
    assert out[1]["experts_idle"] and not out[0]["experts_idle"]
    assert torch.equal(out[0]["router"], out[1]["router"])  # synced over dp
