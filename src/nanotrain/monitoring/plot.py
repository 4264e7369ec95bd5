"""A loss-curve PNG from metrics.jsonl, written at the end of a run.

TensorBoard is the live view; this is the artifact that stays next to the
checkpoints and can be opened anywhere (or pasted into a report).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .sinks import read_metrics


def _read_series(path: Path) -> tuple[dict[int, float], dict[int, float]]:
    """Train and val loss by step. Later records win, so when a resumed run
    re-logs steps (it restarts from its last checkpoint, before the crash)
    the curve shows what the surviving run did."""
    train: dict[int, float] = {}
    val: dict[int, float] = {}
    for rec in read_metrics(path)[0]:  # unreadable lines skipped: a run killed mid-write leaves a partial one
        for key, series in (("loss", train), ("val_loss", val)):
            v = rec.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                series[int(rec["step"])] = float(v)
    return train, val


def _smooth(y: np.ndarray) -> np.ndarray:
    """Centered moving average over ~5% of the points. Centered, unlike an EMA,
    so the smoothed curve doesn't lag behind the raw one."""
    w = max(1, len(y) // 20) | 1  # odd, so the window centers on each point
    c = np.concatenate([[0.0], np.cumsum(y)])
    i = np.arange(len(y))
    lo, hi = np.maximum(i - w // 2, 0), np.minimum(i + w // 2 + 1, len(y))  # shrinks at the edges
    return (c[hi] - c[lo]) / (hi - lo)


def plot_loss_curve(metrics_jsonl: str | Path, out_png: str | Path, title: str = "") -> Path:
    """Plot train loss (raw + smoothed) and val loss against step; return the PNG's path."""
    # Figure + the Agg canvas directly, not pyplot: no display needed, and no
    # global figure state left behind in a long-lived process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train, val = _read_series(Path(metrics_jsonl))
    if not train and not val:
        raise ValueError(f"{metrics_jsonl} has no 'loss' or 'val_loss' records to plot")
    fig = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        steps = np.array(sorted(train))
        loss = np.array([train[s] for s in steps])
        ax.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=1, label="train loss")
        if len(loss) >= 10:
            ax.plot(steps, _smooth(loss), color="tab:blue", linewidth=2, label="train loss (smoothed)")
    if val:
        steps = sorted(val)
        ax.plot(steps, [val[s] for s in steps], "o-", color="tab:orange", markersize=5, label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or Path(metrics_jsonl).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return out_png
