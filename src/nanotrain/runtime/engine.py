"""RuntimeEngine: the training loop, and only the training loop.

    run():  setup -> lock the run folder, decide where to start (run_dir.py)
            -> build: data (and the model sizes it fixes), model, optimizer, schedule,
               forward/backward, checkpointer
            -> checkpointer.load: the newest valid checkpoint (an older one if it is damaged)
            -> start-up lines (machine, model, MFU peak, precision policy, compile, probe)
            -> for step in [start, max_steps): train_step; on a logging step: log, probe, eval,
               checkpointer.save; a non-finite step: skip it or roll back (divergence.py,
               checkpointer.reload_newest); a signal: save and stop (preemption.py); a step that
               never ends: the watchdog ends the job (watchdog.py)
            -> loss-curve plot -> teardown, unlock

What happens inside each piece belongs to the components (runtime/contracts.py): which model,
which parallelism, a plain or a pipelined forward/backward (which also sums the loss over the
ranks: runtime/step.py), which optimizer sharding, what follows the optimizer step. What a
checkpoint holds is runtime/checkpointer.py's, the MFU's terms monitoring/mfu.py's. The engine
is the same for one process and for a 4D layout: the losses it logs come out of the step already
summed over the ranks, and it sums nothing itself.
"""

from __future__ import annotations

import signal
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import merge_over_pipeline
from ..compiling import warm_up
from ..config import Config
from ..module_spec import module_spec
from ..monitoring import build_logger, plot_loss_curve
from ..monitoring.mfu import Throughput
from ..monitoring.monitor import TrainingMonitor, timed
from ..monitoring.probe import Probe
from ..monitoring.step_meter import StepMeter
from ..precision.loss_scaling import LossScaler
from ..precision.master import Dtypes
from ..precision.state import state_snapshot
from .checkpointer import Checkpointer, load_initial_weights
from .components import default_components, resolve_model_config, write_run_config
from .contracts import RunResult, RuntimeComponents, RuntimeContext, TrainData
from .divergence import NonFiniteGuard, TrainingError, hint
from .machine import logical_size, mfu_peak
from .preemption import Preemption
from .run_dir import RunLock, StartPlan, on_rank0, plan_start, write_precision_policy
from .watchdog import Watchdog


@dataclass(frozen=True)
class Due:
    """What follows the update of one step."""

    eval: bool
    save: bool
    probe: bool
    report: bool  # a logging step: the pending losses are read, the monitor looks at the update


def due_after(done: int, cfg: Config, probe: Probe | None) -> Due:
    """What is due after `done` (1-based) updates: every interval, and evaluation (and the probe,
    and checkpoint.save_final's save) after the last step too; each needs a report."""
    t, c = cfg.train, cfg.checkpoint
    is_last = done == t.max_steps
    is_eval = is_last or bool(t.eval_interval and done % t.eval_interval == 0)
    is_save = bool(c.interval and done % c.interval == 0) or (is_last and c.save_final)
    is_probe = probe is not None and probe.due(done, is_last)
    report = done % cfg.logging.log_interval == 0 or is_eval or is_save or is_probe
    return Due(is_eval, is_save, is_probe, report)


