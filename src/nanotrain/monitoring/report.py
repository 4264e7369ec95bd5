"""`nanotrain report RUN_DIR [RUN_DIR ...]`: one static HTML page with the health plots of
one or more runs, overlaid so that runs compare side by side.

Everything comes from each run's metrics.jsonl (and config.json): loss and val loss,
learning rate, gradient norm with the clip threshold, update-to-weight ratios, per-block
gradient norms, MoE load imbalance and the last tokens-per-expert, the step time split
into data wait, forward+backward and optimizer, and the probe batch's figures. The plots are PNGs embedded in
the page (base64), so the file can be mailed or opened offline.

Given `predict` (cli.py passes inspection/predicted_run.predict_run: the planner on this CPU), the
page also sets each run's predicted step beside its measured one, part by part, and draws the
planner's played pipeline timetable and the run's measured timeline (timeline.json, written at
logging.timeline_step) in one style (monitoring/html/report.js, with html/common.js as the plan page).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..config import ConfigError  # noqa: E402
from ..parallel.pipeline.timeline import RankTimeline, align  # noqa: E402
from .page import DOCS_NAME, render_page  # noqa: E402
from .sinks import read_metrics  # noqa: E402


def read_run(run_dir: Path) -> dict:
    """{"name", "train": [row...], "val": [row...], "config": {...}, "skipped": N} of one run folder
    (skipped: unreadable lines of its metrics.jsonl, such as the partial last line of a killed run)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a run folder (train.out_dir) of a run that logged.")
    rows, skipped = read_metrics(path)
    if not rows:  # nothing to show: an empty page would look like a run that logged nothing yet
        raise ConfigError(f"{path} has no readable rows ({skipped} unreadable line{'s' if skipped != 1 else ''}): it "
                         "is not a run's metrics file, or the run stopped before its first log step. Pass the "
                         "folder of a run that logged (train.out_dir).")
    by_step: dict[int, dict] = {}
    val: dict[int, dict] = {}
    for row in rows:  # a resumed run appends: the last value per step wins
        # Records without a train loss (evaluations, the probe batch) are the "val" rows.
        (val if "loss" not in row else by_step).setdefault(row["step"], {}).update(row)
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    name = run_dir.resolve().name
    if name in ("run", "runs", "out"):  # tests' and many users' folder names: say which run
        name = f"{run_dir.resolve().parent.name}/{name}"
    return {"name": name, "train": [by_step[s] for s in sorted(by_step)], "val": [val[s] for s in sorted(val)],
            "config": config, "skipped": skipped}


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _line_plot(runs, keys: list[str], title: str, log: bool = False, hline: float | None = None) -> str | None:
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    drawn = False
    for i, run in enumerate(runs):
        for j, key in enumerate(keys):
            evaluated = key == "val_loss" or key.startswith("probe/")
            rows = run["val"] if evaluated else run["train"]
            x, y = _series(rows, key)
            if x:
                style = ["-", "--", ":", "-."][j % 4]
                label = key if len(runs) == 1 else f"{run['name']}: {key}"
                ax.plot(x, y, style, color=f"C{i}", label=label, marker="o" if evaluated else None, ms=3)
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    if hline:
        ax.axhline(hline, color="grey", lw=0.8, ls="--", label="clip threshold")
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def _block_plot(run) -> str | None:
    keys = [k for k in (run["train"][-1] if run["train"] else {}) if k.startswith("blocks/") and
            k.endswith("/grad_norm")]
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, key in enumerate(keys):
        x, y = _series(run["train"], key)
        ax.plot(x, y, color=plt.cm.viridis(i / max(len(keys) - 1, 1)), label=key.split("/")[1])
    ax.set_yscale("log")
    ax.set_title(f"{run['name']}: gradient norm per block (dark: first)")
    ax.set_xlabel("step")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    return _png(fig)


def _expert_plot(run) -> str | None:
    last = run["train"][-1] if run["train"] else {}
    loads = {k: v for k, v in last.items() if k.endswith("/tokens_per_expert") and isinstance(v, list)}
    if not loads:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    for key in sorted(k for k in last if k.endswith("/imbalance")):
        a.plot(*_series(run["train"], key), label=key.split("/")[1])
    a.set_title("load imbalance (max / mean tokens per expert)")
    a.set_xlabel("step")
    a.legend(fontsize=7)
    width = 0.8 / len(loads)
    for i, (key, load) in enumerate(sorted(loads.items())):
        b.bar([e + i * width for e in range(len(load))], load, width, label=key.split("/")[1])
    b.set_title(f"tokens per expert at step {last['step']}")
    b.set_xlabel("expert")
    b.legend(fontsize=7)
    fig.suptitle(run["name"])
    return _png(fig)


COMM_GROUPS = ("tp", "dp", "pp", "ep", "edp", "embd", "world")


