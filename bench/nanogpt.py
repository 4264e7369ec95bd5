"""nano-train vs nanoGPT on nanoGPT's documented CPU run, same machine, a fresh process each.

    python bench/nanogpt.py [--steps 2000] [--rounds 2] [--other] [--gpt2] [--llama]

Runs, one after the other:
  1. nanoGPT's train.py for the README's CPU command (bench/nanogpt_ref.py re-implements it: fp32),
     --steps iterations (2000, its documented run),
  2. `nanotrain train --config configs/shakespeare_char.toml` as shipped: precision.recipe=auto, which
     is bf16 on a CPU with bf16 units (AMX, AVX512-BF16) and fp32 on an AVX2-only one, for the
     config's own train.max_steps (1500: RoPE reaches nanoGPT's val loss in fewer steps),
  3. the same config for nanoGPT's --steps (cosine to the same step), for a like-for-like step time,
  4. the same config in the other of fp32 and bf16 (--other; bf16 is skipped where it is slower
     than fp32: on AVX2 it would take half an hour),
  5. the same in nanoGPT's exact GPT-2 layout (learned positions instead of RoPE) (--gpt2),
  6. the same with the Llama block (RMSNorm, SwiGLU, RoPE) (--llama),
(3 to 6 at nanoGPT's --steps) and prints the CPU it ran on, wall time (whole run: data, evals,
checkpoints included), step time and final val loss of each, with ratios against nanoGPT.

Targets (issues 2 and 16): with the shipped config, val loss <= 1.88 in no more wall time than
nanoGPT's, on either kind of CPU. The table gives both readings: the whole run's wall time against
nanoGPT's, and the time at which the run's own evaluation first reads <= 1.88.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, table

import numpy as np
import torch

from nanogpt_ref import prepare_char_data, run_nanogpt
from nanotrain.config import load_config
from nanotrain.data import BatchSampler, prepare_data
from nanotrain.runtime import RuntimeEngine
from nanotrain.runtime.machine import probe_machine


GPT2_LAYOUT = ["--model.norm=layernorm", "--model.mlp=gelu", "--model.pos_emb=learned"]
LLAMA_LAYOUT = ["--model.norm=rmsnorm", "--model.mlp=swiglu", "--model.pos_emb=rope"]


FIXED_VAL_BATCHES = 50  # the val loss every model is scored on, after its timed run
TARGET = 1.88  # nanoGPT's documented val loss for this run


def time_to_target(curve: list[tuple[int, float, float]]) -> float:
    """Seconds into the run of its first evaluation at or below TARGET (its own estimate); inf if none."""
    return next((t for _, t, val in curve if val <= TARGET), float("inf"))


def run_ours(steps: int, recipe: str, out_dir: str, extra: list[str] = ()) -> dict:
    """One nano-train run of `steps` (0: the config's own length), the cosine ending with the run;
    "recipe" is the resolved one (auto becomes bf16 or fp32 at start-up)."""
    length = [f"--train.max_steps={steps}", f"--schedule.decay_steps={steps}"] if steps else []
    cfg = load_config(ROOT / "configs/shakespeare_char.toml", [*extra, *length,
        f"--precision.recipe={recipe}", f"--train.out_dir={out_dir}",
        f"--data.path={ROOT / 'data/tinyshakespeare.txt'}", "--logging.progress=plain",
        "--logging.log_interval=250", "--logging.tensorboard=true"])
    t0 = time.perf_counter()
    engine = RuntimeEngine(cfg)
    result = engine.run()
    wall = time.perf_counter() - t0
    data = prepare_data(cfg.data, cfg.train.seq_len, log=lambda *a, **k: None).dir  # up to date: no work
    rows = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["elapsed_s"], r["val_loss"]) for r in rows if "val_loss" in r]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision.recipe != "fp32"):
        fixed = fixed_val_loss(lambda x, y: engine.model(x, y), f"{data}/val.bin", cfg)
    return {"wall_s": wall, "val_loss": result.val_losses[max(result.val_losses)], "fixed_val_loss": fixed,
            "to_target_s": time_to_target(curve), "val_curve": curve,
            "iter_ms": result.train_time_s / cfg.train.max_steps * 1e3, "recipe": cfg.precision.recipe,
            "steps": cfg.train.max_steps}


@torch.no_grad()
def fixed_val_loss(loss_of, val_bin: str, cfg, batches: int = FIXED_VAL_BATCHES) -> float:
    """A model's mean loss on the same fixed val batches for every model (the stream nano-train
    draws its eval batches from; both prepare tiny Shakespeare identically), outside the timed runs:
    each run evaluates during training as its config says (nanoGPT: 20 val and 20 train batches per
    eval; nano-train: train.eval_steps val batches), and the final figures compare like for like."""
    t = cfg.train
    sampler = BatchSampler(np.memmap(val_bin, dtype=np.uint16, mode="r"), t.seq_len, t.batch_size,
                           t.seed, stream=1)  # stream 1 = runtime.components.VAL_STREAM
    return float(np.mean([loss_of(*sampler.batch(i)).item() for i in range(batches)]))


def run_one(who: str, steps: int, recipe: str, extra: list[str], tmp: str) -> dict:
    """One run, in this process (main() starts a process per run)."""
    if who == "ours":
        return run_ours(steps, recipe, f"{tmp}/ours", extra)
    ref_data = prepare_char_data(str(ROOT / "data/tinyshakespeare.txt"), f"{tmp}/nanogpt")
    r = run_nanogpt(ref_data, max_iters=steps, quiet=True)
    model = r.pop("model").eval()
    r["to_target_s"] = time_to_target(r["val_curve"])
    r["steps"] = steps
    r["fixed_val_loss"] = fixed_val_loss(lambda x, y: model(x, y)[1], f"{ref_data}/val.bin",
                                         load_config(ROOT / "configs/shakespeare_char.toml"))
    return r


def in_process(who: str, steps: int, recipe: str = "auto", extra: list[str] = ()) -> dict:
    """One run in a fresh Python process, as a user starts it: each pays its own imports (torch.optim
    imports torch._dynamo on its first optimizer, ~1.3 s) and keeps its own process-wide settings
    (nano-train's malloc tuning, runtime/allocator.py), so neither run changes the other's time."""
    with tempfile.TemporaryDirectory(prefix="nanotrain-vs-nanogpt-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--one", who, "--steps", str(steps), "--recipe", recipe,
               "--result", str(out), "--tmp", tmp, *(f"--extra={e}" for e in extra)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2000, help="nanoGPT's iterations (and rows 3-6's)")
    ap.add_argument("--other", action="store_true", help="also the other of fp32 and bf16")
    ap.add_argument("--gpt2", action="store_true", help="also nanoGPT's exact block (learned positions)")
    ap.add_argument("--llama", action="store_true", help="also the Llama block")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run nanoGPT and the shipped config this many times each, in ABBA order (this "
                         "machine's speed drifts by several %% over minutes); the table gives the medians")
    ap.add_argument("--one", choices=["ref", "ours"], help=argparse.SUPPRESS)  # a single run (in_process)
    ap.add_argument("--recipe", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--extra", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        result = run_one(args.one, args.steps, args.recipe, args.extra, args.tmp)
        Path(args.result).write_text(json.dumps(result))
        return

    machine = probe_machine(torch.device("cpu"))
    print(f"{machine.describe()}; torch {torch.__version__}; matmul fp32 {machine.rates['fp32'] / 1e12:.3g} "
          f"TFLOP/s, bf16 {machine.rates['bf16'] / 1e12:.3g} TFLOP/s", flush=True)
    pairs = {"ref": [], "ours": []}
    for i in range(args.rounds):  # ABBA: ref, ours, ours, ref, ...
        for who in (("ref", "ours") if i % 2 == 0 else ("ours", "ref")):
            pairs[who].append(in_process(who, args.steps if who == "ref" else 0))
            print(f"round {i + 1}: {who} {pairs[who][-1]['wall_s']:.1f} s", flush=True)

    def median_run(rs: list[dict]) -> dict:
        return {k: statistics.median(r[k] for r in rs) if isinstance(rs[0][k], float) else rs[0][k] for k in rs[0]}

    ref, default = median_run(pairs["ref"]), median_run(pairs["ours"])
    if args.rounds > 1:
        ratios = [o["wall_s"] / r["wall_s"] for r, o in zip(pairs["ref"], pairs["ours"])]
        print(f"wall / nanoGPT per round: {', '.join(f'{x:.3f}' for x in ratios)}")
    runs = {"nanoGPT (fp32, reference)": ref, f"nano-train, shipped config (auto: {default['recipe']})": default}
    if default["steps"] != args.steps:
        runs[f"nano-train, shipped config for nanoGPT's {args.steps} steps"] = in_process("ours", args.steps)
    if args.other:
        other = "fp32" if default["recipe"] == "bf16" else "bf16"
        if other == "bf16" and machine.rates["bf16"] < machine.rates["fp32"]:
            print(f"skipped bf16: this CPU's bf16 matmul is {machine.rates['fp32'] / machine.rates['bf16']:.0f}x "
                  "slower than fp32")
        else:
            runs[f"nano-train, {other}"] = in_process("ours", args.steps, other)
    if args.gpt2:
        runs["nano-train, learned positions (nanoGPT's exact block)"] = in_process("ours", args.steps, "auto",
                                                                                     GPT2_LAYOUT)
    if args.llama:
        runs["nano-train, Llama block"] = in_process("ours", args.steps, "auto", LLAMA_LAYOUT)

    rows = [[name, r["steps"], r["wall_s"], r["wall_s"] / ref["wall_s"], r["iter_ms"], r["fixed_val_loss"],
             r["to_target_s"], r["to_target_s"] / ref["wall_s"]] for name, r in runs.items()]
    print()
    print(table(rows, ["", "steps", "wall s", "wall / nanoGPT", "step ms", "val loss at the end",
                       f"s to val <= {TARGET}", "that / nanoGPT's wall"]))
    print(f"\nval loss: every model on the same {FIXED_VAL_BATCHES} fixed val batches of 12 x 64, after its run. "
          f"nanoGPT's own estimate (20 random val batches, its eval_iters=20) said {ref['val_loss']:.4f}; "
          f"nano-train's ({load_config(ROOT / 'configs/shakespeare_char.toml').train.eval_steps} fixed batches) "
          f"{default['val_loss']:.4f}. s to val <= {TARGET}: the first of the run's own evaluations (every "
          f"250 steps) at or below it (inf: none).")


if __name__ == "__main__":
    main()
