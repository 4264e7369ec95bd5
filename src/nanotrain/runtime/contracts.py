"""The contracts between the RuntimeEngine and the pieces it orchestrates.

The engine owns the step loop and nothing else; each piece below is swappable
(a new model family, a data source, a sharded optimizer, a checkpoint format)
without editing the loop. Entry points (`nanotrain train`, examples/) only
choose components and call `RuntimeEngine(cfg, components).run()`, which
returns a RunResult (the losses, the final step, the exit code).

    bootstrap.setup(cfg)                -> RuntimeContext   (device, ranks, precision, out_dir)
    data.build(ctx)                     -> TrainData        (tokenizer, batches by step, val batches)
    model.build(ctx)                    -> nn.Module        (initialised, on ctx.device; a pipeline
                                                             stage under parallel.pp > 1)
    optimizer.build(ctx, model)         -> OptimizerState   (step(lr) with clipping; pieces() for
                                                             checkpoints; post-step hooks)
    schedule.build(ctx)                 -> LRSchedule       (lr(step))
    checkpoint.build(ctx)               -> CheckpointManager (the checkpoint folder; what goes into it
                                                             is runtime/checkpointer.py's)
    forward_backward.build(ctx, model)  -> ForwardBackward  (a step's forwards and backwards, and
                                                             evaluation, with their global loss:
                                                             runtime/step.py)

model.build reads model.vocab_size from ctx.cfg, which the engine fills from the data
(components.resolve_model_config) before calling it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Protocol

import torch
from torch import nn

from ..checkpoint import CheckpointManager, CheckpointReader, Piece
from ..config import Config
from ..parallel.state import ParallelState
from .machine import Machine

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets)


@dataclass
class RuntimeContext:
    """What every component may know about where and how the run executes."""

    cfg: Config  # resolved: model.vocab_size and model.max_seq_len filled in once data is known
    device: torch.device
    out_dir: Path
    autocast_dtype: torch.dtype | None = None  # None: compute in fp32
    rank: int = 0
    world_size: int = 1
    parallel: ParallelState = field(default_factory=ParallelState)
    machine: Machine | None = None  # the device, cores, threads and matmul rates (runtime/machine.py)
    startup_lines: list[str] = field(default_factory=list)  # what the bootstrap decided, for rank 0's log
    # data.document_mask: the token that ends each document, set by the data provider for the
    # model's attention (models/documents.py); None: attention spans the whole window
    document_eos: int | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


@dataclass
class RunResult:
    """What RuntimeEngine.run() returns on each rank."""

    out_dir: Path
    losses: dict[int, float] = field(default_factory=dict)  # step (1-based count of updates) -> train loss
    val_losses: dict[int, float] = field(default_factory=dict)
    grad_norms: dict[int, float] = field(default_factory=dict)  # global norm before clipping
    final_step: int = 0
    tokens_per_s: float = 0.0  # mean over the run's training time (evals and saves excluded)
    train_time_s: float = 0.0
    compile_s: float = 0.0  # train.compile: the start-up compile of the blocks (not in train_time_s)
    rank: int = 0  # global rank of the process that returns this result
    signal: int = 0  # preempted: the signal that stopped the run after its checkpoint (0: it ran to the end)

    @property
    def exit_code(self) -> int:
        """What the process should exit with: 0, or 128 + the signal (143 for SIGTERM, 130 for Ctrl-C)."""
        return 128 + self.signal if self.signal else 0

    @property
    def last_val_loss(self) -> float | None:
        """The latest evaluation of this run (None before the first): what a checkpoint keeps."""
        return self.val_losses[max(self.val_losses)] if self.val_losses else None

    def rewind(self, step: int) -> None:
        """A roll-back to `step`: the figures of the steps after it no longer happened."""
        for d in (self.losses, self.grad_norms, self.val_losses):
            for s in [s for s in d if s > step]:
                del d[s]
        self.final_step = step


class TrainData(Protocol):
    tokenizer: Any
    vocab_size: int
    tokens_per_step: int  # tokens in one global batch

    def micro_batches(self, step: int) -> list[Batch]:
        """This process's micro-batches (inputs, targets) of the global batch at `step`."""

    def val_batches(self) -> Iterator[Batch]:
        """The fixed validation batches (the same ones at every evaluation)."""

    # Optional: probe_batch(n) -> (inputs, targets), n fixed val sequences, the same on every
    # rank and layout (monitoring/probe.py; without it the probe is off, with a message).


