"""Pipeline stages: which layers each pipeline rank holds, and the module that runs them.

The model's n_layers are cut into pp * v contiguous *chunks* (v = virtual stages per
rank, 1 unless the schedule is interleaved). Chunk c lives on pipeline rank c % pp,
so with v = 2 and pp = 2, 8 layers go:

    chunk:   0        1        2        3
    layers:  0 1      2 3      4 5      6 7
    rank:    0        1        0        1        (rank 0 holds layers 0,1 and 4,5)

The embedding lives with chunk 0 (rank 0), the final norm, head and loss with the last
chunk (rank pp - 1). A micro-batch's hidden states travel chunk 0 -> 1 -> ... and its
gradients back; see schedules in gpipe.py, one_f_one_b.py and interleaved.py.

Tied embeddings (the head reuses the token embedding's matrix) put one matrix on two
ranks: the first and the last. Each keeps a copy, named tok_emb.weight on both; the
copies start equal (same init from (seed, name)) and stay equal because their
gradients are summed over the *embedding group* (the first and last rank of each
pipeline) before every optimizer step, as Megatron does.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from ...layers import init_parameters
from ...models.transformer import TransformerModel

# -- partitioning ---------------------------------------------------------------------

def partition_layers(n_layers: int, n_stages: int, costs: list[float] | None = None) -> list[list[int]]:
    """Split layers 0..n_layers-1 into n_stages contiguous, non-empty ranges whose
    largest total cost is as small as possible (the slowest stage sets the pace).

    Dynamic programming over the split points (n is small, O(n^2 * stages)), twice:
    first the smallest bottleneck, then the most even split within it. Ties are
    broken towards giving *later* stages fewer layers: the last stage also runs the
    head and the loss, which the per-layer costs do not count.
    """
    if n_stages < 1:
        raise ValueError(f"n_stages must be >= 1, got {n_stages}")
    if n_layers < n_stages:
        raise ValueError(f"cannot split {n_layers} layers into {n_stages} pipeline stages: every stage "
                         f"needs at least one layer (use parallel.pp <= model.n_layers)")
    costs = [1.0] * n_layers if costs is None else [float(c) for c in costs]
    if len(costs) != n_layers:
        raise ValueError(f"got {len(costs)} costs for {n_layers} layers")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")

    def split(stage_cost, combine):
        # best[k][i]: best value splitting the first i layers into k stages;
        # cut[k][i]: where the k-th stage starts in that best split.
        best = [[inf] * (n_layers + 1) for _ in range(n_stages + 1)]
        cut = [[0] * (n_layers + 1) for _ in range(n_stages + 1)]
        best[0][0] = 0.0
        for k in range(1, n_stages + 1):
            for i in range(k, n_layers + 1):
                for j in range(k - 1, i):  # stage k holds layers j..i-1
                    v = combine(best[k - 1][j], stage_cost(prefix[i] - prefix[j]))
                    if v <= best[k][i]:  # "<=": the latest start wins ties (fewer layers later)
                        best[k][i], cut[k][i] = v, j
        return best[n_stages][n_layers], cut

    # Pass 1: the smallest possible bottleneck (cost of the slowest stage).
    bottleneck, cut = split(lambda c: c, max)
    # Pass 2: among splits within that bottleneck, the most even one (least sum of
    # squares): minimax alone would accept [3, 3, 3, 1] for 10 layers on 4 stages.
    limit = bottleneck * (1 + 1e-9) + 1e-12
    _, cut = split(lambda c: c * c if c <= limit else inf, lambda a, b: a + b)
    ranges, i = [], n_layers
    for k in range(n_stages, 0, -1):
        j = cut[k][i]
        ranges.append(list(range(j, i)))
        i = j
    return ranges[::-1]


# -- the stage ------------------------------------------------------------------------

def layer_costs(model: TransformerModel, by: str) -> list[float] | None:
    """Cost of each layer for partitioning: None (count layers) or its parameter count."""
    if by == "layers":
        return None
    return [float(sum(p.numel() for p in layer.parameters())) for layer in model.layers.values()]


def chunk_layers(n_layers: int, pp: int, v: int = 1, costs: list[float] | None = None) -> list[list[list[int]]]:
    """Layer ids of each rank's chunks: result[rank][k] = layers of global chunk k * pp + rank."""
    chunks = partition_layers(n_layers, pp * v, costs)
    return [[chunks[k * pp + rank] for k in range(v)] for rank in range(pp)]


