"""Step time of every precision recipe, relative to bf16 and fp32, and the memory of each
weight/gradient/optimizer dtype option, in one run (CPU).

    python bench/precision.py [--steps 30] [--rounds 2] [--config configs/shakespeare_char.toml]

Each recipe trains the same model (the config's, same init and batches) through the
RuntimeEngine for --steps steps, evaluation and checkpoints off; rounds alternate the
order of the recipes (this machine's speed drifts) and each figure is the median over
rounds of the engine's training tokens/s (data wait included, evals and saves not).

What the ratios mean on CPU: bf16 and fp16 are torch.autocast, the low-bit recipes
*emulate* their formats (every operand of every linear layer's three GEMMs rounded to
the format's grid with its scales, products in fp32), so their cost here is the
emulation's, not the speed-up fp8/fp4 tensor cores would give; the numerics are the
hardware's. fp16 on a CPU without fp16 GEMM units is slow for the same reason.

Memory (second table): each dtype option of precision/master.py (and persistent low-bit
weights, precision/lowbit.py) trains the same model under the bf16 recipe, and the bytes
of the tensors each copy really holds after the last step are summed: the model's
parameters, the optimizer's master copy (none where the parameters are the master),
the gradients, AdamW's moments, the Kahan compensation. The peer is the first row,
torch's AdamW on fp32 parameters under autocast (what a plain PyTorch loop does); the
loss column shows what each saving costs in quality over the same steps.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from common import ROOT, table  # noqa: F401  (sets sys.path)

from nanotrain.config import load_config
from nanotrain.runtime import RuntimeEngine

RECIPES = ["fp32", "bf16", "fp16", "fp8_tensorwise", "fp8_deepseek", "nvfp4", "mxfp4"]
BF16 = ["--precision.param_dtype=bf16"]
LOW = ["--precision.grad_dtype=bf16", "--precision.exp_avg_dtype=bf16", "--precision.exp_avg_sq_dtype=bf16"]
DTYPE_OPTIONS = {  # name: overrides (all under the bf16 recipe)
    "fp32 params = master (torch AdamW, autocast)": [],
    "bf16 params, fp32 master/grads/moments": BF16,
    "bf16 params, fp32 master, bf16 grads/moments": BF16 + LOW,
    "bf16 master (stochastic), bf16 grads, fp32 moments": BF16 + ["--precision.master_dtype=bf16",
                                                                  "--precision.master_rounding=stochastic",
                                                                  "--precision.grad_dtype=bf16"],
    "bf16 master (stochastic), all bf16": BF16 + LOW + ["--precision.master_dtype=bf16",
                                                        "--precision.master_rounding=stochastic"],
    "bf16 master (kahan), all bf16": BF16 + LOW + ["--precision.master_dtype=bf16",
                                                   "--precision.master_rounding=kahan"],
    "bf16 master (nearest), all bf16": BF16 + LOW + ["--precision.master_dtype=bf16"],
    "fp8 weights (layers), fp32 master/grads/moments": ["--precision.lowbit.weights=layers.*.weight",
                                                        "--precision.lowbit.format=fp8"],
    "nf4 weights (layers), fp32 master/grads/moments": ["--precision.lowbit.weights=layers.*.weight",
                                                        "--precision.lowbit.format=nf4"],
}
KINDS = ("params", "master", "grads", "moments", "compensation")


def run(config: str, recipe: str, steps: int, out: str, *extra: str, engine_out: list | None = None
        ) -> tuple[float, float]:
    cfg = load_config(config, [f"--precision.recipe={recipe}", f"--train.max_steps={steps}", *extra,
                               "--train.eval_interval=0", "--checkpoint.save_final=false", f"--train.out_dir={out}",
                               "--logging.progress=none", "--logging.tensorboard=false", "--logging.plot=false",
                               "--schedule.warmup_steps=2", f"--schedule.decay_steps={max(steps, 3)}",
                               "--logging.peak_tflops=1"])
    engine = RuntimeEngine(cfg)
    result = engine.run()
    if engine_out is not None:
        engine_out.append(engine)
    return result.tokens_per_s, result.losses[steps]


def held_bytes(engine) -> tuple[dict[str, int], int]:
    """Bytes per kind this (one-process) run's tensors hold, and the parameter count."""
    model, opt = engine.model, engine.optimizer
    numel = sum(p.numel() for p in model.parameters())
    if hasattr(opt, "state_bytes") and "params" in opt.state_bytes():  # the flat-bucket optimizer
        return opt.state_bytes(), numel
    size = sum  # torch AdamW on the model's own fp32 parameters (the parameters are the master)
    moments = size(t.numel() * t.element_size() for s in opt.opt.state.values() for t in s.values()
                   if t.dim() > 0)
    return {"params": size(p.numel() * p.element_size() for p in model.parameters()), "master": 0,
            "grads": size(p.numel() * 4 for p in model.parameters()), "moments": moments, "compensation": 0}, numel


def memory_table(config: str, steps: int, tmp: str) -> str:
    rows, base = [], None
    for i, (name, extra) in enumerate(DTYPE_OPTIONS.items()):
        engines = []
        tok_s, loss = run(config, "bf16", steps, f"{tmp}/mem{i}", *extra, engine_out=engines)
        held, numel = held_bytes(engines[0])
        total = sum(held[k] for k in KINDS)
        base = base or total
        rows.append([name, *(f"{held[k] / numel:.2f}" for k in KINDS), f"{total / numel:.2f}", f"{total / base:.2f}",
                     f"{tok_s:,.0f}", f"{loss:.4f}"])
    return table(rows, ["option", *KINDS, "bytes/param", "vs first row", "tokens/s", f"loss at step {steps}"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--config", default=str(ROOT / "configs" / "shakespeare_char.toml"))
    ap.add_argument("--memory-steps", type=int, default=60, help="steps of each dtype option (0: skip the table)")
    args = ap.parse_args()
    speed: dict[str, list[float]] = {r: [] for r in RECIPES}
    loss: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        run(args.config, "bf16", 3, f"{tmp}/warmup")  # data prepared, peak probe cached, threads warm
        for r in range(args.rounds):
            for recipe in (RECIPES if r % 2 == 0 else RECIPES[::-1]):
                tok_s, loss[recipe] = run(args.config, recipe, args.steps, f"{tmp}/{recipe}_{r}")
                speed[recipe].append(tok_s)
    med = {k: statistics.median(v) for k, v in speed.items()}
    rows = [[k, f"{med[k]:,.0f}", f"{med[k] / med['bf16']:.2f}", f"{med[k] / med['fp32']:.2f}", f"{loss[k]:.4f}"]
            for k in RECIPES]
    print(f"precision recipes, {args.config}, {args.steps} steps x {args.rounds} round(s), median tokens/s\n")
    print(table(rows, ["recipe", "tokens/s", "speed vs bf16", "speed vs fp32", f"loss at step {args.steps}"]))
    if args.memory_steps:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"\nweights, gradients and optimizer state per dtype option (bf16 recipe, one process), "
                  f"bytes per parameter after {args.memory_steps} steps\n")
            print(memory_table(args.config, args.memory_steps, tmp))


if __name__ == "__main__":
    main()
