"""Activation recomputation: keep less of a block's forward for backward, and compute the rest
again there (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"; Korthikanti et al.
2022, "Reducing Activation Recomputation in Large Transformer Models").

    train.recompute   a block keeps for backward                    backward computes again
    none              every tensor its ops save                     nothing
    selective         its matmuls' outputs (q, k, v, the MLP's      the norms, activations (GELU, SiLU x up),
                      up and gate projections, ...), attention      RoPE, dropout, residual adds: cheap
                      core's output and log-sum-exp (its costly     elementwise work whose outputs are as
                      T x T work), its input                        large as a matmul's
                      DeepSeek (MLA): not the up-projections        + the MLA up-projections of the
                      (wq_b, wkv_b), whose per-head outputs are     compressed q and kv, as DeepSeek-V3
                      far larger than the compressed latents         does (report, section 3.2.3)
    full              its input only                                the whole block
                      (train.recompute_layers = N: the first N blocks of each pipeline chunk; 0: all)

Full is torch.utils.checkpoint, non-reentrant: the block's forward runs under saved-tensor hooks
that keep nothing but the input, and backward replays it, with the RNG state of the first run
(dropout draws the same mask). Selective is the same call with a policy: each ATen op's output is
saved or recomputed by the op's kind (torch's selective activation checkpointing, as torchtitan's
"op" mode). Both recompute inside the backward of the same rank, so every layout (tp with sp, pp,
ep, ZeRO) recomputes the same collectives in the same order on every rank: a recomputed tp
all-gather is real traffic, and the communication meter counts it under "<group>_recompute"
(metrics.jsonl: comm/tp_recompute_mb).

What runs twice must count once. While backward recomputes, `recomputing()` is true, and:
  - the training monitor's hooks and attention probe record nothing (monitoring/internals.py);
  - MoE layers add nothing to the step's expert load (the router-bias update) or statistics;
  - fp8 delayed scaling adds no amax to its history and replays the scale the first forward
    used (a tape per recomputed region: under 1F1B another micro-batch's forward runs in between).
Their ops run outside selective mode's op recorder (unrecorded()), which matches the recomputed
ops to the first forward's by their order.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

class Region:
    """The recomputed region that runs now: recording its first forward, or replaying it."""

    now: "Region | None" = None

    def __init__(self):
        self.tape: list = []  # values the first forward chose that the replay must reuse (fp8 scales)
        self.replaying = False
        self.in_up_projection = 0  # depth inside a module whose matmuls selective mode recomputes


def recomputing() -> bool:
    """True while backward recomputes a block's forward."""
    return Region.now is not None and Region.now.replaying


def unrecorded():
    """Ops that are bookkeeping, not the block's computation (the monitor's figures, an fp8 amax):
    hidden from selective mode's op recorder, which matches the recomputed ops to the first
    forward's by their order, so that the recompute may skip them."""
    return _disable_current_modes() if Region.now is not None else contextlib.nullcontext()


def replayed(value_fn):
    """value_fn() in a block's first forward (kept on its region's tape), the kept value when the
    block is recomputed; outside a recomputed region, value_fn()."""
    region = Region.now
    if region is None:
        return value_fn()
    if region.replaying:
        return region.tape.pop(0)
    with unrecorded():
        value = value_fn()
    region.tape.append(value)
    return value


_replay_listeners: list = []  # called as each recomputed forward ends (inspection/measure.py)


@contextlib.contextmanager
def on_replay_end(fn):
    """Call fn() each time backward has finished recomputing a block (while the context lasts)."""
    _replay_listeners.append(fn)
    try:
        yield
    finally:
        _replay_listeners.remove(fn)


@contextlib.contextmanager
def _inside(region: Region, replaying: bool):
    previous, Region.now = Region.now, region
    region.replaying = replaying
    try:
        yield
    finally:
        Region.now = previous
        if replaying:
            for fn in _replay_listeners:
                fn()


# Selective mode: the outputs of these ops are kept; everything else in the block is recomputed.
# (_grouped_mm: the experts' GEMMs run grouped, models/grouped.py.)
# (Not bmm: the projections are mm/addmm; a batched matmul in a block is attention's core run as
# separate ops, the CPU math path for MLA's unequal head dims, whose T x T scores are exactly what
# Korthikanti et al. recompute.)
_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten._scaled_mm.default,
            *([torch.ops.aten._grouped_mm.default] if hasattr(torch.ops.aten, "_grouped_mm") else [])}
_ATTENTION = {getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    if hasattr(torch.ops.aten, name)}


def _selective_policy(region: Region):
    def policy(ctx, op, *args, **kwargs):
        if not torch.is_grad_enabled():  # bookkeeping under no_grad (the router's entropy): nothing to keep
            return CheckpointPolicy.PREFER_RECOMPUTE
        if op in _MATMULS and not region.in_up_projection:
            return CheckpointPolicy.MUST_SAVE
        # The attention core is kept unless it draws dropout: a random op must be recomputed, in
        # the order the first forward drew (the RNG state is replayed), not skipped.
        if op in _ATTENTION and not kwargs.get("dropout_p", args[3] if len(args) > 3 else 0.0):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE
    return policy


def mark_up_projection(module: nn.Module) -> None:
    """Selective mode recomputes this module's matmuls (the MLA up-projections) instead of keeping them."""
    def enter(*_):
        if Region.now is not None:
            Region.now.in_up_projection += 1

    def leave(*_):
        if Region.now is not None:
            Region.now.in_up_projection -= 1
    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave)


@dataclass(frozen=True)
class Recompute:
    """train.recompute for one model: which blocks, which mode. parallelize() writes it into the
    model's record (module_spec(model).recompute), and the model's forward runs each block through
    it."""

    mode: str = "none"
    layers: int = 0  # full: the first `layers` blocks of each chunk (0: all)

    def covers(self, position: int) -> bool:
        """Whether the block at this position of its chunk is recomputed."""
        if self.mode == "none":
            return False
        return self.mode == "selective" or not self.layers or position < self.layers

    def run(self, block: nn.Module, position: int, x: torch.Tensor, pos) -> torch.Tensor:
        """block(x, pos), recomputed in backward when this mode covers it (training with grad only);
        pos: models.documents.Positions."""
        if not (self.covers(position) and block.training and torch.is_grad_enabled()):
            return block(x, pos)
        region = Region()

        def contexts():
            first, again = _inside(region, False), _inside(region, True)
            if self.mode == "selective":
                keep, redo = create_selective_checkpoint_contexts(_selective_policy(region))
                return _both(first, keep), _both(again, redo)
            return first, again
        return checkpoint(block, x, pos, use_reentrant=False, preserve_rng_state=True, context_fn=contexts)


@contextlib.contextmanager
def _both(a, b):
    with a, b:
        yield


NONE = Recompute()