class PipelineStage(nn.Module):
    """What one pipeline rank runs: its chunks' layers (+ embeddings if it holds chunk 0,
    + norm/head/loss if it holds the last chunk).

    Build the *full* model, initialise it, then wrap it: the stage deletes what it does
    not run and takes over the rest *under the same attribute names*. Layers live in a
    ModuleDict keyed by the global layer index, so a stage's parameter names are exactly
    the single-process ones ("layers.3.attn.wq.weight", "head.weight"):
      - init_parameters(stage, seed) gives the single-process weights (each weight is
        drawn from (seed, its name));
      - stage.state_dict() is a subset of the full model's (checkpoints merge by name);
      - gradients compare by name with a single-process run.
    (Megatron builds only the stage's layers; building the full model first costs the
    whole model's memory once per rank, fine at this scale, or use the meta device.)
    """

    def __init__(self, model: TransformerModel, rank: int, n_ranks: int, chunks: list[list[int]]):
        super().__init__()
        if not 0 <= rank < n_ranks:
            raise ValueError(f"pipeline rank {rank} is outside 0..{n_ranks - 1}")
        missing = [i for c in chunks for i in c if str(i) not in model.layers]
        if missing:
            raise ValueError(f"layers {missing} are not in the model (it has {len(model.layers)})")
        self.rank, self.n_ranks, self.v = rank, n_ranks, len(chunks)
        self.chunks = [list(c) for c in chunks]
        self.has_first, self.has_last = rank == 0, rank == n_ranks - 1
        self.cfg, self.tp, self.sequence_parallel = model.cfg, model.tp, model.sequence_parallel
        tied = model.cfg.tie_embeddings
        # Drop what this rank does not run from the model itself too, so that nothing
        # (the caller's reference included) keeps those weights alive.
        keep = {str(i) for c in chunks for i in c}
        for name in [n for n in model.layers if n not in keep]:
            del model.layers[name]
        if not self.has_first:
            model.pos_emb = None
            if not (tied and self.has_last):  # the last rank keeps its copy of a tied matrix
                model.tok_emb = None
        if not self.has_last:
            model.norm = model.head = None
        # Same names as in TransformerModel (see the class docstring for why).
        self.tok_emb, self.pos_emb = model.tok_emb, model.pos_emb
        self.dropout = model.dropout
        self.layers = model.layers
        self.norm, self.head = model.norm, model.head
        self.mtp = None  # multi-token prediction is refused with pp > 1 (config.validate)
        if model.rope_cos is not None:  # every stage with layers needs the RoPE tables
            self.register_buffer("rope_cos", model.rope_cos, persistent=False)
            self.register_buffer("rope_sin", model.rope_sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None
        if tied and n_ranks > 1 and (self.has_first or self.has_last):
            # The tied matrix: its gradient is summed over the embedding group, and only
            # the first rank's copy counts in the gradient norm (it is one parameter).
            self.tok_emb.weight.pipeline_shared = True
            if not self.has_first:
                self.tok_emb.weight.pipeline_duplicate = True
        # Model-specific methods that only read the held submodules (DeepSeekModel's MoE
        # bookkeeping: bias updates after the step, load metrics, the MFU count) run on the
        # stage as they would on the model, over this rank's layers only.
        self._last_counts: dict = {}
        for name in ("moe_layers", "update_expert_bias", "step_metrics", "num_matmul_params"):
            fn = getattr(type(model), name, None)
            if fn is not None:
                setattr(self, name, types.MethodType(fn, self))
        self.max_in_flight = 0  # set by the schedule runner: peak micro-batches of stored activations

    def global_chunk(self, k: int) -> int:
        return k * self.n_ranks + self.rank

    def is_first_chunk(self, k: int) -> bool:
        return self.has_first and k == 0

    def is_last_chunk(self, k: int) -> bool:
        return self.has_last and k == self.v - 1

    def init_weights(self, seed: int) -> None:
        init_parameters(self, seed)

    def forward(self, x: torch.Tensor, chunk: int = 0, targets: torch.Tensor | None = None,
                loss_denominator: float | torch.Tensor | None = None) -> torch.Tensor:
        """Run local chunk `chunk`. Its input is input_ids [B, T] for chunk 0, else hidden
        states [B, T(/tp under sequence parallelism), d]. The last chunk returns the loss
        given targets (else logits); the others return hidden states."""
        # The stage holds TransformerModel's submodules under the same names, so it runs
        # TransformerModel's own embed / output code on itself.
        if self.is_first_chunk(chunk):
            x = TransformerModel.embed(self, x)
        rope = TransformerModel.rope_tables(self)
        for i in self.chunks[chunk]:
            x = self.layers[str(i)](x, rope)
        if not self.is_last_chunk(chunk):
            return x
        return TransformerModel.output(self, x, targets, loss_denominator)
