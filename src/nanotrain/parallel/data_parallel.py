"""Data parallelism: every dp rank holds the same weights and a different slice of the batch;
gradients are summed across ranks before the optimizer step. One reducer, `GradReducer`, does
it for every ZeRO stage (parallel/zero.py holds the optimizer that uses it).

Gradients are laid end to end in flat *buckets* of about `bucket_mb` megabytes, in reverse
order of registration (roughly the order backward produces them). A hook on each parameter
fires once its gradient is complete; when the last gradient of a bucket arrives, the bucket's
collective starts asynchronously, while backward goes on computing the earlier layers:

    backward:  [layer 3 grads][layer 2 grads][layer 1 grads][layer 0 grads]
    comm:                 [reduce b0     ][reduce b1     ][reduce b2     ]...wait

    stage 0, 1   all-reduce: every rank gets the whole sum (stage 1 then updates its slice only)
    stage 2, 3   reduce-scatter: rank r keeps the sum of the r-th 1/dp slice of each bucket
                 (stage 3 also shards the parameters, gathered per block: parallel/zero3.py)

Sum, not mean: each rank's loss is already divided by the token count of the *global* batch
(DESIGN, invariant 3), so the sum of the ranks' gradients is the gradient of the global mean loss.

Order. Collectives on a group must be issued in the same order on every rank, and the order in
which buckets fill can differ between ranks (an expert that got no tokens here has no gradient
until the end). So each group's buckets are launched in a fixed order (as DDP's reducer does),
the order in which backward completes them: a full bucket waits for the earlier ones of its
group; the rest are posted at the end.

Which group. Parameters are bucketed by how they are summed (`spec(p)`, params.py): over dp,
or over expert-dp for expert shards (`expert_parallel`: an expert exists only on the ranks of
its expert-data-parallel group); then, after dp, over tp for the partial gradients of
sequence-parallel parameters (norms, row-parallel biases: `sequence_parallel`), or over the
embedding group for the copies of a tied embedding on the first and last pipeline stage
(`pipeline_shared`). A bucket never mixes these, nor weight decay, nor persistent low-bit
weights: each bucket is then one optimizer parameter group and one after-dp sum.

With gradient accumulation, stages 0/1 do nothing until the last micro-batch (DDP's
`no_sync()`); stage 2 reduces every micro-batch, so no whole gradient outlives its backward.

The global gradient norm (`grad_norm`, `reduce_squares`) lives here too: one rule for the
optimizer's clipping and the monitor's per-tensor norms.

(The library versions: torch's DistributedDataParallel runs the same reducer in C++, its
`Reducer`; FSDP's reduce-scatter is stage 2's; bench/dp.py and bench/zero.py compare.)
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import torch
from torch import nn

from ..params import spec
from . import collectives
from .collectives import Group
from .state import all_reduce


@dataclass(eq=False)
class FlatBucket:
    """Parameters laid end to end (+ padding to equal slices): the layout of the gradients, and of
    the parameters' storage and master slices under the optimizer (parallel/zero.py)."""

    params: list[nn.Parameter]
    offsets: list[int]
    numel: int  # padded to a multiple of `shards`
    group: Group | None  # dp, or expert-dp for expert parameters
    size: int  # ranks in the group
    rank: int
    shards: int = 1  # slices the bucket is cut into: the group size under ZeRO, 1 at stage 0
    sum_group: Group | None = None  # after dp: tp (sequence parallel) or the embedding group
    decay: bool = True  # weight decay (matrices) or not (norms, biases)
    lowbit: bool = False  # persistent low-bit weights: their gradients arrive from the dequantised copy
    category: tuple = ()  # (expert, decay, sequence parallel, pipeline shared, low-bit): one per kind
    flat: torch.Tensor | None = None  # the parameters' storage in this layout (the optimizer's)
    order: int = 0  # when backward completes it: the backward position of its last parameter
    ready: int = 0
    posted: bool = False  # launched this round (tests check that hooks launch during backward)
    grad_flat: torch.Tensor | None = None  # stages 0/1: the gradients, end to end
    staging: torch.Tensor | None = None  # stage 2: this backward's gradients, copied in as they arrive
    full: torch.Tensor | None = None  # stage 3: the whole bucket, its storage allocated while gathered (zero3.py)

    @property
    def shard_numel(self) -> int:
        return self.numel // self.shards

    @property
    def index(self) -> int:
        """Which slice this rank owns (the only one at stage 0)."""
        return self.rank if self.shards > 1 else 0

    def owned(self) -> slice:
        n = self.shard_numel
        return slice(self.index * n, (self.index + 1) * n)

    def overlaps(self):
        """(parameter, start, end, first) of each parameter's part inside this rank's slice:
        [start, end) relative to the slice, holding the parameter's elements from `first` on."""
        lo, hi = self.index * self.shard_numel, (self.index + 1) * self.shard_numel
        for p, off in zip(self.params, self.offsets):
            a, b = max(off, lo), min(off + p.numel(), hi)
            if a < b:
                yield p, a - lo, b - lo, a - off

    def attach_grads(self) -> None:
        """Make each parameter's .grad a view into grad_flat, so that backward accumulates straight
        into the buffer the all-reduce sends (DDP's gradient_as_bucket_view)."""
        for p, off in zip(self.params, self.offsets):
            if p.grad is None or p.grad.data_ptr() != self.grad_flat[off:].data_ptr():
                p.grad = self.grad_flat[off:off + p.numel()].view_as(p)

    def stage_grad(self, grad: torch.Tensor, offset: int, grad_dtype: torch.dtype) -> None:
        """Stage 2: copy a fresh gradient into the bucket's staging buffer (the caller drops it),
        so the whole gradients of a bucket exist once (DeepSpeed's IPG bucket); zeros where a
        parameter gets none (an idle expert) and in the padding."""
        if self.staging is None:
            self.staging = torch.zeros(self.numel, dtype=grad_dtype, device=grad.device)
        self.staging[offset:offset + grad.numel()].copy_(grad.reshape(-1))


