"""Step time of every precision recipe, relative to bf16 and fp32, in one run (CPU).

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
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from common import ROOT, table  # noqa: F401  (sets sys.path)

from nanotrain.config import load_config
from nanotrain.runtime import RuntimeEngine

RECIPES = ["fp32", "bf16", "fp16", "fp8_tensorwise", "fp8_deepseek", "nvfp4", "mxfp4"]


def run(config: str, recipe: str, steps: int, out: str) -> tuple[float, float]:
    cfg = load_config(config, [f"--precision.recipe={recipe}", f"--train.max_steps={steps}",
                               "--train.eval_interval=0", "--checkpoint.save_final=false", f"--train.out_dir={out}",
                               "--logging.progress=none", "--logging.tensorboard=false", "--logging.plot=false",
                               "--schedule.warmup_steps=2", f"--schedule.decay_steps={max(steps, 3)}",
                               "--logging.peak_tflops=1"])
    result = RuntimeEngine(cfg).run()
    return result.tokens_per_s, result.losses[steps]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--config", default=str(ROOT / "configs" / "shakespeare_char.toml"))
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


if __name__ == "__main__":
    main()
