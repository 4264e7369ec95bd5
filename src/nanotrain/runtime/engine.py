"""RuntimeEngine: the training loop, and only the training loop.

    run():  setup -> lock the run folder, decide where to start (run_dir.py)
            -> build: checkpoint, data, model, optimizer, schedule, forward/backward
            -> resume (the newest valid checkpoint; an older one if it is damaged)
            -> start-up lines (machine, model, MFU peak, precision policy, compile, probe)
            -> for step in [start, max_steps): train_step; on a logging step: log, probe, eval, save;
               a non-finite step: skip it or roll back (divergence.py); a signal: save and stop
               (preemption.py); a step that never ends: the watchdog ends the job (watchdog.py)
            -> loss-curve plot -> teardown, unlock

What happens inside each piece (which model, which parallelism, a plain or a pipelined
forward/backward, which optimizer sharding, what follows the optimizer step) belongs to the
components (runtime/contracts.py); the engine is the same for one process and for a 4D layout.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointError, CheckpointReader, check_compatible, merge_over_pipeline, model_pieces, whole
from ..compiling import warm_up
from ..config import Config, ConfigError
from ..inspection.counts import flops_per_token as logical_flops_per_token
from ..inspection.counts import meta_model
from ..monitoring import build_logger, mfu, plot_loss_curve
from ..monitoring.monitor import TrainingMonitor, timed
from ..monitoring.probe import Probe, check_resume
from ..parallel import collectives
from ..parallel.state import all_reduce, barrier
from ..parallel.tensor_parallel import padded_vocab
from ..precision.loss_scaling import LossScaler
from ..precision.master import Dtypes
from ..precision.policy import describe_policy
from ..precision.state import load_state as load_precision_state, state_snapshot
from ..precision.state import state_pieces as precision_state_pieces
from .components import default_components, write_run_config
from .contracts import RuntimeComponents, RuntimeContext, TrainData
from .divergence import NonFiniteGuard, TrainingError, hint, nonfinite_error
from .machine import Machine, compute_dtype, job_peak, probe_machine, remeasure_cpu_rate
from .preemption import Preemption
from .run_dir import RunLock, StartPlan, on_rank0, plan_start
from .watchdog import Watchdog


@dataclass
class RunResult:
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


class StepMeter:
    """Per-step losses kept on the device until a report reads them all with one host sync
    (on CUDA an .item() per step would stall the launch queue), and the training time
    between reports."""

    def __init__(self, start_step: int):
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.mark, self.mark_step, self.train_time = time.perf_counter(), start_step, 0.0

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.pending.append((step, torch.stack([loss, grad_norm.to(loss)])))

    def flush(self, step: int, groups=()) -> tuple[dict[int, float], dict[int, float], float]:
        """({step: loss}, {step: grad norm}) since the last flush, and seconds per step.

        Each data-parallel rank holds its share of the global mean loss, and only the last
        pipeline stage holds any (the others hold 0): all-reduces over the dp and pp groups
        sum them (the grad norm, equal on every rank after the sync, is left alone)."""
        values = torch.stack([v for _, v in self.pending])
        losses = values[:, 0].contiguous()
        for group in groups:
            all_reduce(losses, group)
        values[:, 0] = losses
        values = values.tolist()
        now = time.perf_counter()
        step_s = (now - self.mark) / (step - self.mark_step)
        self.train_time += now - self.mark
        losses = {s: v[0] for (s, _), v in zip(self.pending, values)}
        norms = {s: v[1] for (s, _), v in zip(self.pending, values)}
        self.pending.clear()
        self.mark, self.mark_step = now, step
        return losses, norms, step_s

    def restart(self) -> None:
        self.mark = time.perf_counter()

    def rewind(self, step: int) -> None:
        """A roll-back to `step`: the pending losses are of steps that no longer happened."""
        self.pending.clear()
        self.mark, self.mark_step = time.perf_counter(), step


def resolve_model_config(cfg: Config, vocab_size: int) -> str | None:
    """Fill the model sizes that come from the data: vocab (from the tokenizer) and context length.

    A vocabulary taken from the tokenizer (model.vocab_size=0) that parallel.tp does not divide
    is padded, as Megatron's make-vocab-size-divisible-by does, by the model's tensor-parallel
    layers (parallel/tensor_parallel.py): model.vocab_size stays the tokenizer's, so the
    checkpoint, its config and the losses are those of the unpadded model. Returns the line that
    says so (None without padding). An explicit model.vocab_size is obeyed as given."""
    m, tp = cfg.model, cfg.parallel.tp
    if m.max_seq_len == 0:
        m.max_seq_len = cfg.train.seq_len
    if m.vocab_size == 0:
        m.vocab_size = vocab_size
        padded = padded_vocab(vocab_size, tp)
        if padded == vocab_size:
            return None
        return (f"vocabulary: the tokenizer's {vocab_size} tokens padded to {padded} rows for parallel.tp={tp} "
                f"({padded // tp} per rank); the {padded - vocab_size} padding row(s) are never a target and are "
                "masked out of the softmax")
    if m.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({vocab_size}): set model.vocab_size=0 to take it from the tokenizer.")
    if m.vocab_size % tp:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is not divisible by parallel.tp={tp}: set "
                          f"model.vocab_size={padded_vocab(m.vocab_size, tp)}, or 0 to take the tokenizer's "
                          "vocabulary and pad it automatically.")
    return None


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


@dataclass
class Throughput:
    """The fixed terms of the MFU (monitoring/mfu.py), found once per run.

    FLOPs per token of the logical model (inspection/counts.py, the count `nanotrain inspect`
    prints: every matmul a token runs, attention's included), from a copy on the meta device,
    so the layout does not enter. The MFU divides the whole job's FLOP/s by the whole job's
    peak: every GPU's, or every CPU node's (runtime/machine.py: probed once, not per rank)."""

    n_params: int  # of the logical model
    flops_per_token: float
    peak: float  # FLOP/s of the whole job
    peak_source: str
    machine: Machine
    dtype: str = "fp32"  # what the run's matmuls compute in
    probed: bool = False  # the peak was timed on this CPU at start-up (not logging.peak_tflops)
    remeasured: bool = False

    @classmethod
    def of(cls, ctx: RuntimeContext) -> Throughput:
        cfg = ctx.cfg
        logical = meta_model(cfg.model)
        n_params = sum(p.numel() for p in logical.parameters())
        flops_per_token = logical_flops_per_token(logical, cfg.model, cfg.train.seq_len)["train"]
        machine = ctx.machine
        if machine is None or not (machine.rates or cfg.logging.peak_tflops):  # a bootstrap of one's own
            machine = probe_machine(ctx.device)
        dtype = compute_dtype(cfg.precision.recipe, ctx.device, cfg.precision.fp8.gemm)
        peak, peak_source = job_peak(machine, dtype, cfg.logging.peak_tflops)
        probed = machine.device_type == "cpu" and not cfg.logging.peak_tflops
        return cls(n_params, flops_per_token, peak, peak_source, machine, dtype, probed)

    def mfu(self, tokens_per_s: float) -> float:
        value = mfu(tokens_per_s, self.flops_per_token, self.peak)
        if value > 1 and self.probed and not self.remeasured:
            # The run computes faster than the start-up probe measured: the cores were busy with
            # something else while it ran (a short probe; another job). Time the matmuls again, once.
            self.remeasured = True
            again = self.machine.nodes * max(remeasure_cpu_rate(self.machine, d) for d in {self.dtype, "fp32"})
            if again > self.peak:
                print(f"warning: this run reached {value:.0%} of the peak measured at start-up "
                      f"({self.peak / 1e12:.3g} TFLOP/s): the cores were busy then. Measured again: "
                      f"{again / 1e12:.3g} TFLOP/s, the MFU's peak from now on.", flush=True)
                self.peak, self.peak_source = again, self.peak_source + ", measured again during the run"
            value = mfu(tokens_per_s, self.flops_per_token, self.peak)
        return value


def write_precision_policy(model: nn.Module, ctx: RuntimeContext) -> str | None:
    """precision_policy.json: the recipe every GEMM module runs in, each pipeline stage's merged
    (rank 0 writes); returns the line for the log. None (no file) for plain fp32 and bf16."""
    p = ctx.cfg.precision
    if p.recipe in ("fp32", "bf16") and not p.overrides:
        return None
    policy = merge_over_pipeline(getattr(model, "gemm_policy", {}), ctx.parallel.pp_group)  # each stage: its modules
    path = ctx.out_dir / "precision_policy.json"
    if ctx.is_main:
        path.write_text(json.dumps(policy, indent=1) + "\n")
    return f"precision policy: {describe_policy(policy)}; every module in {path}"


class RuntimeEngine:
    def __init__(self, cfg: Config, components: RuntimeComponents | None = None, on_grads=None):
        """on_grads(step, model, ctx), if given, sees the synced gradients of each step before
        clipping (nanotrain verify compares them across layouts)."""
        self.cfg = cfg
        self.c = components or default_components()
        self.on_grads = on_grads
        self.started = time.perf_counter()  # reset by run()
        self.probe: Probe | None = None  # set in run(): the probe batch (monitoring/probe.py), if on
        # The batch a step trains on is the data stream's at step + batch_offset: a roll-back past
        # bad batches raises it (divergence.py); checkpoints keep it.
        self.batch_offset = 0
        self.guard = NonFiniteGuard(cfg)
        self.watchdog: Watchdog | None = None  # while the training loop runs (watchdog.py)
        p = cfg.precision
        ls = p.loss_scale
        self.scaler = LossScaler(ls.init, ls.growth_interval, ls.backoff, hysteresis=ls.hysteresis,
                                 min_scale=ls.min) \
            if p.recipe == "fp16" else None

    # -- one optimizer step --------------------------------------------------------

    def train_step(self, step: int, model: nn.Module, data: TrainData, opt, lr: float,
                   ctx: RuntimeContext, report: bool = False) -> tuple[torch.Tensor, dict]:
        """One optimizer step. report: a logging step, on which the monitor reads the gradients
        and the weights around the update (monitoring.mode standard or debug). The monitor's
        meter times and counts every collective of the step, per parallel group."""
        with self.monitor.metering():
            return self._train_step(step, model, data, opt, lr, ctx, report)

    def _train_step(self, step: int, model: nn.Module, data: TrainData, opt, lr: float,
                    ctx: RuntimeContext, report: bool) -> tuple[torch.Tensor, dict]:
        monitor = self.monitor
        clock = timed()
        batches = data.micro_batches(step + self.batch_offset)
        monitor.add_time("data", clock())
        clock = timed()
        # DESIGN invariant 3: every micro-batch's summed loss is divided by the target
        # count of the whole global batch (all micro-batches of all dp ranks), so the
        # accumulated, dp-summed gradient is the gradient of the global mean loss
        # however the batch is split.
        denom = sum((y != -100).sum() for _, y in batches)
        denom = all_reduce(denom, ctx.parallel.dp_group).clamp(min=1)
        self.targets = denom  # the monitor reports the fraction of ignored targets
        # fp16: the loss times the loss scale S (a smaller denominator), so every gradient is S times
        # the true one; the optimizer divides S out.
        scale = self.scaler.scale if self.scaler is not None else None
        if scale is not None:
            denom = denom / scale
        if report:
            monitor.arm()  # the sentinel blocks' internals, during this step's forward passes
        # Every micro-batch's forward and backward: through the model, or the pipeline's stages.
        total = self.forward_backward.train(batches, denom, opt, step + 1)
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
            total = total / scale
            self.scaler.update(stats["skipped"], step + 1)
        return total, stats

    def evaluate(self, data: TrainData, ctx: RuntimeContext) -> float:
        """The mean loss over the fixed val batches, the same on every rank."""
        sums = self.forward_backward.evaluate(self._watched(data.val_batches()))  # (loss sum, target count)
        all_reduce(sums, ctx.parallel.dp_group)  # each dp rank evaluated its rows
        all_reduce(sums, ctx.parallel.pp_group)  # the last stage's sums (0 on the others)
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
        start = self._resume(plan, ctx) if plan.candidates else 0
        if start >= t.max_steps:  # resume=auto in a finished run: nothing to do (a restart after the last save)
            if ctx.is_main:
                print(f"the run in {ctx.out_dir} is complete: its newest checkpoint is at step {start}, "
                      f"train.max_steps={t.max_steps}. Nothing to train: raise train.max_steps to continue it, or "
                      "pass --train.overwrite=true to start over.", flush=True)
            return RunResult(out_dir=ctx.out_dir, final_step=start, rank=ctx.rank)
        if ctx.is_main:
            write_run_config(ctx)
        self.throughput = Throughput.of(ctx)
        logger = build_logger(ctx.cfg.logging, ctx.out_dir, t.max_steps, start, ctx.rank)
        compile_s = self._start_up(ctx, start, logger)
        result = RunResult(out_dir=ctx.out_dir, final_step=start, rank=ctx.rank, compile_s=compile_s)
        meter = StepMeter(start)
        self.watchdog = Watchdog(ctx.rank, ctx.world_size, t.step_timeout_s, ctx.cfg.parallel.timeout_s,
                                 on_exit=self.lock.release)
        preemption = Preemption(ctx.parallel.world_group, ctx.rank, on_exit=self.lock.release)
        try:
            with self.watchdog, preemption:
                self._loop(start, meter, result, preemption, ctx, logger)
        finally:
            logger.close()  # also on errors: a live progress bar must give the terminal back
            self.ckpt.wait()  # a background save must be complete (or its error raised) before we return
        self._finish(result, meter, start, ctx)
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
            if self._diverged(step + 1, stats):
                step = self._rollback(step + 1, meter, result, ctx, logger)
                continue
            if due.report:
                self._report(step + 1, lr, due, meter, result, ctx, logger)
                meter.restart()  # evals and saves stay out of the measured training time
            step += 1
            result.signal = preemption.agreed()
            if result.signal:
                self._preempted(step, due.save, result, ctx, logger)
                return

    def _diverged(self, done: int, stats: dict) -> bool:
        """monitoring.nonfinite skip or rollback (and no fp16 loss scaler, whose skips are its own):
        count a skipped step; True when the run is to roll back."""
        mode = self.cfg.monitoring.nonfinite
        if mode == "stop" or self.scaler is not None:
            return False
        if not stats["skipped"]:
            self.guard.good()
            return False
        self.guard.skipped(done)  # raises at the limit
        return mode == "rollback"

    def _rollback(self, bad_step: int, meter: StepMeter, result: RunResult, ctx: RuntimeContext, logger) -> int:
        """Reload the newest checkpoint and skip the batches from it to the bad step; returns the
        step to continue from."""
        self.ckpt.wait()
        found = self.ckpt.complete()
        if not found:
            raise TrainingError(f"the gradient norm was not finite at step {bad_step} and there is no checkpoint to "
                                "roll back to (monitoring.nonfinite=rollback): set checkpoint.interval so that one is "
                                f"saved before this step, or {hint(self.cfg)}.")
        offset = self.batch_offset
        step = self._resume(StartPlan(found), ctx)  # restores the checkpoint's batch_offset
        self.guard.rolled_back(step, bad_step)
        first, last = step + 1 + self.batch_offset, bad_step + offset
        self.batch_offset = offset + bad_step - step
        logger.notice(f"rollback: the gradient norm was not finite at step {bad_step}; reloaded the checkpoint of "
                       f"step {step} and skip the batches it trained on since (data positions {first}-{last})")
        logger.log(bad_step, {"rollback_to": step, "skipped_batches": last - first + 1})
        meter.rewind(step)
        for d in (result.losses, result.grad_norms, result.val_losses):
            for s in [s for s in d if s > step]:
                del d[s]
        result.final_step = step
        return step

    def _preempted(self, step: int, saved: bool, result: RunResult, ctx: RuntimeContext, logger) -> None:
        """Every rank agreed a signal came: the checkpoint of this step (unless this step's save was
        just written), synchronously, then one line."""
        if not saved:
            self._save(step, ctx, result.last_val_loss, logger, background=False)
        self.ckpt.wait()
        name = signal.Signals(result.signal).name
        logger.notice(f"stopped by {name} after step {step}: saved checkpoint {self.ckpt.dir / f'step_{step:08d}'}. "
                       "Run the same command again to continue from it (checkpoint.resume=auto); "
                       f"exit code {result.exit_code}")

    def _build(self, ctx: RuntimeContext) -> StartPlan:
        """Every component, in the order they depend on each other; returns where the run starts
        (decided first, with the run folder locked: a bad path or a busy folder fails before any work)."""
        cfg = ctx.cfg
        self.ckpt = self.c.checkpoint.build(ctx)

        def lock_and_plan() -> StartPlan:
            reclaimed = self.lock.acquire()
            plan = plan_start(cfg, self.ckpt)
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
            from ..models.hf import init_from

            try:
                init_from(model, cfg.model, cfg.checkpoint.init_from, ctx.parallel.groups())
            except ValueError as e:
                raise ConfigError(str(e)) from None
        self.model = model  # with self.optimizer: for inspection after run() (tests, notebooks)
        self.optimizer = self.c.optimizer.build(ctx, model)
        self.monitor = TrainingMonitor(cfg, ctx, model, self.optimizer)
        self.schedule = self.c.schedule.build(ctx)
        self.forward_backward = self.c.forward_backward.build(ctx, model)
        return plan

    def _start_up(self, ctx: RuntimeContext, start: int, logger) -> float:
        """The start-up lines, the compile of the blocks (now, so that a block that cannot
        compile stops the run before step 1), and the probe's figures before this run's first
        step. Returns the compile's seconds."""
        cfg, tp = ctx.cfg, self.throughput
        for line in ctx.startup_lines or [tp.machine.describe()]:
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
            logger.message(f"torch.compile: {len(self.model.compiled_blocks)} blocks compiled in {compile_s:.1f} s "
                           "(at the training shapes; evaluation shapes compile when first met)")
        if self.probe is not None:  # its hash, and its figures before this run's first step
            logger.log(start, {"probe/hash": self.probe.hash, **self.probe.measure(self.forward_backward, ctx)})
        return compile_s

    def _report(self, done: int, lr: float, due: Due, meter: StepMeter, result: RunResult,
                ctx: RuntimeContext, logger) -> None:
        """A logging step: read the losses since the last one (one host sync), log them with
        the monitor's and the model's figures; then the probe, evaluation and checkpoint due."""
        ps = ctx.parallel
        losses, norms, step_s = meter.flush(done, (ps.dp_group, ps.pp_group))
        result.losses.update(losses)
        result.grad_norms.update(norms)
        self._check_finite(losses, norms)
        tokens_per_step = self.data.tokens_per_step
        tokens_per_s = tokens_per_step / step_s
        try:
            health = self.monitor.report(losses, norms[done], len(losses), self.targets, tokens_per_step)
        except FloatingPointError as e:  # a parameter became non-finite
            raise TrainingError(f"{e} at step {done}: {hint(self.cfg)}.") from None
        model_metrics = merge_over_pipeline(self.model.step_metrics(), ps.pp_group)  # each stage: its layers
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
            self._save(done, ctx, result.last_val_loss, logger)

    def _finish(self, result: RunResult, meter: StepMeter, start: int, ctx: RuntimeContext) -> None:
        """The loss curve (rank 0), and the run's training time and throughput."""
        cfg = ctx.cfg
        if ctx.is_main and cfg.logging.plot and (ctx.out_dir / "metrics.jsonl").exists():
            plot_loss_curve(ctx.out_dir / "metrics.jsonl", ctx.out_dir / "loss.png",
                            title=f"{Path(cfg.data.path).stem} · {cfg.model.n_layers}L {cfg.model.d_model}d")
        result.train_time_s = meter.train_time
        if meter.train_time:
            result.tokens_per_s = (result.final_step - start) * self.data.tokens_per_step / meter.train_time

    def _compile_blocks(self, model: nn.Module, ctx: RuntimeContext) -> float:
        """Run each compiled block once at the shape it gets in training (compiling.warm_up):
        a micro-batch of this rank's sequence positions (1/cp of them under context parallelism, and
        1/tp of those under sequence parallelism), in the dtype the embedding (or the previous
        pipeline stage) hands it."""
        cfg, ps = ctx.cfg, ctx.parallel
        positions = cfg.train.seq_len // ps.cp // (ps.tp if cfg.parallel.sequence_parallel else 1)
        shape = (cfg.train.micro_batch(ps.dp), positions, cfg.model.d_model)
        return warm_up(model, shape, Dtypes.from_config(cfg.precision).storage, ctx.device, ctx.autocast,
                       partial(state_snapshot, model))

    # -- checkpoints ---------------------------------------------------------------

    def _save(self, step: int, ctx: RuntimeContext, val_loss: float | None, logger, background: bool = True) -> None:
        """Every rank passes the boxes it holds (checkpoint/pieces.py): its shards and stage of
        the model, its slices of the optimizer state, its RNG state. Each box is written once.
        background=False: written before this returns, even with checkpoint.async_save."""
        # A save is I/O, not a step: it gets the process groups' timeout, not the step's.
        self.watchdog.beat(step, "save", limit=ctx.cfg.parallel.timeout_s)
        cfg, ps = ctx.cfg, ctx.parallel
        model, opt, data, schedule, ckpt = self.model, self.optimizer, self.data, self.schedule, self.ckpt
        # Where the optimizer keeps a master copy (precision.master_owner=optimizer), it saves the master.
        pieces = model_pieces(model, getattr(opt, "mastered", set())) + opt.pieces()
        pieces.append(whole(f"rng/torch/rank{ctx.rank}", torch.get_rng_state()))
        pieces += precision_state_pieces(model, ctx.rank)  # amax histories, stochastic-rounding generators
        if ctx.device.type == "cuda":
            pieces.append(whole(f"rng/cuda/rank{ctx.rank}", torch.cuda.get_rng_state(ctx.device)))
        objects = {
            "config": cfg.to_dict(), "val_loss": val_loss,
            "lr_schedule": {"step": step, "next_lr": schedule.lr(step)},  # the lr the continuation starts with
            # The data position: the batch at step s is a function of (seed, s) (data/sampler.py).
            "data": {"step": step, "samples_seen": step * cfg.train.batch_size,
                     "tokens_seen": step * data.tokens_per_step, "batch_offset": self.batch_offset},
            "loss_scaler": self.scaler.state_dict() if self.scaler is not None else None,  # fp16
            "probe": self.probe.state() if self.probe is not None else None,  # its hash, checked on resume
            "layout": {"world_size": ctx.world_size, "tp": ps.tp, "cp": ps.cp, "pp": ps.pp, "dp": ps.dp, "ep": ps.ep,
                       "etp": cfg.parallel.etp, "sequence_parallel": cfg.parallel.sequence_parallel, "zero_stage": cfg.optimizer.zero_stage,
                       "micro_batch_size": cfg.train.micro_batch(ps.dp)}}
        tokenizer = data.tokenizer.to_json() if ctx.is_main else None
        t = time.perf_counter()
        if cfg.checkpoint.async_save and background:
            path = ckpt.save_async(step, pieces, objects, tokenizer)
            logger.message(f"saving checkpoint {path} in the background")
        else:
            path = ckpt.save(step, pieces, objects, tokenizer)
            barrier()  # rank 0 has committed it
            logger.message(f"saved checkpoint {path} ({time.perf_counter() - t:.2f} s)")

    def _check_finite(self, losses: dict[int, float], norms: dict[int, float]) -> None:
        """Stop at the first step whose loss or gradient norm is not finite, naming it (an fp16
        overflow, or monitoring.nonfinite=skip or rollback, skipped that step's update instead)."""
        if self.scaler is not None or self.cfg.monitoring.nonfinite != "stop":
            return
        for step in sorted(losses):
            if not (math.isfinite(losses[step]) and math.isfinite(norms[step])):
                what = "loss" if not math.isfinite(losses[step]) else "gradient norm"
                raise nonfinite_error(what, losses[step] if what == "loss" else norms[step], step, self.cfg)

    def _resume(self, plan: StartPlan, ctx: RuntimeContext) -> int:
        """Load the first of the plan's checkpoints that every rank reads without error; returns the
        step to continue from. A damaged one (a checksum that does not match, a missing or truncated
        shard) is reported and the next tried, unless the user named it (plan.explicit)."""
        problems: list[str] = []
        for i, path in enumerate(plan.candidates):
            try:
                reader: CheckpointReader | None = self.ckpt.load(str(path))
            except CheckpointError as e:
                reader, problem = None, str(e)
            if reader is not None:
                self._check_resumable(reader, path, plan.explicit, ctx)  # the same on every rank: raised
                if reader.step >= ctx.cfg.train.max_steps:  # resume=auto: the run is complete; nothing to load
                    return reader.step
                problem = None
                try:
                    self._load(reader, ctx)
                except CheckpointError as e:
                    problem = str(e)
            found = [problem]
            if ctx.world_size > 1:  # every rank's verdict: all load it, or all go on to the next
                found = [None] * ctx.world_size
                collectives.all_gather_object(found, problem, ctx.parallel.world_group)
            bad = [f"rank {r}: {p}" if ctx.world_size > 1 else p for r, p in enumerate(found) if p]
            if not bad:
                if ctx.is_main:
                    self._say_resumed(reader, path, ctx)
                return reader.step
            problems += bad
            if plan.explicit:
                raise CheckpointError(" ".join(bad))
            if ctx.is_main:
                following = plan.candidates[i + 1] if i + 1 < len(plan.candidates) else None
                print(f"warning: checkpoint {path} is damaged: {' '.join(bad)}. "
                      + (f"Falling back to {following}." if following else ""), flush=True)
        raise CheckpointError(f"none of the {len(plan.candidates)} checkpoint(s) in {self.ckpt.dir} can be read "
                              f"({' '.join(problems)}): restore them, or start a fresh run with --train.overwrite=true "
                              "(which moves them aside).")

    def _check_resumable(self, reader: CheckpointReader, path: Path, explicit: bool, ctx: RuntimeContext) -> None:
        check_compatible(reader.objects["config"], ctx.cfg.to_dict(), path)
        check_resume(reader.objects.get("probe"), self.probe, path, ctx.is_main)
        if explicit and reader.step >= ctx.cfg.train.max_steps:
            raise ConfigError(f"checkpoint {path} is at step {reader.step}, already at train.max_steps="
                              f"{ctx.cfg.train.max_steps}: raise train.max_steps to train further.")

    def _load(self, reader: CheckpointReader, ctx: RuntimeContext) -> None:
        """Model, optimizer, precision and loss-scaler state, RNG, the data offset."""
        model, opt = self.model, self.optimizer
        # The boxes this layout holds, read from whatever boxes the saving layout wrote.
        for piece in model_pieces(model, getattr(opt, "mastered", set())):
            reader.fill(piece)
        opt.load_pieces(reader)  # and the masters, written back into the model
        load_precision_state(model, reader, ctx.rank)
        if self.scaler is not None and reader.objects.get("loss_scaler"):
            self.scaler.load_state_dict(reader.objects["loss_scaler"])
        self.batch_offset = reader.objects.get("data", {}).get("batch_offset", 0)
        for kind in ("torch", "cuda"):  # this rank's generator, or rank 0's if the world was smaller
            if kind == "cuda" and ctx.device.type != "cuda":
                continue
            name = next((n for n in (f"rng/{kind}/rank{ctx.rank}", f"rng/{kind}/rank0") if reader.has(n)), None)
            if name is not None:
                if kind == "torch":
                    torch.set_rng_state(reader.full(name))
                else:
                    torch.cuda.set_rng_state(reader.full(name), ctx.device)

    def _say_resumed(self, reader: CheckpointReader, path: Path, ctx: RuntimeContext) -> None:
        step, saved = reader.step, reader.objects.get("layout", {})
        print(f"resuming from {path} (step {step}; written by {saved.get('world_size')} processes: "
              + ", ".join(f"{k}={saved[k]}" for k in ("tp", "pp", "dp", "ep", "zero_stage") if k in saved) + ")",
              flush=True)
        planned, now = reader.objects.get("lr_schedule", {}).get("next_lr"), self.schedule.lr(step)
        if planned is not None and not math.isclose(planned, now, rel_tol=1e-9, abs_tol=1e-12):
            print(f"note: the learning-rate schedule changed: the saved run would continue at lr {planned:.3g}, "
                  f"this config gives {now:.3g} at step {step}", flush=True)
