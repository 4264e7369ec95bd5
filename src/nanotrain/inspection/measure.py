"""What a rank actually holds, counted tensor by tensor: the yardstick for inspection/memory.py.

CPUs have no allocator statistics (torch.cuda.memory_allocated has no CPU twin), so the
bytes are counted from the tensors themselves, each storage once (views share one):

    static       the model's parameters, their gradients, and the optimizer's state
                 (the ZeRO optimizer's own `state_bytes`, or AdamW's moments)
    activations  every tensor autograd saves for backward (torch.autograd.graph.saved_tensors_hooks),
                 parameters and buffers excluded; a tensor stops counting when autograd frees it
                 (after the backward that used it), so the peak over a step is the activation memory
                 of the micro-batches in flight at once (1F1B keeps pp - stage of them)

Temporaries that live inside one operation (a GEMM's output before the next op reads it, a
communication buffer) are not counted, here or in the estimate. On CUDA,
torch.cuda.max_memory_allocated would include them too.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from torch import nn


def storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


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
