"""What the training-health monitor costs: step time with monitoring.mode off, minimal,
standard and debug, in one run (CPU).

    python bench/monitoring.py [--steps 100] [--rounds 3] [--log-interval 10] [--config ...]
                               [--layout tp=2 --model.vocab_size=66]   # a gloo world: the comm meter's cost too

Each mode trains the same model (the config's, same init and batches) through the
RuntimeEngine for --steps steps, evaluation and checkpoints off, logging every
--log-interval steps (the standard and debug figures are computed on logging steps
only). Rounds alternate the order of the modes (this machine's speed drifts); each
figure is the median over rounds of the engine's training time per step. The peer is
"off": the engine's own loss / lr / gradient-norm / throughput logging, which any
training loop has. The issue's budget: standard at most 5% above off.

Two measures, because this machine's speed drifts by several percent between runs: the
step-time ratio (the real cost, noisy) and the monitor's own time per step, timed
inside it (its figures, its hooks on the sentinel blocks, its collectives), as a
fraction of the off step (precise; what the monitoring adds besides the noise).
With --layout the modes run in a gloo world of that layout (rank 0's times): there the
monitor also times every collective per group (monitoring/comm.py), a cost that lands in
the step time (not in its own time), so read the step-time ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile

from common import ROOT, table  # noqa: F401  (sets sys.path)

from nanotrain.config import Config, load_config
from nanotrain.parallel.layout import CONFIG_KEYS, Layout
from nanotrain.parallel.launch import run_world
from nanotrain.runtime import RuntimeEngine

MODES = ["off", "minimal", "standard", "debug"]


def run(config: str, mode: str, steps: int, log_interval: int, out: str, layout: list[str]) -> tuple[float, float]:
    cfg = load_config(config, [f"--monitoring.mode={mode}", f"--train.max_steps={steps}", "--train.eval_interval=0",
                               "--train.eval_steps=1", "--checkpoint.save_final=false", f"--train.out_dir={out}",
                               f"--logging.log_interval={log_interval}", "--logging.progress=none",
                               "--logging.tensorboard=false", "--logging.plot=false", "--schedule.warmup_steps=2",
                               f"--schedule.decay_steps={max(steps, 3)}", "--logging.peak_tflops=1", *layout])
    world = cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.dp
    if world == 1:
        return _train(dataclasses.asdict(cfg), steps)
    return run_world(_train, world, dataclasses.asdict(cfg), steps)[0]


def _train(cfg_dict: dict, steps: int) -> tuple[float, float]:
    engine = RuntimeEngine(Config.from_dict(cfg_dict))
    result = engine.run()
    return result.train_time_s / steps, engine.monitor.own_seconds() / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--log-interval", type=int, default=10)
    ap.add_argument("--config", default=str(ROOT / "configs" / "shakespeare_char.toml"))
    ap.add_argument("--layout", default="", help="e.g. tp=2 or dp=2,zero=2: run in a gloo world of that layout")
    args, overrides = ap.parse_known_args()  # the rest: config overrides (--model.vocab_size=66 for tp=2)
    chosen, default = Layout.parse(args.layout), Layout()  # the --layout every command takes
    layout = [f"--{CONFIG_KEYS[k]}={str(getattr(chosen, k)).lower()}" for k in CONFIG_KEYS
              if getattr(chosen, k) != getattr(default, k)]
    layout += overrides
    times: dict[str, list[float]] = {m: [] for m in MODES}
    own: dict[str, list[float]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        run(args.config, "off", 5, args.log_interval, f"{tmp}/warmup", layout)  # data prepared, threads warm
        for r in range(args.rounds):
            for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                step_s, own_s = run(args.config, mode, args.steps, args.log_interval, f"{tmp}/{mode}_{r}", layout)
                times[mode].append(step_s)
                own[mode].append(own_s)
    med = {m: statistics.median(v) for m, v in times.items()}
    mine = {m: statistics.median(v) for m, v in own.items()}
    rows = [[m, f"{med[m] * 1e3:.2f}", f"{med[m] / med['off']:.3f}", f"{mine[m] * 1e3:.3f}",
             f"{mine[m] / med['off'] * 100:.2f}%"] for m in MODES]
    print(f"monitoring cost, {args.config}{' layout ' + args.layout if args.layout else ''}, {args.steps} steps, "
          f"logging every {args.log_interval}, "
          f"{args.rounds} rounds (median)\n")
    print(table(rows, ["mode", "ms/step", "vs off", "monitor's own ms/step", "own time / off step"]))


if __name__ == "__main__":
    main()
