"""The forward and backward of one step, as a component: one for a plain model, one for a pipeline.

    train(batches, denom, opt, step) -> summed loss     every micro-batch's forward and backward
    evaluate(batches)                -> [loss sum, target count] of this rank (float64)

The engine calls these without knowing which it has (torchtitan's forward_backward_step and
pp_forward_backward_step are the same split). The loss each returns is this rank's part:
under pipeline parallelism only the last stage has one (the others return 0), and the engine's
all-reduces over the dp and pp groups make it the global figure.
"""

from __future__ import annotations

import json
from typing import Iterable, Protocol

import torch
from torch import nn

from ..checkpoint import merge_over_pipeline
from ..parallel.pipeline.runner import PipelineRunner
from ..precision.master import Dtypes
from .contracts import OptimizerState, RuntimeContext

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets)


class ForwardBackward(Protocol):
    model: nn.Module  # what this rank runs: the model, or its pipeline stage

    def train(self, batches: list[Batch], denom: torch.Tensor, opt: OptimizerState, step: int) -> torch.Tensor:
        """Forward and backward every micro-batch (gradients accumulate in the parameters), each
        backward inside opt.backward_context(last=...); the loss of each micro-batch is its summed
        token loss / denom. Returns the summed loss, detached. step: the update's number (1-based)."""

    def evaluate(self, batches: Iterable[Batch]) -> torch.Tensor:
        """Forward only, in eval mode, without gradients: [loss sum, target count] of this rank."""


class LocalStep:
    """The whole model on this rank (data and tensor parallelism happen inside it)."""

    def __init__(self, model: nn.Module, ctx: RuntimeContext):
        self.model, self.ctx = model, ctx

    def train(self, batches: list[Batch], denom: torch.Tensor, opt: OptimizerState, step: int) -> torch.Tensor:
        total = torch.zeros((), device=self.ctx.device)
        for i, (x, y) in enumerate(batches):
            with self.ctx.autocast():
                loss = self.model(x, y, loss_denominator=denom)
            with opt.backward_context(last=i == len(batches) - 1):  # the last one syncs the gradients
                loss.backward()
            total += loss.detach()
        return total

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch]) -> torch.Tensor:
        sums = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)
        self.model.eval()
        try:
            for x, y in batches:
                with self.ctx.autocast():
                    sums[0] += self.model(x, y, loss_denominator=1.0).double()
                sums[1] += (y != -100).sum()
        finally:
            self.model.train()
        return sums


def overlaps(ctx: RuntimeContext) -> bool:
    """Whether DualPipeV runs its paired forward and backward side by side (pipeline/runner.py):
    where routed experts are spread over ranks, so that one micro-batch's all-to-alls wait while
    the other computes. Each thread's all-to-alls have a group of their own (ep, ep_backward);
    tensor and context parallelism's collectives have one group each, so with tp or cp > 1 the
    pairs run in turn, as they do under the low-bit recipes, whose scaling state both would write."""
    ps, pr = ctx.parallel, ctx.cfg.precision
    return ctx.cfg.parallel.pp_schedule == "dualpipev" and ps.ep > 1 and ps.tp == 1 and ps.cp == 1 and \
        pr.recipe in ("fp32", "bf16", "fp16") and not pr.lowbit.weights


class PipelineStep:
    """This rank's stage of a pipeline: the schedule (parallel/pipeline/runner.py) runs every
    micro-batch's forward and backward through the stages. At logging.timeline_step it records
    each rank's intervals and writes the timeline (timeline.png, timeline.json, the bubble)."""

    def __init__(self, model: nn.Module, ctx: RuntimeContext):
        self.model, self.ctx = model, ctx
        cfg = ctx.cfg
        self.runner = PipelineRunner.from_state(model, cfg.parallel.pp_schedule, ctx.parallel, ctx.device,
                                                ctx.autocast)
        self.runner.dtype = Dtypes.from_config(cfg.precision).storage  # what the stages send
        self.runner.overlap = overlaps(ctx)

    def train(self, batches: list[Batch], denom: torch.Tensor, opt: OptimizerState, step: int) -> torch.Tensor:
        record = step == self.ctx.cfg.logging.timeline_step
        total = self.runner.train_step(batches, denom, opt.backward_context, record=record)
        if record:
            self.write_timeline(len(batches))
        return total

    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch]) -> torch.Tensor:
        sums = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)
        batches = list(batches)  # one micro-batch per batch, through the stages
        self.model.eval()
        try:
            loss_sum = self.runner.forward_only(batches)  # 0 except on the last stage
        finally:
            self.model.train()
        if self.runner.stage.has_last:  # the only stage that has a loss to count (rank 0 in DualPipeV's V)
            sums[0] = loss_sum.double()
            sums[1] = sum((y != -100).sum() for _, y in batches)
        return sums

    def write_timeline(self, n_micro: int) -> None:
        """The recorded step's intervals from every stage of this pipeline: timeline.png,
        timeline.json and the bubble, measured and textbook (rank 0 writes)."""
        from ..parallel.pipeline import textbook_bubble
        from ..parallel.pipeline.timeline import RankTimeline, format_bubble, measured_bubble, plot_timeline

        ctx, runner = self.ctx, self.runner
        ps, p = ctx.parallel, ctx.cfg.parallel
        v = p.chunks_per_rank
        mine = RankTimeline(ps.pp_rank, runner.t0_wall, runner.events, v)
        timelines = merge_over_pipeline({ps.pp_rank: mine}, ps.pp_group)
        if not ctx.is_main:
            return
        timelines = [timelines[r] for r in range(ps.pp)]
        measured, textbook = measured_bubble(timelines), textbook_bubble(ps.pp, n_micro, v, p.pp_schedule)
        step = ctx.cfg.logging.timeline_step
        title = f"{p.pp_schedule}, pp={ps.pp}" + (f", v={v}" if v > 1 else "") \
            + f", m={n_micro}, step {step}"
        plot_timeline(timelines, ctx.out_dir / "timeline.png", title, textbook, measured)
        (ctx.out_dir / "timeline.json").write_text(json.dumps(
            {"schedule": p.pp_schedule, "pp": ps.pp, "v": v, "micro_batches": n_micro,
             "step": step, "bubble_measured": measured, "bubble_textbook": textbook,
             "ranks": [{"rank": t.rank, "t0_wall": t.t0_wall, "events": t.events} for t in timelines]}) + "\n")
        print(format_bubble(measured, textbook) + f"; picture in {ctx.out_dir / 'timeline.png'}", flush=True)


class ForwardBackwardProvider:
    """A pipeline step when parallel.pp > 1, else the plain one."""

    def build(self, ctx: RuntimeContext, model: nn.Module) -> ForwardBackward:
        return PipelineStep(model, ctx) if ctx.parallel.pp > 1 else LocalStep(model, ctx)
