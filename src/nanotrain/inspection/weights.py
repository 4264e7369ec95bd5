"""`nanotrain weights`: what is inside a checkpoint, and how two checkpoints differ.

Per tensor (every `model/` weight; with optimizer=True also Adam's moments, `optim/exp_avg/...`):

    shape, numel, mean, std, min, max, rms = sqrt(mean(x²)), zeros (fraction of exact 0.0),
    quantiles p0.1, p1, p50, p99, p99.9

std is the population std (ddof=0): the spread of these values, not an estimate of some larger
population's. Every tensor is read whole through CheckpointReader.full (which assembles it from
the boxes any layout wrote, so a tp=2 x dp=2 checkpoint gives the same numbers as a one-process
one) and reduced in float64, one tensor at a time: memory holds one logical tensor, not the model.

Per kind of module (counts.kind_of: attention, dense_mlp, norms, ...) the same statistics over all
of that kind's values, combined exactly from the per-tensor ones (Chan et al.'s parallel variance).

Comparing checkpoint a with b, per tensor (and per kind, from the summed squares):

    rel_change = ‖b − a‖ / ‖a‖       how far training moved the tensor, relative to its size
    cosine     = a·b / (‖a‖ ‖b‖)      1: same direction (a tensor that only grew or shrank)
    std_ratio  = std(b) / std(a)     growth of the spread (weight decay vs. updates)

Tied embeddings: head.weight is tok_emb.weight (the state dict, and so the checkpoint, holds it
under both names); it is listed once, as tok_emb.weight, so the kinds are not counted twice.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..checkpoint import CheckpointError, CheckpointReader, resolve_checkpoint
from ..config import ConfigError
from .counts import KINDS, kind_of

QUANTILES = {"p0.1": 0.001, "p1": 0.01, "p50": 0.5, "p99": 0.99, "p99.9": 0.999}
OPTIM_KINDS = ("optim/exp_avg", "optim/exp_avg_sq", "optim/kahan")


# ---------------------------------------------------------------------------
# Finding and opening a checkpoint
# ---------------------------------------------------------------------------

@contextmanager
def _as_config_error() -> Iterator[None]:
    """The CLI reports ConfigError as `error: ...`, exit code 2; a damaged shard raises CheckpointError."""
    try:
        yield
    except CheckpointError as e:
        raise ConfigError(str(e)) from None


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from: itself (step_N), its metadata.json, or a run / checkpoints folder
    (its `latest`; without one, the newest complete step_N in it)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist: pass a checkpoint folder (.../checkpoints/step_00000500) "
                          "or a run folder (train.out_dir) that holds checkpoints/.")
    try:
        return resolve_checkpoint(path)
    except CheckpointError:
        pass
    # `latest` missing (a folder copied without it) or naming a pruned step: take the newest
    # complete one; a folder without metadata.json is a save that never finished.
    for folder in (path, path / "checkpoints"):
        done = sorted(p for p in folder.glob("step_*") if (p / "metadata.json").is_file())
        if done:
            return done[-1]
    raise ConfigError(f"no checkpoint at {path}: it holds no metadata.json, no `latest` file and no complete "
                      "step_N folder. Pass a checkpoint folder (.../checkpoints/step_00000500) or a run folder "
                      "(train.out_dir) of a run that saved one (checkpoint.interval, checkpoint.save_final).")


def open_checkpoint(path: str | Path) -> CheckpointReader:
    with _as_config_error():
        return CheckpointReader(find_checkpoint(path))


def _tied(reader: CheckpointReader) -> set[str]:
    model = reader.objects.get("config", {}).get("model", {})
    if model.get("tie_embeddings") and reader.has("model/tok_emb.weight") and reader.has("model/head.weight"):
        return {"model/head.weight"}
    return set()


def _kind(key: str) -> str | None:
    """The kind of a checkpoint tensor, None for one that is not a weight or moment (rng, step)."""
    if key.startswith("model/"):
        return kind_of(key[len("model/"):])
    moment = "/".join(key.split("/")[:2])
    return moment if moment in OPTIM_KINDS and key.count("/") >= 2 else None


def tensor_keys(reader: CheckpointReader, optimizer: bool = False) -> list[str]:
    """The tensors to look at, in the checkpoint's order (the model's)."""
    tied = _tied(reader)
    keys = []
    for key, meta in reader.tensors.items():
        kind = _kind(key)
        if kind is None or key in tied or (kind.startswith("optim/") and not optimizer):
            continue
        if getattr(torch, meta["dtype"]).is_floating_point:  # a buffer may be an integer index
            keys.append(key)
    return keys


def _name(key: str) -> str:
    return key[len("model/"):] if key.startswith("model/") else key


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------

@torch.no_grad()
def tensor_stats(t: torch.Tensor) -> dict[str, Any]:
    """The statistics of one tensor, computed in float64."""
    x = t.detach().reshape(-1).to(torch.float64)
    n = x.numel()
    out: dict[str, Any] = {"shape": list(t.shape), "numel": n, "dtype": str(t.dtype).removeprefix("torch.")}
    if n == 0:
        return out | {k: math.nan for k in ("mean", "std", "min", "max", "rms", "zeros")} | {"quantiles": {}}
    mean = x.mean().item()
    q = np.quantile(x.numpy(), list(QUANTILES.values()))
    return out | {"mean": mean, "std": (x - mean).square().mean().sqrt().item(),
                  "min": x.min().item(), "max": x.max().item(), "rms": x.square().mean().sqrt().item(),
                  "zeros": (x == 0).sum().item() / n,
                  "quantiles": {k: float(v) for k, v in zip(QUANTILES, q)}}


def _kind_order(kinds) -> list[str]:
    return [k for k in (*KINDS, "other", *OPTIM_KINDS) if k in kinds]


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per kind: the statistics of all its values together, from the per-tensor ones. Variances
    combine as Chan et al.: n·var = Σ nᵢ·(varᵢ + (meanᵢ − mean)²)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["numel"]:
            groups[r["kind"]].append(r)
    out = {}
    for kind in _kind_order(groups):
        g = groups[kind]
        n = sum(r["numel"] for r in g)
        mean = sum(r["numel"] * r["mean"] for r in g) / n
        var = sum(r["numel"] * (r["std"] ** 2 + (r["mean"] - mean) ** 2) for r in g) / n
        out[kind] = {"tensors": len(g), "numel": n, "mean": mean, "std": math.sqrt(var),
                     "min": min(r["min"] for r in g), "max": max(r["max"] for r in g),
                     "rms": math.sqrt(sum(r["numel"] * r["rms"] ** 2 for r in g) / n),
                     "zeros": sum(r["numel"] * r["zeros"] for r in g) / n}
    return out


def _header(reader: CheckpointReader) -> dict[str, Any]:
    return {"checkpoint": str(reader.folder), "step": reader.step,
            "tied": [_name(k) for k in sorted(_tied(reader))]}


def checkpoint_stats(path: str | Path, optimizer: bool = False) -> dict[str, Any]:
    """{"checkpoint", "step", "tied", "tensors": [per-tensor rows], "kinds": {kind: summary}}."""
    reader = open_checkpoint(path)
    rows = []
    with _as_config_error():
        for key in tensor_keys(reader, optimizer):
            rows.append({"name": _name(key), "key": key, "kind": _kind(key)} | tensor_stats(reader.full(key)))
    return _header(reader) | {"tensors": rows, "kinds": summarize(rows)}


# ---------------------------------------------------------------------------
# Comparing two checkpoints
# ---------------------------------------------------------------------------

@torch.no_grad()
def tensor_change(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """How b differs from a (same shape): the norms and dot product, and from them the relative
    change and the cosine. A zero tensor has no direction: its cosine is 1 if both are zero, else 0."""
    a, b = a.reshape(-1).to(torch.float64), b.reshape(-1).to(torch.float64)
    na, nb, diff, dot = a.norm().item(), b.norm().item(), (b - a).norm().item(), a.dot(b).item()
    return {"norm_a": na, "norm_b": nb, "diff_norm": diff, "dot": dot,
            "max_abs_diff": (b - a).abs().max().item() if a.numel() else 0.0,
            "rel_change": diff / na if na > 0 else (0.0 if diff == 0 else math.inf),
            "cosine": max(-1.0, min(1.0, dot / (na * nb))) if na * nb > 0 else float(diff == 0)}


def summarize_change(rows: list[dict]) -> dict[str, dict]:
    """Per kind, as if the kind's tensors were one vector: √Σ‖b−a‖² / √Σ‖a‖², Σa·b / √(Σ‖a‖² Σ‖b‖²)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["kind"]].append(r)
    out = {}
    for kind in _kind_order(groups):
        g = groups[kind]
        na2, nb2 = sum(r["norm_a"] ** 2 for r in g), sum(r["norm_b"] ** 2 for r in g)
        diff = math.sqrt(sum(r["diff_norm"] ** 2 for r in g))
        out[kind] = {"tensors": len(g), "numel": sum(r["numel"] for r in g),
                     "rel_change": diff / math.sqrt(na2) if na2 > 0 else (0.0 if diff == 0 else math.inf),
                     "cosine": sum(r["dot"] for r in g) / math.sqrt(na2 * nb2) if na2 * nb2 > 0 else float(diff == 0)}
    return out


