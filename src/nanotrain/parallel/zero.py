"""AdamW over data-parallel ranks, with ZeRO stages 0 to 3 (Rajbhandari et al. 2020): the
optimizer's memory split over data-parallel ranks. The one optimizer of the runtime: stage 0 is
plain AdamW (one process, or plain data parallelism).

Plain data parallelism keeps, on every rank, the fp32 master weights and both AdamW
moments of the whole model: 12 bytes per parameter, replicated dp times. ZeRO gives
each of the dp ranks 1/dp of them, one change per stage, each a piece of its own:

  stage 0: gradients all-reduced (data_parallel.BucketedAllReduce); every rank runs the whole update.
  stage 1: optimizer state sharded (this file): the same all-reduce; each rank updates only its
           slice of every bucket's master weights and moments, then the updated weights are
           all-gathered into every rank's parameters (WholeWeights.write_back).
  stage 2: + gradients sharded: reduce-scattered instead, bucket by bucket as backward produces
           them, so each rank keeps only its slice of the gradients too
           (zero2.BucketedReduceScatter).
  stage 3: + parameters sharded: each rank keeps its slice of every bucket, and each block's
           are gathered for its forward and its backward and freed after
           (zero3.ParameterSharding, in WholeWeights' place). Buckets then never span two
           blocks; the update writes the slices in place, and no all-gather follows the
           step: the next forward gathers.

The stage number is read once, in ZeroOptimizer.__init__, to pick these pieces.

Layout. Parameters that are synced over the same group (dp, or expert-dp for experts)
and handled alike (weight decay or not; sequence-parallel partial sums; the pipeline
copy of a tied embedding) are laid end to end in *buckets* of about bucket_mb
(data_parallel.bucket_layout: the gradients' buckets and the parameters' are one layout). Each
bucket's parameters are one contiguous flat tensor, padded to a multiple of the group size,
and the parameters become views into it, so the all-gather writes the model directly.
Rank r owns the r-th 1/size slice of every bucket:

    bucket 0   [ layers.3.mlp.w2 | layers.3.mlp.w1 | ...           |pad]
    rank 0     [=========]
    rank 1                [=========]
    ...                              (each rank: its slice of every bucket)

The master weights (an fp32 copy of the owned slices, owned by the optimizer) and the
moments exist for the owned slices only. The global gradient norm is summed from the
owned gradient slices, each parameter's part counted by the rules of data_parallel.grad_norm,
over dp, then tp, ep and pp.

Checkpoints record each rank's slices as boxes of the logical parameters (the moments of
a slice that spans parameters are cut at their boundaries), so a run resumes under any
zero stage, dp size or layout (checkpoint/pieces.py).

Stage 0 is the same machinery unsharded: every rank owns the whole of every bucket, the
gradients are all-reduced, and every rank runs the whole update. With every copy in fp32 (no
master, no low-bit weights: plain AdamW) it updates each parameter as a tensor of its own, not
bucket by bucket: torch's fused CPU AdamW computes a tensor's scalar tail in double, so a flat
bucket could differ from per-parameter AdamW by an ulp (optim.adamw_impl), and plain runs keep
torch's AdamW results exactly (and its rule that a parameter with no gradient is not stepped).
Otherwise (masters, gradients or moments in dtypes of their own, persistent low-bit weights:
precision/master.py, precision/lowbit.py) it updates whole buckets.

Mixed precision. The buckets hold the model's parameters in their storage dtype
(precision.param_dtype); the master slices are copies in master_dtype when that differs
(then the all-gather after the step carries param_dtype: half the bytes of fp32 for bf16);
the gradients are accumulated and reduced in grad_dtype. Where a gradient's dtype differs
from its buffer's, a hook adds each backward's gradient into the buffer and drops it
(Megatron's main_grad) instead of making .grad a view of it. Persistent low-bit weights
(stage 0) live in buckets of their own whose flat buffer is the fp32 master; the model
keeps only the quantised codes, rewritten after each step.

(torch's versions: torch.optim.AdamW for stage 0 behind DistributedDataParallel;
ZeroRedundancyOptimizer shards stage 1 by whole parameters; FSDP2's fully_shard also shards
the parameters, as stage 3. bench/dp.py and bench/zero.py compare.)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint import CheckpointReader, Piece, flat_pieces, sharded, whole
from ..optim import MOMENTS, adamw_impl, adamw_state
from ..precision.master import Dtypes, MixedAdamW
from ..params import spec
from . import collectives
from .data_parallel import BucketedAllReduce, FlatBucket, backward_chunks, bucket_layout, clip_coef, grad_norm
from .zero2 import BucketedReduceScatter
from .zero3 import ParameterSharding, units_of


@dataclass(eq=False)
class Unit:
    """What AdamW updates as one tensor: this rank's slice of a bucket, or (plain fp32 stage 0)
    one parameter, [lo, hi) of the bucket's owned slice, with its master copy."""

    bucket: FlatBucket
    lo: int
    hi: int
    master: torch.Tensor
    param: nn.Parameter | None = None  # the parameter, when the unit is one

    def overlaps(self):
        """(parameter, start, end, first) of each parameter's part of the unit (see FlatBucket.overlaps)."""
        for p, lo, hi, first in self.bucket.overlaps():
            a, b = max(lo, self.lo), min(hi, self.hi)
            if a < b:
                yield p, a - self.lo, b - self.lo, first + a - lo


