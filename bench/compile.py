"""train.compile (torch.compile of each block) vs eager: step time and tokens/s, on CPU.

    python bench/compile.py [--steps 300] [--warmup 50] [--rounds 3] [--precision fp32[,bf16]]
                            [--config configs/shakespeare_char.toml] [--layouts one,dp2] [--threads 0]

Every run is a RuntimeEngine run of the config (nanoGPT's shakespeare_char model by default)
with precision.recipe=fp32 (the issue's setting; bf16 on request), --warmup + --steps steps,
evaluation and checkpoints off and the monitor in minimal mode (standard mode's internals
hooks cost the same in both and add graph breaks on logging steps). Two layouts: one process
(PyTorch's default threads, or --threads; on a machine shared with other work, 1 thread avoids
OpenMP threads waiting on each other for a busy core), and dp=2, a gloo world of 2 processes
(parallel/launch.py), 1 thread each.

Step time: the engine's step_ms of every logging interval after the first one (the first
--warmup steps: allocator, caches, anything that compiles on first use), median over the
intervals; tokens/s follows from it. Runs alternate eager/compiled with the order flipped each
round (this machine's speed drifts, so drift hits both), and each ratio is the median of the
rounds' paired ratios.

Compile time, apart from the step time: RunResult.compile_s, the start-up compile of the
blocks (compiling.warm_up). This script points inductor at a fresh cache folder, so the first
compiled run of each layout and precision compiles from scratch (cold) and later runs find
the kernels on disk (warm: what a second run on the same machine pays).

Goal: compiled/eager step time < 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
from pathlib import Path

from common import ROOT, cpu_kind, table

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="nanotrain-bench-inductor-"))

import torch  # noqa: E402

from nanotrain.config import Config, load_config  # noqa: E402
from nanotrain.parallel.launch import run_world  # noqa: E402
from nanotrain.runtime import RuntimeEngine  # noqa: E402

LAYOUTS = {"one": ("1 process", 1), "dp2": ("dp=2 (gloo, 1 thread each)", 2)}


def train(cfg_dict: dict) -> dict | None:
    """One run (on every rank of a world); rank 0 returns its step time, compile time and last loss."""
    cfg = Config.from_dict(cfg_dict)
    result = RuntimeEngine(cfg).run()
    if result.rank != 0:
        return None
    rows = [json.loads(line) for line in (Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()]
    step_ms = [r["step_ms"] for r in rows if "step_ms" in r and r["step"] > cfg.logging.log_interval]
    return {"step_ms": statistics.median(step_ms), "compile_s": result.compile_s,
            "loss": result.losses[result.final_step], "threads": torch.get_num_threads()}


def config(args, out: str, precision: str, world: int, compiled: bool) -> dict:
    cfg = load_config(args.config, [
        f"--data.path={ROOT / 'data/tinyshakespeare.txt'}", f"--train.out_dir={out}",
        f"--precision.recipe={precision}", f"--parallel.dp={world}", f"--train.compile={compiled}",
        f"--train.threads={args.threads if world == 1 else 0}",
        f"--train.max_steps={args.warmup + args.steps}", f"--logging.log_interval={args.warmup}",
        "--train.eval_interval=0", "--train.eval_steps=1",
        "--checkpoint.save_final=false", "--checkpoint.interval=0", "--monitoring.mode=minimal",
        "--logging.progress=none", "--logging.tensorboard=false", "--logging.plot=false", "--logging.peak_tflops=1"])
    return dataclasses.asdict(cfg)


def run(args, precision: str, world: int, compiled: bool, out: str) -> dict:
    cfg = config(args, out, precision, world, compiled)
    return train(cfg) if world == 1 else run_world(train, world, cfg, timeout_s=1800)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/shakespeare_char.toml"))
    ap.add_argument("--steps", type=int, default=300, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=50, help="steps per run before timing (also the log interval)")
    ap.add_argument("--rounds", type=int, default=3, help="pairs of runs (eager, compiled) per layout and precision")
    ap.add_argument("--precision", default="fp32", help="comma-separated recipes: fp32, bf16")
    ap.add_argument("--layouts", default="one,dp2", help="comma-separated: one, dp2")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the one-process runs (0: default)")
    args = ap.parse_args()
    if args.steps % args.warmup:
        ap.error("--steps must be a multiple of --warmup (the timed logging intervals)")

    from torch._inductor.cpu_vec_isa import pick_vec_isa

    print(f"CPU: {cpu_kind()}; torch {torch.__version__}, ATen CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, inductor vector ISA {pick_vec_isa() or 'none'}")
    print(f"inductor cache: {os.environ['TORCHINDUCTOR_CACHE_DIR']} (empty at the start: the first compiled run "
          "of each setting is cold)")
    print(f"{args.warmup} warm-up + {args.steps} timed steps per run, {args.rounds} rounds\n")
    tmp = tempfile.mkdtemp(prefix="nanotrain-bench-compile-")
    rows, ratios = [], []
    for layout in args.layouts.split(","):
        name, world = LAYOUTS[layout]
        for precision in args.precision.split(","):
            runs: dict[bool, list[dict]] = {False: [], True: []}
            for r in range(args.rounds):
                for compiled in ((False, True) if r % 2 == 0 else (True, False)):
                    res = run(args, precision, world, compiled, f"{tmp}/{layout}_{precision}_{compiled}_{r}")
                    runs[compiled].append(res)
                    print(f"  {name}, {precision}, {'compiled' if compiled else 'eager'}, round {r}: "
                          f"{res['step_ms']:.2f} ms/step" + (f", compile {res['compile_s']:.1f} s" if compiled else ""),
                          flush=True)
            eager_ms = statistics.median(x["step_ms"] for x in runs[False])
            comp_ms = statistics.median(x["step_ms"] for x in runs[True])
            ratio = statistics.median(c["step_ms"] / e["step_ms"] for e, c in zip(runs[False], runs[True]))
            tokens = load_config(args.config).train.batch_size * load_config(args.config).train.seq_len
            cold, warm = runs[True][0]["compile_s"], [x["compile_s"] for x in runs[True][1:]]
            rows.append([name, precision, runs[False][0]["threads"], eager_ms, comp_ms, ratio,
                         tokens / eager_ms * 1e3, tokens / comp_ms * 1e3, 1 / ratio,
                         f"{cold:.1f} / {statistics.median(warm):.1f}" if warm else f"{cold:.1f} / -",
                         f"{runs[False][-1]['loss']:.4f} / {runs[True][-1]['loss']:.4f}"])
            ratios.append(ratio)
    print()
    print(table(rows, ["layout", "precision", "threads/proc", "eager ms/step", "compiled ms/step",
                       "compiled/eager step", "eager tok/s", "compiled tok/s", "tok/s ratio",
                       "compile s (cold / warm)", "last loss (eager / compiled)"]))
    print("\nstep times: median over the timed logging intervals of each run, then over rounds; ratios: median "
          "of the rounds' paired ratios. Compile time is the start-up compile, outside the step time.")


if __name__ == "__main__":
    main()