def compare_checkpoints(path_a: str | Path, path_b: str | Path, optimizer: bool = False) -> dict[str, Any]:
    """Both checkpoints' statistics ("a", "b") and, per tensor they share, how b differs from a.
    Every tensor is read once; a and b hold one tensor each at a time."""
    ra, rb = open_checkpoint(path_a), open_checkpoint(path_b)
    keys_a, keys_b = tensor_keys(ra, optimizer), tensor_keys(rb, optimizer)
    set_a, set_b = set(keys_a), set(keys_b)
    rows_a, rows_b, changes, mismatched = [], [], [], []
    with _as_config_error():
        for key in keys_a:
            ta = ra.full(key)
            rows_a.append({"name": _name(key), "key": key, "kind": _kind(key)} | tensor_stats(ta))
            if key not in set_b:
                continue
            tb = rb.full(key)
            rows_b.append({"name": _name(key), "key": key, "kind": _kind(key)} | tensor_stats(tb))
            if ta.shape != tb.shape:
                mismatched.append({"name": _name(key), "shape_a": list(ta.shape), "shape_b": list(tb.shape)})
                continue
            changes.append({"name": _name(key), "key": key, "kind": _kind(key), "shape": list(ta.shape),
                            "numel": ta.numel(), "std_a": rows_a[-1]["std"], "std_b": rows_b[-1]["std"],
                            "std_ratio": rows_b[-1]["std"] / rows_a[-1]["std"] if rows_a[-1]["std"] else math.nan}
                           | tensor_change(ta, tb))
        only_b = [k for k in keys_b if k not in set_a]
        for key in only_b:
            rows_b.append({"name": _name(key), "key": key, "kind": _kind(key)} | tensor_stats(rb.full(key)))
    return {"a": _header(ra) | {"tensors": rows_a, "kinds": summarize(rows_a)},
            "b": _header(rb) | {"tensors": rows_b, "kinds": summarize(rows_b)},
            "tensors": changes, "kinds": summarize_change(changes),
            "only_in_a": [_name(k) for k in keys_a if k not in set_b], "only_in_b": [_name(k) for k in only_b],
            "shape_mismatch": mismatched}