class WholeWeights:
    """Stages 0-2: every rank holds every weight whole, the parameters views of their buckets'
    storage (b.flat). Stage 3's counterpart: zero3.ParameterSharding."""

    saves_model = False  # the model holds the weights (the optimizer saves them only from a master copy)

    def store(self, b: FlatBucket, storage: torch.dtype, fp32: torch.Tensor) -> torch.Tensor:
        """Make b's parameters views of one flat buffer in the storage dtype, b.flat, holding the
        values `fp32`; returns this rank's slice's fp32 values. Low-bit weights: the model keeps
        the codes, b.flat is their fp32 master."""
        b.flat = fp32 if b.lowbit or storage == torch.float32 else fp32.to(storage)
        for p, off in zip(b.params, b.offsets):
            if b.lowbit:
                spec(p).lowbit.store(fp32[off:off + p.numel()].view(p.shape))
                p.data = torch.zeros(1, dtype=torch.float32, device=p.device).expand(p.shape)
            else:
                p.data = b.flat[off:off + p.numel()].view_as(p)  # the parameter now lives in the bucket
        return fp32[b.owned()]

    def mine(self, b: FlatBucket) -> torch.Tensor:
        """This rank's part of b's storage: its slice (unsharded: all of it)."""
        return b.flat[b.owned()]

    def write_back(self, b: FlatBucket, master: torch.Tensor) -> None:
        """This rank's updated master slice into every rank's parameters: all-gathered (ZeRO-1, 2; in
        place when the master is the storage), copied (a master of its own dtype), or re-quantised."""
        if b.lowbit:
            for p, off in zip(b.params, b.offsets):
                spec(p).lowbit.store(b.flat[off:off + p.numel()].view(p.shape))
        elif b.shards > 1:
            collectives.all_gather_into(b.flat, master.to(b.flat.dtype), b.group)
        elif master.dtype != b.flat.dtype:
            b.flat.copy_(master)

    def weight_parts(self, buckets: list[FlatBucket], names: dict) -> None:
        return None  # whole on every rank: the monitor reads the parameters

    def nbytes(self, buckets: list[FlatBucket]) -> int:
        return sum(spec(p).lowbit.nbytes() if spec(p).lowbit is not None else p.numel() * p.element_size()
                   for b in buckets for p in b.params)

    def end_backward(self) -> None:
        pass  # nothing gathered


