"""`nanotrain plan --hardware cpu` against the step it predicts, measured here.

    python bench/plan_vs_measured.py [--steps 25] [--warmup 5] [--rounds 3] [--only 1,3]

Six layouts (the issue's), each trained for real and predicted:

    1  one process            shakespeare_char, batch 12 x 64 (threads: this machine's cores)
    2  dp=2                   shakespeare_char, 6 sequences per rank
    3  tp=2                   shakespeare_char, heads and MLP split (no sequence parallelism)
    4  pp=2 1F1B              shakespeare_char, 4 micro-batches of 3
    5  deepseek_tiny ep=2     deepseek_tiny's own batch (24 x 64), dp=2 with the experts split
    6  ZeRO-3 dp=2            shakespeare_char, parameters sharded

Measured: the engine (runtime/engine.py) runs `--steps` optimizer steps in a fresh gloo world of
the layout's processes (parallel/launch.run_world: one thread per rank, as torchrun's
OMP_NUM_THREADS=1; one process alone gets every core, as `nanotrain train` does), with the
config's own batch and precision (precision.recipe=auto resolves as the run resolves it); every
train_step is timed on every rank. A step's time is the mean over the ranks (they finish together:
the gradient norm is all-reduced); the figure is the median over the steps after `--warmup`, and
over `--rounds` worlds. Nothing else runs in those steps: no evaluation, checkpoint, probe or
logging step (logging.log_interval = the run's length).

Predicted: inspection/plan.search with the layout fixed whole (--layout, --schedule 1f1b,
--recompute none) on cluster.cpu_cluster(N), the same GEMM dtype as the run's recipe. The
cluster is measured once per process count, before the runs.

Other work on the machine (a test suite beside us) slows both sides: the table says how many
cores it kept busy while each layout ran (cpu_measure.OtherWork); a figure taken beside other
work is not this machine's.

Goal: every layout's predicted/measured within 0.75..1.25. Measured on a 2-core Intel Xeon VM with
amx_bf16 (AMX tiles), torch 2.13, bf16 (auto), nothing else running (~45 s in all); medians of
two or three worlds, eight runs of the bench give these ranges of predicted/measured (seven of the
eight had all six within 25%, at the edge for deepseek_tiny and ZeRO-3; one had deepseek_tiny at
0.71, a round whose world ran at 183 ms):

    1 process                 0.90 - 1.02     (~23 ms)
    dp=2                      0.79 - 0.92     (~30 ms)
    tp=2                      0.76 - 1.03     (~55 ms)
    pp=2 1F1B x 4             0.82 - 1.02     (~45 ms)
    deepseek_tiny dp=2,ep=2   0.71 - 0.83     (~155 ms; now and then a world runs at ~180)
    ZeRO-3 dp=2               0.91 - 1.24     (~50 ms)

The spread is mostly the planner's own gloo measurement (a call's mean cost on this VM, 0.9-1.2 ms
between computations, moves from one measurement to the next) and the machine's drift (the same
run measures 22-25 ms from one minute to the next). What the model leaves out, by size: under
ep=2 the routing's imbalance in the first steps (the busier rank's experts get ~10% more rows and
its peer waits at every all-to-all: the measured ep time is 22-39 ms a step, the model's 12-16) and
the expert-parallel path's own operations (its splits, concatenations and the counts' .tolist()),
which the timed stand-in block runs locally; under dp the buckets' all-reduce running on the
cores backward computes on (backward is ~3 ms slower beside it than in one process). Counted too
much: ZeRO-3's prefetched gathers, ~1 ms each mostly waiting for the peer, which passes in part
while this rank computes (the model exposes every call whole: cluster.overlap is False on a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

from common import ROOT, cpu_kind, table

import torch

from nanotrain.config import Config, load_config
from nanotrain.inspection import cpu_measure as cm
from nanotrain.inspection.cluster import cpu_cluster
from nanotrain.inspection.plan import Request, parse_fixed, search
from nanotrain.inspection.report import model_config
from nanotrain.parallel.launch import run_world
from nanotrain.runtime import RuntimeEngine
from nanotrain.verify import layout_config

SHAKESPEARE, DEEPSEEK = ROOT / "configs/shakespeare_char.toml", ROOT / "configs/deepseek_tiny.toml"


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    config: object
    procs: int
    run: str  # the layout as the run takes it (parallel/layout.py text; the rest stays the config's)
    plan: str  # the same layout, every key fixed for the planner (it searches what is left open)


CASES = [
    Case("1 process", SHAKESPEARE, 1, "dp=1", "tp=1,cp=1,pp=1,dp=1,ep=1,etp=1,sp=0,zero=0,micro=12"),
    Case("dp=2", SHAKESPEARE, 2, "dp=2", "tp=1,cp=1,pp=1,dp=2,ep=1,etp=1,sp=0,zero=0,micro=6"),
    Case("tp=2", SHAKESPEARE, 2, "tp=2", "tp=2,cp=1,pp=1,dp=1,ep=1,etp=1,sp=0,zero=0,micro=12"),
    Case("pp=2 1f1b x4", SHAKESPEARE, 2, "pp=2,micro=3", "tp=1,cp=1,pp=2,dp=1,ep=1,etp=1,sp=0,zero=0,micro=3"),
    Case("deepseek_tiny dp=2,ep=2", DEEPSEEK, 2, "dp=2,ep=2", "tp=1,cp=1,pp=1,dp=2,ep=2,etp=1,sp=0,zero=0,micro=12"),
    Case("ZeRO-3 dp=2", SHAKESPEARE, 2, "dp=2,zero=3", "tp=1,cp=1,pp=1,dp=2,ep=1,etp=1,sp=0,zero=3,micro=6"),
]


class TimedEngine(RuntimeEngine):
    """The engine, with each optimizer step's wall time kept (train_step: data, forward and
    backward of every micro-batch, gradient sync, optimizer)."""

    def train_step(self, *args, **kwargs):
        start = time.perf_counter()
        out = super().train_step(*args, **kwargs)
        self.step_times.append(time.perf_counter() - start)
        return out


def worker(cfg_dict: dict) -> tuple[list[float], str, float]:
    """One rank: (each step's seconds, the recipe as the run resolved it, this process's CPU seconds)."""
    engine = TimedEngine(Config.from_dict(cfg_dict))
    engine.step_times = []
    engine.run()
    return engine.step_times, engine.cfg.precision.recipe, time.process_time()


def run_config(case: Case, steps: int, out_dir: str) -> Config:
    cfg = load_config(str(case.config), [f"--data.path={ROOT / 'data/tinyshakespeare.txt'}"])
    for key, value in {"train.max_steps": steps, "train.eval_interval": 0, "train.eval_steps": 1,
                       "checkpoint.save_final": False, "checkpoint.interval": 0, "checkpoint.resume": "",
                       "logging.progress": "none", "logging.tensorboard": False, "logging.plot": False,
                       "logging.log_interval": steps, "monitoring.probe_batch": 0,
                       "parallel.pp_schedule": "1f1b", "schedule.decay_steps": 1000, "train.out_dir": out_dir}.items():
        cfg_set(cfg, key, value)
    return layout_config(cfg, case.run)


def cfg_set(cfg: Config, key: str, value) -> None:
    from nanotrain.config import set_value

    set_value(cfg, key, value, source="bench")


def measure(case: Case, steps: int, warmup: int) -> tuple[float, str, float | None]:
    """(median step seconds, the run's resolved recipe, cores other work kept busy meanwhile)."""
    with tempfile.TemporaryDirectory() as out:
        cfg = run_config(case, steps, out)
        threads = cm.threads_per_process(case.procs)
        with cm.OtherWork() as meter:
            cpu = time.process_time()
            ranks = run_world(worker, case.procs, dataclasses.asdict(cfg), threads=threads)
            cpu = time.process_time() - cpu
    times = [statistics.mean(step) for step in zip(*(t for t, _, _ in ranks))][warmup:]
    others = meter.cores(cpu + sum(c for _, _, c in ranks))  # the machine's busy time less the world's
    return statistics.median(times), ranks[0][1], others


def predict(case: Case, recipe: str, clusters: dict) -> dict:
    dtype = "fp32" if recipe == "fp32" else "bf16"
    overrides = [f"--precision.recipe={dtype}", "--model.vocab_size=65"]
    cfg = load_config(str(case.config), overrides)
    m, seq = model_config(str(case.config), None, overrides, None)
    if case.procs not in clusters:
        clusters[case.procs] = cpu_cluster(case.procs)
    req = Request(m, cfg, clusters[case.procs], case.procs, cfg.train.batch_size, seq, parse_fixed(case.plan),
                  "1f1b", "none", dtype, 1)
    return search(req)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=25, help="optimizer steps per run (warm-up included)")
    ap.add_argument("--warmup", type=int, default=5, help="first steps left out of the median")
    ap.add_argument("--rounds", type=int, default=3, help="worlds per layout (the median of their medians)")
    ap.add_argument("--only", help="comma-separated case numbers (1-6)")
    args = ap.parse_args()
    cases = [c for i, c in enumerate(CASES, 1) if not args.only or str(i) in args.only.split(",")]
    started = time.perf_counter()
    print(f"{cpu_kind()}, {cm.cores()} cores, torch {torch.__version__}")
    from nanotrain.data import prepare_data

    for config in {c.config for c in cases}:  # once, here: ranks preparing a fresh clone's data would race
        cfg = load_config(str(config), [f"--data.path={ROOT / 'data/tinyshakespeare.txt'}"])
        prepare_data(cfg.data, cfg.train.seq_len, log=lambda *_: None)
    run_world(abs, 1, 1)  # start the forkserver (it imports torch) outside any measurement
    clusters: dict = {}
    for procs in sorted({c.procs for c in cases}):
        t = time.perf_counter()
        clusters[procs] = cpu_cluster(procs)
        print(f"cpu_cluster({procs}) measured in {time.perf_counter() - t:.1f} s: {clusters[procs].describe()}")
    rows = []
    for i, case in enumerate(cases, 1):
        measured, others = [], []
        for _ in range(args.rounds):
            seconds, recipe, busy = measure(case, args.steps, args.warmup)
            measured.append(seconds)
            others.append(busy)
        result = predict(case, recipe, clusters)
        real = statistics.median(measured)
        parts = " ".join(f"{k} {v * 1e3:.1f}" for k, v in result["breakdown"].items() if v > 0)
        busy = max((b for b in others if b is not None), default=None)
        rows.append([case.name, recipe, " / ".join(f"{s * 1e3:.1f}" for s in measured), real * 1e3,
                     result["step_s"] * 1e3, f"{result['step_s'] / real:.2f}",
                     "?" if busy is None else f"{busy:.2f}", parts])
        print(f"  {case.name}: measured {real * 1e3:.1f} ms, predicted {result['step_s'] * 1e3:.1f} ms", flush=True)
    print()
    print(table(rows, ["layout", "recipe", "measured ms (rounds)", "measured ms", "predicted ms", "pred/meas",
                       "other work (cores)", "predicted parts (ms)"]))
    worst = max(abs(float(r[5]) - 1) for r in rows)
    print(f"\nworst |predicted/measured - 1| = {worst:.0%} (goal: within 25%); {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
