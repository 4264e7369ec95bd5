"""Tensor parallelism (Megatron-LM): layers whose matrices are split across the tp group.

    ColumnParallelLinear   W [out, in] split by rows (output features): each rank computes
                           out/tp features of y = x W^T from the full x.
    RowParallelLinear      W [out, in] split by columns (input features): each rank multiplies
                           its in/tp slice of x; the partial sums are all-reduced.
    VocabParallelEmbedding the table split by vocabulary rows; each rank looks up the ids
                           in its range, zeros elsewhere, all-reduce.
    VocabParallelHead      the output head, split by vocabulary rows: each rank computes the
                           logits of its rows.
    vocab_parallel_cross_entropy  softmax over a vocabulary split across ranks without
                           gathering the logits: max, sum-exp and the target logit are
                           each one all-reduce of a [tokens] tensor.

A vocabulary that tp does not divide (65 characters over tp=2) is padded to the next
multiple of tp (padded_vocab; Megatron's make-vocab-size-divisible-by), the padding rows at
the end of the last shards. They are no token: the head gives them logit -inf, so no softmax
(loss, probe, sampling) sees them and the model is the unpadded one-process model; their
weights start at zero and get no gradient; checkpoints and gathers leave them out
(Shard.size). The logical tensors keep the vocabulary's own size.

A Column -> Row pair (attention's wq/wk/wv -> wo, the MLP's w1/w3 -> w2) needs
one all-reduce forward and one backward, and nothing between the two matmuls (the column
linears that read the same input enter the region together: column_linears):

    x ──f──> [x W1_r^T] ──act──> [h_r W2_r^T] ──g──> y        (f, g: collectives.py)

With sequence parallelism the activations between TP regions (norms, dropout,
residual adds) are split along the sequence, and f/g become
all-gather / reduce-scatter along it, moving the same bytes while storing 1/tp
of those activations.

Each layer holds only its shard, marked with `Shard` so that init
(layers.init_parameters) copies in the matching slice of the full tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import ParallelConfig
from ..layers import Embedding, Linear
from ..module_spec import mark
from ..params import Shard, declare, spec
from ..precision.policy import gemm
from .collectives import (Group, all_reduce, copy_to_region, gather_last, gather_seq, reduce_from_region,
                          reduce_scatter_seq)
from .state import ParallelState


@dataclass(frozen=True)
class TensorParallel:
    """What a tensor-parallel layer needs to know: its group and whether SP is on."""

    group: Group | None  # parallel/collectives.py
    rank: int
    size: int
    sequence_parallel: bool = False
    experts: bool = False  # parallel.etp = tp: each routed expert's width split over the group too (models/moe.py)


def tensor_parallel(ps: ParallelState, p: ParallelConfig) -> TensorParallel | None:
    """parallelize()'s first step: what the model's layers are built with (None: tp = 1, the plain
    layers). The group of this rank's tp peers; sequence parallelism (parallel.sequence_parallel);
    and parallel.etp > 1, the routed experts' width split over the same group (models/moe.py)."""
    if ps.tp == 1:
        return None
    return TensorParallel(ps.tp_group, ps.tp_rank, ps.tp, p.sequence_parallel, p.etp > 1)


def _shard_param(p: nn.Parameter, dim: int, tp: TensorParallel, size: int = 0) -> nn.Parameter:
    return declare(p, shard=Shard(dim, tp.rank, tp.size, size=size))


