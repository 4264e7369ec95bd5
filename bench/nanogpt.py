"""nano-train vs nanoGPT on nanoGPT's documented CPU run, same machine, same process.

    python bench/nanogpt.py [--steps 2000] [--skip-fp32]

Runs, one after the other:
  1. nanoGPT's train.py for the README's CPU command (bench/nanogpt_ref.py re-implements it: fp32),
  2. `nanotrain train --config configs/shakespeare_char.toml` as shipped: precision.recipe=auto, which
     is bf16 on a CPU with bf16 units (AMX, AVX512-BF16) and fp32 on an AVX2-only one,
  3. the same config in the other of fp32 and bf16 (--other; bf16 is skipped where it is slower
     than fp32: on AVX2 it would take half an hour),
  4. the same in nanoGPT's exact GPT-2 layout (learned positions instead of RoPE) (--gpt2),
  5. the same with the Llama block (RMSNorm, SwiGLU, RoPE) (--llama),
and prints the CPU it ran on, wall time (whole run: data, evals, checkpoints included), step time
and final val loss of each, with ratios against nanoGPT.

Targets (issues 2 and 16): with the shipped config, val loss <= 1.88 in no more wall time than
nanoGPT's, on either kind of CPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from common import ROOT, table

import numpy as np
import torch

from nanogpt_ref import prepare_char_data, run_nanogpt
from nanotrain.config import load_config
from nanotrain.data import BatchSampler
from nanotrain.runtime import RuntimeEngine
from nanotrain.runtime.machine import probe_machine


GPT2_LAYOUT = ["--model.norm=layernorm", "--model.mlp=gelu", "--model.pos_emb=learned"]
LLAMA_LAYOUT = ["--model.norm=rmsnorm", "--model.mlp=swiglu", "--model.pos_emb=rope"]


def run_ours(steps: int, recipe: str, out_dir: str, extra: list[str] = ()) -> dict:
    """One nano-train run; "recipe" is the resolved one (auto becomes bf16 or fp32 at start-up)."""
    cfg = load_config(ROOT / "configs/shakespeare_char.toml", [*extra,
        f"--train.max_steps={steps}", f"--precision.recipe={recipe}", f"--train.out_dir={out_dir}",
        f"--data.path={ROOT / 'data/tinyshakespeare.txt'}", "--logging.progress=plain",
        "--logging.log_interval=250", "--logging.tensorboard=true"])
    t0 = time.perf_counter()
    result = RuntimeEngine(cfg).run()
    wall = time.perf_counter() - t0
    val = result.val_losses[max(result.val_losses)]
    return {"wall_s": wall, "val_loss": val, "fixed_val_loss": val,
            "iter_ms": result.train_time_s / steps * 1e3, "recipe": cfg.precision.recipe}


@torch.no_grad()
def our_val_loss(model, val_bin: str, cfg) -> float:
    """nanoGPT's model on the exact val batches nano-train evaluates on (same tokens: both
    prepare tiny Shakespeare identically), so the val losses compare like for like."""
    t = cfg.train
    sampler = BatchSampler(np.memmap(val_bin, dtype=np.uint16, mode="r"), t.seq_len, t.batch_size,
                           t.seed, stream=1)  # stream 1 = runtime.components.VAL_STREAM
    model.eval()
    return float(np.mean([model(*sampler.batch(i))[1].item() for i in range(t.eval_steps)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--other", action="store_true", help="also the other of fp32 and bf16")
    ap.add_argument("--gpt2", action="store_true", help="also nanoGPT's exact block (learned positions)")
    ap.add_argument("--llama", action="store_true", help="also the Llama block")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="nanotrain-vs-nanogpt-")

    machine = probe_machine(torch.device("cpu"))
    print(f"{machine.describe()}; torch {torch.__version__}; matmul fp32 {machine.rates['fp32'] / 1e12:.3g} "
          f"TFLOP/s, bf16 {machine.rates['bf16'] / 1e12:.3g} TFLOP/s")
    ref_data = prepare_char_data(str(ROOT / "data/tinyshakespeare.txt"), f"{tmp}/nanogpt")
    ref = run_nanogpt(ref_data, max_iters=args.steps, quiet=True)
    ref["fixed_val_loss"] = our_val_loss(ref["model"], f"{ref_data}/val.bin",
                                         load_config(ROOT / "configs/shakespeare_char.toml"))
    runs = {"nanoGPT (fp32, reference)": ref}
    default = run_ours(args.steps, "auto", f"{tmp}/default")
    runs[f"nano-train, shipped config (auto: {default['recipe']})"] = default
    if args.other:
        other = "fp32" if default["recipe"] == "bf16" else "bf16"
        if other == "bf16" and machine.rates["bf16"] < machine.rates["fp32"]:
            print(f"skipped bf16: this CPU's bf16 matmul is {machine.rates['fp32'] / machine.rates['bf16']:.0f}x "
                  "slower than fp32")
        else:
            runs[f"nano-train, {other}"] = run_ours(args.steps, other, f"{tmp}/{other}")
    if args.gpt2:
        runs["nano-train, learned positions (nanoGPT's exact block)"] = run_ours(
            args.steps, "auto", f"{tmp}/gpt2", GPT2_LAYOUT)
    if args.llama:
        runs["nano-train, Llama block"] = run_ours(args.steps, "auto", f"{tmp}/llama", LLAMA_LAYOUT)

    rows = [[name, r["wall_s"], r["wall_s"] / ref["wall_s"], r["iter_ms"], r["fixed_val_loss"]]
            for name, r in runs.items()]
    print()
    print(table(rows, ["", "wall s", "wall / nanoGPT", "step ms", f"val loss @ {args.steps}"]))
    print(f"\nval loss: every model on the same 50 fixed val batches of 12 x 64 (nano-train's eval set). "
          f"nanoGPT's own estimate (20 random val batches, its eval_iters=20) said {ref['val_loss']:.4f}.")


if __name__ == "__main__":
    main()
