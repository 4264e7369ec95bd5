"""ZeRO-2 (Rajbhandari et al. 2020, P_os+g): the gradients are sharded over data parallelism too.
The change to plain bucketed DDP (data_parallel.BucketedAllReduce) is one collective and where
the gradients wait for it:

    DDP, ZeRO-1   backward accumulates into a whole buffer per bucket; all-reduce it once per step:
                  every rank holds the whole sum (ZeRO-1 then updates its slice only)
    ZeRO-2        each backward's gradients are copied into the bucket's staging buffer as they
                  arrive, and dropped; the full bucket is reduce-scattered: rank r keeps only the
                  sum of the r-th 1/dp slice, added up over the step's micro-batches

    bucket     [ layers.3.mlp.w2 | layers.3.mlp.w1 | ...           |pad]
    staging    [this backward's gradients, whole                       ]  freed once sent
    rank 0     [== summed ==]                                             kept: the optimizer's slice
    rank 1                   [== summed ==]
    ...

So no whole gradient outlives its backward (DeepSpeed's IPG bucket), at the price of one
reduce-scatter per micro-batch instead of one all-reduce per step. A pipeline rank with several
chunks (interleaved, DualPipeV) sends after each backward only the buckets of the chunk that
backward reached (data_parallel.backward_chunks): every gradient once per micro-batch, as 1F1B.

ZeRO-3 (zero3.py) keeps this reducer and shards the parameters as well.
"""

from __future__ import annotations

import torch

from . import collectives
from .data_parallel import BucketedAllReduce, FlatBucket


class BucketedReduceScatter(BucketedAllReduce):
    """BucketedAllReduce with a reduce-scatter after every backward: `grad[id(b)]` is the only
    copy of the gradients, this rank's slice of bucket b summed over dp and the micro-batches."""

    every_backward = True  # no whole gradient waits for the last micro-batch
    grad_views_allowed = False  # each backward's gradients are copied into staging, then dropped

    def _buffers(self, device: torch.device) -> dict[int, torch.Tensor]:
        self.staging: dict[FlatBucket, torch.Tensor] = {}  # this backward's gradients, per bucket
        self._summed: set[FlatBucket] = set()  # buckets whose slice got a sum this step
        return {id(b): torch.zeros(b.shard_numel, dtype=self.grad_dtype, device=device) for b in self.buckets}

    def _collect(self, b: FlatBucket, offset: int, grad: torch.Tensor) -> None:
        """Copy a fresh gradient into the bucket's staging buffer (the caller drops it), so the whole
        gradients of a bucket exist once; zeros where a parameter gets none (an idle expert) and in
        the padding."""
        if b not in self.staging:
            self.staging[b] = torch.zeros(b.numel, dtype=self.grad_dtype, device=grad.device)
        part = self.staging[b][offset:offset + grad.numel()]
        if b.cross_chunk:  # another chunk's backward may have given this parameter a gradient already
            part.add_(grad.reshape(-1))
        else:
            part.copy_(grad.reshape(-1))

    def _unsent(self) -> list[tuple]:
        """Also a cross-chunk bucket that got gradients after its chunk's last backward (none in the
        schedules here: the chunk lowest in the model finishes last), so that none is left behind."""
        return [key for key, q in self._order.items() if key not in self._sent or any(b in self.staging for b in q)]

    def _launch(self, b: FlatBucket) -> None:
        b.ready, b.posted = 0, True
        flat = self.staging.pop(b, None)  # freed once the reduce-scatter is done: only the slice is kept
        if flat is None:  # no gradient arrived
            flat = torch.zeros(b.numel, dtype=self.grad_dtype, device=self.grad[id(b)].device)
        self._reap()
        # The step's first sum of this slice goes straight into it; a later micro-batch's into a
        # buffer that is added once it arrives.
        first = b not in self._summed
        self._summed.add(b)
        out = self.grad[id(b)] if first else torch.empty(b.shard_numel, dtype=flat.dtype, device=flat.device)
        work = collectives.reduce_scatter(out, flat, b.group, async_op=True) if b.size > 1 else None
        if work is None:
            out.copy_(flat)
        self._pending.append((work, b, None if first else out, flat))  # flat: alive until the work is done

    def _reap(self) -> None:
        """Finish the reduce-scatters that are done (add their slices; drop their buffers), so that
        the staging buffers do not all live until sync(). A bucket's sums are added in the order
        they were posted."""
        waiting, kept = set(), []
        for entry in self._pending:
            work, b = entry[:2]
            if b in waiting or (work is not None and not work.is_completed()):
                waiting.add(b)
                kept.append(entry)
                continue
            self._finish(*entry)  # (done: wait() raises a failure, if any)
        self._pending = kept

    def _finish(self, work, b: FlatBucket, out: torch.Tensor | None = None, flat=None) -> None:
        """Wait for one reduction; add a later micro-batch's slice into the bucket's."""
        super()._finish(work, b)
        if out is not None:
            self.grad[id(b)] += out

    def _summed_part(self, b: FlatBucket) -> torch.Tensor:
        return self.grad[id(b)]

    def zero(self) -> None:
        self._summed.clear()  # the next step's first reduce-scatter overwrites each slice
        self.got_grad.clear()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.grad.values())