def padded_vocab(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of tp, so that each rank holds as many rows."""
    return -(-vocab_size // tp) * tp


def _vocab_rows(vocab_size: int, tp: TensorParallel) -> tuple[int, int]:
    """(rows per rank, Shard.size): the padded vocabulary's rows per rank, and the logical size
    to record when the vocabulary was padded (0 when tp divides it)."""
    padded = padded_vocab(vocab_size, tp.size)
    return padded // tp.size, vocab_size if padded != vocab_size else 0


def _divide(n: int, tp: TensorParallel, what: str) -> int:
    if n % tp.size:
        raise ValueError(f"{what}={n} is not divisible by parallel.tp={tp.size}")
    return n // tp.size


class ColumnParallelLinear(Linear):
    """y_r = x W_r^T + b_r; W_r = rows [r*out/tp, (r+1)*out/tp) of the full weight.

    shared_input: x has already entered the tp region (enter_columns), once for several
    column-parallel linears that read it (column_linears: q, k, v; gate and up)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, init_std: float, tp: TensorParallel,
                 gather_output: bool = False, shared_input: bool = False):
        super().__init__(in_features, _divide(out_features, tp, "output features"), bias, init_std)
        self.tp, self.gather_output, self.shared_input = tp, gather_output, shared_input
        _shard_param(self.weight, 0, tp)
        if self.bias is not None:
            _shard_param(self.bias, 0, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.shared_input:
            x = enter_columns(x, self.tp)
        y = gemm(self, x, self.weight, self.bias)
        return gather_last(y, self.tp.group) if self.gather_output else y


def enter_columns(x: torch.Tensor, tp: TensorParallel | None) -> torch.Tensor:
    """The input of column-parallel linears: the whole sequence all-gathered (sp), or x itself
    copied into the region (its gradient all-reduced in backward: f). Once for all the linears
    that read x: autograd sums their input gradients before the one backward collective."""
    if tp is None:
        return x
    return gather_seq(x, tp.group) if tp.sequence_parallel else copy_to_region(x, tp.group)


class RowParallelLinear(Linear):
    """y = sum_r x_r W_r^T + b; W_r = columns [r*in/tp, (r+1)*in/tp); x_r already split."""

    def __init__(self, in_features: int, out_features: int, bias: bool, init_std: float, tp: TensorParallel):
        super().__init__(_divide(in_features, tp, "input features"), out_features, bias, init_std)
        self.tp = tp
        _shard_param(self.weight, 1, tp)
        if self.bias is not None and tp.sequence_parallel:
            declare(self.bias, sequence_parallel=True)  # added on a sequence shard: its gradient is partial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.tp.group
        y = gemm(self, x, self.weight)
        y = reduce_scatter_seq(y, g) if self.tp.sequence_parallel else reduce_from_region(y, g)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(Embedding):
    """Rows [r*V/tp, (r+1)*V/tp) of the (padded) table on rank r; out-of-range ids contribute zeros."""

    def __init__(self, num_embeddings: int, dim: int, init_std: float, tp: TensorParallel):
        rows, size = _vocab_rows(num_embeddings, tp)
        super().__init__(rows, dim, init_std)
        self.tp = tp
        self.vocab_start = tp.rank * self.num_embeddings
        _shard_param(self.weight, 0, tp, size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        g = self.tp.group
        return reduce_scatter_seq(out, g) if self.tp.sequence_parallel else reduce_from_region(out, g)


class VocabParallelHead(ColumnParallelLinear):
    """The output head: logits [..., V/tp] of this rank's rows of the (padded) vocabulary.

    Padding rows get logit -inf: exp(-inf) = 0 exactly, so every softmax over the vocabulary
    (the loss, the probe, sampling) is the unpadded model's, and the gradient of a padding
    logit, softmax - onehot, is 0: the padding rows of the weight (tied or not) never move."""

    def __init__(self, in_features: int, vocab_size: int, init_std: float, tp: TensorParallel):
        rows, size = _vocab_rows(vocab_size, tp)
        super().__init__(in_features, rows * tp.size, False, init_std, tp)
        _shard_param(self.weight, 0, tp, size)
        start, stop = spec(self.weight).shard.span(rows)
        self.real_rows = stop - start  # the rest of this shard, if any, is padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.real_rows == self.out_features:
            return y
        padding = torch.arange(self.out_features, device=y.device) >= self.real_rows
        return y.masked_fill(padding, float("-inf"))


def shifted_softmax_sums(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, group, ignore_index: int,
                         more=None):
    """The half of a softmax over a vocabulary split across `group` that every user of it shares
    (the cross-entropy below, the monitor's probe): logits [tokens, V/tp] (fp32) shifted by the
    global max (one all-reduce MAX), so exp never overflows; then one all-reduce SUM of
    [the target's shifted logit (the one rank whose shard holds it; 0 on the others), the sum of
    exp, *more(z, exp)]. Returns (z, exp, the sums, mine, idx): mine marks the tokens whose target
    is in this shard, at column idx. group None: the whole vocabulary on one rank.
    (Megatron's VocabParallelCrossEntropy; DTensor's loss_parallel is the library version.)"""
    zmax = logits.max(dim=-1).values
    all_reduce(zmax, group, dist.ReduceOp.MAX)
    z = logits - zmax.unsqueeze(-1)
    local = targets - vocab_start
    mine = (local >= 0) & (local < z.shape[-1]) & (targets != ignore_index)
    idx = local.clamp(0, z.shape[-1] - 1).unsqueeze(-1)
    z_target = torch.where(mine, z.gather(-1, idx).squeeze(-1), torch.zeros_like(zmax))
    exp = z.exp()
    sums = torch.stack([z_target, exp.sum(dim=-1), *(more(z, exp) if more else ())])  # one all-reduce for all
    all_reduce(sums, group)
    return z, exp, sums, mine, idx


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token -log softmax(z)[target] with z split over the tp group along the vocabulary
    (padding columns arrive as -inf from VocabParallelHead: they add exp(-inf) = 0 to the sum)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, group, ignore_index: int):
        _, exp, (z_target, sum_exp), mine, idx = shifted_softmax_sums(logits.float(), targets, vocab_start, group,
                                                                      ignore_index)
        loss = sum_exp.log() - z_target
        valid = targets != ignore_index
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        softmax = exp / sum_exp.unsqueeze(-1)
        ctx.save_for_backward(softmax, mine, idx, valid)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, mine, idx, valid = ctx.saved_tensors
        # d loss / d z = softmax - onehot(target), the one-hot only on the rank owning the target.
        grad = softmax
        grad.scatter_add_(-1, idx, -mine.to(grad.dtype).unsqueeze(-1))
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, tp: TensorParallel,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Per-token loss [*targets.shape] from vocabulary-sharded logits [..., V/tp] (0 where ignored)."""
    vocab_start = tp.rank * logits.shape[-1]
    return _VocabParallelCrossEntropy.apply(logits, targets, vocab_start, tp.group, ignore_index)


# ---------------------------------------------------------------------------
# Factories: blocks ask for a "column" or "row" projection; with no tensor
# parallelism (tp is None) they get the plain primitive, so the single-process
# model runs no collective code at all.
# ---------------------------------------------------------------------------

def column_linear(in_features: int, out_features: int, bias: bool, init_std: float,
                  tp: TensorParallel | None) -> Linear:
    if tp is None:
        return Linear(in_features, out_features, bias, init_std)
    return ColumnParallelLinear(in_features, out_features, bias, init_std, tp)


def column_linears(in_features: int, widths: list[int], bias: bool, init_std: float,
                   tp: TensorParallel | None) -> list[Linear]:
    """Column-parallel linears that read one input (attention's q, k, v; SwiGLU's gate and up).
    The caller enters the tp region once for all of them (enter_columns): one all-gather forward
    and one reduce-scatter backward with sp (one backward all-reduce without), where a linear each
    would run one each. That is what Megatron's fused QKV and gate/up projections save in
    communication; each weight stays its own parameter, so checkpoints and the Hugging Face
    names (q_proj, k_proj, v_proj; gate_proj, up_proj) are unchanged. (The GEMMs stay separate:
    one [3d, d] GEMM measured no faster than three on CPU at these sizes.)"""
    if tp is None:
        return [Linear(in_features, w, bias, init_std) for w in widths]
    return [ColumnParallelLinear(in_features, w, bias, init_std, tp, shared_input=True) for w in widths]


def row_linear(in_features: int, out_features: int, bias: bool, init_std: float,
               tp: TensorParallel | None) -> Linear:
    linear = Linear(in_features, out_features, bias, init_std) if tp is None else \
        RowParallelLinear(in_features, out_features, bias, init_std, tp)
    return mark(linear, row_parallel=True)


def vocab_embedding(num_embeddings: int, dim: int, init_std: float, tp: TensorParallel | None) -> Embedding:
    if tp is None:
        return Embedding(num_embeddings, dim, init_std)
    return VocabParallelEmbedding(num_embeddings, dim, init_std, tp)


def vocab_head(dim: int, vocab_size: int, init_std: float, tp: TensorParallel | None) -> Linear:
    if tp is None:
        return Linear(dim, vocab_size, False, init_std)
    return VocabParallelHead(dim, vocab_size, init_std, tp)
