"""Data parallelism: every dp rank holds the same weights and a different slice of the batch;
gradients are summed across ranks before the optimizer step. This file is plain bucketed DDP,
`BucketedAllReduce`; each ZeRO stage is a change on top of it:

    stage 0   BucketedAllReduce, every rank updates every parameter        (this file)
    stage 1   the same all-reduce; the optimizer updates its slice only    (zero.py: ZeroOptimizer)
    stage 2   + reduce-scatter instead: a rank keeps its slice's sum only  (zero2.py: BucketedReduceScatter)
    stage 3   + the parameters sharded too, gathered per block             (zero3.py: ParameterSharding)

Gradients are laid end to end in flat *buckets* of about `bucket_mb` megabytes, in reverse
order of registration (roughly the order backward produces them). A hook on each parameter
fires once its gradient is complete; when the last gradient of a bucket arrives, the bucket's
all-reduce starts asynchronously, while backward goes on computing the earlier layers:

    backward:  [layer 3 grads][layer 2 grads][layer 1 grads][layer 0 grads]
    comm:                 [reduce b0     ][reduce b1     ][reduce b2     ]...wait

Sum, not mean: each rank's loss is already divided by the token count of the *global* batch
(DESIGN, invariant 3), so the sum of the ranks' gradients is the gradient of the global mean loss.

Order. Collectives on a group must be issued in the same order on every rank, and the order in
which buckets fill can differ between ranks (an expert that got no tokens here has no gradient
until the end). So each group's buckets are launched in a fixed order (as DDP's reducer does),
the order in which backward completes them: a full bucket waits for the earlier ones of its
group; the rest are posted when the backward ends.

Which group. Parameters are bucketed by how they are summed (`spec(p)`, params.py): over dp,
or over expert-dp for expert shards (`expert_parallel`: an expert exists only on the ranks of
its expert-data-parallel group); then, after dp, over tp for the partial gradients of
sequence-parallel parameters (norms, row-parallel biases: `sequence_parallel`), or over the
embedding group for the copies of a tied embedding on the first and last pipeline stage
(`pipeline_shared`). A bucket never mixes these, nor weight decay, nor persistent low-bit
weights: each bucket is then one optimizer parameter group and one after-dp sum.

Which chunk. A pipeline rank of an interleaved or DualPipeV schedule runs several chunks of
layers, one backward at a time, and a bucket never mixes two chunks (`backward_chunks`): after
a synced backward, only the buckets of the chunk it reached are posted, so each gradient is
sent as often as under 1F1B, not once per chunk. (A parameter two chunks use, the tied
embedding where one rank holds both ends of the model, is in a `cross_chunk` bucket that waits for
the backward of the chunk that comes last in each micro-batch.)

With gradient accumulation nothing is sent until each chunk's last micro-batch (DDP's
`no_sync()`): the buffers accumulate the gradients whole until then.

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
from .collectives import Group, all_reduce


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
    shards: int = 1  # slices the bucket is cut into: the group size under ZeRO, 1 without
    sum_group: Group | None = None  # after dp: tp (sequence parallel) or the embedding group
    decay: bool = True  # weight decay (matrices) or not (norms, biases)
    lowbit: bool = False  # persistent low-bit weights: the model keeps codes, flat is their fp32 master
    category: tuple = ()  # (expert, decay, sequence parallel, pipeline shared, low-bit): one per kind
    chunk: int = 0  # the pipeline chunk whose backward fills it (backward_chunks)
    cross_chunk: bool = False  # other chunks' backwards add to it too: posted after its own chunk's only
    flat: torch.Tensor | None = None  # the parameters' storage in this layout (the optimizer's)
    order: int = 0  # when backward completes it: the backward position of its last parameter
    ready: int = 0
    posted: bool = False  # launched this round (tests check that hooks launch during backward)

    @property
    def shard_numel(self) -> int:
        return self.numel // self.shards

    @property
    def index(self) -> int:
        """Which slice this rank owns (the only one, unsharded)."""
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


def _category(p: nn.Parameter) -> tuple:
    s = spec(p)
    return s.expert_parallel, p.dim() >= 2, s.sequence_parallel, s.pipeline_shared, s.lowbit is not None


# Unsharded buckets start each parameter on a 128-byte boundary (32 fp32 elements): the
# parameters live in the buckets, and a GEMM on a weight that starts mid-cache-line runs slower
# (measured: 4% more forward and backward time on the default model, bench/dp.py --bucket-mb 0.5).
# ZeRO keeps its slices contiguous (the padding would move every rank's slice boundaries).
ALIGN = 32


def bucket_layout(params: list[nn.Parameter], ps, sharded: bool = False, bucket_mb: float = 25.0,
                  units: dict[nn.Parameter, int] | None = None,
                  chunks: dict[nn.Parameter, tuple[int, bool]] | None = None) -> list[FlatBucket]:
    """The trainable `params` in buckets of about bucket_mb (sized at 4 bytes an element, whatever the
    dtypes, so that every precision cuts the same buckets), per category, in backward order;
    `sharded` (ZeRO) padded to a multiple of the group's size, else each parameter starting on an
    ALIGN boundary. No bucket holds two `units`' parameters (ZeRO-3: parameter -> the block it
    belongs to, zero3.units_of), nor two pipeline `chunks`' (backward_chunks). `ps`: a
    ParallelState, or anything with its dp_group, edp_group, tp_group, embd_group."""
    backward = list(reversed([p for p in params if p.requires_grad]))  # backward visits the last layers first
    by_key: dict[tuple, list[nn.Parameter]] = {}
    for p in backward:
        unit, chunk = units[p] if units else 0, chunks.get(p, (0, False)) if chunks else (0, False)
        by_key.setdefault((unit, chunk, _category(p)), []).append(p)
    position = {p: i for i, p in enumerate(backward)}
    buckets = []
    for (_, (chunk, cross_chunk), key), members in by_key.items():
        expert, decay, sp, shared, lowbit = key
        group = ps.edp_group if expert else ps.dp_group
        size, rank = collectives.size(group), collectives.rank(group)
        shards = size if sharded else 1
        tp_group = ps.tp_group if sp and collectives.size(ps.tp_group) > 1 else None
        sum_group = ps.embd_group if shared else tp_group
        step = 1 if sharded else ALIGN
        for part in _chunks(members, bucket_mb * 2**20):
            offsets = list(itertools.accumulate((-(-p.numel() // step) * step for p in part[:-1]), initial=0))
            total = offsets[-1] + part[-1].numel()
            buckets.append(FlatBucket(part, offsets, -(-total // shards) * shards, group, size, rank, shards,
                                      sum_group, decay, lowbit, key, chunk, cross_chunk, order=position[part[-1]]))
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


def backward_chunks(model: nn.Module) -> dict[nn.Parameter, tuple[int, bool]]:
    """Parameter -> (chunk, cross_chunk): the chunk of this pipeline rank (k in model.stage.chunks) whose
    backward gives its gradient: a block's, its chunk; the embedding, the model's first chunk; the
    rest (final norm, head), its last. `cross_chunk`: several chunks' backwards give it gradients (the
    tied embedding on a rank that holds both ends of the model: DualPipeV's rank 0); its chunk is
    then the one lowest in the model, whose backward comes last in each micro-batch. Empty with one
    chunk per rank."""
    stage = model.stage
    if stage is None or stage.v == 1:
        return {}
    out: dict[nn.Parameter, tuple[int, bool]] = {}

    def claim(params, k: int) -> None:
        for p in params:
            if p not in out:
                out[p] = (k, False)
            elif out[p][0] != k:
                out[p] = (min(out[p][0], k, key=lambda c: stage.ids[c]), True)

    for k, layer_ids in enumerate(stage.chunks):
        claim((p for i in layer_ids for p in model.layers[str(i)].parameters()), k)
    first = [k for k in range(stage.v) if stage.is_first_chunk(k)]
    last = [k for k in range(stage.v) if stage.is_last_chunk(k)]
    embedding = [m for m in (model.tok_emb, model.pos_emb) if m is not None]
    for name, module in model.named_children():
        if name != "layers":  # (a rank with neither end holds none of these parameters)
            ends = first + last if module in embedding else last + first
            claim(module.parameters(), ends[0] if ends else 0)
    return out


class BucketedAllReduce:
    """Plain bucketed DDP: sums the gradients of `buckets` over their groups, one all-reduce per
    bucket launched from backward hooks in bucket order, then the sums after dp. ZeRO-1 uses it
    as it is; ZeRO-2 and 3 reduce-scatter instead (zero2.BucketedReduceScatter, a subclass).

    After sync(), `grad[id(b)]` is this rank's summed slice of bucket b, in grad_dtype (unsharded:
    all of it), a view of the whole summed buffer; each .grad is a view of the buffer where the
    dtypes allow. `got_grad` holds the parameters that have a gradient this step: every one a
    collective summed, and those backward reached."""

    every_backward = False  # sync after each backward (ZeRO-2), or after each chunk's last (DDP's no_sync)
    grad_views_allowed = True  # .grad a view of the buffer the collective sends (DDP's gradient_as_bucket_view)

    def __init__(self, buckets: list[FlatBucket], grad_dtype: torch.dtype = torch.float32, local_ok: bool = False):
        self.buckets, self.grad_dtype = buckets, grad_dtype
        device = buckets[0].params[0].device if buckets else torch.device("cpu")
        # .grad as a view into the buffer where the dtypes agree; otherwise a hook adds each
        # backward's gradient into the buffer in grad_dtype and drops it (Megatron's main_grad).
        self.grad_views = self.grad_views_allowed and all(
            not b.lowbit and all(p.dtype == grad_dtype for p in b.params) for b in buckets)
        self.got_grad: set[nn.Parameter] = set()
        # Nothing to reduce (one process, or no group of size > 1 and no sum after dp), and the
        # caller reads each .grad as it is (local_ok: plain fp32 AdamW per parameter): no buffers,
        # no hooks. Autograd's own .grad tensors are the gradients, set to None after each step, as
        # a plain PyTorch loop has them (a buffer would cost a memset and an accumulate per step).
        self.local = local_ok and self.grad_views and all(b.size == 1 and b.sum_group is None for b in buckets)
        if self.local:
            self.grad, self.grad_flat = {}, {}
            return
        self.grad = self._buffers(device)
        self.sync_enabled = True
        self._pending: list[tuple] = []  # (work, bucket, ...): posted, not yet waited for
        # Per (chunk, group): its buckets in the order backward completes them, whatever category.
        # (Not the order of their first parameters: the bucket of a category backward reaches early
        # and completes late, the norms', would hold back every bucket behind it until backward ends.)
        self._order: dict[tuple, list[FlatBucket]] = {}
        for b in sorted(buckets, key=lambda b: b.order):
            self._order.setdefault((b.chunk, b.cross_chunk, b.group), []).append(b)
        self._queues = {key: list(q) for key, q in self._order.items()}
        self._reached: set[int] = set()  # the chunks this backward gave gradients to
        self._sent: set[tuple] = set()  # the queues posted whole this step
        self._bucket_of = {p: b for b in buckets for p in b.params}
        self._offset_of = {p: off for b in buckets for p, off in zip(b.params, b.offsets)}
        for b in buckets:
            for p in b.params:  # (a low-bit weight's gradient is its dequantised copy's: precision/lowbit.py)
                p.register_post_accumulate_grad_hook(self._on_autograd)

    def _buffers(self, device: torch.device) -> dict[int, torch.Tensor]:
        """One flat gradient buffer per bucket, what the all-reduce sends; .grad views of it."""
        self.grad_flat = {b: torch.zeros(b.numel, dtype=self.grad_dtype, device=device) for b in self.buckets}
        if self.grad_views:
            for b in self.buckets:
                self._attach_grads(b)
        return {id(b): self.grad_flat[b][b.owned()] for b in self.buckets}

    def _attach_grads(self, b: FlatBucket) -> None:
        """Make each parameter's .grad a view into its bucket's buffer, so that backward accumulates
        straight into what the all-reduce sends."""
        flat = self.grad_flat[b]
        for p, off in zip(b.params, b.offsets):
            if p.grad is None or p.grad.data_ptr() != flat[off:].data_ptr():
                p.grad = flat[off:off + p.numel()].view_as(p)

    @contextlib.contextmanager
    def backward_context(self, last: bool):
        """Around each backward: sync on each chunk's last micro-batch only (`last`; gradients
        accumulate whole in the buffers until then), or on every one (every_backward). After a
        synced backward the buckets of the chunks it reached that it did not fill (experts that got
        no token) are posted: every rank posts the same collectives in the same order."""
        if self.local:
            yield
            return
        self.sync_enabled = last or self.every_backward
        if self.grad_views:
            for b in self.buckets:
                self._attach_grads(b)
        yield
        if self.sync_enabled:
            self._post_rest(self._complete())
            self._reached.clear()

    def _complete(self) -> list[tuple]:
        """The queues whose gradients are complete after a synced backward: those of the chunks it reached."""
        return [key for key in self._order if key[0] in self._reached]

    def _on_autograd(self, p: nn.Parameter) -> None:
        grad = p.grad
        if not self.grad_views:
            p.grad = None  # its values go into the bucket's buffer (_collect)
        self.on_grad(p, grad)

    def on_grad(self, p: nn.Parameter, grad: torch.Tensor) -> None:
        """p's gradient of this backward is complete: put it where the bucket's reduction reads it,
        and post the buckets of its chunk that are full, in order."""
        b = self._bucket_of[p]
        self.got_grad.add(p)
        self._collect(b, self._offset_of[p], grad)
        if not self.sync_enabled or b.cross_chunk:  # (it waits for its own chunk's backward to end)
            return
        self._reached.add(b.chunk)
        b.ready += 1
        queue = self._queues[(b.chunk, b.cross_chunk, b.group)]
        while queue and queue[0].ready == len(queue[0].params):
            self._launch(queue.pop(0))

    def _collect(self, b: FlatBucket, offset: int, grad: torch.Tensor) -> None:
        """Accumulate over the micro-batches in grad_dtype (a .grad view has done it already)."""
        if not self.grad_views:
            self.grad_flat[b][offset:offset + grad.numel()].add_(grad.reshape(-1))

    def _post_rest(self, keys: list[tuple]) -> None:
        """Post every bucket of these queues not posted yet, in order; refill them for the next round."""
        for key in keys:
            queue = self._queues[key]
            while queue:
                self._launch(queue.pop(0))
            self._queues[key] = list(self._order[key])
            self._sent.add(key)

    def _launch(self, b: FlatBucket) -> None:
        """All-reduce the buffer in place; every rank then reads its slice (unsharded: all)."""
        b.ready, b.posted = 0, True
        work = collectives.all_reduce(self.grad_flat[b], b.group, async_op=True) if b.size > 1 else None
        self._pending.append((work, b))

    def _finish(self, work, b: FlatBucket, *rest) -> None:
        if work is not None:
            work.wait()

    def sync(self) -> None:
        """Post what no synced backward did (a chunk of the tied embedding's rank, which syncs once),
        wait for the reductions, then the sums that come after dp."""
        if self.local:  # the parameters that backward reached
            self.got_grad = {p for b in self.buckets for p in b.params if p.grad is not None}
            return
        self._post_rest(self._unsent())
        self._sent.clear()
        for entry in self._pending:
            self._finish(*entry)
        self._pending.clear()
        for b in self.buckets:
            b.posted = False
            if b.size > 1:  # summed: every rank holds each of its gradients now (zeros where none)
                self.got_grad.update(b.params)
        self.sum_after_dp()

    def _unsent(self) -> list[tuple]:
        """The queues no synced backward posted this step."""
        return [key for key in self._order if key not in self._sent]

    def sum_after_dp(self) -> None:
        """tp for sequence-parallel partial gradients, the embedding group for tied copies (the
        whole buffer, so that every .grad is the true gradient)."""
        for b in self.buckets:
            if b.sum_group is not None:
                collectives.all_reduce(self._summed_part(b), b.sum_group)
                self.got_grad.update(b.params)

    def _summed_part(self, b: FlatBucket) -> torch.Tensor:
        return self.grad_flat[b]

    def zero(self) -> None:
        if self.local:  # the next backward makes fresh ones (zero_grad(set_to_none=True))
            for b in self.buckets:
                for p in b.params:
                    p.grad = None
        else:
            for b in self.buckets:
                self.grad_flat[b].zero_()  # any .grad views stay; the next backward accumulates into them
        self.got_grad.clear()

    def nbytes(self) -> int:
        """Bytes of the gradient buffers this rank keeps."""
        return sum(t.numel() * t.element_size() for t in self.grad_flat.values())


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
