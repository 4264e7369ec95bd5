"""Data-parallel gradient sync: buckets start their all-reduce during backward (overlap),
accumulation defers it, and the result is the sum of the ranks' gradients."""

import torch
import torch.distributed as dist

from nanotrain.parallel.data_parallel import GradSync
from nanotrain.parallel.launch import run_world


def _sync_run():
    r = dist.get_rank()
    torch.manual_seed(0)  # same weights on both ranks
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
    for p in model.parameters():
        p.shard = None
    sync = GradSync(list(model.parameters()), dist.group.WORLD, bucket_mb=8 * 8 * 4 / 2**20)  # ~1 layer a bucket
    x = torch.full((2, 8), float(r + 1))

    sync.sync_enabled = False  # first micro-batch: accumulate only
    model(x).sum().backward()
    launched_early = [b.handle is not None for b in sync.buckets]
    sync.sync_enabled = True  # last micro-batch
    model(x).sum().backward()
    launched = [b.handle is not None for b in sync.buckets]  # before finish(): started by hooks
    sync.finish()
    return len(sync.buckets), launched_early, launched, [p.grad.clone() for p in model.parameters()]


def test_buckets_overlap_backward_and_sum_gradients():
    results = run_world(_sync_run, 2)
    n_buckets, early, launched, grads0 = results[0]
    assert n_buckets >= 4
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
