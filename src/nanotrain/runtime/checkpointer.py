"""Checkpointer: what a run saves, and how it comes back (torchtitan's components/checkpoint.py).

The engine's loop only calls it:

    save(step, val_loss, batch_offset)   at checkpoint.interval, the last step, a preemption
    load(plan)        -> (step, offset)  resume: the first of the plan's checkpoints that every rank
                                         reads without error; a damaged one is reported and the next
                                         one tried, unless the user named it (plan.explicit)
    reload_newest(bad_step) -> (step, offset)   monitoring.nonfinite=rollback (divergence.py)

It gathers the state of the run's pieces, each rank the part it holds (checkpoint/pieces.py's boxes
of logical tensors), and restores each in place:

    tensors   model/...            the model's shards (its master copy where the optimizer keeps one)
              optim/...            the optimizer state this rank holds (ZeRO slices)
              precision/...        amax histories, stochastic-rounding generators
              rng/torch|cuda/rank{r}
    objects   config, val_loss, lr_schedule, loss_scaler (fp16), probe (its hash), layout (str(Layout)),
              data: the position; the batch at step s is a function of (seed, s + batch_offset)

The folder (who writes which box, the temporary folder, `latest`, async) is checkpoint/manager.py's.
A fresh run may start from other weights instead (checkpoint.init_from: load_initial_weights).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import (CheckpointError, CheckpointManager, CheckpointReader, Piece, check_compatible, model_pieces,
                          whole)
from ..config import ConfigError
from ..models.hf import init_from
from ..monitoring.probe import Probe, check_resume
from ..parallel import collectives
from ..parallel.layout import Layout
from ..parallel.collectives import barrier
from ..precision.loss_scaling import LossScaler
from ..precision.state import load_state as load_precision_state
from ..precision.state import state_pieces as precision_state_pieces
from .contracts import LRSchedule, OptimizerState, RuntimeContext, TrainData
from .divergence import TrainingError, hint
from .run_dir import StartPlan


def saved_layout(objects: dict) -> str:
    """The layout a checkpoint was written by, as Layout's text. Checkpoints store str(Layout); those
    written before did a dict of its sizes ({"tp": 2, "dp": 2, "zero_stage": 2, ...}), read here too."""
    saved = objects.get("layout")
    if not isinstance(saved, dict):
        return saved or "?"
    return str(Layout(tp=saved.get("tp", 1), cp=saved.get("cp", 1), pp=saved.get("pp", 1), dp=saved.get("dp", 1),
                      ep=saved.get("ep", 1), etp=saved.get("etp", 1), sp=saved.get("sequence_parallel", False),
                      zero=saved.get("zero_stage", 0), micro=saved.get("micro_batch_size", 0)))


def load_initial_weights(model: nn.Module, ctx: RuntimeContext) -> None:
    """checkpoint.init_from: a fresh run starts from these weights (a Hugging Face folder or another
    run's checkpoint: models/hf.py), read before the optimizer copies the model's."""
    try:
        init_from(model, ctx.cfg.model, ctx.cfg.checkpoint.init_from, ctx.parallel.groups())
    except ValueError as e:
        raise ConfigError(str(e)) from None


@dataclass
class Checkpointer:
    """The run's pieces a checkpoint holds, and the folder it goes to."""

    folder: CheckpointManager
    ctx: RuntimeContext
    model: nn.Module
    optimizer: OptimizerState
    schedule: LRSchedule
    data: TrainData
    scaler: LossScaler | None = None  # fp16
    probe: Probe | None = None

    # -- saving ---------------------------------------------------------------------

    def save(self, step: int, val_loss: float | None, batch_offset: int, logger, background: bool = True) -> None:
        """Every rank passes the boxes it holds; each box is written once. background=False: written
        before this returns, even with checkpoint.async_save."""
        ctx = self.ctx
        pieces, objects = self._pieces(), self._objects(step, val_loss, batch_offset)
        tokenizer = self.data.tokenizer.to_json() if ctx.is_main else None
        t = time.perf_counter()
        if ctx.cfg.checkpoint.async_save and background:
            path = self.folder.save_async(step, pieces, objects, tokenizer)
            logger.message(f"saving checkpoint {path} in the background")
        else:
            path = self.folder.save(step, pieces, objects, tokenizer)
            barrier()  # rank 0 has committed it
            logger.message(f"saved checkpoint {path} ({time.perf_counter() - t:.2f} s)")

    def _pieces(self) -> list[Piece]:
        """This rank's boxes: its shards and stage of the model, its slices of the optimizer state,
        its precision state and its RNG state."""
        ctx = self.ctx
        # Where the optimizer keeps a master copy (precision.master_owner=optimizer), it saves the master.
        pieces = model_pieces(self.model, self.optimizer.mastered) + self.optimizer.pieces()
        pieces.append(whole(f"rng/torch/rank{ctx.rank}", torch.get_rng_state()))
        pieces += precision_state_pieces(self.model, ctx.rank)  # amax histories, stochastic-rounding generators
        if ctx.device.type == "cuda":
            pieces.append(whole(f"rng/cuda/rank{ctx.rank}", torch.cuda.get_rng_state(ctx.device)))
        return pieces

    def _objects(self, step: int, val_loss: float | None, batch_offset: int) -> dict:
        cfg, ps = self.ctx.cfg, self.ctx.parallel
        # The layout as the run resolved it: micro-batch 0 (batch_size / dp) written as the size it was.
        layout = dataclasses.replace(ps.layout, micro=cfg.train.micro_batch(ps.dp))
        return {
            "config": cfg.to_dict(), "val_loss": val_loss,
            "lr_schedule": {"step": step, "next_lr": self.schedule.lr(step)},  # the lr the continuation starts with
            # The data position: the batch at step s is a function of (seed, s) (data/sampler.py).
            "data": {"step": step, "samples_seen": step * cfg.train.batch_size,
                     "tokens_seen": step * self.data.tokens_per_step, "batch_offset": batch_offset},
            "loss_scaler": self.scaler.state_dict() if self.scaler is not None else None,  # fp16
            "probe": self.probe.state() if self.probe is not None else None,  # its hash, checked on resume
            "layout": str(layout)}

    def wait(self) -> None:
        """A background save complete (or its error raised)."""
        self.folder.wait()

    # -- loading --------------------------------------------------------------------

    def load(self, plan: StartPlan) -> tuple[int, int]:
        """Load the first of the plan's checkpoints that every rank reads without error; returns the
        step to continue from and the batch offset saved with it. A damaged one (a checksum that
        does not match, a missing or truncated shard) is reported and the next tried, unless the
        user named it (plan.explicit)."""
        ctx, problems = self.ctx, []
        for i, path in enumerate(plan.candidates):
            reader, problem = self._try(path, plan.explicit)
            if reader is not None and reader.step >= ctx.cfg.train.max_steps:  # resume=auto: the run is complete
                if ctx.is_main:
                    print(f"the run in {ctx.out_dir} is complete: its newest checkpoint is at step {reader.step}, "
                          f"train.max_steps={ctx.cfg.train.max_steps}. Nothing to train: raise train.max_steps to "
                          "continue it, or pass --train.overwrite=true to start over.", flush=True)
                return reader.step, 0
            bad = self._verdicts(problem)
            if not bad:
                if ctx.is_main:
                    self._say_resumed(reader, path)
                return reader.step, reader.objects.get("data", {}).get("batch_offset", 0)
            problems += bad
            if plan.explicit:
                raise CheckpointError(" ".join(bad))
            if ctx.is_main:
                following = plan.candidates[i + 1] if i + 1 < len(plan.candidates) else None
                print(f"warning: checkpoint {path} is damaged: {' '.join(bad)}. "
                      + (f"Falling back to {following}." if following else ""), flush=True)
        raise CheckpointError(f"none of the {len(plan.candidates)} checkpoint(s) in {self.folder.dir} can be read "
                              f"({' '.join(problems)}): restore them, or start a fresh run with --train.overwrite=true "
                              "(which moves them aside).")

    def reload_newest(self, bad_step: int) -> tuple[int, int]:
        """A roll-back: the newest complete checkpoint, loaded as load() does; (step, batch offset)."""
        self.folder.wait()
        found = self.folder.complete()
        if not found:
            raise TrainingError(f"the gradient norm was not finite at step {bad_step} and there is no checkpoint to "
                                "roll back to (monitoring.nonfinite=rollback): set checkpoint.interval so that one is "
                                f"saved before this step, or {hint(self.ctx.cfg)}.")
        return self.load(StartPlan(found))

    def _try(self, path: Path, explicit: bool) -> tuple[CheckpointReader | None, str | None]:
        """(the reader, None) when this rank loaded the checkpoint, (reader or None, why) when not. A
        checkpoint this run must not continue from (another config or data) raises, the same on every rank."""
        try:
            reader = self.folder.load(str(path))
        except CheckpointError as e:
            return None, str(e)
        self._check_resumable(reader, path, explicit)
        if reader.step >= self.ctx.cfg.train.max_steps:  # nothing to load
            return reader, None
        try:
            self._restore(reader)
        except CheckpointError as e:
            return reader, str(e)
        return reader, None

    def _verdicts(self, problem: str | None) -> list[str]:
        """Every rank's problem with the checkpoint: all load it, or all go on to the next."""
        ctx, found = self.ctx, [problem]
        if ctx.world_size > 1:
            found = [None] * ctx.world_size
            collectives.all_gather_object(found, problem, ctx.parallel.world_group)
        return [f"rank {r}: {p}" if ctx.world_size > 1 else p for r, p in enumerate(found) if p]

    def _check_resumable(self, reader: CheckpointReader, path: Path, explicit: bool) -> None:
        cfg = self.ctx.cfg
        check_compatible(reader.objects["config"], cfg.to_dict(), path)
        check_resume(reader.objects.get("probe"), self.probe, path, self.ctx.is_main)
        if explicit and reader.step >= cfg.train.max_steps:
            raise ConfigError(f"checkpoint {path} is at step {reader.step}, already at train.max_steps="
                              f"{cfg.train.max_steps}: raise train.max_steps to train further.")

    def _restore(self, reader: CheckpointReader) -> None:
        """Model, optimizer, precision and loss-scaler state, RNG."""
        ctx, model = self.ctx, self.model
        # The boxes this layout holds, read from whatever boxes the saving layout wrote.
        for piece in model_pieces(model, self.optimizer.mastered):
            reader.fill(piece)
        self.optimizer.load_pieces(reader)  # and the masters, written back into the model
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

    def _say_resumed(self, reader: CheckpointReader, path: Path) -> None:
        step = reader.step
        print(f"resuming from {path} (step {step}; written by {reader.meta.get('world_size')} processes: "
              f"{saved_layout(reader.objects)})", flush=True)
        planned, now = reader.objects.get("lr_schedule", {}).get("next_lr"), self.schedule.lr(step)
        if planned is not None and not math.isclose(planned, now, rel_tol=1e-9, abs_tol=1e-12):
            print(f"note: the learning-rate schedule changed: the saved run would continue at lr {planned:.3g}, "
                  f"this config gives {now:.3g} at step {step}", flush=True)
