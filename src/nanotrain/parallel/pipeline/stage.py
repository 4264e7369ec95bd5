"""Pipeline stages: which layers each pipeline rank holds, and the cut that leaves it only those.

The model's n_layers are cut into pp * v contiguous *chunks* (v = virtual stages per
rank: 1, the interleaved schedule's pp_virtual_stages, or DualPipeV's 2). Chunk c lives
on pipeline rank c % pp, so with v = 2 and pp = 2, 8 layers go:

    chunk:   0        1        2        3
    layers:  0 1      2 3      4 5      6 7
    rank:    0        1        0        1        (rank 0 holds layers 0,1 and 4,5)

DualPipeV places them in a V instead: rank r holds chunks r and 2 pp - 1 - r, so the
micro-batches go down the ranks and back up, and rank 0 also holds the last chunk:

    chunk:   0        1        2        3
    rank:    0        1        1        0        (rank 0 holds layers 0,1 and 6,7)

The embedding lives with chunk 0 (rank 0), the final norm, head and loss with the last
chunk (rank pp - 1, or rank 0 in the V). A micro-batch's hidden states travel chunk 0 -> 1 -> ... and its
gradients back; see schedules in gpipe.py, one_f_one_b.py and interleaved.py.

The stage is the model itself, cut down: `pipeline_stage` gives the model a `Stage` (which
chunks this rank runs) and the model deletes what it does not run (`keep_stage`), keeping
every parameter under its single-process name ("layers.3.attn.wq.weight", "head.weight"):
  - init_parameters gives the single-process weights (each drawn from (seed, its name));
  - its state_dict() is a subset of the full model's (checkpoints merge by name);
  - gradients compare by name with a single-process run;
  - whatever the model computes from its layers (DeepSeek's MoE bias updates and load
    metrics, the MFU count) covers this rank's layers only, with no extra code.
(torchtitan cuts its models the same way, setting the pieces a stage lacks to None;
Megatron builds only the stage's layers. Building the full model first costs the whole
model's memory once per rank: fine at this scale, or use the meta device.)

Tied embeddings (the head reuses the token embedding's matrix) put one matrix on two
ranks: the first and the last. Each keeps a copy, named tok_emb.weight on both; the
copies start equal (same init from (seed, name)) and stay equal because their
gradients are summed over the *embedding group* (the first and last rank of each
pipeline) before every optimizer step, as Megatron does.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from torch import nn

from ...params import declare
from .actions import loop_placement

# -- partitioning ---------------------------------------------------------------------

def partition_layers(n_layers: int, n_stages: int, costs: list[float] | None = None) -> list[list[int]]:
    """Split layers 0..n_layers-1 into n_stages contiguous, non-empty ranges whose
    largest total cost is as small as possible (the slowest stage sets the pace).

    Dynamic programming over the split points (n is small, O(n^2 * stages)), twice:
    first the smallest bottleneck, then the most even split within it. Ties are
    broken towards giving *later* stages fewer layers: the last stage also runs the
    head and the loss, which the per-layer costs do not count.
    """
    return [list(r) for r in _partition(n_layers, n_stages, None if costs is None else tuple(costs))]


@lru_cache(maxsize=1024)
def _partition(n_layers: int, n_stages: int, costs: tuple[float, ...] | None) -> tuple[tuple[int, ...], ...]:
    """partition_layers, kept: the dynamic programme is O(n^2 stages), and `nanotrain plan` asks for the
    same split once per layout it weighs (DeepSeek-V3: 61 layers)."""
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
    return tuple(tuple(r) for r in ranges[::-1])


# -- the stage ------------------------------------------------------------------------

def layer_costs(model: nn.Module, by: str) -> list[float] | None:
    """Cost of each layer (model.layers) for partitioning: None (count layers) or its parameter count."""
    if by == "layers":
        return None
    return [float(sum(p.numel() for p in layer.parameters())) for layer in model.layers.values()]


def chunk_layers(n_layers: int, pp: int, v: int = 1, costs: list[float] | None = None,
                 placement: list[list[int]] | None = None) -> list[list[list[int]]]:
    """Layer ids of each rank's chunks: result[rank][k] = layers of global chunk placement[rank][k]
    (by default k * pp + rank; actions.loop_placement)."""
    chunks = partition_layers(n_layers, pp * v, costs)
    placement = placement or loop_placement(pp, v)
    return [[chunks[c] for c in ids] for ids in placement]


@dataclass(frozen=True)
class Stage:
    """Which part of the model pipeline rank `rank` of `n_ranks` runs: `chunks[k]` are the layer
    ids of its k-th chunk, global chunk `ids[k]` of the model's n_ranks * v (by default
    k * n_ranks + rank). The rank with chunk 0 also embeds; the one with the last chunk also runs
    the final norm, head and loss."""

    rank: int
    n_ranks: int
    chunks: tuple[tuple[int, ...], ...]
    ids: tuple[int, ...] = ()  # () : k * n_ranks + rank

    def __post_init__(self):
        if not self.ids:
            object.__setattr__(self, "ids", tuple(k * self.n_ranks + self.rank for k in range(len(self.chunks))))

    @property
    def v(self) -> int:
        """Chunks (virtual stages) on this rank."""
        return len(self.chunks)

    @property
    def n_chunks(self) -> int:
        return self.n_ranks * self.v

    @property
    def has_first(self) -> bool:
        return 0 in self.ids

    @property
    def has_last(self) -> bool:
        return self.n_chunks - 1 in self.ids

    def is_first_chunk(self, k: int) -> bool:
        return self.ids[k] == 0

    def is_last_chunk(self, k: int) -> bool:
        return self.ids[k] == self.n_chunks - 1


def pipeline_stage(model: nn.Module, rank: int, n_ranks: int, chunks: list[list[int]],
                   ids: list[int] | None = None) -> nn.Module:
    """Cut `model` (built whole and initialised) down to what pipeline rank `rank` runs, in place,
    and return it. ids: the global index of each chunk (None: k * n_ranks + rank). The model
    implements `keep_stage(stage)` (models/transformer.py): it knows which of its modules the
    first and last stage need."""
    if not 0 <= rank < n_ranks:
        raise ValueError(f"pipeline rank {rank} is outside 0..{n_ranks - 1}")
    missing = [i for c in chunks for i in c if str(i) not in model.layers]
    if missing:
        raise ValueError(f"layers {missing} are not in the model (it has {len(model.layers)})")
    stage = Stage(rank, n_ranks, tuple(tuple(c) for c in chunks), tuple(ids or ()))
    model.keep_stage(stage)
    # The tied matrix on two ranks (not on DualPipeV's rank 0, which holds both ends: one tensor).
    if model.cfg.tie_embeddings and n_ranks > 1 and (stage.has_first != stage.has_last):
        # The tied matrix: its gradient is summed over the embedding group, and only
        # the first rank's copy counts in the gradient norm (it is one parameter).
        declare(model.tok_emb.weight, pipeline_shared=True, pipeline_duplicate=not stage.has_first)
    return model