class ZeroOptimizer:
    """AdamW with ZeRO stage 0 (replicated: plain AdamW), 1, 2 or 3 (state, gradients, parameters
    sharded over the data-parallel group), over flat buckets, with the precision policy's dtypes
    (precision/master.py).

    Per step the engine calls backward_context(last) around each micro-batch's backward,
    sync_grads() once, then step(lr); pieces() / load_pieces() for checkpoints.
    """

    def __init__(self, model: nn.Module, stage: int, ps, cfg, bucket_mb: float = 25.0,
                 dtypes: Dtypes | None = None, seed: int = 0, per_param: bool | None = None):
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"optimizer.zero_stage={stage}: ZeRO stages 0 (off), 1, 2 and 3 are implemented here")
        self.stage, self.ps, self.cfg = stage, ps, cfg
        self.step_post_hooks: list = []  # hook(self) after every step that was not skipped
        self.dtypes = dt = dtypes or Dtypes()
        self.names = {p: n for n, p in model.named_parameters()}
        # Every name the model's state_dict gives each parameter: a tied head's weight is also
        # "head.weight", saved under both names (checkpoint.model_pieces), from the master too.
        self.aliases: dict[nn.Parameter, list[str]] = {}
        for n, t in model.state_dict(keep_vars=True).items():
            if isinstance(t, nn.Parameter):
                self.aliases.setdefault(t, []).append(n)
        self.params = params = [p for p in model.parameters() if p.requires_grad]
        lowbit = any(spec(p).lowbit is not None for p in params)
        sharded = stage > 0  # ZeRO-1: each rank updates its slice of every bucket
        if sharded and lowbit:  # this class's own limit; a config asking for it is refused first (cross_checks)
            raise ValueError("precision.lowbit.weights with optimizer.zero_stage>0: the low-bit weights' masters are "
                             "not sharded. Use optimizer.zero_stage=0, or drop precision.lowbit.weights.")
        # The buckets: per pipeline chunk (each chunk's backward sends its own), at stage 3 per block.
        self.buckets = bucket_layout(params, ps, sharded, bucket_mb, units_of(model) if stage == 3 else None,
                                     backward_chunks(model))
        # Where the weights live: whole on every rank, views of the buckets (stages 0-2), or this
        # rank's slices, each block's gathered for its forward and backward (3: zero3.py).
        self.weights = ParameterSharding(model, self.buckets, ps) if stage == 3 else WholeWeights()
        initial = {id(b): self._store(b, dt.storage) for b in self.buckets}  # fp32 values before any cast
        self.has_experts = any(spec(p).expert_parallel for p in params)
        # Plain AdamW (stage 0, every copy fp32): one unit per parameter (see the module docstring).
        # per_param=False: whole buckets anyway (tests compare the two).
        self.per_param = not sharded and dt.all_fp32 and not lowbit and per_param is not False
        self.units = [u for b in self.buckets for u in self._units(b, initial[id(b)])]
        del initial
        # How the gradients are summed: all-reduced (stages 0, 1) or reduce-scattered (2, 3: zero2.py).
        reducer = BucketedReduceScatter if stage >= 2 else BucketedAllReduce
        self.reducer = reducer(self.buckets, dt.grad, local_ok=self.per_param)
        self.grad = self.reducer.grad
        # Views of the (persistent) gradient buffers, made once: each unit's, and each parameter's
        # part of this rank's slices (the norm's and the monitor's). With nothing to reduce (the
        # reducer's `local`) each parameter's own .grad instead, read at each step.
        if not self.reducer.local:
            self._unit_grads = {u: self.grad[id(u.bucket)][u.lo:u.hi].view(u.master.shape) for u in self.units}
            self._views = [(p, self.grad[id(b)][lo:hi]) for b in self.buckets for p, lo, hi, _ in b.overlaps()]

        # One parameter group per category, in bucket order (the order MixedAdamW's stochastic
        # rounding draws its random numbers in).
        by_category: dict[tuple, list[Unit]] = {}
        for u in self.units:
            by_category.setdefault(u.bucket.category, []).append(u)
        groups = [{"params": [u.master for u in us], "weight_decay": cfg.weight_decay if us[0].bucket.decay else 0.0}
                  for us in by_category.values()]
        device = self.buckets[0].flat.device if self.buckets else torch.device("cpu")
        if dt.torch_adamw:  # fp32 masters and moments: torch's AdamW
            self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                         **adamw_impl(cfg, device))
        else:
            self.opt = MixedAdamW(groups, cfg.lr, (cfg.beta1, cfg.beta2), cfg.eps, dt.exp_avg, dt.exp_avg_sq,
                                  dt.rounding, seed=seed + ps.rank)
        # Parameters whose logical value lives in a master copy, not in the model (checkpoints); at
        # stage 3 every one: the model holds slices, which the optimizer saves as the masters.
        self.mastered = {n for b in self.buckets if self._saves_model(b) for p in b.params for n in self._names(p)}

    @property
    def sharding(self) -> ParameterSharding | None:
        """Stage 3's gathering (tests and the memory meter read its figures); None at stages 0-2."""
        return self.weights if isinstance(self.weights, ParameterSharding) else None

    @property
    def _parts(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Each parameter's gradient on this rank, flat: its part of this rank's slices (a view of
        the buffers), or its own .grad (local; a parameter backward did not reach: zeros)."""
        if not self.reducer.local:
            return self._views
        return [(p, p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device))
                for b in self.buckets for p in b.params]

    def _unit_grad(self, u: Unit) -> torch.Tensor:
        return u.param.grad if self.reducer.local else self._unit_grads[u]

    def _master_is_storage(self, b: FlatBucket) -> bool:
        return not b.lowbit and self.dtypes.master == b.flat.dtype

    def _saves_model(self, b: FlatBucket) -> bool:
        """Whether the optimizer saves (and loads) b's weights, from its master slices: when the
        master is a copy of its own, or (stage 3) the model holds only this rank's slices."""
        return self.weights.saves_model or not self._master_is_storage(b)

    # -- layout -------------------------------------------------------------------------

    def _store(self, b: FlatBucket, storage: torch.dtype) -> torch.Tensor:
        """Move b's parameters into the weights' storage (self.weights.store); returns the fp32 values
        of this rank's slice, before any cast."""
        fp32 = torch.zeros(b.numel, dtype=torch.float32, device=b.params[0].device)
        for p, off in zip(b.params, b.offsets):
            fp32[off:off + p.numel()].copy_(p.detach().reshape(-1))
        return self.weights.store(b, storage, fp32)

    def _units(self, b: FlatBucket, values: torch.Tensor) -> list[Unit]:
        """The master weights: this rank's slice of b (in the storage dtype it is the storage's own
        slice, and the all-gather then runs in place; in another dtype a copy of the initial fp32
        `values`), or, plain, each parameter as a view of the bucket."""
        if self.per_param:
            return [Unit(b, off, off + p.numel(), b.flat[off:off + p.numel()].view_as(p), p)
                    for p, off in zip(b.params, b.offsets)]
        mine = self.weights.mine(b)
        master = mine if self._master_is_storage(b) or b.lowbit else values.to(self.dtypes.master)
        return [Unit(b, 0, b.shard_numel, master)]

    # -- gradients (data_parallel.py, zero2.py) -------------------------------------------

    @contextlib.contextmanager
    def backward_context(self, last: bool):
        """Around each backward: the reducer syncs on the last micro-batch (stages 0/1) or on every one
        (2, 3); then stage 3 frees what that backward still holds."""
        with self.reducer.backward_context(last):
            yield
        self.weights.end_backward()

    def sync_grads(self) -> None:
        """Wait for the reductions; then this rank's summed gradient slices are in self.grad."""
        self.reducer.sync()

    def _stepped(self) -> list[Unit]:
        """The units AdamW updates: all of them, except, per parameter, one with no gradient this step
        (plain AdamW skips it: no weight decay, no moment decay), as torch's optimizer does."""
        if not self.per_param:
            return self.units
        return [u for u in self.units if u.param in self.reducer.got_grad]

    def _grad_norm(self) -> torch.Tensor:
        """Global norm of the logical model's gradient (data_parallel.grad_norm)."""
        ps = self.ps
        if all(b.shards == 1 for b in self.buckets):
            # Whole gradients on every rank (stage 0, or nothing to shard over): plain AdamW's
            # norm, over the parameters in the model's order. A sum of squares in another order
            # (bucket order) differs in the last bit, and so then does the clipping coefficient
            # and every update; bf16 training amplifies that.
            views = dict(self._parts)  # whole parameters here
            keep = self.reducer.got_grad if self.per_param else views
            params = [p for p in self.params if p in views and p in keep]
            return grad_norm(params, [views[p].view(p.shape).float() for p in params], ps)
        return grad_norm([p for p, _ in self._parts], [g.float() for _, g in self._parts], ps,
                         sliced=True, experts=self.has_experts)

    # -- the step -----------------------------------------------------------------------

    def step(self, lr: float, loss_scale: float | None = None, skip_nonfinite: bool = False) -> dict:
        """loss_scale (fp16): divided out of the gradients with the clipping. With skip_nonfinite
        (fp16, or monitoring.nonfinite=skip) a step whose global norm is not finite (the same
        on every rank) is skipped."""
        units = self._stepped()
        norm = self._grad_norm() / (loss_scale or 1.0)  # the norm *before* clipping is what we log
        if skip_nonfinite and not torch.isfinite(norm):
            self.reducer.zero()
            return {"grad_norm": norm, "skipped": True}
        grads = [self._unit_grad(u) for u in units]
        coef = clip_coef(norm, self.cfg.grad_clip, loss_scale)
        if coef is not None:  # in place: the buffers are zeroed after the step
            torch._foreach_mul_(grads, coef)
        for u, g in zip(units, grads):
            if isinstance(self.opt, MixedAdamW):  # reads the gradient in its own dtype
                self.opt.grads[u.master] = g
            else:  # torch's AdamW: .grad in the master's dtype
                u.master.grad = g if g.dtype == u.master.dtype else g.to(u.master.dtype)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        for u in units:
            u.master.grad = None
        if not self.per_param:  # (per parameter, the units are the parameters themselves)
            for u in self.units:  # one per bucket
                self.weights.write_back(u.bucket, u.master)
        self.reducer.zero()
        for hook in self.step_post_hooks:
            hook(self)
        return {"grad_norm": norm, "skipped": False}

    def register_step_post_hook(self, hook) -> None:
        """hook(self) runs at the end of every step that was not skipped (torch.optim.Optimizer's
        name; the runtime registers DeepSeek's expert-bias update here)."""
        self.step_post_hooks.append(hook)

    def grad_parts(self) -> list[tuple[str, torch.Tensor]]:
        """(parameter name, this rank's part of its summed gradient) for the monitor: the parts
        inside this rank's slices (ZeRO-1/2: summed over dp they make the whole)."""
        return [(self.names[p], g) for p, g in self._parts]

    def grad_pieces(self) -> list[Piece]:
        """This rank's summed gradients as boxes of the logical parameters, under their one-process
        names (checkpoint.flat_pieces, as the moments are saved): put together over every rank
        (checkpoint.assemble) they are the whole gradients, at any stage (nanotrain verify)."""
        if self.reducer.local:  # autograd's own .grad, whole on this rank
            pieces = [sharded(self.names[p], p.grad, spec(p).shard) for p in self.params if p.grad is not None]
            return [piece for piece in pieces if piece is not None]
        return [piece for b in self.buckets for p, lo, hi, first in b.overlaps()
                for piece in flat_pieces(self.names[p], self.grad[id(b)][lo:hi], p, first, first + hi - lo)]

    def weight_parts(self) -> list[tuple[str, torch.Tensor]] | None:
        """Stage 3: (parameter name, this rank's part of its weights), as grad_parts (summed over dp
        they make the whole); None at stages 0-2, where every rank holds whole parameters."""
        return self.weights.weight_parts(self.buckets, self.names)

    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds per kind (tests, benchmarks): the model's parameters, the master
        copies (0 where the master is the storage), gradients, moments, Kahan compensation."""
        def size(ts):
            return sum(t.numel() * t.element_size() for t in ts)

        moments = size(t for s in self.opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
        master = size(u.master for u in self.units if not self._master_is_storage(u.bucket))
        comp = size(getattr(self.opt, "compensation", {}).values())
        return {"params": self.weights.nbytes(self.buckets), "master": master, "grads": self.reducer.nbytes(),
                "moments": moments, "compensation": comp, "grad_shards": size(self.grad.values())}

    # -- checkpoints: each rank's slices, as boxes of the logical parameters --------------

    def _names(self, p: nn.Parameter) -> list[str]:
        return self.aliases.get(p, [self.names[p]])

    def _slice_pieces(self, prefix: str, u: Unit, t: torch.Tensor) -> list[Piece]:
        """This rank's part of a per-unit tensor (moments, masters), cut at parameter boundaries
        into boxes of each parameter (checkpoint.flat_pieces); the padding is not saved. The
        model's weights go under each of their names (a tied head's too), the moments under one."""
        flat = t.reshape(-1)  # a view: filling the pieces fills t
        return [piece for p, lo, hi, first in u.overlaps()
                for name in (self._names(p) if prefix == "model/" else [self.names[p]])
                for piece in flat_pieces(f"{prefix}{name}", flat[lo:hi], p, first, first + hi - lo)]

    def _state_pieces(self, u: Unit, state: dict) -> list[Piece]:
        out = [piece for k in MOMENTS for piece in self._slice_pieces(f"optim/{k}/", u, state[k])]
        comp = getattr(self.opt, "compensation", {}).get(u.master)
        if comp is not None:
            out += self._slice_pieces("optim/kahan/", u, comp)
        return out

    def pieces(self) -> list[Piece]:
        """The moments this rank owns and the step count; the master copies, as the model's
        logical weights (model/NAME, in full precision) where they are not the parameters
        themselves (those are saved with the model); the stochastic-rounding generator."""
        out, steps = [], []
        for u in self.units:
            state = self.opt.state.get(u.master)
            if state:  # (a parameter that never had a gradient has no moments yet)
                out += self._state_pieces(u, state)
                steps.append(state["step"])
            if self._saves_model(u.bucket):
                out += self._slice_pieces("model/", u, u.master)
        if steps:
            out.append(whole("optim/step", max(steps, key=float)))
        generator = getattr(self.opt, "generator", None)
        if generator is not None:
            out.append(whole(f"precision/rank{self.ps.rank}/master_generator", generator.get_state()))
        return out

    def load_pieces(self, reader: CheckpointReader) -> None:
        """This rank's slices of the saved moments and masters, whatever layout and stage wrote them."""
        for u in self.units:  # masters first: any checkpoint has the model's weights
            if self._saves_model(u.bucket):  # (then not per parameter: one unit per bucket)
                for piece in self._slice_pieces("model/", u, u.master):
                    reader.fill(piece)
                self.weights.write_back(u.bucket, u.master)
        generator = getattr(self.opt, "generator", None)
        key = f"precision/rank{self.ps.rank}/master_generator"
        if generator is not None and reader.has(key):
            generator.set_state(reader.full(key))
        if not reader.has("optim/step"):  # a weights-only checkpoint: fresh moments
            return
        step = reader.full("optim/step")
        for u in self.units:
            if u.param is not None and not reader.has(f"optim/exp_avg/{self.names[u.param]}"):
                continue  # plain AdamW: no moments saved before the parameter's first gradient, none now
            master = u.master
            state = self.opt.new_state(step, master) if isinstance(self.opt, MixedAdamW) else adamw_state(step, master)
            if isinstance(self.opt, MixedAdamW):
                self.opt.kahan_buffer(master)  # created here so that a saved compensation is read into it
            for piece in self._state_pieces(u, state):
                # Absent: moments saved by plain AdamW before this parameter's first gradient, or a
                # compensation the saving run did not keep; both start from zero.
                if reader.has(piece.name):
                    reader.fill(piece)
            self.opt.state[master] = state
