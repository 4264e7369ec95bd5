"""The contracts between the RuntimeEngine and the pieces it orchestrates.

The engine owns the step loop and nothing else; each piece below is swappable
(a new model family, a data source, a sharded optimizer, a checkpoint format)
without editing the loop. Entry points (`nanotrain train`, examples/) only
choose components and call `RuntimeEngine(cfg, components).run()`.

    bootstrap.setup(cfg)                -> RuntimeContext   (device, ranks, precision, out_dir)
    data.build(ctx)                     -> TrainData        (tokenizer, batches by step, val batches)
    model.build(ctx)                    -> nn.Module        (initialised, on ctx.device; a pipeline
                                                             stage under parallel.pp > 1)
    optimizer.build(ctx, model)         -> OptimizerState   (step(lr) with clipping; pieces() for
                                                             checkpoints; post-step hooks)
    schedule.build(ctx)                 -> LRSchedule       (lr(step))
    checkpoint.build(ctx)               -> CheckpointManager
    forward_backward.build(ctx, model)  -> ForwardBackward  (a step's forwards and backwards, and
                                                             evaluation: runtime/step.py)

model.build reads model.vocab_size from ctx.cfg, which the engine fills from the data
(resolve_model_config) before calling it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

import torch
from torch import nn

from ..checkpoint import CheckpointManager, CheckpointReader, Piece
from ..config import Config
from ..parallel.state import ParallelState
from .machine import Machine

if TYPE_CHECKING:
    from .step import ForwardBackward


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


class TrainData(Protocol):
    tokenizer: Any
    vocab_size: int
    tokens_per_step: int  # tokens in one global batch

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This process's micro-batches (inputs, targets) of the global batch at `step`."""

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed validation batches (the same ones at every evaluation)."""

    # Optional: probe_batch(n) -> (inputs, targets), n fixed val sequences, the same on every
    # rank and layout (monitoring/probe.py; without it the probe is off, with a message).


class OptimizerState(Protocol):
    def backward_context(self, last: bool) -> contextlib.AbstractContextManager:
        """Wraps each micro-batch's backward; `last` marks the one after which gradients sync."""

    def sync_grads(self) -> None:
        """Finish the gradient reductions (data parallel, sequence parallel) started in backward."""

    def step(self, lr: float, loss_scale: float | None = None, skip_nonfinite: bool = False) -> dict[str, float]:
        """Unscale (fp16: the gradients hold loss_scale times the true ones) and clip, set the
        learning rate, update, zero the gradients; return metrics: grad_norm (the true global
        norm before clipping) and skipped (skip_nonfinite and the norm was not finite: nothing
        was updated). The monitor also reads `grad_parts()` where the gradients are not whole
        in each parameter's .grad (ZeRO slices), and the moments in `.opt.state`. After a step
        that updated (not a skipped one) it calls each post-step hook, in registration order."""

    def register_step_post_hook(self, hook: Callable[[Any], None]) -> None:
        """hook(optimizer) after every step that was not skipped (torch.optim.Optimizer's name):
        model state that follows the update, such as the MoE routers' expert biases
        (components.register_moe_load_balancing_hook)."""

    def pieces(self) -> list[Piece]:
        """The optimizer state this rank holds, as boxes of logical tensors (checkpoint/pieces.py)."""

    def load_pieces(self, reader: CheckpointReader) -> None:
        """Restore this rank's part of the optimizer state from a checkpoint of any layout."""


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


def _default_step() -> StepProvider:
    from .step import ForwardBackwardProvider  # step.py imports this module

    return ForwardBackwardProvider()


@dataclass
class RuntimeComponents:
    """One implementation of each contract. `default_components()` gives the standard set."""

    bootstrap: Bootstrap
    data: DataProvider
    model: ModelProvider
    optimizer: OptimizerRuntime
    schedule: ScheduleProvider
    checkpoint: CheckpointProvider
    forward_backward: StepProvider = field(default_factory=_default_step)  # plain model or pipeline