# ---------------------------------------------------------------------------
# Output: markdown, JSON, plot
# ---------------------------------------------------------------------------

def _g(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"


def _stats_tables(r: dict) -> list[str]:
    lines = ["| kind | tensors | values | mean | std | min | max | rms | zeros |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for kind, s in r["kinds"].items():
        lines.append(f"| {kind} | {s['tensors']} | {s['numel']:,} | {_g(s['mean'])} | {_g(s['std'])} | "
                     f"{_g(s['min'])} | {_g(s['max'])} | {_g(s['rms'])} | {s['zeros']:.2%} |")
    lines += ["", "| tensor | shape | mean | std | min | p0.1 | p50 | p99.9 | max | rms | zeros |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for t in r["tensors"]:
        q = t["quantiles"]
        lines.append(f"| {t['name']} | {'x'.join(map(str, t['shape'])) or 'scalar'} | {_g(t['mean'])} | "
                     f"{_g(t['std'])} | {_g(t['min'])} | {_g(q.get('p0.1'))} | {_g(q.get('p50'))} | "
                     f"{_g(q.get('p99.9'))} | {_g(t['max'])} | {_g(t['rms'])} | {t['zeros']:.2%} |")
    return lines


def _title(r: dict) -> str:
    return f"{r['checkpoint']} (step {r['step']})"


def markdown(result: dict) -> str:
    """The tables of checkpoint_stats or compare_checkpoints."""
    if "a" not in result:
        tied = f" {result['tied'][0]} is tok_emb.weight (tied embeddings), listed once." if result["tied"] else ""
        return "\n".join([f"# Weights of {_title(result)}", "",
                          f"{len(result['tensors'])} tensors, {sum(t['numel'] for t in result['tensors']):,} "
                          f"values.{tied}", "", *_stats_tables(result)]) + "\n"
    a, b = result["a"], result["b"]
    lines = [f"# Weights: a = {_title(a)}, b = {_title(b)}", "",
             "rel change = ‖b − a‖ / ‖a‖; cosine = a·b / (‖a‖ ‖b‖); std b/a = growth of the spread.", "",
             "| kind | tensors | values | rel change | cosine | std a | std b |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for kind, s in result["kinds"].items():
        sa, sb = a["kinds"].get(kind, {}), b["kinds"].get(kind, {})
        lines.append(f"| {kind} | {s['tensors']} | {s['numel']:,} | {_g(s['rel_change'])} | {s['cosine']:.6f} | "
                     f"{_g(sa.get('std'))} | {_g(sb.get('std'))} |")
    lines += ["", "| tensor | shape | rel change | cosine | std a | std b | std b/a | max abs diff |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for t in result["tensors"]:
        lines.append(f"| {t['name']} | {'x'.join(map(str, t['shape'])) or 'scalar'} | {_g(t['rel_change'])} | "
                     f"{t['cosine']:.6f} | {_g(t['std_a'])} | {_g(t['std_b'])} | {_g(t['std_ratio'])} | "
                     f"{_g(t['max_abs_diff'])} |")
    for side, names in (("a", result["only_in_a"]), ("b", result["only_in_b"])):
        if names:
            lines += ["", f"Only in {side}: " + ", ".join(names)]
    if result["shape_mismatch"]:
        lines += ["", "Shapes differ (not compared; a different model config): "
                  + ", ".join(f"{m['name']} {m['shape_a']} vs {m['shape_b']}" for m in result["shape_mismatch"])]
    return "\n".join(lines) + "\n"


def _finite(x: Any) -> Any:
    """JSON has no inf or nan: they become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def to_json(result: dict) -> str:
    return json.dumps(_finite(result), indent=1)


def _histograms(readers: list[CheckpointReader], sides: list[dict], kind: str, bins: int
                ) -> tuple[np.ndarray, list[np.ndarray]]:
    """One kind's histogram in each checkpoint, over shared bins. A second read of the tensors:
    the bins need the kind's range, known only after the first pass, and keeping every tensor
    from the first pass would hold the whole model in memory."""
    lo = min(s["kinds"][kind]["min"] for s in sides if kind in s["kinds"])
    hi = max(s["kinds"][kind]["max"] for s in sides if kind in s["kinds"])
    if lo == hi:  # e.g. RMSNorm gains at initialisation: all exactly 1.0
        lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    edges = np.linspace(lo, hi, bins + 1)
    counts = []
    for reader, side in zip(readers, sides):
        c = np.zeros(bins, dtype=np.int64)
        with _as_config_error():
            for t in side["tensors"]:
                if t["kind"] == kind:
                    c += np.histogram(reader.full(t["key"]).to(torch.float64).numpy(), edges)[0]
        counts.append(c)
    return edges, counts


def _change_bars(ax, result: dict) -> None:
    from matplotlib.patches import Patch

    rows = [t for t in result["tensors"] if math.isfinite(t["rel_change"])]
    kinds = list(result["kinds"])
    colors = {k: f"C{i % 10}" for i, k in enumerate(kinds)}
    y = np.arange(len(rows))
    ax.barh(y, [t["rel_change"] for t in rows], color=[colors[t["kind"]] for t in rows])
    if len(rows) <= 80:  # beyond that the names overlap; the colours still tell the kinds apart
        ax.set_yticks(y, [t["name"] for t in rows], fontsize=7)
    ax.invert_yaxis()  # the model's order, top to bottom
    if rows and all(t["rel_change"] > 0 for t in rows):
        ax.set_xscale("log")  # norms move by 1e-3 while embeddings move by 1e-1
    ax.legend(handles=[Patch(color=colors[k], label=k) for k in kinds], fontsize=7)
    ax.set_xlabel("relative change ‖b − a‖ / ‖a‖", fontsize=8)
    ax.set_title(f"change per tensor, step {result['a']['step']} -> {result['b']['step']}", fontsize=9)
    ax.grid(alpha=0.3, axis="x")


def plot_weights(result: dict, out_png: str | Path, bins: int = 80) -> Path:
    """Histograms of the values per kind (log count), both checkpoints overlaid for a comparison,
    and then a bar per tensor of its relative change."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    compare = "a" in result
    sides = [result["a"], result["b"]] if compare else [result]
    kinds = _kind_order({k for s in sides for k in s["kinds"]})
    ncols = min(3, max(1, len(kinds)))
    nrows = max(1, math.ceil(len(kinds) / ncols))
    bar_h = min(20.0, max(3.0, 0.15 * len(result["tensors"]))) if compare else 0.0
    fig = Figure(figsize=(4.5 * ncols, 3.2 * nrows + bar_h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subfigures(2, 1, height_ratios=[3.2 * nrows, bar_h]) if compare else (fig, None)
    axes = list(top.subplots(nrows, ncols, squeeze=False).flat)
    readers = [open_checkpoint(s["checkpoint"]) for s in sides]
    for ax, kind in zip(axes, kinds):
        edges, counts = _histograms(readers, sides, kind, bins)
        for i, (side, c) in enumerate(zip(sides, counts)):
            ax.stairs(c, edges, color=f"C{i}", fill=not compare, alpha=0.8 if compare else 0.6,
                      label=f"{'ab'[i] + ': ' if compare else ''}step {side['step']}")
        ax.set_yscale("log")  # the tails (outliers) are a few values among thousands
        ax.set_ylim(bottom=0.8)
        n = max(s["kinds"].get(kind, {}).get("numel", 0) for s in sides)
        ax.set_title(f"{kind} ({n:,} values)", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if compare:
            ax.legend(fontsize=7)
    for ax in axes[len(kinds):]:
        ax.set_visible(False)
    top.suptitle("weights of " + (f"a: {_title(sides[0])}\nb: {_title(sides[1])}" if compare else _title(sides[0])),
                 fontsize=9)
    if compare:
        _change_bars(bottom.subplots(), result)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return out_png


def write_weights(result: dict, out_dir: str | Path) -> list[Path]:
    """weights.md, weights.json and weights.png in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "weights.md").write_text(markdown(result), encoding="utf-8")
    (out / "weights.json").write_text(to_json(result), encoding="utf-8")
    return [out / "weights.md", out / "weights.json", plot_weights(result, out / "weights.png")]
