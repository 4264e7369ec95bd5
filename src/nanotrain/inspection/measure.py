"""What a rank actually holds, counted tensor by tensor: the yardstick for inspection/memory.py.

CPUs have no allocator statistics (torch.cuda.memory_allocated has no CPU twin), so the
bytes are counted from the tensors themselves, each storage once (views share one):

    static       the model's parameters, their gradients, and the optimizer's state
                 (the ZeRO optimizer's own `state_bytes`, or AdamW's moments)
    activations  every tensor autograd saves for backward (torch.autograd.graph.saved_tensors_hooks),
                 parameters and buffers excluded; a tensor stops counting when autograd frees it
                 (after the backward that used it), so the peak over a step is the activation memory
                 of the micro-batches in flight at once (1F1B keeps pp - stage of them)
                 (SavedTensorMeter). Recomputation hides what it keeps from those hooks (a
                 checkpointed block installs hooks of its own, and keeps its input and, in selective
                 mode, the outputs it chose outside them), so LiveActivationMeter counts instead
                 every storage the model's forward creates, and backward's recomputed forwards, for
                 as long as it lives, sampled when each forward or recomputation ends: what is
                 still alive then is what backward will use.

Temporaries that live inside one operation (a GEMM's output before the next op reads it, a
communication buffer) are not counted, here or in the estimate. On CUDA,
torch.cuda.max_memory_allocated would include them too.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..recompute import on_replay_end, recomputing


def storage_key(t: torch.Tensor) -> int:
    """The storage's identity (its StorageImpl, not its data pointer: ZeRO-3 frees and reallocates
    the memory behind a parameter's storage, which stays the same object)."""
    return t.untyped_storage()._cdata


def unique_bytes(tensors) -> int:
    """Bytes of the distinct storages behind these tensors."""
    seen: dict[int, int] = {}
    for t in tensors:
        if torch.is_tensor(t) and t.numel():
            seen[storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


class SavedTensorMeter:
    """Live and peak bytes of the tensors autograd keeps for backward (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.skip = {storage_key(t) for t in [*model.parameters(), *model.buffers()] if t.numel()}
        self.refs: dict[int, int] = {}  # storage -> live saved tensors that use it
        self.size: dict[int, int] = {}
        self.live = self.peak = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t) if t.numel() else None
        if key is None or key in self.skip or t.device.type == "meta":
            return t
        if self.refs.get(key, 0) == 0:
            self.size[key] = t.untyped_storage().nbytes()
            self.live += self.size[key]
            self.peak = max(self.peak, self.live)
        self.refs[key] = self.refs.get(key, 0) + 1
        # The Python object lives as long as autograd's saved copy of the tensor (PyTorch keeps a
        # tensor's Python object alive while the C++ tensor is): its finalizer marks the free.
        weakref.finalize(t, self._release, key)
        return t

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.size.pop(key)

    @contextmanager
    def counting(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self


class LiveActivationMeter(TorchDispatchMode):
    """Peak bytes of the storages created by the model's forward passes (and by the forwards
    recomputed in backward) while they live, sampled at the end of each forward and of each
    recomputed block (see the module docstring): what recomputation keeps, and the one block it
    rebuilds at a time, as well as what plain autograd saves.

    A storage counts from the op that creates it (not a view or an in-place write of an op's
    inputs, not a parameter gathered by ZeRO-3) until it is freed: PyTorch keeps a storage's
    Python object alive as long as the storage, so its finalizer marks the free."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.size: dict[int, int] = {}  # storage -> bytes, while it lives
        self.live = self.peak = 0
        self.depth = 0  # model forwards running now (a pipeline stage's forward is the model's)
        self.skip = {storage_key(t) for t in [*model.parameters(), *model.buffers()]}
        self.replayed = False  # a recomputed block has just ended: sample at backward's next op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.replayed:  # the recomputation's own temporaries are gone by now (not at its end:
            self.replayed = False  # an early-stopped recomputation's frames still hold them there)
            self.sample()
        out = func(*args, **(kwargs or {}))
        if self.depth or recomputing():
            inputs = {storage_key(t) for t in tree_leaves((args, kwargs)) if torch.is_tensor(t)}
            for t in tree_leaves(out):
                if torch.is_tensor(t) and storage_key(t) not in inputs:
                    self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.size or key in self.skip or storage.nbytes() == 0 or t.device.type == "meta":
            return
        self.size[key] = storage.nbytes()
        self.live += self.size[key]
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self.size.pop(key)

    def sample(self) -> None:
        self.peak = max(self.peak, self.live)

    def _replay_ended(self) -> None:
        self.replayed = True

    @contextmanager
    def counting(self):
        def enter(module, args, kwargs):
            # The model's inputs count too: token ids and targets, or on a later pipeline stage the
            # hidden states received from the one before (made by a receive, not by this forward).
            for t in tree_leaves((args, kwargs)):
                if torch.is_tensor(t):
                    self._track(t)
            self.depth += 1

        def leave(module, args, out):
            self.depth -= 1
            self.sample()

        hooks = [self.model.register_forward_pre_hook(enter, with_kwargs=True),
                 self.model.register_forward_hook(leave)]
        try:
            with self, on_replay_end(self._replay_ended):
                yield self
        finally:
            for h in hooks:
                h.remove()
