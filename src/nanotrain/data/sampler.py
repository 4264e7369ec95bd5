"""Batches of random windows from a flat token array, a pure function of the step.

nanoGPT draws random windows with torch.randint, so the batch at step s depends
on everything that touched the RNG before it. Here the global batch at step s
depends only on (seed, stream, s), with its own numpy generator and no mutable
state. So:

- a run resumed at step s sees exactly the batches the uninterrupted run would;
- every data-parallel layout sees the same global batch: rank r just takes its
  contiguous slice of rows (and micro-batches slice that further);
- evaluation (another stream over the val tokens) sees the same fixed batches
  every time: batch(0), ..., batch(eval_steps - 1).

MixtureSampler does the same over several corpora (data.sources): each row of the batch first
picks its corpus by weight, then its window, both drawn from the step's generator.
"""

from __future__ import annotations

import numpy as np
import torch

from nanotrain.data.shards import TokenShards
from nanotrain.data.tokenizer import DataError


def inputs_and_targets(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, seq_len + 1] token windows -> (x, y) int64 [rows, seq_len], y = x shifted by one."""
    w = torch.from_numpy(windows.astype(np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class BatchSampler:
    """tokens: one array (a memmap of train.bin), or shards read as one (data/shards.py)."""

    def __init__(self, tokens: np.ndarray | TokenShards, seq_len: int, batch_size: int, seed: int, stream: int = 0):
        if len(tokens) < seq_len + 1:
            raise DataError(f"{len(tokens):,} tokens are too few for one sequence of train.seq_len={seq_len} "
                            f"(it needs seq_len + 1 = {seq_len + 1}): use a smaller train.seq_len or more text.")
        if seed < 0 or stream < 0:
            raise DataError(f"seed={seed} and stream={stream} must be >= 0: set train.seed to a non-negative integer.")
        self.tokens = TokenShards.of(tokens)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.stream = stream

    def offsets(self, step: int) -> np.ndarray:
        """Start offsets of the step's global batch, uniform in [0, len(tokens) - seq_len - 1]."""
        rng = np.random.default_rng([self.seed, self.stream, step])
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)

    def batch(self, step: int, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 [n_rows, seq_len] for the given rows of the step's global batch; y = x shifted by one.

        Only the selected rows are read from the memmap, in one fancy-indexing
        gather of a [rows, seq_len + 1] index (one file; a window per row from shards),
        then one conversion to torch.
        """
        return inputs_and_targets(self.tokens.windows(self.offsets(step)[rows], self.seq_len + 1))

    def resized(self, batch_size: int, stream: int) -> "BatchSampler":
        """The same tokens, another batch size and stream (the probe's fixed batch)."""
        return BatchSampler(self.tokens, self.seq_len, batch_size, self.seed, stream)


class MixtureSampler:
    """Batches drawn from several token arrays: each row picks array i with probability
    weights[i], then a uniform window in it, from the step's own generator (as BatchSampler)."""

    def __init__(self, parts: list[np.ndarray | TokenShards], weights: list[float], seq_len: int, batch_size: int,
                 seed: int, stream: int = 0):
        self.parts = [BatchSampler(t, seq_len, batch_size, seed, stream) for t in parts]  # (checks each)
        self.weights = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.seq_len, self.batch_size, self.seed, self.stream = seq_len, batch_size, seed, stream

    def offsets(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(corpus, start) of each row of the step's global batch."""
        rng = np.random.default_rng([self.seed, self.stream, step])
        which = rng.choice(len(self.parts), size=self.batch_size, p=self.weights)
        spans = np.asarray([len(p.tokens) - self.seq_len for p in self.parts])
        starts = (rng.random(self.batch_size) * spans[which]).astype(np.int64)
        return which, starts

    def batch(self, step: int, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        which, starts = (a[rows] for a in self.offsets(step))
        return inputs_and_targets(np.concatenate([self.parts[i].tokens.windows(np.asarray([s]), self.seq_len + 1)
                                                  for i, s in zip(which, starts)]))

    def resized(self, batch_size: int, stream: int) -> "MixtureSampler":
        return MixtureSampler([p.tokens for p in self.parts], list(self.weights), self.seq_len, batch_size,
                              self.seed, stream)
