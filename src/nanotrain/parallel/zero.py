"""ZeRO stages 1 and 2 (Rajbhandari et al. 2020): the optimizer's memory split over data-parallel ranks.

Plain data parallelism keeps, on every rank, the fp32 master weights and both AdamW
moments of the whole model: 12 bytes per parameter, replicated dp times. ZeRO gives
each of the dp ranks 1/dp of them:

  stage 1: gradients all-reduced (data_parallel.GradSync, unchanged); each rank updates
           only its shard of the master weights and moments, then the updated weights
           are all-gathered into every rank's parameters.
  stage 2: gradients reduce-scattered instead, bucket by bucket as backward produces
           them, so each rank keeps only its shard of the gradients too (summed over the
           micro-batches of the step in the shard). Each gradient is copied into its
           bucket's staging buffer as soon as backward produces it, and dropped; the
           buffer lives until its reduce-scatter is done (DeepSpeed's IPG bucket).

Layout. Parameters that are synced over the same group (dp, or expert-dp for experts)
and handled alike (weight decay or not; sequence-parallel partial sums; the pipeline
copy of a tied embedding) are laid end to end in *buckets* of about bucket_mb. Each
bucket is one contiguous flat fp32 tensor, padded to a multiple of the group size,
and the parameters become views into it, so the all-gather writes the model directly.
Rank r owns the r-th 1/size slice of every bucket:

    bucket 0   [ layers.3.mlp.w2 | layers.3.mlp.w1 | ...           |pad]
    rank 0     [=========]
    rank 1                [=========]
    ...                              (each rank: its slice of every bucket)

The master weights (an fp32 copy of the owned slices, owned by the optimizer) and the
moments exist for the owned slices only. The global gradient norm is summed from the
owned gradient slices, each parameter's part counted by the tensor-parallel rules of
data_parallel.clip_grad_norm, over dp, then tp, ep and pp.

Checkpoints record each rank's slices as boxes of the logical parameters (the moments of
a slice that spans parameters are cut at their boundaries), so a run resumes under any
zero stage, dp size or layout (checkpoint/pieces.py).

Stage 0 is the same machinery unsharded: every rank owns the whole of every bucket, the
gradients are all-reduced, and every rank runs the whole update. The runtime uses it for
plain data parallelism when the precision policy asks for what torch's AdamW cannot do:
master weights, master gradients or moments in dtypes of their own, or persistent
low-bit weights (precision/master.py, precision/lowbit.py).

Mixed precision. The buckets hold the model's parameters in their storage dtype
(precision.param_dtype); the master slices are copies in master_dtype when that differs
(then the all-gather after the step carries param_dtype: half the bytes of fp32 for bf16);
the gradients are accumulated and reduced in grad_dtype. Where a gradient's dtype differs
from its buffer's, a hook adds each backward's gradient into the buffer and drops it
(Megatron's main_grad) instead of making .grad a view of it. Persistent low-bit weights
(stage 0) live in buckets of their own whose flat buffer is the fp32 master; the model
keeps only the quantised codes, rewritten after each step.

(torch's versions: ZeroRedundancyOptimizer shards stage 1 by whole parameters; FSDP2's
fully_shard also shards the parameters (stage 3). bench/zero.py compares.)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import CheckpointReader, Piece, flat_pieces, whole
from ..optim import MOMENTS, adamw_impl, adamw_state
from ..precision.master import Dtypes, MixedAdamW
from ..params import spec
from .data_parallel import grad_norm
from .state import all_reduce


# torch 2.13 names (reduce_scatter_tensor / all_gather_into_tensor in older releases). Looked up
# at each call, so that monitoring/comm.py's meter sees them.
def _reduce_scatter(*args, **kwargs):
    return (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(*args, **kwargs)


def _all_gather(*args, **kwargs):
    return (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(*args, **kwargs)


@dataclass
class FlatBucket:
    params: list[nn.Parameter]
    group: dist.ProcessGroup
    size: int  # ranks in the group
    rank: int
    flat: torch.Tensor  # every parameter of the bucket, end to end (+ padding): the parameters are views
    shards: int = 1  # slices the bucket is cut into: the group size under ZeRO, 1 at stage 0
    lowbit: bool = False  # flat is the fp32 master of persistent low-bit weights (the model keeps codes)
    offsets: list[int] = field(default_factory=list)
    ready: int = 0
    grad_flat: torch.Tensor | None = None  # stages 0/1: the gradients, end to end
    staging: torch.Tensor | None = None  # stage 2: this backward's gradients, copied in as they arrive

    def attach_grads(self) -> None:
        """Stages 0/1 when gradient and buffer dtypes agree: make each parameter's .grad a view
        into grad_flat, so that backward accumulates straight into the buffer the all-reduce
        sends (DDP's gradient_as_bucket_view)."""
        for p, off in zip(self.params, self.offsets):
            if p.grad is None or p.grad.data_ptr() != self.grad_flat[off:].data_ptr():
                p.grad = self.grad_flat[off:off + p.numel()].view_as(p)

    @property
    def shard_numel(self) -> int:
        return self.flat.numel() // self.shards

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

    def stage_grad(self, grad: torch.Tensor, offset: int, grad_dtype: torch.dtype) -> None:
        """Stage 2: copy a fresh gradient into the bucket's staging buffer (the caller drops it),
        so the whole gradients of a bucket exist once (DeepSpeed's IPG bucket); zeros where a
        parameter gets none (an idle expert) and in the padding."""
        if self.staging is None:
            self.staging = torch.zeros(self.flat.numel(), dtype=grad_dtype, device=self.flat.device)
        self.staging[offset:offset + grad.numel()].copy_(grad.reshape(-1))


@dataclass
class Category:
    """Parameters handled alike: one sync group, one weight decay, one extra gradient sum."""
    buckets: list[FlatBucket]
    decay: bool
    sum_group: dist.ProcessGroup | None = None  # tp (sequence parallel) or the embedding group, after dp


def _category_key(p: nn.Parameter):
    s = spec(p)
    return s.expert_parallel, p.dim() >= 2, s.sequence_parallel, s.pipeline_shared, s.lowbit is not None


class ZeroOptimizer:
    """AdamW over flat buckets: ZeRO stage 1 or 2 (state sharded over the data-parallel group),
    or stage 0 (replicated), with the precision policy's dtypes (precision/master.py).

    The same interface as runtime.components.AdamWState: backward_context(last) around
    each backward, sync_grads() once per step, step(lr), pieces() / load_pieces().
    """

    def __init__(self, model: nn.Module, stage: int, ps, cfg, bucket_mb: float = 25.0,
                 dtypes: Dtypes | None = None, seed: int = 0):
        if stage not in (0, 1, 2):
            raise ValueError(f"optimizer.zero_stage={stage}: ZeRO stages 0 (off), 1 and 2 are implemented here")
        self.stage, self.ps, self.cfg = stage, ps, cfg
        self.step_post_hooks: list = []  # hook(self) after every step that was not skipped
        self.dtypes = dt = dtypes or Dtypes()
        self.names = {p: n for n, p in model.named_parameters()}
        self.params = params = [p for p in model.parameters() if p.requires_grad]
        if stage > 0 and any(spec(p).lowbit is not None for p in params):
            raise ValueError("precision.lowbit_weights with optimizer.zero_stage>0: the low-bit weights' masters are "
                             "not sharded. Use optimizer.zero_stage=0, or drop precision.lowbit_weights.")
        groups = {False: ps.dp_group, True: ps.edp_group}
        # Reverse registration order: backward produces the last layers' gradients first.
        by_key: dict[tuple, list[nn.Parameter]] = {}
        for p in reversed(params):
            by_key.setdefault(_category_key(p), []).append(p)
        self.categories: list[Category] = []
        initial: dict[int, torch.Tensor] = {}  # each bucket's fp32 values before the cast to storage
        for (expert, decay, sp, shared, lowbit), members in by_key.items():
            group = groups[expert]
            sum_group = ps.embd_group if shared else (ps.tp_group if sp and ps.tp > 1 else None)
            self.categories.append(Category(self._bucketize(members, group, bucket_mb * 2**20, stage > 0, lowbit,
                                                            dt.storage, initial), decay, sum_group))
        self.buckets = [b for c in self.categories for b in c.buckets]
        self.has_experts = any(spec(p).expert_parallel for p in params)
        # Master weights: this rank's slices, the only ones AdamW updates. In the storage dtype
        # they are the slices of the buckets themselves (no copy; the all-gather then runs in
        # place); in another dtype, copies made from the initial fp32 values.
        self.master = {}
        for b in self.buckets:
            if b.lowbit or dt.master == b.flat.dtype:
                self.master[id(b)] = b.flat[b.owned()]
            else:
                self.master[id(b)] = initial[id(b)][b.owned()].to(dt.master)
        del initial
        # Gradients: whole buffers at stages 0/1, this rank's slices at stage 2, in grad_dtype.
        # .grad is a view into the buffer where the dtypes agree; otherwise hooks add into it.
        self.grad_views = stage < 2 and all(dt.grad == b.flat.dtype and not b.lowbit for b in self.buckets)
        if stage < 2:
            for b in self.buckets:
                b.grad_flat = torch.zeros(b.flat.numel(), dtype=dt.grad, device=b.flat.device)
                if self.grad_views:
                    b.attach_grads()
            self.grad = {id(b): b.grad_flat[b.owned()] for b in self.buckets}
        else:
            self.grad = {id(b): torch.zeros(b.shard_numel, dtype=dt.grad, device=b.flat.device)
                         for b in self.buckets}
        groups_ = [{"params": [self.master[id(b)] for b in c.buckets],
                    "weight_decay": cfg.weight_decay if c.decay else 0.0} for c in self.categories]
        if dt.torch_adamw:  # fp32 masters and moments: torch's AdamW, the implementation plain AdamW uses
            self.opt = torch.optim.AdamW(groups_, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                         **adamw_impl(cfg, self.buckets[0].flat.device))
        else:
            self.opt = MixedAdamW(groups_, cfg.lr, (cfg.beta1, cfg.beta2), cfg.eps, dt.exp_avg, dt.exp_avg_sq,
                                  dt.rounding, seed=seed + ps.rank)
        self.sync_enabled = True
        self._queues = {}
        # (work, this rank's reduced slice (stage 2), bucket, the buffer sent: alive until the work is done)
        self._pending: list[tuple[dist.Work | None, torch.Tensor | None, FlatBucket, torch.Tensor | None]] = []
        # Post each group's buckets in the order backward fills them (the position of their
        # first parameter in backward order), whatever category they belong to.
        backward_pos = {p: i for i, p in enumerate(reversed(params))}
        for b in sorted(self.buckets, key=lambda b: backward_pos[b.params[0]]):
            self._queues.setdefault(b.group, []).append(b)
        self._order = {g: list(q) for g, q in self._queues.items()}
        self._bucket_of = {p: b for b in self.buckets for p in b.params}
        self._offset_of = {p: off for b in self.buckets for p, off in zip(b.params, b.offsets)}
        for p in params:
            if spec(p).lowbit is not None:  # its gradient arrives from the dequantised copy
                spec(p).lowbit.deliver = lambda g, p=p: self._on_grad(p, g)
            else:
                p.register_post_accumulate_grad_hook(self._on_autograd)
        # Parameters whose logical value lives in a master copy, not in the model (checkpoints).
        self.mastered = {self.names[p] for b in self.buckets if not self._master_is_storage(b) for p in b.params}

    def _master_is_storage(self, b: FlatBucket) -> bool:
        return not b.lowbit and self.master[id(b)].dtype == b.flat.dtype

    # -- layout -------------------------------------------------------------------------

    @staticmethod
    def _bucketize(params: list[nn.Parameter], group, bucket_bytes: float, sharded: bool, lowbit: bool,
                   storage: torch.dtype, initial: dict) -> list[FlatBucket]:
        size = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        shards = size if sharded else 1
        chunks, current, nbytes = [], [], 0
        for p in params:
            current.append(p)
            nbytes += p.numel() * 4
            if nbytes >= bucket_bytes:
                chunks.append(current)
                current, nbytes = [], 0
        if current:
            chunks.append(current)
        buckets = []
        for members in chunks:
            total = sum(p.numel() for p in members)
            padded = -(-total // shards) * shards  # equal slices for every rank
            fp32 = torch.zeros(padded, dtype=torch.float32, device=members[0].device)
            off, offsets = 0, []
            for p in members:
                fp32[off:off + p.numel()].copy_(p.detach().reshape(-1))
                offsets.append(off)
                off += p.numel()
            flat = fp32 if lowbit or storage == torch.float32 else fp32.to(storage)
            b = FlatBucket(members, group, size, rank, flat, shards, lowbit, offsets)
            initial[id(b)] = fp32
            for p, off in zip(members, offsets):
                if lowbit:  # the model keeps the codes; the fp32 values live on here as the master
                    spec(p).lowbit.store(fp32[off:off + p.numel()].view(p.shape))
                    p.data = torch.zeros(1, dtype=torch.float32, device=p.device).expand(p.shape)
                else:
                    p.data = flat[off:off + p.numel()].view_as(p)  # the parameter now lives in the bucket
            buckets.append(b)
        return buckets

    # -- gradients ----------------------------------------------------------------------

    @contextlib.contextmanager
    def backward_context(self, last: bool):
        """Stages 0/1 sync on the last micro-batch only (gradients accumulate whole in the
        buffers until then, as with DDP's no_sync; `last` is per chunk in an interleaved
        pipeline). Stage 2 reduces every backward's gradients, so no whole gradient is kept
        between micro-batches, and posts the buckets that backward did not fill (experts that
        got no token, the other chunks of an interleaved stage) right after it; stages 0/1 post
        them in sync_grads(). Either way every rank posts the same collectives in the same order."""
        self.sync_enabled = last or self.stage == 2
        if self.grad_views:
            for b in self.buckets:
                b.attach_grads()
        yield
        if self.stage == 2:
            self._post_rest()

    def _post_rest(self) -> None:
        """Post every bucket not posted yet, in order; reset the queues for the next round."""
        for queue in self._queues.values():
            while queue:
                self._launch(queue.pop(0))
        self._queues = {g: list(q) for g, q in self._order.items()}

    def _on_autograd(self, p: nn.Parameter) -> None:
        grad = p.grad
        if not self.grad_views:
            p.grad = None  # its values go into the bucket's buffer below
        self._on_grad(p, grad)

    def _on_grad(self, p: nn.Parameter, grad: torch.Tensor) -> None:
        """p's gradient of this backward is complete: put it where the bucket's reduction reads it,
        and post the buckets that are full."""
        b, off = self._bucket_of[p], self._offset_of[p]
        if self.stage == 2:
            if not self.sync_enabled:
                return
            b.stage_grad(grad, off, self.dtypes.grad)
        elif not self.grad_views:  # accumulate over the micro-batches in grad_dtype (Megatron's main_grad)
            b.grad_flat[off:off + p.numel()].add_(grad.reshape(-1))
        if not self.sync_enabled:
            return
        b.ready += 1
        queue = self._queues[b.group]
        while queue and queue[0].ready == len(queue[0].params):  # in order, as GradSync
            self._launch(queue.pop(0))

    def _launch(self, b: FlatBucket) -> None:
        b.ready = 0
        if self.stage < 2:  # all-reduce the buffer in place; every rank then reads its slice (stage 0: all of it)
            work = dist.all_reduce(b.grad_flat, group=b.group, async_op=True) if b.size > 1 else None
            self._pending.append((work, None, b, None))
            return
        flat = b.staging if b.staging is not None else torch.zeros(b.flat.numel(), dtype=self.dtypes.grad,
                                                                   device=b.flat.device)  # nothing arrived
        b.staging = None  # freed once the reduce-scatter is done: only this rank's slice is kept
        out = torch.empty(b.shard_numel, dtype=flat.dtype, device=flat.device)
        work = _reduce_scatter(out, flat, group=b.group, async_op=True) if b.size > 1 else None
        if work is None:
            out.copy_(flat)
        self._pending.append((work, out, b, flat))

    def sync_grads(self) -> None:
        """Wait for the reductions; then this rank's summed gradient slices are in self.grad
        (stages 0/1: views of the whole, all-reduced gradients; stage 2: the only copy)."""
        if self.stage < 2:  # every chunk's gradients are complete now
            self._post_rest()
        for work, out, b, *_ in self._pending:
            if work is not None:
                work.wait()
            if out is not None:
                self.grad[id(b)] += out
        self._pending.clear()
        for c in self.categories:  # sums that come after dp: tp for sequence-parallel grads, tied copies
            if c.sum_group is not None:
                for b in c.buckets:  # stages 0/1: the whole buffer, so that every .grad is the true gradient
                    all_reduce(b.grad_flat if self.stage < 2 else self.grad[id(b)], c.sum_group)

    def _grad_norm(self) -> torch.Tensor:
        """Global norm of the logical model's gradient, from the owned slices (see clip_grad_norm)."""
        ps = self.ps
        if all(b.shards == 1 for b in self.buckets):
            # Whole gradients on every rank (stage 0, or nothing to shard over): plain AdamW's
            # norm, over the parameters in the model's order. A sum of squares in another order
            # (bucket order) differs in the last bit, and so then does the clipping coefficient
            # and every update; bf16 training amplifies that.
            views = {p: self.grad[id(b)][lo:hi].view(p.shape) for b in self.buckets for p, lo, hi, _ in b.overlaps()}
            params = [p for p in self.params if p in views]
            return grad_norm(params, [views[p].float() for p in params], ps.tp_group, ps.tp_rank, ps.ep_group,
                             ps.pp_group)
        device = self.buckets[0].flat.device
        slices = {"dp": [], "edp": []}
        for b in self.buckets:
            g = self.grad[id(b)]
            kind = "edp" if spec(b.params[0]).expert_parallel else "dp"
            slices[kind] += [g[lo:hi].float() for p, lo, hi, _ in b.overlaps() if spec(p).counts_in_norm(ps.tp_rank)]
        parts = torch.stack([torch.stack(torch._foreach_norm(s)).pow(2).sum() if s else torch.zeros((), device=device)
                             for s in (slices["dp"], slices["edp"])])
        sharded = self.stage > 0
        if sharded:  # each dp rank holds different slices
            parts[0:1] = all_reduce(parts[0:1].clone(), ps.dp_group)
        if self.has_experts:  # (without experts the edp sum would be one more collective, of zeros)
            if sharded:
                parts[1:2] = all_reduce(parts[1:2].clone(), ps.edp_group)
            parts[1:2] = all_reduce(parts[1:2].clone(), ps.ep_group)  # each ep rank holds different experts
        total = parts.sum()
        all_reduce(total, ps.tp_group)
        all_reduce(total, ps.pp_group)
        return total.sqrt()

    # -- the step -----------------------------------------------------------------------

    def step(self, lr: float, loss_scale: float | None = None, skip_nonfinite: bool = False) -> dict:
        """loss_scale (fp16): divided out of the gradients with the clipping. With skip_nonfinite
        (fp16, or monitoring.nonfinite=skip) a step whose global norm is not finite (the same
        on every rank) is skipped."""
        norm = self._grad_norm() / (loss_scale or 1.0)
        if skip_nonfinite and not torch.isfinite(norm):
            self._zero_grads()
            return {"grad_norm": norm, "skipped": True}
        clip = self.cfg.grad_clip
        coef = torch.clamp(clip / (norm + 1e-6), max=1.0) if clip > 0 else None  # clip_grad_norm_'s formula
        if loss_scale is not None:
            coef = 1.0 / loss_scale if coef is None else coef / loss_scale
        for b in self.buckets:
            g = self.grad[id(b)]
            g = g * coef if coef is not None else g
            master = self.master[id(b)]
            if isinstance(self.opt, MixedAdamW):  # reads the gradient in its own dtype
                self.opt.grads[master] = g
            else:  # torch's AdamW: .grad in the master's dtype
                master.grad = g if g.dtype == master.dtype else g.to(master.dtype)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        for b in self.buckets:
            self._write_back(b)
            self.master[id(b)].grad = None
        self._zero_grads()
        for hook in self.step_post_hooks:
            hook(self)
        return {"grad_norm": norm, "skipped": False}

    def register_step_post_hook(self, hook) -> None:
        self.step_post_hooks.append(hook)

    def _write_back(self, b: FlatBucket) -> None:
        """The updated masters into the model: every rank's slice into every rank's parameters
        (in place when the master is the storage), cast to the storage dtype, or re-quantised."""
        master = self.master[id(b)]
        if b.lowbit:
            for p, off in zip(b.params, b.offsets):
                spec(p).lowbit.store(b.flat[off:off + p.numel()].view(p.shape))
        elif b.shards > 1:
            _all_gather(b.flat, master if self._master_is_storage(b) else master.to(b.flat.dtype), group=b.group)
        elif not self._master_is_storage(b):
            b.flat.copy_(master)

    def grad_parts(self) -> list[tuple[str, torch.Tensor]]:
        """(parameter name, this rank's part of its summed gradient) for the monitor: the parts
        inside this rank's slices (ZeRO-1/2: summed over dp they make the whole)."""
        return [(self.names[p], self.grad[id(b)][lo:hi]) for b in self.buckets for p, lo, hi, _ in b.overlaps()]

    def _zero_grads(self) -> None:
        for b in self.buckets:
            if self.stage < 2:
                b.grad_flat.zero_()  # any .grad views stay; the next backward accumulates into them
            else:
                self.grad[id(b)].zero_()

    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds per kind (tests, benchmarks): the model's parameters, the master
        copies (0 where the master is the storage), gradients, moments, Kahan compensation."""
        def size(ts):
            return sum(t.numel() * t.element_size() for t in ts)

        moments = size(t for s in self.opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
        params = sum(spec(p).lowbit.nbytes() if spec(p).lowbit is not None else p.numel() * p.element_size()
                     for b in self.buckets for p in b.params)
        master = size(self.master[id(b)] for b in self.buckets if not self._master_is_storage(b))
        comp = size(getattr(self.opt, "compensation", {}).values())
        grads = size(self.grad.values()) if self.stage == 2 else size(b.grad_flat for b in self.buckets)
        return {"params": params, "master": master, "grads": grads, "moments": moments, "compensation": comp,
                "grad_shards": size(self.grad.values())}

    # -- checkpoints: each rank's slices, as boxes of the logical parameters --------------

    def _slice_pieces(self, prefix: str, b: FlatBucket, flat_slice: torch.Tensor) -> list[Piece]:
        """This rank's slice of a per-bucket tensor (moments, masters), cut at parameter
        boundaries into boxes of each parameter (checkpoint.flat_pieces); the padding is not saved."""
        return [piece for p, lo, hi, first in b.overlaps()
                for piece in flat_pieces(f"{prefix}{self.names[p]}", flat_slice[lo:hi], p, first, first + hi - lo)]

    def _state_pieces(self, b: FlatBucket, state: dict) -> list[Piece]:
        out = [piece for k in MOMENTS for piece in self._slice_pieces(f"optim/{k}/", b, state[k])]
        comp = getattr(self.opt, "compensation", {}).get(self.master[id(b)])
        if comp is not None:
            out += self._slice_pieces("optim/kahan/", b, comp)
        return out

    def pieces(self) -> list[Piece]:
        """The moments this rank owns and the step count; the master copies, as the model's
        logical weights (model/NAME, in full precision) where they are not the parameters
        themselves (those are saved with the model); the stochastic-rounding generator."""
        out, step = [], None
        for b in self.buckets:
            state = self.opt.state.get(self.master[id(b)])
            if state:
                out += self._state_pieces(b, state)
                step = state["step"]
            if not self._master_is_storage(b):
                out += self._slice_pieces("model/", b, self.master[id(b)])
        if step is not None:
            out.append(whole("optim/step", step))
        generator = getattr(self.opt, "generator", None)
        if generator is not None:
            out.append(whole(f"precision/rank{self.ps.rank}/master_generator", generator.get_state()))
        return out

    def load_pieces(self, reader: CheckpointReader) -> None:
        """This rank's slices of the saved moments and masters, whatever layout and stage wrote them."""
        for b in self.buckets:  # masters first: any checkpoint has the model's weights
            if not self._master_is_storage(b):
                for piece in self._slice_pieces("model/", b, self.master[id(b)]):
                    reader.fill(piece)
                self._write_back(b)
        generator = getattr(self.opt, "generator", None)
        key = f"precision/rank{self.ps.rank}/master_generator"
        if generator is not None and reader.has(key):
            generator.set_state(reader.full(key))
        if not reader.has("optim/step"):  # a weights-only checkpoint: fresh moments
            return
        step = reader.full("optim/step")
        for b in self.buckets:
            master = self.master[id(b)]
            state = self.opt.new_state(step, master) if isinstance(self.opt, MixedAdamW) else adamw_state(step, master)
            if isinstance(self.opt, MixedAdamW):
                self.opt.kahan_buffer(master)  # created here so that a saved compensation is read into it
            for piece in self._state_pieces(b, state):
                # Absent: moments saved by plain AdamW before this parameter's first gradient, or a
                # compensation the saving run did not keep; both start from zero.
                if reader.has(piece.name):
                    reader.fill(piece)
            self.opt.state[master] = state
