"""The forward and backward of one step, as a component: one for a plain model, one for a pipeline.

    train(batches, opt, step, loss_scale) -> StepLoss   every micro-batch's forward and backward;
                                                        the global loss and target count
    evaluate(batches)                     -> [loss sum, target count] of the whole job (float64)

The engine calls these without knowing which it has (torchtitan's forward_backward_step and
pp_forward_backward_step are the same split), and without a collective of its own: the figures
each returns are already global. Each data-parallel rank holds its share of the global mean loss,
and under pipeline parallelism only the last stage holds any (the others hold 0), so the step sums
them over the dp and pp groups (`global_sum`).
"""

from __future__ import annotations

import json
from typing import Iterable

import torch
from torch import nn

from ..checkpoint import merge_over_pipeline
from ..parallel.pipeline import textbook_bubble
from ..parallel.pipeline.runner import PipelineRunner
from ..parallel.pipeline.timeline import RankTimeline, format_bubble, measured_bubble, plot_timeline
from ..parallel.collectives import all_reduce
from ..precision.master import Dtypes
from .contracts import Batch, ForwardBackward, OptimizerState, RuntimeContext, StepLoss


def loss_denominator(batches: list[Batch], ctx: RuntimeContext,
                     loss_scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the target count of the whole global batch, what each micro-batch's summed loss is divided by).

    DESIGN invariant 3: every micro-batch's summed loss is divided by the target count of all
    micro-batches of all dp ranks, so the accumulated, dp-summed gradient is the gradient of the
    global mean loss however the batch is split. fp16: the loss times the loss scale S (a smaller
    denominator), so every gradient is S times the true one; the optimizer divides S out."""
    targets = sum((y != -100).sum() for _, y in batches)
    targets = all_reduce(targets, ctx.parallel.dp_group).clamp(min=1)
    return targets, (targets / loss_scale if loss_scale is not None else targets)


def global_sum(t: torch.Tensor, ctx: RuntimeContext) -> torch.Tensor:
    """This rank's part summed over the data-parallel replicas (each evaluated or trained on its
    rows) and the pipeline stages (only the last has a loss); in place."""
    all_reduce(t, ctx.parallel.dp_group)
    return all_reduce(t, ctx.parallel.pp_group)


def _step_loss(total: torch.Tensor, targets: torch.Tensor, loss_scale: float | None, ctx: RuntimeContext) -> StepLoss:
    if loss_scale is not None:  # fp16: the loss was S times the true one (a denominator S times smaller)
        total = total / loss_scale
    return StepLoss(global_sum(total, ctx), targets)


class LocalStep:
    """The whole model on this rank (data and tensor parallelism happen inside it)."""

    def __init__(self, model: nn.Module, ctx: RuntimeContext):
        self.model, self.ctx = model, ctx

    def train(self, batches: list[Batch], opt: OptimizerState, step: int,
              loss_scale: float | None = None) -> StepLoss:
        targets, denom = loss_denominator(batches, self.ctx, loss_scale)
        total = torch.zeros((), device=self.ctx.device)
        for i, (x, y) in enumerate(batches):
            with self.ctx.autocast():
                loss = self.model(x, y, loss_denominator=denom)
            with opt.backward_context(last=i == len(batches) - 1):  # the last one syncs the gradients
                loss.backward()
            total += loss.detach()
        return _step_loss(total, targets, loss_scale, self.ctx)

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
        return global_sum(sums, self.ctx)


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

    def train(self, batches: list[Batch], opt: OptimizerState, step: int,
              loss_scale: float | None = None) -> StepLoss:
        targets, denom = loss_denominator(batches, self.ctx, loss_scale)
        record = step == self.ctx.cfg.logging.timeline_step
        total = self.runner.train_step(batches, denom, opt.backward_context, record=record)
        if record:
            self.write_timeline(len(batches))
        return _step_loss(total, targets, loss_scale, self.ctx)

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
        return global_sum(sums, self.ctx)

    def write_timeline(self, n_micro: int) -> None:
        """The recorded step's intervals from every stage of this pipeline: timeline.png,
        timeline.json and the bubble, measured and textbook (rank 0 writes)."""
        ctx, ps, p = self.ctx, self.ctx.parallel, self.ctx.cfg.parallel
        mine = RankTimeline.from_runner(self.runner)  # this rank's intervals of the recorded step
        v = mine.v
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
