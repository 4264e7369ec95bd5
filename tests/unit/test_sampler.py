"""BatchSampler: the global batch is a pure function of (seed, stream, step)."""

import numpy as np
import pytest
import torch

from nanotrain.data import BatchSampler, DataError

N, T, B = 10_000, 16, 8


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 500, size=N).astype(np.uint16)


def test_deterministic_across_objects_and_call_order(tokens):
    a = BatchSampler(tokens, T, B, seed=1)
    first = [a.batch(s) for s in range(5)]
    b = BatchSampler(tokens, T, B, seed=1)
    for s in [4, 2, 0, 3, 1, 2]:  # fresh object, shuffled order, repeats
        x, y = b.batch(s)
        assert torch.equal(x, first[s][0]) and torch.equal(y, first[s][1])


def test_steps_seeds_streams_differ(tokens):
    base = BatchSampler(tokens, T, B, seed=1).batch(0)[0]
    others = [BatchSampler(tokens, T, B, seed=1).batch(1)[0],
              BatchSampler(tokens, T, B, seed=2).batch(0)[0],
              BatchSampler(tokens, T, B, seed=1, stream=1).batch(0)[0]]
    for o in others:
        assert not torch.equal(base, o)


def test_y_is_x_shifted_and_matches_tokens(tokens):
    s = BatchSampler(tokens, T, B, seed=3)
    x, y = s.batch(7)
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row, start in zip(x, s.offsets(7)):
        assert torch.equal(row, torch.from_numpy(tokens[start:start + T].astype(np.int64)))


@pytest.mark.parametrize("dp", [2, 4])
def test_row_slices_compose_to_global_batch(tokens, dp):
    s = BatchSampler(tokens, T, B, seed=5)
    x, y = s.batch(11)
    per = B // dp
    parts = [s.batch(11, slice(r * per, (r + 1) * per)) for r in range(dp)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
    assert torch.equal(s.batch(11, slice(2, 3))[0], x[2:3])


def test_offsets_in_range():
    toks = np.arange(T + 3, dtype=np.uint16)  # only 3 possible windows: hit both ends
    s = BatchSampler(toks, T, 64, seed=0)
    starts = np.concatenate([s.offsets(i) for i in range(20)])
    assert starts.min() == 0 and starts.max() == len(toks) - T - 1
    x, y = s.batch(0)  # tokens are 0, 1, 2, ...: every row is a run of consecutive ids
    assert torch.equal(y - x, torch.ones_like(x)) and y.max().item() <= len(toks) - 1


def test_too_few_tokens():
    with pytest.raises(DataError, match="too few for one sequence"):
        BatchSampler(np.arange(T, dtype=np.uint16), T, B, seed=0)