def _category(p: nn.Parameter) -> tuple:
    s = spec(p)
    return s.expert_parallel, p.dim() >= 2, s.sequence_parallel, s.pipeline_shared, s.lowbit is not None


# Stage 0 starts each parameter on a 128-byte boundary (32 fp32 elements) of its bucket: the
# parameters live in the buckets, and a GEMM on a weight that starts mid-cache-line runs slower
# (measured: 4% more forward and backward time on the default model, bench/dp.py --bucket-mb 0.5).
# ZeRO keeps its slices contiguous (the padding would move every rank's slice boundaries).
ALIGN = 32


def bucket_layout(params: list[nn.Parameter], ps, stage: int = 0, bucket_mb: float = 25.0,
                  units: dict[nn.Parameter, int] | None = None) -> list[FlatBucket]:
    """The trainable `params` in buckets of about bucket_mb (sized at 4 bytes an element, whatever the
    dtypes, so that every precision cuts the same buckets), per category, in backward order; under
    ZeRO (stage > 0) padded to a multiple of the group's size; at stage 0 each parameter starts on
    an ALIGN boundary. `units` (ZeRO-3: parameter -> the block it belongs to, zero3.units_of): no
    bucket holds two units' parameters. `ps`: a ParallelState, or anything with its dp_group,
    edp_group, tp_group, embd_group."""
    backward = list(reversed([p for p in params if p.requires_grad]))  # backward visits the last layers first
    by_key: dict[tuple, list[nn.Parameter]] = {}
    for p in backward:
        by_key.setdefault((units[p] if units else 0, _category(p)), []).append(p)
    position = {p: i for i, p in enumerate(backward)}
    buckets = []
    for (_, key), members in by_key.items():
        expert, decay, sp, shared, lowbit = key
        group = ps.edp_group if expert else ps.dp_group
        size, rank = collectives.size(group), collectives.rank(group)
        shards = size if stage > 0 else 1
        tp_group = ps.tp_group if sp and collectives.size(ps.tp_group) > 1 else None
        sum_group = ps.embd_group if shared else tp_group
        for chunk in _chunks(members, bucket_mb * 2**20):
            step = ALIGN if stage == 0 else 1
            offsets = list(itertools.accumulate((-(-p.numel() // step) * step for p in chunk[:-1]), initial=0))
            total = offsets[-1] + chunk[-1].numel()
            buckets.append(FlatBucket(chunk, offsets, -(-total // shards) * shards, group, size, rank, shards,
                                      sum_group, decay, lowbit, key, order=position[chunk[-1]]))
    return buckets


def _chunks(params: list[nn.Parameter], bucket_bytes: float) -> list[list[nn.Parameter]]:
    chunks, current, nbytes = [], [], 0
    for p in params:
        current.append(p)
        nbytes += p.numel() * 4
        if nbytes >= bucket_bytes:
            chunks.append(current)
            current, nbytes = [], 0
    return chunks + [current] if current else chunks


class GradReducer:
    """Sums the gradients of `buckets` over their groups: all-reduce (stages 0, 1) or reduce-scatter
    (stage 2), launched from backward hooks in bucket order, then the after-dp sums.

    After sync(), `grad[id(b)]` is this rank's summed slice of bucket b, in grad_dtype (stages 0/1:
    a view of the whole summed buffer, and each .grad a view of it where dtypes allow; stages 2
    and 3: the only copy). At stage 3 `sharding` (zero3.ParameterSharding) hears of each gradient
    taken, and of each backward's end, to free the blocks' parameters. `got_grad` holds the
    parameters that have a gradient this step: every one a collective summed, and those backward
    reached."""

    def __init__(self, buckets: list[FlatBucket], stage: int = 0, grad_dtype: torch.dtype = torch.float32,
                 local_ok: bool = False):
        self.buckets, self.stage, self.grad_dtype = buckets, stage, grad_dtype
        self.sharding = None  # stage 3: set by the optimizer
        device = buckets[0].params[0].device if buckets else torch.device("cpu")
        # .grad as a view into the buffer where the dtypes agree; otherwise a hook adds each
        # backward's gradient into the buffer in grad_dtype and drops it (Megatron's main_grad).
        self.grad_views = stage < 2 and all(not b.lowbit and all(p.dtype == grad_dtype for p in b.params)
                                            for b in buckets)
        self.got_grad: set[nn.Parameter] = set()
        # Nothing to reduce (one process, or no group of size > 1 and no sum after dp), and the
        # caller reads each .grad as it is (local_ok: plain fp32 AdamW per parameter): no buffers,
        # no hooks. Autograd's own .grad tensors are the gradients, set to None after each step, as
        # a plain PyTorch loop has them (a buffer would cost a memset and an accumulate per step).
        self.local = local_ok and stage == 0 and self.grad_views and \
            all(b.size == 1 and b.sum_group is None for b in buckets)
        if self.local:
            self.grad = {}
            return
        if stage < 2:
            for b in buckets:
                b.grad_flat = torch.zeros(b.numel, dtype=grad_dtype, device=device)
                if self.grad_views:
                    b.attach_grads()
            self.grad = {id(b): b.grad_flat[b.owned()] for b in buckets}
        else:
            self.grad = {id(b): torch.zeros(b.shard_numel, dtype=grad_dtype, device=device) for b in buckets}
        self.sync_enabled = True
        # (work, this rank's reduced slice (stage 2), bucket, the buffer sent: alive until the work is done)
        self._pending: list[tuple] = []
        # Per group: its buckets in the order backward completes them, whatever category. (Not the
        # order of their first parameters: the bucket of a category backward reaches early and
        # completes late, the norms', would hold back every bucket behind it until backward ends.)
        self._order: dict = {}
        for b in sorted(buckets, key=lambda b: b.order):
            self._order.setdefault(b.group, []).append(b)
        self._queues = {g: list(q) for g, q in self._order.items()}
        self._summed: set[FlatBucket] = set()  # stages 2, 3: buckets whose slice got a sum this step
        self._bucket_of = {p: b for b in buckets for p in b.params}
        self._offset_of = {p: off for b in buckets for p, off in zip(b.params, b.offsets)}
        for b in buckets:
            for p in b.params:
                if b.lowbit:  # its gradient arrives from the dequantised copy (precision/lowbit.py)
                    spec(p).lowbit.deliver = lambda g, p=p: self.on_grad(p, g)
                else:
                    p.register_post_accumulate_grad_hook(self._on_autograd)

    @contextlib.contextmanager
    def backward_context(self, last: bool):
        """Stages 0/1 sync on the last micro-batch only (gradients accumulate whole in the buffers
        until then; `last` is per chunk in an interleaved pipeline). Stage 2 reduces every
        backward's gradients and posts the buckets that backward did not fill (experts that got no
        token, the other chunks of an interleaved stage) right after it; stages 0/1 post them in
        sync(). Either way every rank posts the same collectives in the same order."""
        if self.local:
            yield
            return
        self.sync_enabled = last or self.stage >= 2
        if self.grad_views:
            for b in self.buckets:
                b.attach_grads()
        yield
        if self.stage >= 2:
            self._post_rest()
        if self.sharding is not None:
            self.sharding.end_backward()

    def _on_autograd(self, p: nn.Parameter) -> None:
        grad = p.grad
        if not self.grad_views:
            p.grad = None  # its values go into the bucket's buffer below
        self.on_grad(p, grad)

    def on_grad(self, p: nn.Parameter, grad: torch.Tensor) -> None:
        """p's gradient of this backward is complete: put it where the bucket's reduction reads it,
        and post the buckets that are full, in order."""
        b, off = self._bucket_of[p], self._offset_of[p]
        self.got_grad.add(p)
        if self.stage >= 2:
            if not self.sync_enabled:
                return
            b.stage_grad(grad, off, self.grad_dtype)
            if self.sharding is not None:
                self.sharding.on_grad(p)
        elif not self.grad_views:  # accumulate over the micro-batches in grad_dtype
            b.grad_flat[off:off + p.numel()].add_(grad.reshape(-1))
        if not self.sync_enabled:
            return
        b.ready += 1
        queue = self._queues[b.group]
        while queue and queue[0].ready == len(queue[0].params):
            self._launch(queue.pop(0))

    def _post_rest(self) -> None:
        """Post every bucket not posted yet, in order; reset the queues for the next round."""
        for queue in self._queues.values():
            while queue:
                self._launch(queue.pop(0))
        self._queues = {g: list(q) for g, q in self._order.items()}

    def _launch(self, b: FlatBucket) -> None:
        b.ready, b.posted = 0, True
        if self.stage < 2:  # all-reduce the buffer in place; every rank then reads its slice (stage 0: all)
            work = collectives.all_reduce(b.grad_flat, b.group, async_op=True) if b.size > 1 else None
            self._pending.append((work, None, b, None))
            return
        flat = b.staging if b.staging is not None else torch.zeros(b.numel, dtype=self.grad_dtype,
                                                                   device=self.grad[id(b)].device)  # none arrived
        b.staging = None  # freed once the reduce-scatter is done: only this rank's slice is kept
        self._reap()
        # The step's first sum of this slice goes straight into it; a later micro-batch's into a
        # buffer that is added once it arrives.
        first = b not in self._summed
        self._summed.add(b)
        out = self.grad[id(b)] if first else torch.empty(b.shard_numel, dtype=flat.dtype, device=flat.device)
        work = collectives.reduce_scatter(out, flat, b.group, async_op=True) if b.size > 1 else None
        if work is None:
            out.copy_(flat)
        self._pending.append((work, None if first else out, b, flat))

    def _reap(self) -> None:
        """Finish the reduce-scatters that are done (add their slices; drop their buffers), so that
        the staging buffers do not all live until sync(). A bucket's sums are added in the order
        they were posted."""
        waiting, kept = set(), []
        for entry in self._pending:
            work, out, b, _ = entry
            if b in waiting or (work is not None and not work.is_completed()):
                waiting.add(b)
                kept.append(entry)
                continue
            self._finish(work, out, b)  # (done: wait() raises a failure, if any)
        self._pending = kept

    def _finish(self, work, out: torch.Tensor | None, b: FlatBucket) -> None:
        """Wait for one reduction; add a later micro-batch's slice into the bucket's."""
        if work is not None:
            work.wait()
        if out is not None:
            self.grad[id(b)] += out

    def sync(self) -> None:
        """Wait for the reductions (posting any a hook did not: unused parameters), accumulate
        stage 2's slices, then the sums that come after dp."""
        if self.local:  # the parameters that backward reached
            self.got_grad = {p for b in self.buckets for p in b.params if p.grad is not None}
            return
        if self.stage < 2:  # every chunk's gradients are complete now
            self._post_rest()
        for work, out, b, _ in self._pending:
            self._finish(work, out, b)
        for b in self.buckets:
            b.posted = False
        self._pending.clear()
        for b in self.buckets:
            if b.size > 1:  # summed: every rank holds each of its gradients now (zeros where none)
                self.got_grad.update(b.params)
        self.sum_after_dp()

    def sum_after_dp(self) -> None:
        """tp for sequence-parallel partial gradients, the embedding group for tied copies (stages
        0/1: the whole buffer, so that every .grad is the true gradient)."""
        for b in self.buckets:
            if b.sum_group is not None:
                collectives.all_reduce(b.grad_flat if self.stage < 2 else self.grad[id(b)], b.sum_group)
                self.got_grad.update(b.params)

    def zero(self) -> None:
        if self.local:  # the next backward makes fresh ones (zero_grad(set_to_none=True))
            for b in self.buckets:
                for p in b.params:
                    p.grad = None
            self.got_grad.clear()
            return
        if self.stage < 2:
            for b in self.buckets:
                b.grad_flat.zero_()  # any .grad views stay; the next backward accumulates into them
        self._summed.clear()  # stages 2, 3: the next step's first reduce-scatter overwrites each slice
        self.got_grad.clear()


# -- the global gradient norm ---------------------------------------------------------------

def reduce_squares(sq: torch.Tensor, ps, sliced: bool, experts: bool) -> torch.Tensor:
    """The logical model's sums of squares from this rank's: sq[0] the dense parameters' squares,
    sq[1] the experts' (any trailing shape: one total, or one per tensor). Summed over dp and
    expert-dp when each rank holds different slices (ZeRO's `sliced` gradients), experts over ep
    (each ep rank holds different experts), then the rows added and summed over tp and pp.
    `experts`: whether there are expert rows to reduce (a dense model skips those collectives)."""
    if sliced:
        sq[0:1] = all_reduce(sq[0:1].clone(), ps.dp_group)
        if experts:
            sq[1:2] = all_reduce(sq[1:2].clone(), ps.edp_group)
    if experts:
        sq[1:2] = all_reduce(sq[1:2].clone(), ps.ep_group)
    total = sq.sum(0)
    all_reduce(total, ps.tp_group)
    all_reduce(total, ps.pp_group)
    return total


def grad_norm(params: list[nn.Parameter], grads: list[torch.Tensor], ps=None, sliced: bool = False,
              experts: bool | None = None) -> torch.Tensor:
    """Global norm of the *logical* model's gradient, from this rank's gradients `grads` of `params`
    (whole, or ZeRO slices of them: `sliced`), in that order: the order of the sums is part of the
    result's last bit.

    Under tensor parallelism a sharded parameter contributes its shard's squares on every tp rank
    (the shards add up to the whole), while a replicated one (norms, biases) is counted on tp rank
    0 only, so it is counted once (ParamSpec.counts_in_norm). Expert shards (axis "ep", whole on
    every tp rank) are counted on tp rank 0 and summed over the ep group. Pipeline stages hold
    disjoint layers: their squares add over the pp group, the last stage's copy of a tied
    embedding left out. With one rank of each this is exactly clip_grad_norm_'s arithmetic."""
    one = ps is None or all(collectives.size(g) == 1 for g in (ps.tp_group, ps.ep_group, ps.pp_group))
    if one and not sliced:
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    device = grads[0].device if grads else torch.device("cpu")

    def squares(gs):
        return torch.stack(torch._foreach_norm(gs)).pow(2).sum() if gs else torch.zeros((), device=device)

    counted = [(spec(p), g) for p, g in zip(params, grads) if spec(p).counts_in_norm(ps.tp_rank)]
    parts = torch.stack([squares([g for s, g in counted if not s.expert_parallel]),
                         squares([g for s, g in counted if s.expert_parallel])])
    if experts is None:
        experts = collectives.size(ps.ep_group) > 1
    return reduce_squares(parts, ps, sliced, experts).sqrt()


def clip_coef(norm: torch.Tensor, max_norm: float, loss_scale: float | None = None) -> torch.Tensor | float | None:
    """What to multiply the gradients by: min(1, max_norm / (norm + 1e-6)) (torch.nn.utils.
    clip_grad_norm_'s formula; norm the true one), divided by the fp16 loss scale; None: nothing."""
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0) if max_norm > 0 else None
    if loss_scale is not None:
        coef = 1.0 / loss_scale if coef is None else coef / loss_scale
    return coef
