"""Layer primitives: Linear, Embedding, RMSNorm, LayerNorm, and layout-invariant init.

Blocks (attention, MLP) are built only from these primitives, so a
tensor-parallel variant (ColumnParallelLinear, RowParallelLinear,
VocabParallelEmbedding) can stand in for one of them without touching the
block: it keeps the same forward signature and declares which slice of the
full ("logical") weight it holds through `Shard`.

Layout-invariant initialisation (DESIGN, invariant 1): every parameter's
*full* tensor is drawn from a generator seeded by (seed, logical name), then
the local slice is copied in. A shard held by TP rank r is therefore
bit-identical to the same slice of the single-process tensor, whatever the
layout. (Megatron does the same with its "master weight" init followed by a
split; torchtitan inits on meta and materialises DTensors.) Drawing the full
tensor on every rank costs time and memory proportional to the full model,
which is fine at the sizes this project trains.
"""

from __future__ import annotations

import hashlib
import math
import torch
import torch.nn.functional as F
from torch import nn

from .module_spec import GEMM, mark
from .params import Shard, declare, shard_part, spec
from .precision.policy import gemm


def _mark(p: nn.Parameter, init: str, std: float = 0.0, shard: Shard | None = None) -> nn.Parameter:
    # Init recipe and sharding travel with the parameter (params.ParamSpec), so
    # init_parameters needs no knowledge of the module that owns it.
    return declare(p, init=init, init_std=std, shard=shard)


class Linear(nn.Linear):
    """y = x W^T (+ b). Weight [out_features, in_features], initialised N(0, init_std).

    A subclass of nn.Linear (same attributes, same forward) so that PyTorch's own
    tools recognise it (DTensor's parallelize_module, FSDP2); only construction
    differs: no default init here, init_parameters fills the weights. The GEMM runs in
    the recipe the precision policy gave this module (precision/policy.py, through its
    module_spec)."""

    tp = None  # the tensor-parallel layers' TensorParallel (ColumnParallelLinear, RowParallelLinear)

    def __init__(self, in_features: int, out_features: int, bias: bool = False, init_std: float = 0.02):
        nn.Module.__init__(self)  # skip nn.Linear's kaiming init: layout-invariant init comes later
        mark(self, kind=GEMM)  # the precision policy gives it a recipe
        self.in_features, self.out_features = in_features, out_features
        self.weight = _mark(nn.Parameter(torch.empty(out_features, in_features)), "normal", init_std)
        self.bias = _mark(nn.Parameter(torch.empty(out_features)), "zeros") if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemm(self, x, self.weight, self.bias)


class Embedding(nn.Embedding):
    """Token (or position) lookup table [num_embeddings, dim] (an nn.Embedding, as Linear above)."""

    def __init__(self, num_embeddings: int, dim: int, init_std: float = 0.02):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = num_embeddings, dim
        self.padding_idx, self.max_norm, self.norm_type = None, None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False
        self.weight = _mark(nn.Parameter(torch.empty(num_embeddings, dim)), "normal", init_std)

    @property
    def dim(self) -> int:
        return self.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    """x / rms(x) * g  (Zhang & Sennrich 2019): LayerNorm without centring or bias."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = _mark(nn.Parameter(torch.empty(dim)), "ones")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In fp32 whatever the input (a bf16 projection output under autocast): the mean of
        # squares needs the precision, and the fused kernel wants input and weight alike.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class LayerNorm(nn.Module):
    """(x - mean) / std * g (+ b)  (Ba et al. 2016), bias optional as in nanoGPT."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = _mark(nn.Parameter(torch.empty(dim)), "ones")
        self.bias = _mark(nn.Parameter(torch.empty(dim)), "zeros") if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Weights in the input's dtype (the fused kernel wants them alike; bf16 parameters and an fp32 input).
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.layer_norm(x, (x.shape[-1],), self.weight.to(x.dtype), bias, self.eps)


def make_norm(kind: str, dim: int, eps: float, bias: bool = False) -> nn.Module:
    return RMSNorm(dim, eps) if kind == "rmsnorm" else LayerNorm(dim, eps, bias)


# ---------------------------------------------------------------------------
# Layout-invariant initialisation
# ---------------------------------------------------------------------------

def param_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed from (run seed, logical parameter name). Python's hash() is salted per process."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def full_shape(p: nn.Parameter) -> tuple[int, ...]:
    shape = list(p.shape)
    for shard in spec(p).shards:
        shape[shard.dim] = shard.full_size(shape[shard.dim])
    return tuple(shape)


def logical_numel(model: nn.Module) -> int:
    """Parameters of the whole (unsharded, unpadded) model, counted from this rank's shards."""
    return sum(math.prod(full_shape(p)) for p in model.parameters())


def full_init_tensor(p: nn.Parameter, name: str, seed: int) -> torch.Tensor:
    """The full (unsharded) initial value of parameter `name`, in fp32 on CPU."""
    shape, s = full_shape(p), spec(p)
    if s.init == "normal":
        g = torch.Generator().manual_seed(param_seed(seed, name))
        return torch.randn(shape, generator=g) * s.init_std
    if s.init == "ones":
        return torch.ones(shape)
    if s.init == "zeros":
        return torch.zeros(shape)
    raise ValueError(f"parameter {name} has no init recipe: build it with nanotrain.layers primitives")


@torch.no_grad()
def init_parameters(model: nn.Module, seed: int) -> None:
    """Initialise every parameter from (seed, its logical name), then keep the local slice."""
    for name, p in model.named_parameters():
        # Padding rows (Shard.size) start at zero, and stay there: nothing reads them (the
        # vocabulary-parallel head masks their logits), so their gradient is zero, and AdamW
        # moves a zero weight with zero gradient nowhere.
        p.copy_(shard_part(full_init_tensor(p, name, seed), spec(p).shard))
