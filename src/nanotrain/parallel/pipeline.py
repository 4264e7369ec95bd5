"""Pipeline parallelism: split the layers into stages, stream micro-batches through them.

Each pp rank holds a contiguous range of layers (a *stage*). The first stage also
holds the embeddings, the last the final norm, the head and the loss. A micro-batch
flows forward stage 0 -> 1 -> ... -> pp-1 (hidden states [micro_batch, seq, d_model]
sent point-to-point), then its gradient flows back pp-1 -> ... -> 0.

One batch through pp stages would keep all but one stage idle at any time; cutting
the batch into m micro-batches lets the stages work on different micro-batches at
once. What is left idle is the "bubble": (pp - 1) / (m + pp - 1) of the time for
both schedules below. They differ in *memory*: how many micro-batches of
activations a stage must keep alive between a micro-batch's forward and backward.

Timeline for pp = 4, m = 8 (Fi / Bi = forward / backward of micro-batch i, one
slot each; real backwards take ~2x a forward, which does not change the picture):

GPipe: all forwards, then all backwards. Stage 0 holds 8 micro-batches of activations.

  stage 0 |F1 F2 F3 F4 F5 F6 F7 F8 .  .  .  .  .  .  B8 B7 B6 B5 B4 B3 B2 B1|
  stage 1 |.  F1 F2 F3 F4 F5 F6 F7 F8 .  .  .  .  B8 B7 B6 B5 B4 B3 B2 B1 . |
  stage 2 |.  .  F1 F2 F3 F4 F5 F6 F7 F8 .  .  B8 B7 B6 B5 B4 B3 B2 B1 .  . |
  stage 3 |.  .  .  F1 F2 F3 F4 F5 F6 F7 F8 B8 B7 B6 B5 B4 B3 B2 B1 .  .  . |

1F1B (PipeDream-Flush, Narayanan et al. 2021): stage s runs pp - s - 1 warm-up
forwards, then alternates one forward / one backward, then drains the remaining
backwards. A micro-batch's activations are freed by its backward as soon as
possible, so stage s holds at most pp - s micro-batches (stage 0: pp = 4, not m = 8).

  stage 0 |F1 F2 F3 F4 .  .  .  B1 F5 B2 F6 B3 F7 B4 F8 B5 .  B6 .  B7 .  B8|
  stage 1 |.  F1 F2 F3 .  .  B1 F4 B2 F5 B3 F6 B4 F7 B5 F8 B6 .  B7 .  B8 . |
  stage 2 |.  .  F1 F2 .  B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 F8 B7 .  B8 .  . |
  stage 3 |.  .  .  F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7 F8 B8 .  .  . |

Both take 22 slots here: the same bubble, (pp - 1) / (m + pp - 1) of each
stage's time as warm-up and drain. 1F1B only bounds the memory.

Gradients of every micro-batch accumulate into the stage's parameters; the caller
steps the optimizer afterwards, exactly as with gradient accumulation. Because
the loss is sum(CE) / loss_denominator with the *global* token count, the sum of
the micro-batch losses is the global mean loss and the accumulated gradients are
the single-process gradients of the same parameters (same names, same values).

Integrating (the engine): build the full model, wrap it in
PipelineStage(model, state.pp_rank, state.pp, partition_layers(n_layers, pp)[state.pp_rank]),
make comm = P2P.from_state(state, (micro_batch, seq_len, d_model), dtype), call a
schedule once per optimizer step with the step's micro-batches, then sync grads
over this stage's dp group and step. Gradient clipping must sum the squared norm
over the pp group too: each stage holds only part of the parameters.

Not here yet: interleaved (virtual) stages, tied embeddings across the first and
last stages (needs an embedding group that all-reduces the two copies' grads),
and freeing the sent output's storage early (Megatron's deallocate_output_tensor).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..layers import init_parameters
from ..models.transformer import TransformerModel

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

class PipelineStage(nn.Module):
    """One stage of a TransformerModel: a subset of its layers (+ embeddings on the
    first stage, + norm/head/loss on the last).

    Build the *full* model (on the CPU, or the meta device for a big one), then wrap
    it: the stage deletes what it does not run and takes over the rest *under the
    same attribute names*. Layers live in a ModuleDict keyed by the global layer
    index, so a stage's parameter names are exactly the single-process ones
    ("layers.3.attn.wq.weight", "head.weight"), and therefore:
      - init_parameters(stage, seed) (= stage.init_weights) gives the single-process
        weights, since every weight is drawn from (seed, its name);
      - stage.state_dict() is a subset of the full model's state_dict (checkpoints
        from different layouts share keys);
      - gradients can be compared by name with a single-process run.
    """

    def __init__(self, model: TransformerModel, stage: int, n_stages: int, layer_ids: list[int]):
        super().__init__()
        if not 0 <= stage < n_stages:
            raise ValueError(f"stage {stage} is outside 0..{n_stages - 1}")
        if model.cfg.tie_embeddings and n_stages > 1:
            raise NotImplementedError("tie_embeddings with pipeline parallelism (pp > 1) is not implemented yet: "
                                      "the first and last stages would each hold a copy of the embedding and "
                                      "need an embedding group to sum their gradients. Set "
                                      "model.tie_embeddings=false to use pp > 1.")
        missing = [i for i in layer_ids if str(i) not in model.layers]
        if missing:
            raise ValueError(f"layers {missing} are not in the model (it has {len(model.layers)})")
        self.stage, self.n_stages = stage, n_stages
        self.layer_ids = list(layer_ids)
        self.is_first, self.is_last = stage == 0, stage == n_stages - 1
        self.cfg, self.tp, self.sequence_parallel = model.cfg, model.tp, model.sequence_parallel
        # Drop what this stage does not run from the model itself too, so that nothing
        # (the caller's reference included) keeps those weights alive.
        keep = {str(i) for i in layer_ids}
        for name in [n for n in model.layers if n not in keep]:
            del model.layers[name]
        if not self.is_first:
            model.tok_emb = model.pos_emb = None
        if not self.is_last:
            model.norm = model.head = None
        # Same names as in TransformerModel (see the class docstring for why).
        self.tok_emb, self.pos_emb = model.tok_emb, model.pos_emb
        self.dropout = model.dropout
        self.layers = model.layers
        self.norm, self.head = model.norm, model.head
        if model.rope_cos is not None:  # every stage with layers needs the RoPE tables
            self.register_buffer("rope_cos", model.rope_cos, persistent=False)
            self.register_buffer("rope_sin", model.rope_sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None
        self.max_in_flight = 0  # set by the schedules: peak micro-batches of stored activations

    def init_weights(self, seed: int) -> None:
        init_parameters(self, seed)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None,
                loss_denominator: float | torch.Tensor | None = None) -> torch.Tensor:
        """First stage: x is input_ids [B, T]; others: hidden states [B, T, d].
        Last stage: the loss if targets are given (else logits); others: hidden states."""
        # A stage holds TransformerModel's submodules under the same names, so it runs
        # TransformerModel's own embed / output code on itself.
        if self.is_first:
            x = TransformerModel.embed(self, x)
        rope = TransformerModel.rope_tables(self)
        for layer in self.layers.values():
            x = layer(x, rope)
        if not self.is_last:
            return x
        return TransformerModel.output(self, x, targets, loss_denominator)


# -- point-to-point -------------------------------------------------------------------

@dataclass
class P2P:
    """Sends and receives between neighbouring stages. Ranks are *global* ranks
    (ParallelState.prev_stage_rank / next_stage_rank); None at the ends of the pipe.

    Receivers must know the shape and dtype before the data arrives (p2p carries no
    metadata): [micro_batch, seq_len, d_model], float32 or the autocast dtype. Every
    exchange goes through batch_isend_irecv, and the combined send+recv calls post
    both operations at once: two neighbours that each send before they receive would
    otherwise wait on each other forever with blocking transports.
    """
    prev_rank: int | None
    next_rank: int | None
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    group: dist.ProcessGroup | None = None

    @classmethod
    def from_state(cls, state, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> P2P:
        """The neighbours of this rank in its pp group (Megatron rank order, ParallelState)."""
        return cls(state.prev_stage_rank, state.next_stage_rank, tuple(shape), dtype, device, state.pp_group)

    def _run(self, sends: list[tuple[torch.Tensor, int]], recv_from: int | None) -> torch.Tensor | None:
        ops = [dist.P2POp(dist.isend, t.contiguous(), peer, self.group) for t, peer in sends]
        buf = None
        if recv_from is not None:
            buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, buf, recv_from, self.group))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        return buf

    def _out(self, t: torch.Tensor | None, peer: int | None) -> list[tuple[torch.Tensor, int]]:
        return [(t.detach().to(self.dtype), peer)] if t is not None and peer is not None else []

    def recv_forward(self) -> torch.Tensor | None:
        return self._run([], self.prev_rank)

    def send_forward(self, y: torch.Tensor | None) -> None:
        self._run(self._out(y, self.next_rank), None)

    def recv_backward(self) -> torch.Tensor | None:
        return self._run([], self.next_rank)

    def send_backward(self, dx: torch.Tensor | None) -> None:
        self._run(self._out(dx, self.prev_rank), None)

    def send_forward_recv_backward(self, y: torch.Tensor | None) -> torch.Tensor | None:
        return self._run(self._out(y, self.next_rank), self.next_rank)

    def send_backward_recv_forward(self, dx: torch.Tensor | None) -> torch.Tensor | None:
        return self._run(self._out(dx, self.prev_rank), self.prev_rank)


# Free functions with the names of the usual API (Megatron's p2p_communication).
def recv_forward(comm: P2P) -> torch.Tensor | None:
    return comm.recv_forward()


def send_forward(y: torch.Tensor | None, comm: P2P) -> None:
    comm.send_forward(y)


def recv_backward(comm: P2P) -> torch.Tensor | None:
    return comm.recv_backward()


def send_backward(dx: torch.Tensor | None, comm: P2P) -> None:
    comm.send_backward(dx)


# -- one micro-batch forward / backward -------------------------------------------------

class _Activations:
    """The (input, output) pairs kept between a micro-batch's forward and backward.
    1F1B pops the oldest (micro-batches finish in order); GPipe pops the newest
    (its backwards run in reverse). max_in_flight is the peak count: the activation
    memory of a schedule in units of one micro-batch."""

    def __init__(self) -> None:
        self.items: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.max_in_flight = 0

    def push(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.items.append((x, y))
        self.max_in_flight = max(self.max_in_flight, len(self.items))

    def pop(self, newest: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return self.items.pop(-1 if newest else 0)


def _forward_step(stage: PipelineStage, x_recv: torch.Tensor | None, micro_batch, loss_denominator,
                  acts: _Activations) -> tuple[torch.Tensor, torch.Tensor | float]:
    """Run one micro-batch forward; keep (input, output) for its backward.
    Returns (output to send: hidden states, or the loss on the last stage; loss value)."""
    ids, targets = micro_batch
    if stage.is_first:
        x = ids  # token ids: nothing to differentiate, nothing to send back
    else:
        # A leaf that requires grad: after backward, x.grad is what the previous stage needs.
        x = x_recv.requires_grad_()
    y = stage(x, targets if stage.is_last else None, loss_denominator if stage.is_last else None)
    acts.push(x, y)
    # Detached tensor, not .item(): reading the value would stall a GPU stream each micro-batch.
    return y, (y.detach() if stage.is_last else 0.0)


def _backward_step(stage: PipelineStage, x: torch.Tensor, y: torch.Tensor,
                   grad_y: torch.Tensor | None) -> torch.Tensor | None:
    """Backpropagate one micro-batch through this stage; return the gradient of its input.
    The last stage's output is the scalar loss, whose gradient is implicitly 1."""
    if grad_y is not None and grad_y.dtype != y.dtype:
        grad_y = grad_y.to(y.dtype)
    torch.autograd.backward(y, grad_tensors=None if stage.is_last else grad_y)
    return None if stage.is_first else x.grad


