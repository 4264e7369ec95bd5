"""The standard components: token files from `nanotrain prepare`, TransformerModel (or
DeepSeekModel), AdamW, the plain or pipeline step (runtime/step.py), on one process or a 4D
world (tp x pp x dp, with ep inside dp) started by torchrun."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..checkpoint import CheckpointManager
from ..compiling import check_compiler
from ..config import Config, ConfigError
from ..data import BatchSampler, DataError, PretrainedTokenizer, prepare_data
from ..data.prepare import prepare_mixture
from ..data.sampler import MixtureSampler
from ..data.tokenizer import is_pretrained
from ..models.deepseek import DeepSeekModel
from ..monitoring.comm import CommMeter
from ..optim import lr_at
from ..parallel.context_parallel import zigzag_split
from ..parallel.layout import Layout
from ..parallel.collectives import barrier
from ..parallel.parallelize import parallelize
from ..parallel.state import ParallelState, destroy_parallel, init_parallel
from ..parallel.tensor_parallel import padded_vocab
from ..parallel.zero import ZeroOptimizer
from ..precision.master import Dtypes
from ..precision.policy import AUTOCAST
from .allocator import keep_freed_memory
from .contracts import RuntimeComponents, RuntimeContext
from .machine import resolve_precision
from .preflight import preflight
from .run_dir import on_rank0
from .step import ForwardBackwardProvider

VAL_STREAM = 1  # the val sampler draws from its own random stream
PROBE_STREAM = 2  # and the probe batch (monitoring/probe.py) from another


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible: use train.device=cpu or auto.")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


class LocalBootstrap:
    """Device, process groups (when launched by torchrun), threads, seed, precision, output folder."""

    def setup(self, cfg: Config) -> RuntimeContext:
        device = pick_device(cfg.train.device)
        if device.type == "cuda" and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        if cfg.train.compile:  # a missing compiler is named now, not at the first step
            check_compiler(device)
        try:
            # The run's communication meter: the groups report to it, the monitor switches it on
            # for each training step (monitoring/comm.py).
            parallel = init_parallel(Layout.from_config(cfg), device.type, CommMeter(), cfg.parallel.timeout_s)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if device.type == "cpu":
            keep_freed_memory()  # the next step's activations reuse this step's memory (runtime/allocator.py)
        # precision.recipe=auto becomes bf16 or fp32 here, from the device (runtime/machine.py).
        machine, lines = resolve_precision(cfg, device)
        torch.manual_seed(cfg.train.seed)  # dropout's RNG; data and init have their own seeds
        out_dir = Path(cfg.train.out_dir)
        if parallel.rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
        # The low-bit recipes quantise the linear layers' GEMMs themselves; the rest runs in bf16.
        recipe = cfg.precision.recipe
        autocast = None if recipe == "fp32" else AUTOCAST.get(recipe, torch.bfloat16)
        return RuntimeContext(cfg=cfg, device=device, out_dir=out_dir, autocast_dtype=autocast,
                              rank=parallel.rank, world_size=parallel.world_size, parallel=parallel,
                              machine=machine, startup_lines=lines)

    def teardown(self, ctx: RuntimeContext) -> None:
        destroy_parallel()


@dataclass
class TokenData:
    """Batches by step from prepared token files (see nanotrain.data).

    The global batch at a step is the same for every layout; data-parallel rank r
    takes rows [r*B/dp, (r+1)*B/dp) of it and splits them into micro-batches.
    Validation batches are split across dp ranks the same way.
    """

    tokenizer: Any
    vocab_size: int
    tokens_per_step: int
    train: BatchSampler | MixtureSampler
    val: BatchSampler | MixtureSampler
    micro_batch_size: int
    grad_accum_steps: int
    eval_steps: int
    device: torch.device
    dp_rank: int = 0
    dp: int = 1
    cp_rank: int = 0  # context parallel: this rank keeps its zigzag chunks of every sequence
    cp: int = 1

    def _local(self, xy: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets on the device, and under context parallelism this rank's tokens of
        each sequence (parallel/context_parallel.py's zigzag split; the loss denominator, summed
        over dp x cp, still counts the whole batch's targets)."""
        x, y = self._to_device(xy)
        if self.cp > 1:
            x, y = zigzag_split(x, self.cp, self.cp_rank), zigzag_split(y, self.cp, self.cp_rank)
        return x, y

    def _to_device(self, xy: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cpu":
            return xy
        return xy[0].to(self.device, non_blocking=True), xy[1].to(self.device, non_blocking=True)

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        mb = self.micro_batch_size
        first = self.dp_rank * mb * self.grad_accum_steps
        return [self._local(self.train.batch(step, slice(first + i * mb, first + (i + 1) * mb)))
                for i in range(self.grad_accum_steps)]

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rows = self.val.batch_size // self.dp
        for i in range(self.eval_steps):
            yield self._local(self.val.batch(i, slice(self.dp_rank * rows, (self.dp_rank + 1) * rows)))

    def probe_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n fixed val sequences, whole on every rank: a function of (seed, seq_len, val tokens) only."""
        return self._to_device(self.val.resized(n, PROBE_STREAM).batch(0))


class TokenDataProvider:
    def build(self, ctx: RuntimeContext) -> TokenData:
        cfg, t, dp = ctx.cfg, ctx.cfg.train, ctx.parallel.dp
        log = print if ctx.is_main else (lambda *a, **k: None)
        loaded = check_vocabulary(cfg)  # (prepare then need not load it again)
        # Rank 0 prepares (writes the token files) while the others wait, then they read them.
        if not ctx.is_main:
            barrier()
        if cfg.data.sources:  # a mixture: each corpus prepared on its own, one tokenizer for all
            tokenizer, parts = prepare_mixture(cfg.data, t.seq_len, log=log, tokenizer=loaded)
        else:
            prepared = prepare_data(cfg.data, t.seq_len, log=log, tokenizer=loaded)
            tokenizer, parts = prepared.tokenizer, [(prepared, 1.0)]
        if ctx.is_main:
            barrier()
        if len(parts) > 1:
            for (p, w), (path, _) in zip(parts, cfg.data.mixture()):
                seen = t.max_steps * t.batch_size * t.seq_len * w  # tokens this corpus gives the run
                log(f"data.sources: {path}: weight {w:.3f}, {p.n_train_tokens:,} train tokens, "
                    f"{seen / p.n_train_tokens:.2f} epochs in {t.max_steps} steps")

        if cfg.data.document_mask:
            eos = tokenizer.eos_id if isinstance(tokenizer, PretrainedTokenizer) else None
            if eos is None:
                raise DataError(f"data.document_mask=true: the tokenizer of data.tokenizer={cfg.data.tokenizer!r} "
                                "names no EOS token, so the documents cannot be found: name one in its "
                                "tokenizer_config.json (\"eos_token\"), or set data.document_mask=false.")
            ctx.document_eos = eos

        def sampler(split: str, stream: int = 0):
            if len(parts) == 1:
                return BatchSampler(parts[0][0].tokens(split), t.seq_len, t.batch_size, t.seed, stream)
            return MixtureSampler([p.tokens(split) for p, _ in parts], [w for _, w in parts], t.seq_len,
                                  t.batch_size, t.seed, stream)

        return TokenData(
            tokenizer=tokenizer, vocab_size=tokenizer.vocab_size,
            tokens_per_step=t.batch_size * t.seq_len,
            train=sampler("train"), val=sampler("val", VAL_STREAM),
            micro_batch_size=t.micro_batch(dp), grad_accum_steps=t.grad_accum_steps(dp),
            eval_steps=t.eval_steps, device=ctx.device, dp_rank=ctx.parallel.dp_rank, dp=dp,
            cp_rank=ctx.parallel.cp_rank, cp=ctx.parallel.cp)


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


def check_vocabulary(cfg) -> PretrainedTokenizer | None:
    """A model's own tokenizer (data.tokenizer: a tokenizer.json or a model folder) is known
    before any data is read: a model with fewer embedding rows than it has tokens stops here.
    Returns the tokenizer it loaded (None when there was nothing to check), for prepare to use."""
    if not (is_pretrained(cfg.data.tokenizer) and cfg.model.vocab_size):
        return None
    try:
        tok = PretrainedTokenizer.load(cfg.data.tokenizer)
    except DataError as e:
        raise ConfigError(str(e)) from None
    n = tok.vocab_size
    if cfg.model.vocab_size < n:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the vocabulary of "
                          f"data.tokenizer={cfg.data.tokenizer!r} ({n} tokens): its ids would index past the "
                          "embedding. Use the model that tokenizer belongs to, or model.vocab_size=0 to take it.")
    return tok


class TransformerProvider:
    """The model named by model.arch, made into this rank's model of the layout: the recipe in
    parallel/parallelize.py (built sharded, initialised from (seed, parameter names), cut to the
    pipeline stage, marked for recomputation and precision, moved, compiled)."""

    def build(self, ctx: RuntimeContext) -> nn.Module:
        # Before any tensor is made: the folders take a checkpoint, the memory holds the ranks
        # (preflight.py; rank 0 looks, every rank gets its answer or its error).
        on_rank0(lambda: preflight(ctx.cfg, ctx.device.type), ctx.parallel.world_group)
        return parallelize(ctx.cfg, ctx.parallel, ctx.device, ctx.autocast_dtype, ctx.document_eos)


class AdamWRuntime:
    def build(self, ctx: RuntimeContext, model: nn.Module) -> ZeroOptimizer:
        """The one optimizer: AdamW over the data-parallel layout, at optimizer.zero_stage (0: plain
        AdamW, one process or plain dp), with the precision policy's dtypes (parallel/zero.py)."""
        opt = ZeroOptimizer(model, ctx.cfg.optimizer.zero_stage, ctx.parallel, ctx.cfg.optimizer,
                            ctx.cfg.parallel.bucket_mb, Dtypes.from_config(ctx.cfg.precision), seed=ctx.cfg.train.seed)
        register_moe_load_balancing_hook(opt, model, ctx.parallel)
        return opt


def register_moe_load_balancing_hook(opt: ZeroOptimizer, model: nn.Module, parallel: ParallelState) -> None:
    """Auxiliary-loss-free load balancing (models/deepseek.py): after every optimizer step that
    updated, each MoE router moves its expert biases by the step's load, counted over the
    parallel groups. Only a DeepSeekModel has routed experts (a pipeline stage of one without MoE
    layers updates nothing); a step skipped for a non-finite gradient runs no hooks, so the biases
    stay too (torchtitan registers its bias update on the optimizers the same way)."""
    if isinstance(model, DeepSeekModel):
        update = model.update_expert_bias
        opt.register_step_post_hook(lambda _: update(parallel))


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
                             checkpoint=LocalCheckpoints(), forward_backward=ForwardBackwardProvider())


def write_run_config(ctx: RuntimeContext) -> None:
    (ctx.out_dir / "config.json").write_text(json.dumps(ctx.cfg.to_dict(), indent=2) + "\n")
