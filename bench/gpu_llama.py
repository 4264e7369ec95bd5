"""A 1B-parameter Llama-shaped model in bf16 on one CUDA GPU, torch.compile off and on: MFU against the
datasheet peak, tokens/s and peak memory. Part of bench/gpu_check.sh; needs a GPU with ~40 GB.

    python bench/gpu_llama.py [--steps 30] [--batch 8] [--out figures.json]

The model: 16 layers, d_model 2048, 16 heads (head dim 128), SwiGLU (d_ff 5504), RMSNorm, RoPE, a
32,000-token vocabulary (untied), context 2048: 0.95B parameters (Llama-2's block at TinyLlama-like
depth). It trains on the character-level Shakespeare tokens (they are < 65: the other rows of the
vocabulary are never targets; the FLOPs are the model's all the same). Each run is the RuntimeEngine
with the default monitoring; tokens/s and MFU are the median of the logged steps after the first
log interval (which holds start-up and compilation).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from common import ROOT

import torch

from nanotrain.config import load_config
from nanotrain.runtime import RuntimeEngine

LLAMA_1B = ["--model.d_model=2048", "--model.n_layers=16", "--model.n_heads=16", "--model.norm=rmsnorm",
            "--model.mlp=swiglu", "--model.pos_emb=rope", "--model.tie_embeddings=false", "--model.vocab_size=32000",
            "--train.seq_len=2048"]


# --smoke: the same script on a CPU with a 2-layer, 128-wide model, to check it before a GPU is lent
SMOKE = ["--model.d_model=128", "--model.n_layers=2", "--model.n_heads=2", "--train.seq_len=128",
         "--train.device=cpu", "--precision.recipe=fp32"]


def run(steps: int, batch: int, compile_: bool, out_dir: str, smoke: bool = False) -> dict:
    log = 5
    cfg = load_config(None, [*LLAMA_1B, f"--data.path={ROOT / 'data/tinyshakespeare.txt'}",
                             f"--train.out_dir={out_dir}", "--train.device=cuda", "--precision.recipe=bf16",
                             f"--train.batch_size={batch}", f"--train.max_steps={steps}", "--train.eval_interval=0",
                             "--train.eval_steps=1", "--checkpoint.save_final=false", f"--logging.log_interval={log}",
                             "--logging.progress=plain", "--logging.tensorboard=false", "--logging.plot=false",
                             "--schedule.warmup_steps=5", "--monitoring.probe_batch=0",
                             f"--train.compile={'true' if compile_ else 'false'}", *(SMOKE if smoke else [])])
    cuda = cfg.train.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = RuntimeEngine(cfg).run()
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "mfu" in r and r["step"] > log]  # the first interval holds start-up, compile
    return {"compile": compile_, "steps": steps, "batch": batch, "seq_len": 2048,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "mfu": statistics.median(r["mfu"] for r in timed),
            "step_ms": statistics.median(r["step_ms"] for r in timed),
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan"), "wall_s": wall,
            "final_loss": result.losses[max(result.losses)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8, help="sequences of 2048 tokens per step")
    ap.add_argument("--out", help="write the figures here as JSON")
    ap.add_argument("--smoke", action="store_true", help="a 2-layer model on the CPU: checks this script, not speed")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("bench/gpu_llama.py needs a CUDA GPU (--smoke runs a tiny model on the CPU)")
    device = torch.cuda.get_device_name() if not args.smoke else "cpu (smoke test)"
    print(f"{device}, torch {torch.__version__}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="nanotrain-llama1b-") as tmp:
        for compile_ in (False, True):
            rows.append(run(args.steps, args.batch, compile_, f"{tmp}/{'compiled' if compile_ else 'eager'}",
                            args.smoke))
            r = rows[-1]
            print(f"compile={r['compile']}: {r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.1%}, step "
                  f"{r['step_ms']:.0f} ms, peak memory {r['peak_memory_gb']:.1f} GB, wall {r['wall_s']:.0f} s, "
                  f"loss {r['final_loss']:.3f}", flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print(f"compiled / eager tokens/s: {rows[1]['tokens_per_s'] / rows[0]['tokens_per_s']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "runs": rows}, f, indent=1)


if __name__ == "__main__":
    main()