def _set_stats(stats: dict | None, stage: PipelineStage, acts: _Activations) -> None:
    # Exposed two ways: in the caller's dict, and on the stage (last schedule run).
    stage.max_in_flight = acts.max_in_flight
    if stats is not None:
        stats["max_in_flight"] = acts.max_in_flight


# -- schedules ------------------------------------------------------------------------

def gpipe(stage: PipelineStage, micro_batches: list, loss_denominator, comm: P2P,
          stats: dict | None = None) -> float:
    """All forwards, then all backwards (newest first). Simple; holds m activations."""
    acts, loss_sum = _Activations(), 0.0
    for mb in micro_batches:
        y, loss = _forward_step(stage, comm.recv_forward(), mb, loss_denominator, acts)
        comm.send_forward(None if stage.is_last else y)
        loss_sum += loss
    for _ in micro_batches:
        x, y = acts.pop(newest=True)
        dx = _backward_step(stage, x, y, comm.recv_backward())
        comm.send_backward(dx)
    _set_stats(stats, stage, acts)
    return float(loss_sum)


def one_f_one_b(stage: PipelineStage, micro_batches: list, loss_denominator, comm: P2P,
                stats: dict | None = None) -> float:
    """1F1B (PipeDream-Flush): warm-up, steady one-forward-one-backward, cool-down.

    The steady state pairs each send with the receive that answers it
    (send_forward_recv_backward / send_backward_recv_forward) so that neighbours,
    which run these in mirrored order, never both block on a send.
    """
    m = len(micro_batches)
    n_warmup = min(stage.n_stages - stage.stage - 1, m)
    n_steady = m - n_warmup
    acts, loss_sum = _Activations(), 0.0
    it = iter(micro_batches)

    # Warm-up: fill the pipe. Stage s must run pp-s-1 forwards before the first
    # gradient can come back from the last stage.
    for _ in range(n_warmup):
        y, loss = _forward_step(stage, comm.recv_forward(), next(it), loss_denominator, acts)
        comm.send_forward(y)
        loss_sum += loss

    # Steady state: forward micro-batch i + n_warmup, then backward micro-batch i.
    x_recv = comm.recv_forward() if n_steady > 0 else None
    for i in range(n_steady):
        y, loss = _forward_step(stage, x_recv, next(it), loss_denominator, acts)
        loss_sum += loss
        grad_y = comm.send_forward_recv_backward(None if stage.is_last else y)
        x, y = acts.pop()  # oldest first: FIFO
        dx = _backward_step(stage, x, y, grad_y)
        if i == n_steady - 1:
            comm.send_backward(dx)
            x_recv = None
        else:
            x_recv = comm.send_backward_recv_forward(dx)

    # Cool-down: drain the warm-up micro-batches' backwards.
    for _ in range(n_warmup):
        x, y = acts.pop()
        dx = _backward_step(stage, x, y, comm.recv_backward())
        comm.send_backward(dx)

    _set_stats(stats, stage, acts)
    return float(loss_sum)


SCHEDULES: dict[str, Callable[..., float]] = {"gpipe": gpipe, "1f1b": one_f_one_b}
