"""The two pictures of docs/planning.md, each made by one command:

    python -m nanotrain.inspection.plan_plots mfu-vs-tp docs/img/plan_mfu_vs_tp.png
    python -m nanotrain.inspection.plan_plots bubble docs/img/plan_bubble.png

mfu-vs-tp: GPT-3 175B (96 heads: tp up to 32 divides them; published.py's Megatron-README 177B model)
on 384 H100s, global batch 1152 x 4096 tokens: for each tp the best layout the search finds with that
tp (everything else searched), its predicted MFU, and its exposed tensor-parallel time. Past 8 the
tp group leaves the node: its collectives go over 50 GB/s NICs instead of 360 GB/s of NVLink.

bubble: the same model's blocks on pp = 8 stages (tp 4, dp 2, micro-batch 1): the bubble's share of
the step as each schedule plays out, against the micro-batches per step, from the played
schedule (schedules.timed_play) with the model's own action costs.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from ..config import ConfigError, load_config
from .cluster import PRESETS
from .memory import Plan
from .plan import Request, make_plan, search
from .steptime import StepPlan, predict

CONFIG = "configs/llama3_70b.toml"


def _request(gpus: int, batch: int, fixed: dict, schedule: str | None = None, recompute: str | None = None) -> Request:
    cfg = load_config(CONFIG, [])
    cfg.precision.recipe = "bf16"
    return Request(cfg.model, cfg, PRESETS["h100"], gpus, batch, 8192, fixed, schedule, recompute, "bf16", 1)


def mfu_vs_tp(path: str) -> list[tuple[int, float, float]]:
    from .roofline import _figure

    from ..config import ModelConfig
    from .published import runs

    gpt = ModelConfig(**next(r for r in runs() if r.name == "megatron-h100-177b").model)
    base = _request(384, 1152, {})
    points = []
    for tp in (1, 2, 4, 8, 16, 32):
        req = replace(base, m=gpt, seq_len=4096, fixed={"tp": tp, "cp": 1})
        try:
            best = search(req)
        except ConfigError:  # nothing fits at this tp
            continue
        points.append((tp, best["mfu"], best["breakdown"].get("tp", 0.0) / best["step_s"]))
    fig = _figure((7, 4.5))
    ax = fig.add_subplot()
    tps = [p[0] for p in points]
    ax.plot(tps, [100 * p[1] for p in points], "o-", label="predicted MFU (best layout with this tp)")
    ax.plot(tps, [100 * p[2] for p in points], "s--", label="exposed tp communication, % of the step")
    ax.axvline(8, color="gray", linestyle=":", linewidth=1)
    ax.annotate("one node: 8 GPUs on NVLink", (8, 5), xytext=(4, 0), textcoords="offset points", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(tps, [str(t) for t in tps])
    _finish(fig, ax, path, "tensor-parallel size tp", "%", "GPT-3 175B on 384 H100: MFU against tp (nanotrain plan)")
    return points


def bubble(path: str) -> dict[str, list[tuple[int, float]]]:
    from .roofline import _figure

    req = _request(64, 0, {})
    cfg = req.cfg
    curves: dict[str, list[tuple[int, float]]] = {}
    for schedule, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb_h1", 1), ("dualpipev", 2)):
        for m in (8, 16, 32, 64):
            if schedule == "dualpipev" and m < 16:
                continue
            plan: Plan = make_plan(req, 4, 1, 8, 2, 1, 1, 1, 1, schedule, v, "none")
            plan = Plan(plan.layout, seq_len=8192, micro_batches=m, pp_schedule=schedule, pp_virtual_stages=v)
            out = predict(cfg.model, StepPlan(plan, 2 * m), cfg.precision, PRESETS["h100"])
            curves.setdefault(schedule if v == 1 else f"{schedule} (v={v})", []).append(
                (m, out["breakdown"]["bubble"] / out["step_s"]))
    fig = _figure((7, 4.5))
    ax = fig.add_subplot()
    for name, pts in curves.items():
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", label=name)
    ax.set_xscale("log", base=2)
    _finish(fig, ax, path, "micro-batches per step (per pipeline)", "bubble, % of the step",
            "Llama 3 70B, pp = 8 on H100: the bubble as each schedule plays out")
    return curves


def _finish(fig, ax, path: str, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanotrain.inspection.plan_plots")
    p.add_argument("which", choices=["mfu-vs-tp", "bubble"])
    p.add_argument("out", help="PNG file to write")
    args = p.parse_args(argv)
    result = mfu_vs_tp(args.out) if args.which == "mfu-vs-tp" else bubble(args.out)
    print(result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