class OptimizerState(Protocol):
    stage: int  # the ZeRO stage (0: every rank holds whole gradients and weights)
    mastered: set[str]  # the parameters whose master copy the optimizer keeps (it saves those, not the model)
    opt: torch.optim.Optimizer  # the update rule; the monitor reads the moments in its .state

    def backward_context(self, last: bool) -> contextlib.AbstractContextManager:
        """Wraps each micro-batch's backward; `last` marks the one after which gradients sync."""

    def sync_grads(self) -> None:
        """Finish the gradient reductions (data parallel, sequence parallel) started in backward."""

    def step(self, lr: float, loss_scale: float | None = None, skip_nonfinite: bool = False) -> dict[str, float]:
        """Unscale (fp16: the gradients hold loss_scale times the true ones) and clip, set the
        learning rate, update, zero the gradients; return metrics: grad_norm (the true global
        norm before clipping) and skipped (skip_nonfinite and the norm was not finite: nothing
        was updated). After a step that updated (not a skipped one) it calls each post-step
        hook, in registration order."""

    def register_step_post_hook(self, hook: Callable[[Any], None]) -> None:
        """hook(optimizer) after every step that was not skipped (torch.optim.Optimizer's name):
        model state that follows the update, such as the MoE routers' expert biases
        (components.register_moe_load_balancing_hook)."""

    def grad_parts(self) -> list[tuple[str, torch.Tensor]]:
        """(parameter name, this rank's part of its synced gradient), for the monitor: whole
        gradients, or ZeRO slices that summed over dp make the whole."""

    def weight_parts(self) -> list[tuple[str, torch.Tensor]] | None:
        """ZeRO-3: (parameter name, this rank's slice of its weights); None where the model
        holds whole weights."""

    def pieces(self) -> list[Piece]:
        """The optimizer state this rank holds, as boxes of logical tensors (checkpoint/pieces.py)."""

    def load_pieces(self, reader: CheckpointReader) -> None:
        """Restore this rank's part of the optimizer state from a checkpoint of any layout."""


class StepLoss(NamedTuple):
    """What ForwardBackward.train returns, on the device (read with one host sync per report)."""

    loss: torch.Tensor  # the step's global mean loss, the same on every rank
    targets: torch.Tensor  # target tokens of the global batch: the loss's denominator (before a loss scale)


class ForwardBackward(Protocol):
    model: nn.Module  # what this rank runs: the model, or its pipeline stage

    def train(self, batches: list[Batch], opt: OptimizerState, step: int,
              loss_scale: float | None = None) -> StepLoss:
        """Forward and backward every micro-batch (gradients accumulate in the parameters), each
        backward inside opt.backward_context(last=...); each micro-batch's loss is its summed token
        loss / the global batch's target count (fp16: times loss_scale). step: the update's
        number (1-based)."""

    def evaluate(self, batches: Iterable[Batch]) -> torch.Tensor:
        """Forward only, in eval mode, without gradients: [loss sum, target count] (float64) of the
        whole job's val batches, the same on every rank."""


class Bootstrap(Protocol):
    def setup(self, cfg: Config) -> RuntimeContext: ...

    def teardown(self, ctx: RuntimeContext) -> None: ...


class DataProvider(Protocol):
    def build(self, ctx: RuntimeContext) -> TrainData: ...


class ModelProvider(Protocol):
    def build(self, ctx: RuntimeContext) -> nn.Module:
        """model(x, y, loss_denominator) -> loss (a pipeline stage, under parallel.pp > 1, runs
        chunk by chunk: runtime/step.py's PipelineStep), and step_metrics() -> the figures of the
        last step to log (TransformerModel: none; DeepSeekModel: the MoE load per layer)."""


class OptimizerRuntime(Protocol):
    def build(self, ctx: RuntimeContext, model: nn.Module) -> OptimizerState: ...


class LRSchedule(Protocol):
    def lr(self, step: int) -> float: ...


class ScheduleProvider(Protocol):
    def build(self, ctx: RuntimeContext) -> LRSchedule: ...


class CheckpointProvider(Protocol):
    def build(self, ctx: RuntimeContext) -> CheckpointManager: ...


class StepProvider(Protocol):
    def build(self, ctx: RuntimeContext, model: nn.Module) -> ForwardBackward: ...


@dataclass
class RuntimeComponents:
    """One implementation of each contract. `default_components()` gives the standard set."""

    bootstrap: Bootstrap
    data: DataProvider
    model: ModelProvider
    optimizer: OptimizerRuntime
    schedule: ScheduleProvider
    checkpoint: CheckpointProvider
    forward_backward: StepProvider  # plain model or pipeline (runtime/step.py)
