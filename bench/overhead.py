"""What does the RuntimeEngine cost over a hand-written PyTorch loop?

Trains the identical model (same init, same batches, same optimizer and LR
schedule) twice in one process: once through `RuntimeEngine` with its full
monitoring (console, metrics.jsonl, TensorBoard), once with the plain loop
below, which is what a nanoGPT user would write.

This machine's speed drifts by up to 30% over minutes (thermal and frequency
limits), so runs go in ABBA order (plain, engine, engine, plain, ...) and the
reported ratio is the median of the ratios of neighbouring pairs, each pair
measured within seconds of each other; the ratio of the fastest run of each
side is printed beside it.

    python bench/overhead.py [--steps 100] [--repeats 10] [--config configs/shakespeare_char.toml]

Goal: ratio (engine / plain) <= 1.03, and equal losses.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

from common import ROOT, median, table  # noqa: F401  (sets sys.path)

import torch

from nanotrain.runtime.machine import resolve_precision
from nanotrain.config import load_config
from nanotrain.data import BatchSampler, prepare_data
from nanotrain.models import build_model
from nanotrain.models.attention import Attention
from nanotrain.module_spec import mark
from nanotrain.optim import adamw_impl
from nanotrain.runtime import RuntimeEngine


def plain_loop(cfg, steps: int) -> tuple[float, list[float]]:
    """The reference: a nanoGPT-style loop written out by hand. Returns (seconds per step, losses)."""
    t, o, s = cfg.train, cfg.optimizer, cfg.schedule
    torch.manual_seed(t.seed)
    data = prepare_data(cfg.data, t.seq_len, log=lambda *_: None)
    sampler = BatchSampler(data.tokens("train"), t.seq_len, t.batch_size, t.seed)
    cfg.model.vocab_size, cfg.model.max_seq_len = data.vocab_size, t.seq_len
    model = build_model(cfg.model)
    model.init_weights(t.seed)
    resolve_precision(cfg, torch.device("cpu"))  # recipe=auto -> bf16 or fp32, as the engine's bootstrap does
    bf16 = cfg.precision.recipe == "bf16"
    for m in model.modules():  # the same precision policy as the engine: attention core in fp32 on CPU
        if isinstance(m, Attention) and bf16:
            mark(m, core_dtype=torch.float32)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            **adamw_impl(o, torch.device("cpu")))  # the engine's implementation: equal losses

    def get_lr(it):
        if it < s.warmup_steps:
            return o.lr * (it + 1) / (s.warmup_steps + 1)
        if it >= s.decay_steps:
            return s.min_lr
        ratio = (it - s.warmup_steps) / (s.decay_steps - s.warmup_steps)
        return s.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (o.lr - s.min_lr)

    losses = []
    t0 = time.perf_counter()
    for it in range(steps):
        for g in opt.param_groups:
            g["lr"] = get_lr(it)
        x, y = sampler.batch(it)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # nanoGPT logs every step; the engine syncs once per log interval
    return (time.perf_counter() - t0) / steps, losses


def engine_run(cfg, steps: int) -> tuple[float, list[float]]:
    result = RuntimeEngine(cfg).run()
    return result.train_time_s / steps, [result.losses[i + 1] for i in range(steps)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/shakespeare_char.toml"))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=10, help="pairs of runs (one plain, one engine each)")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="nanotrain-overhead-")

    def config(i):
        return load_config(args.config, [
            f"--train.max_steps={args.steps}", "--train.eval_interval=0", "--train.eval_steps=1",
            "--checkpoint.save_final=false", "--checkpoint.interval=0", "--logging.plot=false",
            f"--train.out_dir={tmp}/engine{i}", f"--data.path={ROOT / 'data/tinyshakespeare.txt'}",
            "--logging.progress=plain", "--logging.log_interval=50",
            f"--schedule.decay_steps={max(args.steps, 200)}"])

    engine_t, plain_t = [], []
    for i in range(args.repeats):
        order = ("plain", "engine") if i % 2 == 0 else ("engine", "plain")
        for which in order:
            if which == "plain":
                dt, plain_losses = plain_loop(config(i), args.steps)
                plain_t.append(dt)
            else:
                dt, engine_losses = engine_run(config(i), args.steps)
                engine_t.append(dt)

    e, p = median(engine_t), median(plain_t)
    ratio = median([a / b for a, b in zip(engine_t, plain_t)])
    same = engine_losses == plain_losses
    max_diff = max(abs(a - b) for a, b in zip(engine_losses, plain_losses))
    print()
    print(table([["plain PyTorch loop", p * 1e3, plain_losses[-1]],
                 ["nano-train RuntimeEngine", e * 1e3, engine_losses[-1]]],
                ["", "step ms (median)", f"loss @ step {args.steps}"]))
    print(f"\nratio engine/plain = {ratio:.3f} (median of paired ratios; goal <= 1.03), "
          f"{min(engine_t) / min(plain_t):.3f} (fastest run of each)")
    print(f"per-repeat ms: engine "
          f"{[round(x * 1e3, 2) for x in engine_t]}, plain {[round(x * 1e3, 2) for x in plain_t]}")
    print(f"losses identical at every step: {same} (max |diff| {max_diff:.2e})")


if __name__ == "__main__":
    main()
