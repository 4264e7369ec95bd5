"""RuntimeEngine: the training loop, and only the training loop.

    run():  setup -> data -> model -> optimizer -> schedule -> checkpoint/resume
            -> for step in [start, max_steps): train_step, log, eval, save
            -> final eval, final save, loss-curve plot -> teardown

What happens inside each piece (which model, which parallelism, which
optimizer sharding) belongs to the components (runtime/contracts.py); the
engine is the same for one process and for a 4D layout.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import CheckpointReader, check_compatible, merge_over_pipeline, model_pieces, whole
from ..compiling import warm_up
from ..config import Config, ConfigError
from ..inspection.counts import flops_per_token as logical_flops_per_token
from ..inspection.counts import meta_model
from ..monitoring import build_logger, mfu, plot_loss_curve
from ..monitoring.monitor import TrainingMonitor, timed
from ..monitoring.probe import Probe, check_resume
from ..parallel.pipeline.runner import PipelineRunner
from ..parallel.state import all_reduce, barrier
from ..parallel.tensor_parallel import padded_vocab
from ..precision.loss_scaling import LossScaler
from ..precision.master import Dtypes
from ..precision.policy import describe_policy, load_state as load_precision_state, state_snapshot
from ..precision.policy import state_pieces as precision_state_pieces
from .components import default_components, write_run_config
from .contracts import RuntimeComponents, RuntimeContext, TrainData
from .machine import compute_dtype, job_peak, probe_machine


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


class RuntimeEngine:
    def __init__(self, cfg: Config, components: RuntimeComponents | None = None, on_grads=None):
        """on_grads(step, model, ctx), if given, sees the synced gradients of each step before
        clipping (nanotrain verify compares them across layouts)."""
        self.cfg = cfg
        self.c = components or default_components()
        self.on_grads = on_grads
        self.started = time.perf_counter()  # reset by run()
        self.pipeline: PipelineRunner | None = None  # set in run() when parallel.pp > 1
        self.probe: Probe | None = None  # set in run(): the probe batch (monitoring/probe.py), if on
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
        batches = data.micro_batches(step)
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
        if self.pipeline is not None:
            # The schedule runs every micro-batch's forward and backward through the stages.
            record = step + 1 == ctx.cfg.logging.timeline_step
            total = self.pipeline.train_step(batches, denom, opt.backward_context, record=record)
            if record:
                self._write_timeline(ctx, len(batches))
        else:
            total = torch.zeros((), device=ctx.device)
            for i, (x, y) in enumerate(batches):
                with ctx.autocast():
                    loss = model(x, y, loss_denominator=denom)
                with opt.backward_context(last=i == len(batches) - 1):
                    loss.backward()
                total += loss.detach()
        monitor.disarm()
        monitor.add_time("compute", clock())
        clock = timed()
        opt.sync_grads()
        if self.on_grads is not None:
            self.on_grads(step + 1, model, ctx)
        if report:
            monitor.before_update(scale)
        skip = scale is not None or ctx.cfg.monitoring.nonfinite == "skip"
        stats = opt.step(lr, scale, skip_nonfinite=skip)
        monitor.add_time("optimizer", clock())
        monitor.after_step(stats["grad_norm"], stats["skipped"] and scale is None)
        if scale is not None:
            total = total / scale
            self.scaler.update(stats["skipped"], step + 1)
        if stats["skipped"]:
            return total, stats  # nothing was updated: no MoE bias step either
        # Models with state that follows the optimizer step (MoE router biases) update it here.
        if hasattr(model, "after_optimizer_step"):
            model.after_optimizer_step(ctx.parallel)
        return total, stats

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TrainData, ctx: RuntimeContext) -> float:
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # (loss sum, target count)
        if self.pipeline is not None:
            batches = list(data.val_batches())  # one micro-batch per val batch, through the stages
            loss_sum = self.pipeline.forward_only(batches)  # 0 except on the last stage
            if ctx.parallel.is_last_stage:  # the only stage that has a loss to count
                sums[0] = loss_sum.double()
                sums[1] = sum((y != -100).sum() for _, y in batches)
        else:
            for x, y in data.val_batches():
                with ctx.autocast():
                    sums[0] += model(x, y, loss_denominator=1.0).double()
                sums[1] += (y != -100).sum()
        model.train()
        all_reduce(sums, ctx.parallel.dp_group)  # each dp rank evaluated its rows
        all_reduce(sums, ctx.parallel.pp_group)  # the last stage's sums (0 on the others)
        return (sums[0] / sums[1]).item()

    # -- the run -----------------------------------------------------------------------

    def run(self) -> RunResult:
        self.started = time.perf_counter()  # metrics' elapsed_s: wall time since here (set-up included)
        ctx = self.c.bootstrap.setup(self.cfg)
        try:
            return self._run(ctx)
        finally:
            self.c.bootstrap.teardown(ctx)

    def _run(self, ctx: RuntimeContext) -> RunResult:
        cfg = ctx.cfg
        t_cfg, log_cfg = cfg.train, cfg.logging
        ckpt = self.c.checkpoint.build(ctx)
        resume_path = ckpt.resolve(cfg.checkpoint.resume) if cfg.checkpoint.resume else None  # fail fast

        data = self.c.data.build(ctx)
        self.probe = Probe.build(cfg, data, ctx.is_main)
        padding = resolve_model_config(cfg, data.vocab_size)
        if padding and ctx.is_main:
            print(padding, flush=True)
        model = self.c.model.build(ctx)
        if cfg.checkpoint.init_from:  # weights from elsewhere, then a fresh run from step 0
            from ..models.hf import init_from

            try:
                init_from(model, cfg.model, cfg.checkpoint.init_from, ctx.parallel.groups())
            except ValueError as e:
                raise ConfigError(str(e)) from None
        opt = self.c.optimizer.build(ctx, model)
        self.model, self.optimizer = model, opt  # for inspection after run() (tests, notebooks)
        self.monitor = TrainingMonitor(cfg, ctx, model, opt)
        schedule = self.c.schedule.build(ctx)
        ps = ctx.parallel
        if ps.pp > 1:
            self.pipeline = PipelineRunner.from_state(model, cfg.parallel.pp_schedule, ps, ctx.device, ctx.autocast)
            self.pipeline.dtype = Dtypes.from_config(cfg.precision).storage  # what the stages send

        start = 0
        if resume_path is not None:
            start = self._resume(resume_path, ckpt, model, opt, schedule, ctx)
        if ctx.is_main:
            write_run_config(ctx)

        # FLOPs per token of the logical model (inspection/counts.py, the count `nanotrain inspect`
        # prints: every matmul a token runs, attention's included), from a copy on the meta
        # device, so the layout does not enter. The MFU divides the whole job's FLOP/s by the whole
        # job's peak: every GPU's, or every CPU node's (runtime/machine.py: probed once, not per rank).
        logical = meta_model(cfg.model)
        n_params = sum(p.numel() for p in logical.parameters())
        flops_per_token = logical_flops_per_token(logical, cfg.model, t_cfg.seq_len)["train"]
        del logical
        machine = ctx.machine
        if machine is None or not (machine.rates or log_cfg.peak_tflops):  # a bootstrap of one's own
            machine = probe_machine(ctx.device)
        dtype = compute_dtype(cfg.precision.recipe, ctx.device, cfg.precision.fp8.gemm)
        peak, peak_source = job_peak(machine, dtype, log_cfg.peak_tflops)
        logger = build_logger(log_cfg, ctx.out_dir, t_cfg.max_steps, start, ctx.rank)
        for line in ctx.startup_lines or [machine.describe()]:
            logger.message(line)
        logger.message(f"model: {n_params / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} MFLOP/token; "
                       f"{data.tokens_per_step} tokens/step; precision {cfg.precision.recipe}; MFU peak "
                       f"{peak / 1e12:.3g} TFLOP/s ({peak_source})" + (f"; resumed at step {start}" if start else ""))
        if cfg.precision.recipe not in ("fp32", "bf16") or cfg.precision.overrides:
            policy = merge_over_pipeline(getattr(model, "gemm_policy", {}), ps.pp_group)  # each stage: its modules
            path = ctx.out_dir / "precision_policy.json"
            if ctx.is_main:
                path.write_text(json.dumps(policy, indent=1) + "\n")
            logger.message(f"precision policy: {describe_policy(policy)}; every module in {path}")

        compile_s = 0.0
        if cfg.train.compile:  # now, so that a block that cannot compile stops the run before step 1
            compile_s = self._compile_blocks(model, ctx)
            logger.message(f"torch.compile: {len(model.compiled_blocks)} blocks compiled in {compile_s:.1f} s "
                           "(at the training shapes; evaluation shapes compile when first met)")
        if self.probe is not None:  # its hash, and its figures before this run's first step
            logger.log(start, {"probe/hash": self.probe.hash, **self.probe.measure(model, self.pipeline, ctx)})
        result = RunResult(out_dir=ctx.out_dir, final_step=start, rank=ctx.rank, compile_s=compile_s)
        meter = StepMeter(start)
        val_loss = None
        model.train()
        try:
            last_report = start
            for step in range(start, t_cfg.max_steps):
                lr = schedule.lr(step)
                done = step + 1
                is_last = done == t_cfg.max_steps
                is_eval = is_last or (t_cfg.eval_interval and done % t_cfg.eval_interval == 0)
                is_save = (cfg.checkpoint.interval and done % cfg.checkpoint.interval == 0) or \
                    (is_last and cfg.checkpoint.save_final)
                is_probe = self.probe is not None and self.probe.due(done, is_last)
                report = done % log_cfg.log_interval == 0 or is_eval or is_save or is_probe
                loss, stats = self.train_step(step, model, data, opt, lr, ctx, report)
                meter.add(done, loss, stats["grad_norm"])
                result.final_step = done
                if not report:
                    continue
                losses, norms, step_s = meter.flush(done, (ps.dp_group, ps.pp_group))
                result.losses.update(losses)
                result.grad_norms.update(norms)
                self._check_finite(losses, norms)
                tokens_per_s = data.tokens_per_step / step_s
                health = self.monitor.report(losses, norms[done], done - last_report, self.targets,
                                             data.tokens_per_step)
                last_report = done
                model_metrics = model.step_metrics() if hasattr(model, "step_metrics") else {}
                model_metrics = merge_over_pipeline(model_metrics, ps.pp_group)  # each stage: its layers
                if self.scaler is not None:
                    model_metrics.update(loss_scale=self.scaler.scale, skipped_steps=self.scaler.skipped)
                logger.log(done, {"loss": losses[done], "lr": lr, "grad_norm": norms[done],
                                  "tokens_per_s": tokens_per_s, "mfu": mfu(tokens_per_s, flops_per_token, peak),
                                  "step_ms": step_s * 1e3, "tokens": done * data.tokens_per_step,
                                  "elapsed_s": time.perf_counter() - self.started, **health,
                                  **model_metrics})
                probed = self.probe.measure(model, self.pipeline, ctx) if is_probe else {}
                if is_eval:
                    val_loss = result.val_losses[done] = self.evaluate(model, data, ctx)
                    logger.log(done, {"val_loss": val_loss, "elapsed_s": time.perf_counter() - self.started,
                                      **self.monitor.val_metrics(val_loss), **probed})
                elif probed:
                    logger.log(done, probed)
                if is_save:  # every rank writes its own part
                    self._save(done, model, opt, data, schedule, ckpt, ctx, val_loss, logger)
                meter.restart()  # evals and saves stay out of the measured training time
        finally:
            logger.close()  # also on errors: a live progress bar must give the terminal back
            ckpt.wait()  # a background save must be complete (or its error raised) before we return

        if ctx.is_main and log_cfg.plot and (ctx.out_dir / "metrics.jsonl").exists():
            plot_loss_curve(ctx.out_dir / "metrics.jsonl", ctx.out_dir / "loss.png",
                            title=f"{Path(cfg.data.path).stem} · {cfg.model.n_layers}L {cfg.model.d_model}d")
        result.train_time_s = meter.train_time
        if meter.train_time:
            result.tokens_per_s = (result.final_step - start) * data.tokens_per_step / meter.train_time
        return result

    def _compile_blocks(self, model: nn.Module, ctx: RuntimeContext) -> float:
        """Run each compiled block once at the shape it gets in training (compiling.warm_up):
        a micro-batch of this rank's sequence positions (1/tp of them under sequence parallelism),
        in the dtype the embedding (or the previous pipeline stage) hands it."""
        cfg, ps = ctx.cfg, ctx.parallel
        positions = cfg.train.seq_len // (ps.tp if cfg.parallel.sequence_parallel else 1)
        shape = (cfg.train.micro_batch(ps.dp), positions, cfg.model.d_model)
        return warm_up(model, shape, Dtypes.from_config(cfg.precision).storage, ctx.device, ctx.autocast,
                       partial(state_snapshot, model))

    # -- checkpoints ---------------------------------------------------------------

    def _save(self, step, model, opt, data, schedule, ckpt, ctx: RuntimeContext, val_loss, logger) -> None:
        """Every rank passes the boxes it holds (checkpoint/pieces.py): its shards and stage of
        the model, its slices of the optimizer state, its RNG state. Each box is written once."""
        cfg, ps = ctx.cfg, ctx.parallel
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
                     "tokens_seen": step * data.tokens_per_step},
            "loss_scaler": self.scaler.state_dict() if self.scaler is not None else None,  # fp16
            "probe": self.probe.state() if self.probe is not None else None,  # its hash, checked on resume
            "layout": {"world_size": ctx.world_size, "tp": ps.tp, "pp": ps.pp, "dp": ps.dp, "ep": ps.ep,
                       "sequence_parallel": cfg.parallel.sequence_parallel, "zero_stage": cfg.optimizer.zero_stage,
                       "micro_batch_size": cfg.train.micro_batch(ps.dp)}}
        tokenizer = data.tokenizer.to_json() if ctx.is_main else None
        t = time.perf_counter()
        if cfg.checkpoint.async_save:
            path = ckpt.save_async(step, pieces, objects, tokenizer)
            logger.message(f"saving checkpoint {path} in the background")
        else:
            path = ckpt.save(step, pieces, objects, tokenizer)
            barrier()  # rank 0 has committed it
            logger.message(f"saved checkpoint {path} ({time.perf_counter() - t:.2f} s)")

    def _check_finite(self, losses: dict[int, float], norms: dict[int, float]) -> None:
        """Stop at the first step whose loss or gradient norm is not finite, naming it (an fp16
        overflow, or monitoring.nonfinite=skip, skipped that step's update instead: counted)."""
        if self.scaler is not None or self.cfg.monitoring.nonfinite == "skip":
            return
        for step in sorted(losses):
            if not (math.isfinite(losses[step]) and math.isfinite(norms[step])):
                what = "loss" if not math.isfinite(losses[step]) else "gradient norm"
                value = losses[step] if what == "loss" else norms[step]
                raise FloatingPointError(f"{what} became {value} at step {step}: lower optimizer.lr, enable "
                                         "optimizer.grad_clip, resume from an earlier checkpoint, or set "
                                         "monitoring.nonfinite=skip to skip such steps.")

    def _write_timeline(self, ctx: RuntimeContext, n_micro: int) -> None:
        """The recorded step's intervals from every stage of this pipeline: timeline.png,
        timeline.json and the bubble, measured and textbook (rank 0 writes)."""
        from ..parallel.pipeline import textbook_bubble
        from ..parallel.pipeline.timeline import RankTimeline, format_bubble, measured_bubble, plot_timeline

        ps, p = ctx.parallel, ctx.cfg.parallel
        mine = RankTimeline(ps.pp_rank, self.pipeline.t0_wall, self.pipeline.events, p.pp_virtual_stages)
        timelines = merge_over_pipeline({ps.pp_rank: mine}, ps.pp_group)
        if not ctx.is_main:
            return
        timelines = [timelines[r] for r in range(ps.pp)]
        measured, textbook = measured_bubble(timelines), textbook_bubble(ps.pp, n_micro, p.pp_virtual_stages)
        step = ctx.cfg.logging.timeline_step
        title = f"{p.pp_schedule}, pp={ps.pp}" + (f", v={p.pp_virtual_stages}" if p.pp_virtual_stages > 1 else "") \
            + f", m={n_micro}, step {step}"
        plot_timeline(timelines, ctx.out_dir / "timeline.png", title, textbook, measured)
        (ctx.out_dir / "timeline.json").write_text(json.dumps(
            {"schedule": p.pp_schedule, "pp": ps.pp, "v": p.pp_virtual_stages, "micro_batches": n_micro,
             "step": step, "bubble_measured": measured, "bubble_textbook": textbook,
             "ranks": [{"rank": t.rank, "t0_wall": t.t0_wall, "events": t.events} for t in timelines]}) + "\n")
        print(format_bubble(measured, textbook) + f"; picture in {ctx.out_dir / 'timeline.png'}", flush=True)

    def _resume(self, path: Path, ckpt, model, opt, schedule, ctx: RuntimeContext) -> int:
        reader: CheckpointReader = ckpt.load(str(path))
        check_compatible(reader.objects["config"], ctx.cfg.to_dict(), path)
        check_resume(reader.objects.get("probe"), self.probe, path, ctx.is_main)
        step = reader.step
        if step >= ctx.cfg.train.max_steps:
            raise ConfigError(f"checkpoint {path} is at step {step}, already at train.max_steps="
                              f"{ctx.cfg.train.max_steps}: raise train.max_steps to train further.")
        # The boxes this layout holds, read from whatever boxes the saving layout wrote.
        for piece in model_pieces(model, getattr(opt, "mastered", set())):
            reader.fill(piece)
        opt.load_pieces(reader)  # and the masters, written back into the model
        load_precision_state(model, reader, ctx.rank)
        if self.scaler is not None and reader.objects.get("loss_scaler"):
            self.scaler.load_state_dict(reader.objects["loss_scaler"])
        for kind in ("torch", "cuda"):  # this rank's generator, or rank 0's if the world was smaller
            if kind == "cuda" and ctx.device.type != "cuda":
                continue
            name = next((n for n in (f"rng/{kind}/rank{ctx.rank}", f"rng/{kind}/rank0") if reader.has(n)), None)
            if name is not None:
                if kind == "torch":
                    torch.set_rng_state(reader.full(name))
                else:
                    torch.cuda.set_rng_state(reader.full(name), ctx.device)
        if ctx.is_main:
            saved = reader.objects.get("layout", {})
            print(f"resuming from {path} (step {step}; written by {saved.get('world_size')} processes: "
                  + ", ".join(f"{k}={saved[k]}" for k in ("tp", "pp", "dp", "ep", "zero_stage") if k in saved) + ")",
                  flush=True)
            planned, now = reader.objects.get("lr_schedule", {}).get("next_lr"), schedule.lr(step)
            if planned is not None and not math.isclose(planned, now, rel_tol=1e-9, abs_tol=1e-12):
                print(f"note: the learning-rate schedule changed: the saved run would continue at lr {planned:.3g}, "
                      f"this config gives {now:.3g} at step {step}", flush=True)
        return step
