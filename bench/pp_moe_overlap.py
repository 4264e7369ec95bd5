"""DualPipeV's paired forward and backward side by side: what the overlap hides of the all-to-alls.

    python bench/pp_moe_overlap.py [--steps 12] [--seq 128] [--n-micro 8] [extra config overrides]

One gloo world of pp=2 x dp=2 (ep=2: each pipeline stage's experts over two ranks) trains
configs/deepseek_tiny.toml under parallel.pp_schedule=dualpipev in fp32. After 2 warm-up steps
the steps alternate between the pairs run in turn (PipelineRunner.overlap = False: before) and
side by side (True: after, the default for this layout), so machine drift hits both alike.
Per step, on every rank, the communication meter gives the ep (all-to-all) time exposed, i.e.
blocked while the rank computed nothing else, and the time hidden behind the paired
micro-batch's compute in the other thread (monitoring/comm.py). Printed: medians over the
steps of each mode, averaged over the ranks.

On gloo the overlap is limited: an all-to-all's wait is a host thread blocking, and the 4
processes share the machine's cores with both threads of each.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

from common import cpu_kind, table

from nanotrain.config import Config, load_config
from nanotrain.parallel.launch import run_world
from nanotrain.runtime import RuntimeEngine


class AlternatingEngine(RuntimeEngine):
    """Toggles the pairs' overlap step by step and records the meter's ep figures of each step."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.rows: list[tuple[bool, float, float, float]] = []  # (overlap, step s, ep exposed s, ep hidden s)

    def train_step(self, step, model, data, opt, lr, ctx, report=False):
        runner = self.forward_backward.runner
        runner.overlap = step % 2 == 1
        meter = ctx.parallel.meter
        before = (meter.seconds.get("ep", 0.0), meter.hidden.get("ep", 0.0))
        start = time.perf_counter()
        out = super().train_step(step, model, data, opt, lr, ctx, report)
        seconds = time.perf_counter() - start
        if step >= 2 and not report:  # the monitor resets the meter at a logging step
            self.rows.append((runner.overlap, seconds, meter.seconds.get("ep", 0.0) - before[0],
                              meter.hidden.get("ep", 0.0) - before[1]))
        return out


def worker(cfg_dict: dict) -> list:
    engine = AlternatingEngine(Config.from_dict(cfg_dict))
    engine.run()
    return engine.rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="timed steps after 2 warm-up steps (half in each mode)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--n-micro", type=int, default=8, help="micro-batches per step per data-parallel rank")
    args, extra = ap.parse_known_args()
    cfg = load_config("configs/deepseek_tiny.toml", [
        "--parallel.pp=2", "--parallel.dp=2", "--parallel.ep=2", "--parallel.pp_schedule=dualpipev",
        "--precision.recipe=fp32", f"--train.seq_len={args.seq}", "--train.micro_batch_size=1",
        f"--train.batch_size={2 * args.n_micro}", f"--train.max_steps={args.steps + 2}",
        "--train.eval_interval=0", "--train.eval_steps=1", "--checkpoint.save_final=false",
        "--checkpoint.interval=0", f"--logging.log_interval={args.steps + 2}", "--logging.progress=none",
        "--logging.tensorboard=false", "--logging.plot=false", "--train.out_dir=runs/bench_pp_moe_overlap",
        "--train.overwrite=true", "--train.threads=1", "--schedule.warmup_steps=1", *extra])
    results = run_world(worker, 4, dataclasses.asdict(cfg))
    rows = []
    figures = {}
    for overlap in (False, True):
        per_rank = [[r for r in rank if r[0] == overlap] for rank in results]
        step = statistics.mean(statistics.median(r[1] for r in rank) for rank in per_rank)
        exposed = statistics.mean(statistics.median(r[2] for r in rank) for rank in per_rank)
        hidden = statistics.mean(statistics.median(r[3] for r in rank) for rank in per_rank)
        figures[overlap] = (step, exposed, hidden)
        rows.append(["side by side (after)" if overlap else "in turn (before)", f"{step * 1e3:.0f}",
                     f"{exposed * 1e3:.1f}", f"{hidden * 1e3:.1f}"])
    print(f"DualPipeV pairs, DeepSeek tiny (d_model {cfg.model.d_model}, {cfg.model.n_layers} layers, "
          f"{cfg.model.n_routed_experts} experts top-{cfg.model.moe_top_k}), pp=2 x dp=2, ep=2, seq {args.seq}, "
          f"{args.n_micro} micro-batches per rank, fp32, gloo, {cpu_kind()}; medians of {args.steps // 2} steps "
          f"per mode, mean over 4 ranks\n")
    print(table(rows, ["pairs", "step ms", "ep exposed ms/step", "ep hidden ms/step"]))
    (s0, e0, _), (s1, e1, h1) = figures[False], figures[True]
    print(f"\nexposed all-to-all time: {e0 * 1e3:.1f} -> {e1 * 1e3:.1f} ms per step ({(e1 - e0) / e0:+.0%}), "
          f"{h1 * 1e3:.1f} ms hidden behind the paired compute; step time ratio after/before {s1 / s0:.2f}")


if __name__ == "__main__":
    main()