class RuntimeEngine:
    def __init__(self, cfg: Config, components: RuntimeComponents | None = None, on_grads=None):
        """on_grads(step, model, ctx), if given, sees the synced gradients of each step before
        clipping (nanotrain verify compares them across layouts)."""
        self.cfg = cfg
        self.c = components or default_components()
        self.on_grads = on_grads
        self.started = time.perf_counter()  # reset by run()
        self.probe: Probe | None = None  # set in run(): the probe batch (monitoring/probe.py), if on
        # Step s trains on the stream's batch s + batch_offset: a roll-back past bad ones raises it (checkpointed).
        self.batch_offset = 0
        self.guard = NonFiniteGuard(cfg)
        self.watchdog: Watchdog | None = None  # while the training loop runs (watchdog.py)
        ls = cfg.precision.loss_scale  # fp16's (precision/loss_scaling.py)
        self.scaler = LossScaler(ls.init, ls.growth_interval, ls.backoff, hysteresis=ls.hysteresis, min_scale=ls.min) \
            if cfg.precision.recipe == "fp16" else None

    # -- one optimizer step --------------------------------------------------------

    def train_step(self, step: int, model: nn.Module, data: TrainData, opt, lr: float,
                   ctx: RuntimeContext, report: bool = False) -> tuple[torch.Tensor, dict]:
        """One optimizer step; returns its global loss and the optimizer's figures. report: a logging
        step, on which the monitor reads the gradients and the weights around the update
        (monitoring.mode standard or debug). The monitor's meter times and counts every collective
        of the step, per parallel group."""
        monitor, scale = self.monitor, self.scaler.scale if self.scaler is not None else None  # fp16
        with monitor.metering():
            clock = timed()
            batches = data.micro_batches(step + self.batch_offset)
            monitor.add_time("data", clock())
            clock = timed()
            if report:
                monitor.arm()  # the sentinel blocks' internals, during this step's forward passes
            # Every micro-batch's forward and backward, through the model or the pipeline's stages:
            # the step's global mean loss, and the global batch's target count (the monitor reports
            # the fraction of ignored targets).
            loss, self.targets = self.forward_backward.train(batches, opt, step + 1, scale)
            monitor.disarm()
            monitor.add_time("compute", clock())
            clock = timed()
            opt.sync_grads()
            if self.on_grads is not None:
                self.on_grads(step + 1, model, ctx)
            if report:
                monitor.before_update(scale)
            skip = scale is not None or ctx.cfg.monitoring.nonfinite != "stop"  # skip, rollback
            # Unless the step is skipped, the optimizer's post-step hooks follow the update (the MoE
            # routers' bias step: components.register_moe_load_balancing_hook).
            stats = opt.step(lr, scale, skip_nonfinite=skip)
            monitor.add_time("optimizer", clock())
            monitor.after_step(stats["grad_norm"], stats["skipped"] and scale is None)
            if scale is not None:
                self.scaler.update(stats["skipped"], step + 1)
        return loss, stats

    def evaluate(self, data: TrainData, ctx: RuntimeContext) -> float:
        """The mean loss over the fixed val batches, the same on every rank."""
        sums = self.forward_backward.evaluate(self._watched(data.val_batches()))  # the job's (loss sum, target count)
        return (sums[0] / sums[1]).item()

    def _watched(self, batches):
        """Each val batch a phase of its own for the watchdog: an evaluation may last many steps."""
        for batch in batches:
            if self.watchdog is not None:
                self.watchdog.beat(self.watchdog.step, "eval")
            yield batch

    # -- the run -----------------------------------------------------------------------

    def run(self) -> RunResult:
        self.started = time.perf_counter()  # metrics' elapsed_s: wall time since here (set-up included)
        ctx = self.c.bootstrap.setup(self.cfg)
        self.lock = RunLock(ctx.out_dir)  # rank 0 takes it in _build
        try:
            return self._run(ctx)
        finally:
            self.lock.release()
            self.c.bootstrap.teardown(ctx)

    def _run(self, ctx: RuntimeContext) -> RunResult:
        t = ctx.cfg.train
        plan = self._build(ctx)
        start = 0
        if plan.candidates:
            start, self.batch_offset = self.checkpointer.load(plan)
        if start >= t.max_steps:  # resume=auto in a finished run: nothing to do (a restart after the last save)
            return RunResult(out_dir=ctx.out_dir, final_step=start, rank=ctx.rank)
        if ctx.is_main:
            write_run_config(ctx)
        self.throughput = Throughput(*logical_size(ctx.cfg.model, t.seq_len), *mfu_peak(ctx.cfg, ctx.device, ctx.machine))
        logger = build_logger(ctx.cfg.logging, ctx.out_dir, t.max_steps, start, ctx.rank, asdict(ctx.cfg))
        compile_s = self._start_up(ctx, start, logger)
        result = RunResult(out_dir=ctx.out_dir, final_step=start, rank=ctx.rank, compile_s=compile_s)
        meter = StepMeter(start)
        self.watchdog = Watchdog(ctx.rank, ctx.world_size, t.step_timeout_s, ctx.cfg.parallel.timeout_s,
                                 on_exit=self.lock.release)
        preemption = Preemption(ctx.parallel.world_group, ctx.rank, on_exit=self.lock.release)
        try:
            with self.watchdog, preemption:
                self._loop(start, meter, result, preemption, ctx, logger)
            self._finish(result, meter, start, ctx, logger)
        finally:
            logger.close()  # also on errors: a live progress bar must give the terminal back
            self.checkpointer.wait()  # a background save must be complete (or its error raised) before we return
        return result

    def _loop(self, start: int, meter: StepMeter, result: RunResult, preemption: Preemption,
              ctx: RuntimeContext, logger) -> None:
        """The steps [start, max_steps); a roll-back moves the step back, a signal ends the loop."""
        model, data, opt, t = self.model, self.data, self.optimizer, ctx.cfg.train
        model.train()
        step = start
        while step < t.max_steps:
            lr = self.schedule.lr(step)
            due = due_after(step + 1, ctx.cfg, self.probe)
            self.watchdog.beat(step + 1, "train")
            began = time.perf_counter()
            loss, stats = self.train_step(step, model, data, opt, lr, ctx, due.report)
            self.watchdog.step_took(time.perf_counter() - began)
            meter.add(step + 1, loss, stats["grad_norm"])
            result.final_step = step + 1
            if self.guard.after_step(step + 1, stats["skipped"]):  # monitoring.nonfinite=rollback
                step = self._rollback(step + 1, meter, result, logger)
                continue
            if due.report:
                self._report(step + 1, lr, due, meter, result, ctx, logger)
                meter.restart()  # evals and saves stay out of the measured training time
            if step + 1 == ctx.cfg.logging.timeline_step and (ctx.out_dir / "timeline.png").exists():
                logger.picture("pipeline_timeline", ctx.out_dir / "timeline.png", step + 1)  # drawn in the step
            step += 1
            result.signal = preemption.agreed()
            if result.signal:
                self._preempted(step, due.save, result, ctx, logger)
                return

    def _rollback(self, bad_step: int, meter: StepMeter, result: RunResult, logger) -> int:
        """Reload the newest checkpoint and skip the batches from it to the bad step; returns the
        step to continue from."""
        step, saved_offset = self.checkpointer.reload_newest(bad_step)
        self.guard.rolled_back(step, bad_step)
        first, last = step + 1 + saved_offset, bad_step + self.batch_offset
        self.batch_offset += bad_step - step
        logger.notice(f"rollback: the gradient norm was not finite at step {bad_step}; reloaded the checkpoint of "
                      f"step {step} and skip the batches it trained on since (data positions {first}-{last})")
        logger.log(bad_step, {"rollback_to": step, "skipped_batches": last - first + 1})
        meter.rewind(step)
        result.rewind(step)
        return step

    def _preempted(self, step: int, saved: bool, result: RunResult, ctx: RuntimeContext, logger) -> None:
        """Every rank agreed a signal came: the checkpoint of this step (unless this step's save was
        just written), synchronously, then one line."""
        if not saved:
            self._save(step, result, logger, background=False)
        self.checkpointer.wait()
        name, folder = signal.Signals(result.signal).name, self.checkpointer.folder.dir
        logger.notice(f"stopped by {name} after step {step}: saved checkpoint {folder / f'step_{step:08d}'}. "
                       "Run the same command again to continue from it (checkpoint.resume=auto); "
                       f"exit code {result.exit_code}")

    def _build(self, ctx: RuntimeContext) -> StartPlan:
        """Every component, in the order they depend on each other; returns where the run starts
        (decided first, with the run folder locked: a bad path or a busy folder fails before any work)."""
        cfg = ctx.cfg
        folder = self.c.checkpoint.build(ctx)

        def lock_and_plan() -> StartPlan:
            reclaimed = self.lock.acquire()
            plan = plan_start(cfg, folder)
            plan.lines[:0] = [reclaimed] if reclaimed else []
            return plan
        plan = on_rank0(lock_and_plan, ctx.parallel.world_group)
        for line in plan.lines if ctx.is_main else ():
            print(line, flush=True)
        self.data = self.c.data.build(ctx)
        self.probe = Probe.build(cfg, self.data, ctx.is_main)
        padding = resolve_model_config(cfg, self.data.vocab_size)
        if padding and ctx.is_main:
            print(padding, flush=True)
        model = self.c.model.build(ctx)
        # Weights from elsewhere, then a fresh run from step 0; a run that has checkpoints resumes instead.
        if cfg.checkpoint.init_from and not plan.candidates:
            load_initial_weights(model, ctx)
        self.model = model  # with self.optimizer: for inspection after run() (tests, notebooks)
        self.optimizer = self.c.optimizer.build(ctx, model)
        self.monitor = TrainingMonitor(cfg, ctx, model, self.optimizer)
        self.schedule = self.c.schedule.build(ctx)
        self.forward_backward = self.c.forward_backward.build(ctx, model)
        self.checkpointer = Checkpointer(folder, ctx, model, self.optimizer, self.schedule, self.data, self.scaler,
                                         self.probe)
        return plan

    def _start_up(self, ctx: RuntimeContext, start: int, logger) -> float:
        """The start-up lines, the compile of the blocks (now, so that a block that cannot
        compile stops the run before step 1), and the probe's figures before this run's first
        step. Returns the compile's seconds."""
        cfg, tp = ctx.cfg, self.throughput
        for line in ctx.startup_lines or ([ctx.machine.describe()] if ctx.machine else []):
            logger.message(line)
        logger.message(f"model: {tp.n_params / 1e6:.2f}M parameters, {tp.flops_per_token / 1e6:.1f} MFLOP/token; "
                       f"{self.data.tokens_per_step} tokens/step; precision {cfg.precision.recipe}; MFU peak "
                       f"{tp.peak / 1e12:.3g} TFLOP/s ({tp.peak_source})"
                       + (f"; resumed at step {start}" if start else ""))
        policy = write_precision_policy(self.model, ctx)
        if policy is not None:
            logger.message(policy)
        compile_s = 0.0
        if cfg.train.compile:
            compile_s = self._compile_blocks(self.model, ctx)
            logger.message(f"torch.compile: {len(module_spec(self.model).compiled_blocks)} blocks compiled in "
                           f"{compile_s:.1f} s (at the training shapes; evaluation shapes compile when first met)")
        if self.probe is not None:  # its hash, and its figures before this run's first step
            logger.log(start, {"probe/hash": self.probe.hash, **self.probe.measure(self.forward_backward, ctx)})
        return compile_s

    def _report(self, done: int, lr: float, due: Due, meter: StepMeter, result: RunResult,
                ctx: RuntimeContext, logger) -> None:
        """A logging step: read the losses since the last one (one host sync), log them with
        the monitor's and the model's figures; then the probe, evaluation and checkpoint due."""
        losses, norms, step_s = meter.flush(done)
        result.losses.update(losses)
        result.grad_norms.update(norms)
        self.guard.check_finite(losses, norms)  # monitoring.nonfinite=stop
        tokens_per_step = self.data.tokens_per_step
        tokens_per_s = tokens_per_step / step_s
        try:
            health = self.monitor.report(losses, norms[done], len(losses), self.targets, tokens_per_step)
        except FloatingPointError as e:  # a parameter became non-finite
            raise TrainingError(f"{e} at step {done}: {hint(self.cfg)}.") from None
        model_metrics = merge_over_pipeline(self.model.step_metrics(), ctx.parallel.pp_group)  # each stage: its layers
        if self.scaler is not None:
            model_metrics.update(loss_scale=self.scaler.scale, skipped_steps=self.scaler.skipped)
        logger.log(done, {"loss": losses[done], "lr": lr, "grad_norm": norms[done], "tokens_per_s": tokens_per_s,
                          "mfu": self.throughput.mfu(tokens_per_s), "step_ms": step_s * 1e3,
                          "tokens": done * tokens_per_step, "elapsed_s": time.perf_counter() - self.started,
                          **health, **model_metrics})
        probed = self.probe.measure(self.forward_backward, ctx) if due.probe else {}
        if due.eval:
            val_loss = result.val_losses[done] = self.evaluate(self.data, ctx)
            logger.log(done, {"val_loss": val_loss, "elapsed_s": time.perf_counter() - self.started,
                              **self.monitor.val_metrics(val_loss), **probed})
        elif probed:
            logger.log(done, probed)
        if due.save and self.guard.in_row:  # the same on every rank: the norm is global
            logger.notice(f"not saving step {done}: its update and the {len(self.guard.in_row) - 1} before it were "
                          "skipped for a non-finite gradient norm; a diverging model is not checkpointed")
        elif due.save:  # every rank writes its own part
            self._save(done, result, logger)

    def _finish(self, result: RunResult, meter: StepMeter, start: int, ctx: RuntimeContext, logger) -> None:
        """The loss curve (rank 0), and the run's training time and throughput."""
        cfg = ctx.cfg
        if ctx.is_main and cfg.logging.plot and (ctx.out_dir / "metrics.jsonl").exists():
            plot_loss_curve(ctx.out_dir / "metrics.jsonl", ctx.out_dir / "loss.png",
                            title=f"{Path(cfg.data.path).stem} · {cfg.model.n_layers}L {cfg.model.d_model}d")
            logger.picture("loss_curve", ctx.out_dir / "loss.png", result.final_step)
        result.train_time_s = meter.train_time
        if meter.train_time:
            result.tokens_per_s = (result.final_step - start) * self.data.tokens_per_step / meter.train_time

    def _compile_blocks(self, model: nn.Module, ctx: RuntimeContext) -> float:
        """Run each compiled block once at its training shape (compiling.warm_up): a micro-batch of
        this rank's positions (1/cp of the sequence under context parallelism, 1/tp of those under
        sequence parallelism), in the dtype the embedding or the previous pipeline stage hands it."""
        cfg, ps = ctx.cfg, ctx.parallel
        positions = cfg.train.seq_len // ps.cp // (ps.tp if cfg.parallel.sequence_parallel else 1)
        shape = (cfg.train.micro_batch(ps.dp), positions, cfg.model.d_model)
        return warm_up(model, shape, Dtypes.from_config(cfg.precision).storage, ctx.device, ctx.autocast,
                       partial(state_snapshot, model))

    def _save(self, step: int, result: RunResult, logger, background: bool = True) -> None:
        # A save is I/O, not a step: it gets the process groups' timeout, not the step's.
        self.watchdog.beat(step, "save", limit=self.cfg.parallel.timeout_s)
        self.checkpointer.save(step, result.last_val_loss, self.batch_offset, logger, background)