def _time_plot(runs) -> str | None:
    """Stacked bars: data wait, compute, optimizer, then the time in each group's collectives."""
    parts = ["time/data_ms", "time/compute_ms", "time/optimizer_ms"]
    labels = ["data wait", "forward + backward", "optimizer"]
    present = {k for run in runs for r in run["train"] for k in r}
    for g in COMM_GROUPS:
        if f"time/comm_{g}_ms" in present:
            parts.append(f"time/comm_{g}_ms")
            labels.append(f"comm {g}")
    means = []
    for run in runs:
        rows = [r for r in run["train"] if all(k in r for k in parts[:3])][1:] or run["train"][-1:]  # skip warm-up
        if not rows or not all(k in rows[-1] for k in parts[:3]):
            return None
        means.append([sum(r.get(k, 0.0) for r in rows) / len(rows) for k in parts])
    fig, ax = plt.subplots(figsize=(6.4, 0.6 + 0.5 * len(runs)))
    left = [0.0] * len(runs)
    for j, label in enumerate(labels):
        vals = [m[j] for m in means]
        ax.barh([r["name"] for r in runs], vals, left=left, label=label, color=f"C{j}",
                hatch="//" if label.startswith("comm") else None)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_xlabel("ms per step (mean over the logged steps)")
    ax.set_title("where a step's time goes (communication timed around the collectives)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.45 - 0.1 / len(runs)), ncol=4)
    return _png(fig)


def _summary(runs) -> str:
    heads = ["run", "steps", "final loss", "val loss", "tokens/s", "MFU", "grad norm", "update ratio", "clip rate",
             "probe batch"]
    rows = []
    for run in runs:
        last = run["train"][-1] if run["train"] else {}
        val = next((r["val_loss"] for r in reversed(run["val"]) if "val_loss" in r), None)

        def fmt(v, spec=".4g"):
            return "" if v is None else format(v, spec)
        rows.append([run["name"], str(last.get("step", "")), fmt(last.get("loss")), fmt(val),
                     fmt(last.get("tokens_per_s"), ",.0f"), fmt(last.get("mfu"), ".1%"), fmt(last.get("grad_norm")),
                     fmt(last.get("update_ratio"), ".2e"), fmt(last.get("clip_rate"), ".0%"),
                     (_probe_hash(run) or "")[:12]])
    cells = "".join(f"<th>{h}</th>" for h in heads)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    note = ""
    if len({_probe_hash(r) for r in runs if _probe_hash(r)}) > 1:  # sha256 of the probe's tokens
        note = "<p>The runs probed different batches (probe batch column): their probe figures do not compare.</p>"
    return f"<table><tr>{cells}</tr>{body}</table>{note}"


def _probe_hash(run) -> str | None:
    return next((r["probe/hash"] for r in run["val"] if "probe/hash" in r), None)


def _flat(d: dict, prefix: str = "") -> dict:
    """{"precision": {"fp8": {"margin": 0}}} -> {"precision.fp8.margin": 0}: tables become dotted keys."""
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _config_diff(runs) -> str:
    """The config keys whose values differ between the runs."""
    if len(runs) < 2:
        return ""
    flat = [_flat({s: d for s, d in r["config"].items() if isinstance(d, dict)}) for r in runs]
    keys = sorted(k for k in set().union(*flat) if len({json.dumps(f.get(k)) for f in flat}) > 1
                  and not k.endswith(("out_dir", "prepared_dir")))
    if not keys:
        return "<p>The configs are the same.</p>"
    head = "<th>key</th>" + "".join(f"<th>{html.escape(r['name'])}</th>" for r in runs)
    body = "".join(f"<tr><td>{k}</td>" + "".join(f"<td>{html.escape(json.dumps(f.get(k)))}</td>" for f in flat)
                   + "</tr>" for k in keys)
    return f"<h2>What differs</h2><table><tr>{head}</tr>{body}</table>"


def measured_step(run) -> dict | None:
    """The run's step in ms, mean over its logged steps but the first (warm-up): the whole step,
    its data wait, forward + backward and optimizer, and the time inside each group's collectives
    (part of forward + backward)."""
    rows = [r for r in run["train"] if "step_ms" in r and "time/compute_ms" in r]
    rows = rows[1:] or rows
    if not rows:
        return None
    keys = ["step_ms", "time/data_ms", "time/compute_ms", "time/optimizer_ms"]
    keys += [f"time/comm_{g}_ms" for g in COMM_GROUPS if any(f"time/comm_{g}_ms" in r for r in rows)]
    return {k: sum(r.get(k, 0.0) for r in rows) / len(rows) for k in keys}


def side_by_side(predicted: dict, measured: dict) -> list[list]:
    """[part, predicted ms, measured ms] rows: the planner's parts grouped as the run times them
    (everything between the data and the optimizer is forward + backward there)."""
    b = {k: v * 1e3 for k, v in predicted["breakdown"].items()}
    passes = sum(v for k, v in b.items() if k not in ("data", "optimizer"))
    rows = [["data wait", b.get("data", 0.0), measured["time/data_ms"]],
            ["forward + backward (collectives, bubble included)", passes, measured["time/compute_ms"]],
            ["optimizer", b.get("optimizer", 0.0), measured["time/optimizer_ms"]]]
    rows += [[f"of which in {k[10:-3]} collectives", b.get(k[10:-3]), v] for k, v in measured.items()
             if k.startswith("time/comm_")]
    return rows + [["step", predicted["step_s"] * 1e3, measured["step_ms"]]]


def measured_timeline(run_dir: Path) -> dict | None:
    """timeline.json (logging.timeline_step) as timeline events in ms, ranks aligned on wall time."""
    path = run_dir / "timeline.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    ranks = [RankTimeline(r["rank"], r["t0_wall"], [tuple(e) for e in r["events"]]) for r in saved["ranks"]]
    events = [[r, k, c, mb, s * 1e3, e * 1e3] for r, evs in enumerate(align(ranks)) for k, c, mb, s, e in evs]
    return {"step": saved.get("step"), "ranks": len(ranks), "events": events, "span_ms": max(e[5] for e in events)}


def step_data(runs, run_dirs, predict) -> tuple[dict, list[str]]:
    """The JSON report.js draws: per run, its measured step, the prediction (or why there is none),
    the side-by-side rows and the measured timeline. Also a note for each prediction that failed."""
    out, notes = [], []
    for run, d in zip(runs, run_dirs):
        measured, predicted, why = measured_step(run), None, None
        if predict is None or not run["config"]:
            why = "no config.json in the run folder" if predict else "not asked for"
        else:
            try:
                predicted = predict(run["config"])
            except (ConfigError, ValueError) as e:
                why = str(e)
                notes.append(f"no prediction for {run['name']}: {why}")
        rows = side_by_side(predicted, measured) if predicted and measured else []
        out.append({"name": run["name"], "measured": measured, "predicted": predicted, "why_not": why,
                    "side_by_side": rows, "timeline": measured_timeline(Path(d))})
    return {"docs": DOCS_NAME, "runs": out}, notes


def write_report(run_dirs: list[Path], out: Path, predict=None) -> tuple[Path, list[str]]:
    """The page, and a line for each run whose metrics.jsonl had unreadable lines (skipped) or
    whose step could not be predicted. predict(config dict) -> the planner's entry for the run."""
    runs = [read_run(Path(d)) for d in run_dirs]
    notes = [f"skipped {r['skipped']} unreadable line{'s' if r['skipped'] > 1 else ''} of "
             f"{Path(d) / 'metrics.jsonl'} (a run killed mid-write leaves a partial last line)"
             for d, r in zip(run_dirs, runs) if r["skipped"]]
    names = [r["name"] for r in runs]
    for i, r in enumerate(runs):  # distinct labels even for folders of the same name
        if names.count(r["name"]) > 1:
            r["name"] = f"{r['name']} ({i + 1})"
    clip = next((r["config"].get("optimizer", {}).get("grad_clip") for r in runs if r["config"]), None)
    plots = [
        ("Loss", _line_plot(runs, ["loss", "loss_ema", "val_loss"], "loss (train, EMA, val)")),
        ("Learning rate", _line_plot(runs, ["lr"], "learning rate")),
        ("Gradient norm", _line_plot(runs, ["grad_norm"], "global gradient norm before clipping", log=True,
                                     hline=clip or None)),
        ("Update-to-weight ratio", _line_plot(runs, ["update_ratio", "update_ratio_p50", "update_ratio_p95",
                                                     "update_ratio_max"], "||ΔW|| / ||W|| (global and over tensors)",
                                              log=True)),
        ("Parameter norm", _line_plot(runs, ["param_norm"], "global parameter norm")),
        ("Time split", _time_plot(runs)),
        ("Throughput", _line_plot(runs, ["tokens_per_s"], "tokens/s")),
        ("Probe batch", _line_plot(runs, ["probe/loss", "probe/entropy"], "probe batch: loss, output entropy (nats)")),
        ("Probe confidence", _line_plot(runs, ["probe/top1_mass", "probe/top5_mass"],
                                        "probe batch: probability of the top 1 and top 5 tokens")),
    ]
    plots += [(f"Blocks: {r['name']}", _block_plot(r)) for r in runs]
    plots += [(f"Experts: {r['name']}", _expert_plot(r)) for r in runs]
    figures = "".join(f"<figure><figcaption>{html.escape(t)}</figcaption><img src='data:image/png;base64,{p}'>"
                      "</figure>" for t, p in plots if p)
    data, more = step_data(runs, run_dirs, predict)
    body = (f"{_summary(runs)}{_config_diff(runs)}<h2>The step: predicted and measured</h2><div id='steps'></div>"
            f"<h2>Plots</h2>{figures}")
    page = render_page(f"nano-train report: {', '.join(r['name'] for r in runs)}", "report",
                       json.dumps(data, separators=(",", ":")), body)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out, notes + more
