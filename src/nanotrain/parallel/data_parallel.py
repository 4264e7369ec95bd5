"""Data parallelism: every dp rank holds the same weights and a different slice of the batch;
gradients are summed across ranks before the optimizer step.

Gradients are grouped into buckets of about `bucket_mb` megabytes, in reverse
order of registration (roughly the order backward produces them). A hook on
each parameter fires once its gradient is complete; when the last gradient of
a bucket arrives, the bucket is flattened and its all-reduce starts
asynchronously, while backward goes on computing the earlier layers:

    backward:  [layer 3 grads][layer 2 grads][layer 1 grads][layer 0 grads]
    comm:                 [all-reduce b0 ][all-reduce b1 ][all-reduce b2 ]...wait

Sum, not mean: each rank's loss is already divided by the token count of the
*global* batch (DESIGN, invariant 3), so the sum of the ranks' gradients is
the gradient of the global mean loss.

With gradient accumulation, hooks do nothing until the last micro-batch
(`sync_enabled` off), as DDP's `no_sync()`. (torch's DistributedDataParallel
implements the same reducer in C++; bench/dp.py compares the two.)

Sequence parallelism adds one more sum: parameters applied to a sequence shard
(norms, row-parallel biases) hold partial gradients, summed over the tp group.

Expert parallelism changes whose gradients match: rank r's experts exist only on
the ranks of its expert-data-parallel group, so expert parameters
(`spec(p).expert_parallel`) get their own buckets, summed over that group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..params import spec


@dataclass
class Bucket:
    params: list[nn.Parameter]
    group: dist.ProcessGroup | None = None  # dp, or expert-dp for expert parameters
    ready: int = 0
    flat: torch.Tensor | None = None
    handle: dist.Work | None = None
    sizes: list[int] = field(default_factory=list)


class GradSync:
    def __init__(self, params: list[nn.Parameter], dp_group: dist.ProcessGroup | None,
                 tp_group: dist.ProcessGroup | None = None, bucket_mb: float = 25.0,
                 edp_group: dist.ProcessGroup | None = None):
        self.tp_group = tp_group
        self.sp_params = [p for p in params if spec(p).sequence_parallel]
        self.sync_enabled = True
        self.buckets: list[Bucket] = []
        self._queues: dict = {}  # per group: its buckets not launched yet, in launch order
        self._bucket_of: dict[nn.Parameter, Bucket] = {}
        trainable = [p for p in params if p.requires_grad]
        for group, members in ((dp_group, [p for p in trainable if not spec(p).expert_parallel]),
                               (edp_group, [p for p in trainable if spec(p).expert_parallel])):
            if group is not None and dist.get_world_size(group) > 1 and members:
                self._build_buckets(members, bucket_mb * 2**20, group)

    def _build_buckets(self, params: list[nn.Parameter], bucket_bytes: float, group) -> None:
        new, current, size = [], [], 0
        for p in reversed(params):  # backward visits the last layers first
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_bytes:
                new.append(Bucket(current, group=group))
                current, size = [], 0
        if current:
            new.append(Bucket(current, group=group))
        self.buckets += new
        self._queues[group] = list(new)
        for b in new:
            for p in b.params:
                self._bucket_of[p] = b
                p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def _on_grad_ready(self, p: nn.Parameter) -> None:
        if not self.sync_enabled:
            return
        bucket = self._bucket_of[p]
        bucket.ready += 1
        # Launch in bucket order only (as DDP's reducer does): collectives on a group must be
        # issued in the same order on every rank, and the order in which buckets fill can
        # differ between ranks (an expert that got no tokens here has no gradient until
        # finish()). A full bucket waits for the earlier ones of its group.
        queue = self._queues[bucket.group]
        while queue and queue[0].ready == len(queue[0].params):
            self._launch(queue.pop(0))

    def _launch(self, b: Bucket) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in b.params]
        b.sizes = [g.numel() for g in grads]
        b.flat = torch.cat([g.reshape(-1) for g in grads])
        b.handle = dist.all_reduce(b.flat, group=b.group, async_op=True)

    def finish(self) -> None:
        """Wait for every bucket (launching any a hook did not: unused parameters), write the
        summed gradients back, then sum sequence-parallel gradients over tp."""
        for b in self.buckets:
            if b.handle is None:
                self._launch(b)
        for b in self.buckets:
            b.handle.wait()
            for p, chunk in zip(b.params, b.flat.split(b.sizes)):
                if p.grad is None:
                    p.grad = chunk.view_as(p).clone()
                else:
                    p.grad.copy_(chunk.view_as(p.grad))
            b.ready, b.flat, b.handle = 0, None, None
        self._queues = {g: [b for b in self.buckets if b.group is g] for g in self._queues}
        if self.sp_params and self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
            for p in self.sp_params:  # an expert that saw no token on this rank has no gradient yet
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in self.sp_params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.tp_group)
            for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(chunk.view_as(g))


def all_reduce_copy(t: torch.Tensor, group) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


def grad_norm(params: list[nn.Parameter], grads: list[torch.Tensor], tp_group: dist.ProcessGroup | None,
              tp_rank: int = 0, ep_group: dist.ProcessGroup | None = None,
              pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Global norm of the *logical* model's gradient, from this rank's whole gradients `grads`
    of `params` (in that order: the order of the sums is part of the result's last bit).

    Under tensor parallelism a sharded parameter contributes its shard's squares on
    every tp rank (the shards add up to the whole), while a replicated one (norms,
    biases) is counted on tp rank 0 only, so it is counted once. Expert shards
    (axis "ep", whole on every tp rank) are counted on tp rank 0 and summed over the
    ep group. Pipeline stages hold disjoint layers: their squares add over the pp
    group, the last stage's copy of a tied embedding left out (it is the first
    stage's parameter). With one rank of each this is exactly clip_grad_norm_'s
    arithmetic."""
    tp = 1 if tp_group is None else dist.get_world_size(tp_group)
    ep = 1 if ep_group is None else dist.get_world_size(ep_group)
    pp = 1 if pp_group is None else dist.get_world_size(pp_group)
    if tp == 1 and ep == 1 and pp == 1:
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    device = grads[0].device if grads else torch.device("cpu")

    def squares(gs):
        return torch.stack(torch._foreach_norm(gs)).pow(2).sum() if gs else torch.zeros((), device=device)

    counted = [(spec(p), g) for p, g in zip(params, grads) if spec(p).counts_in_norm(tp_rank)]
    dense = [g for s, g in counted if not s.expert_parallel]
    experts = [g for s, g in counted if s.expert_parallel]
    parts = torch.stack([squares(dense), squares(experts)])
    if ep > 1:
        parts[1:] = all_reduce_copy(parts[1:], ep_group)
    total_sq = parts.sum()
    if tp > 1:
        dist.all_reduce(total_sq, group=tp_group)
    if pp > 1:
        dist.all_reduce(total_sq, group=pp_group)
    return total_sq.sqrt()


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, tp_group: dist.ProcessGroup | None,
                   tp_rank: int = 0, ep_group: dist.ProcessGroup | None = None,
                   pp_group: dist.ProcessGroup | None = None, loss_scale: float = 1.0) -> torch.Tensor:
    """Global gradient norm over the logical model (grad_norm), then scale every gradient by
    min(1, max_norm / norm) (torch.nn.utils.clip_grad_norm_'s formula). With fp16 loss
    scaling the gradients hold loss_scale times the true ones: the norm returned is the
    true one (inf or NaN if any gradient overflowed), and the same pass divides it out."""
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    total = grad_norm(params, grads, tp_group, tp_rank, ep_group, pp_group) / loss_scale
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0) / loss_scale  # clip_grad_norm_'s formula
        torch._foreach_mul_(grads, coef)
    elif loss_scale != 1.0:
        torch._foreach_mul_(grads, 1.0 / loss_scale)
    return total
