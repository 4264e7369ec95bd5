"""What activation recomputation saves and costs: peak memory and step time of one training step
under train.recompute = none, selective and full, side by side.

    python bench/recompute.py [--layers 8] [--d-model 512] [--seq 1024] [--batch 8] [--steps 2]
                              [--threads 0] [--arch transformer|deepseek]

Each mode runs in a fresh process (peak RSS only grows): the model (fp32, Llama-style: RMSNorm,
SwiGLU, RoPE) and torch's AdamW take one warm-up step, so that gradients and optimizer state exist;
then the process's peak resident set (VmHWM) is reset (Linux: 5 > /proc/self/clear_refs) and
`--steps` steps run. activation MB = peak RSS during those steps - RSS before them: what the
forward keeps for backward, plus backward's transients. The peer is the same model with nothing
recomputed (none); full is torch.utils.checkpoint around each block, selective torch's selective
activation checkpointing with nano-train's policy (nanotrain/recompute.py). The losses are printed
too: every mode must give the same ones.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, table


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def one_mode(a) -> dict:
    """In this process: warm up, reset the peak, time a.steps steps of a.mode."""
    import torch

    from nanotrain.config import load_config
    from nanotrain.models import build_model
    from nanotrain.module_spec import mark
    from nanotrain.recompute import Recompute

    if a.threads:
        torch.set_num_threads(a.threads)
    extra = ["--model.arch=deepseek", "--model.q_lora_rank=128", "--model.kv_lora_rank=128",
             "--model.qk_nope_head_dim=64", "--model.qk_rope_head_dim=32", "--model.v_head_dim=64",
             "--model.n_routed_experts=8", "--model.moe_top_k=2", f"--model.moe_d_ff={a.d_model}",
             "--model.first_k_dense_replace=1"] if a.arch == "deepseek" else []
    cfg = load_config(None, [f"--model.n_layers={a.layers}", f"--model.d_model={a.d_model}",
                             f"--model.n_heads={a.d_model // 64}", "--model.vocab_size=256",
                             f"--model.max_seq_len={a.seq}", f"--train.seq_len={a.seq}", "--model.norm=rmsnorm",
                             "--model.mlp=swiglu", "--model.pos_emb=rope", *extra]).model
    model = build_model(cfg)
    model.init_weights(0)
    mark(model, recompute=Recompute(a.mode))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (a.batch, a.seq), generator=gen) for _ in range(a.steps + 1)]

    def step(x):
        loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # gradients stay allocated: the activations are what changes
        return loss.item()

    losses = [step(batches[0])]  # warm-up: gradients and AdamW state now exist
    before = rss_mb()
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS starts again from the current RSS
    t0 = time.perf_counter()
    losses += [step(x) for x in batches[1:]]
    seconds = (time.perf_counter() - t0) / a.steps
    return {"mode": a.mode, "activation_mb": rss_mb("VmHWM") - before, "step_s": seconds, "losses": losses,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--arch", default="transformer", choices=["transformer", "deepseek"])
    ap.add_argument("--mode", help=argparse.SUPPRESS)  # set for the child process of one mode
    a = ap.parse_args()
    if a.mode:
        print(json.dumps(one_mode(a)))
        return
    results = []
    for mode in ("none", "selective", "full"):
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode], capture_output=True,
                               text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        if child.returncode:
            sys.exit(f"{mode} failed:\n{child.stderr}")
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    from nanotrain.runtime.machine import probe_machine  # the CPU kind, named beside the figures
    import torch

    print(f"one training step, {a.arch}, {a.layers} layers, d_model {a.d_model}, seq {a.seq}, batch {a.batch}, "
          f"fp32, {results[0]['params_m']:.1f}M parameters, {results[0]['threads']} threads; mean of "
          f"{a.steps} step(s) after a warm-up\n{probe_machine(torch.device('cpu')).describe()}\n")
    none = results[0]
    rows = [[r["mode"], f"{r['activation_mb']:.0f}", f"{r['activation_mb'] / none['activation_mb']:.2f}",
             f"{r['step_s']:.2f}", f"{r['step_s'] / none['step_s']:.2f}",
             "yes" if r["losses"] == none["losses"] else "NO"] for r in results]
    print(table(rows, ["recompute", "activation MB (peak RSS - before)", "/ none", "step s", "/ none",
                       "same losses as none"]))


if __name__ == "__main__":
    main()
