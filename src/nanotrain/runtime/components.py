"""The standard components: one process, token files from `nanotrain prepare`, TransformerModel, AdamW."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..checkpoint import CheckpointManager
from ..config import Config
from ..data import BatchSampler, prepare_data
from ..models import build_model
from ..models.attention import Attention
from ..optim import build_adamw, lr_at
from .contracts import RuntimeComponents, RuntimeContext

VAL_STREAM = 1  # the val sampler draws from its own random stream


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible: use train.device=cpu or auto.")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


class LocalBootstrap:
    """One process: device, threads, seed, precision, output folder."""

    def setup(self, cfg: Config) -> RuntimeContext:
        device = pick_device(cfg.train.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)  # dropout's RNG; data and init have their own seeds
        out_dir = Path(cfg.train.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        autocast = {"fp32": None, "bf16": torch.bfloat16}[cfg.precision.recipe]
        return RuntimeContext(cfg=cfg, device=device, out_dir=out_dir, autocast_dtype=autocast)

    def teardown(self, ctx: RuntimeContext) -> None:
        pass


@dataclass
class TokenData:
    """Batches by step from prepared token files (see nanotrain.data)."""

    tokenizer: Any
    vocab_size: int
    tokens_per_step: int
    train: BatchSampler
    val: BatchSampler
    micro_batch_size: int
    grad_accum_steps: int
    eval_steps: int
    device: torch.device

    def _to_device(self, xy: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cpu":
            return xy
        return xy[0].to(self.device, non_blocking=True), xy[1].to(self.device, non_blocking=True)

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        mb = self.micro_batch_size
        return [self._to_device(self.train.batch(step, slice(i * mb, (i + 1) * mb)))
                for i in range(self.grad_accum_steps)]

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(self.eval_steps):
            yield self._to_device(self.val.batch(i))


class TokenDataProvider:
    def build(self, ctx: RuntimeContext) -> TokenData:
        cfg, t = ctx.cfg, ctx.cfg.train
        log = print if ctx.is_main else (lambda *a, **k: None)
        prepared = prepare_data(cfg.data, t.seq_len, log=log)
        return TokenData(
            tokenizer=prepared.tokenizer, vocab_size=prepared.vocab_size,
            tokens_per_step=t.global_batch_size * t.seq_len,
            train=BatchSampler(prepared.tokens("train"), t.seq_len, t.global_batch_size, t.seed),
            val=BatchSampler(prepared.tokens("val"), t.seq_len, t.micro_batch_size, t.seed, stream=VAL_STREAM),
            micro_batch_size=t.micro_batch_size, grad_accum_steps=t.grad_accum_steps,
            eval_steps=t.eval_steps, device=ctx.device)


def attention_core_dtype(ctx: RuntimeContext) -> torch.dtype | None:
    """The precision policy's dtype for the attention core (None: follow autocast)."""
    choice = ctx.cfg.precision.attention
    if ctx.autocast_dtype is None or choice == "autocast":
        return None
    if choice == "auto" and ctx.device.type == "cuda":
        return None
    return torch.float32


class TransformerProvider:
    """Build the model named by model.arch, initialise it from (seed, parameter names), move it."""

    def build(self, ctx: RuntimeContext) -> nn.Module:
        model = build_model(ctx.cfg.model)
        model.init_weights(ctx.cfg.train.seed)
        core = attention_core_dtype(ctx)
        for module in model.modules():
            if isinstance(module, Attention):
                module.core_dtype = core
        return model.to(ctx.device)


class AdamWState:
    """torch AdamW plus global-norm clipping: the single-process optimizer runtime."""

    def __init__(self, model: nn.Module, ctx: RuntimeContext):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = build_adamw(model, ctx.cfg.optimizer, ctx.device)
        self.grad_clip = ctx.cfg.optimizer.grad_clip

    def step(self, lr: float) -> dict[str, float | torch.Tensor]:
        # clip_grad_norm_ returns the norm *before* clipping; with max_norm=inf it only measures.
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip or float("inf"))
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"grad_norm": norm}

    def state_dict(self) -> dict[str, Any]:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state)


class AdamWRuntime:
    def build(self, ctx: RuntimeContext, model: nn.Module) -> AdamWState:
        return AdamWState(model, ctx)


@dataclass
class LRScheduleFn:
    fn: Any

    def lr(self, step: int) -> float:
        return self.fn(step)


class WarmupDecaySchedule:
    def build(self, ctx: RuntimeContext) -> LRScheduleFn:
        c = ctx.cfg
        return LRScheduleFn(partial(lr_at, opt=c.optimizer, sched=c.schedule, max_steps=c.train.max_steps))


class LocalCheckpoints:
    def build(self, ctx: RuntimeContext) -> CheckpointManager:
        c = ctx.cfg.checkpoint
        return CheckpointManager(c.dir or ctx.out_dir / "checkpoints", c.keep_last)


def default_components() -> RuntimeComponents:
    return RuntimeComponents(bootstrap=LocalBootstrap(), data=TokenDataProvider(), model=TransformerProvider(),
                             optimizer=AdamWRuntime(), schedule=WarmupDecaySchedule(),
                             checkpoint=LocalCheckpoints())


def write_run_config(ctx: RuntimeContext) -> None:
    (ctx.out_dir / "config.json").write_text(json.dumps(ctx.cfg.to_dict(), indent=2) + "\n")
