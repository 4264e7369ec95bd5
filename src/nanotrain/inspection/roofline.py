"""Arithmetic intensity and the roofline (Williams, Waterman & Patterson 2009), per phase and module kind.

A kernel that does F FLOPs while moving B bytes to and from memory has arithmetic intensity
AI = F / B. On a device with peak P FLOP/s and memory bandwidth W B/s it cannot run faster than

    attainable = min(P, AI · W)

The two meet at the ridge point AI* = P / W (H100, bf16: 989e12 / 3.35e12 ≈ 295 FLOP/byte).
Left of it a kernel is memory bound: the tensor cores wait for bytes. Right of it, compute bound.

A matmul [m, k] @ [k, n] does 2mkn FLOPs and moves at least the weight (kn), its input (mk) and
its output (mn) once: AI = 2mkn / (dtype · (kn + mk + mn)), about m FLOP/byte in bf16 while the
m tokens are few next to k and n. So the number of tokens that share one read of a weight decides:
- training and prefill: m = micro_batch · seq_len tokens per weight read: compute bound.
- decode: m = micro_batch (one new token per sequence): memory bound unless the batch nears the
  ridge point; and attention reads each sequence's own KV cache, which no batch shares.
- routed experts: a weight serves only the tokens routed to it, tokens · top_k / n_experts on
  average, 32x fewer than a dense layer for DeepSeek-V3's 8 of 256: MoE decode is memory bound.

The bytes are the ideal-cache lower bound, the roofline convention: every operand crosses the
memory bus exactly once (weights read once per pass, activations read once and written once,
in the given dtype), as if on-chip memory held everything else. Real kernels move more (tiles
re-read, fp32 gradients, elementwise ops between the matmuls, which are left out here: norms,
activations, RoPE, softmax are few FLOPs and run at memory speed). So each point is an upper
bound on speed, and the time is a lower bound.

Training = forward + backward: the backward's two matmuls (dX = dY Wᵀ, dW = Xᵀ dY) have the
forward's shape permuted, so the same FLOPs and bytes each (W, dY, dX; X, dY, dW): training costs
3x the forward in both, at the forward's intensity. Attention likewise (FlashAttention's backward
reads Q, K, V, O, dO and writes dQ, dK, dV). FLOPs follow counts.py (PaLM's model FLOPs), so the
training kinds sum to counts.flops_per_token; the one exception is MLA decode (see attention_core).
"""

from __future__ import annotations

import math
from collections import defaultdict

from torch import nn

from ..config import ModelConfig
from ..layers import Linear
from .counts import attention_dims, kind_of, meta_model
from .hardware import Accelerator

PHASES = ("train", "prefill", "decode")
DTYPE_BYTES = {"bf16": 2, "fp8": 1}


def linear_shapes(model: nn.Module, cfg: ModelConfig) -> list[tuple[str, int, int, int]]:
    """(kind, in_features, out_features, n_experts) of every weight a token multiplies, walked as
    counts.matmul_params_per_token walks them; n_experts > 0 for the stacked routed-expert
    weights (the shape is one expert's), 0 for a weight every token uses."""
    shapes = []
    for name, m in model.named_modules():
        if isinstance(m, Linear):
            shapes.append((kind_of(name + ".weight"), m.in_features, m.out_features, 0))
        elif name.endswith("experts") and not name.endswith("shared_experts"):  # ExpertMLP: [E, out, in]
            shapes += [("routed_experts", p.shape[2], p.shape[1], p.shape[0]) for p in m.parameters()]
        elif name.endswith("router"):
            shapes.append(("router", m.weight.shape[1], m.weight.shape[0], 0))
    if cfg.mtp_depth:  # the MTP module reuses the head once per depth
        shapes += [("mtp", model.head.in_features, model.head.out_features, 0)] * cfg.mtp_depth
    return shapes


def gemm_cost(m: float, k: int, n: int, dtype_bytes: int, count: float = 1.0) -> tuple[float, float]:
    """FLOPs and bytes of `count` matmuls [m, k] @ [k, n]: weight, input and output each moved once."""
    return 2.0 * m * k * n * count, dtype_bytes * count * (k * n + m * k + m * n)


def experts_touched(tokens: float, top_k: int, n_experts: int) -> float:
    """Expected number of experts that get at least one of `tokens` tokens under uniform routing:
    n (1 - (1 - k/n)^tokens). Only those have their weights read. With many tokens it is n, and
    each expert sees tokens · k / n of them; one decoded token reads just its k experts."""
    return n_experts * (1.0 - (1.0 - top_k / n_experts) ** tokens)


def kv_cache_per_token(cfg: ModelConfig) -> int:
    """Numbers cached per token per layer: K and V of each kv head; MLA caches the compressed
    latent and the shared rope key instead (kv_lora_rank + qk_rope_head_dim, 576 for V3)."""
    if cfg.arch == "deepseek":
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    heads, dqk, dv = attention_dims(cfg)
    return (cfg.n_kv_heads or heads) * (dqk + dv)


def attention_core(cfg: ModelConfig, phase: str, batch: int, seq_len: int, dtype_bytes: int) -> tuple[float, float]:
    """FLOPs and bytes of softmax(QKᵀ)V, forward, all layers, as a fused (flash) kernel runs it:
    the T x T scores stay on chip, so the bytes are Q, K, V read and O written; in decode, the
    whole KV cache read for one new token per sequence (no batch shares a cache)."""
    heads, dqk, dv = attention_dims(cfg)
    layers = cfg.n_layers + cfg.mtp_depth
    T = seq_len
    if phase == "decode":
        cache = kv_cache_per_token(cfg)
        if cfg.arch == "deepseek":
            # Attending over the compressed cache means the absorbed form (DeepSeek-V2 §2.1.3,
            # FlashMLA): W_UK folded into the query, W_UV after the output, so each head scores
            # over kv_lora + rope dims and sums kv_lora-dim values. 2·512 + 64 = 1088 multiply-adds
            # per head and position, against the 192 + 128 that counts.py's decode (the
            # decompressed form) counts; the absorbed matmuls themselves cost what wkv_b costs.
            c = cfg.kv_lora_rank
            flops = 2.0 * heads * T * (2 * c + cfg.qk_rope_head_dim)
            q_o = heads * (c + cfg.qk_rope_head_dim) + heads * c
        else:
            flops = 2.0 * heads * T * (dqk + dv)
            q_o = heads * (dqk + dv)
        # Read the T cached positions, write the new one; q in, o out.
        return batch * layers * flops, dtype_bytes * batch * layers * (T * cache + cache + q_o)
    tokens = batch * T
    # Training counts the full T x T square, as PaLM and counts.py do; prefill the causal half.
    ctx = T if phase == "train" else (T + 1) / 2
    flops = 2.0 * tokens * layers * heads * ctx * (dqk + dv)
    # MLA training decompresses k and v for every head; GQA reads n_kv_heads of them.
    kv_heads = heads if cfg.arch == "deepseek" else (cfg.n_kv_heads or heads)
    per_token = heads * dqk + kv_heads * (dqk + dv) + heads * dv  # q, k, v, o
    return flops, dtype_bytes * tokens * layers * per_token


def phase_costs(shapes: list, cfg: ModelConfig, phase: str, batch: int, seq_len: int,
                dtype_bytes: int) -> dict[str, tuple[float, float]]:
    """{kind: (FLOPs, bytes)} for one micro-batch in a phase: train and prefill run batch · seq_len
    tokens (train: forward + backward, 3x); decode runs one token for each of `batch` sequences."""
    tokens = batch * (1 if phase == "decode" else seq_len)
    passes = 3.0 if phase == "train" else 1.0
    costs: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for kind, k, n, n_experts in shapes:
        if n_experts:
            touched = experts_touched(tokens, cfg.moe_top_k, n_experts)
            f, b = gemm_cost(tokens * cfg.moe_top_k / touched, k, n, dtype_bytes, touched)
        else:
            f, b = gemm_cost(tokens, k, n, dtype_bytes)
        costs[kind][0] += passes * f
        costs[kind][1] += passes * b
    f, b = attention_core(cfg, phase, batch, seq_len, dtype_bytes)
    costs["attention_scores"] = [passes * f, passes * b]
    return {k: (f, b) for k, (f, b) in costs.items()}


def roof_point(flops: float, nbytes: float, peak: float, bandwidth: float) -> dict:
    """Where (FLOPs, bytes) sits under the roof, and the least time it can take."""
    ai = flops / nbytes
    return {"flops": flops, "bytes": nbytes, "intensity": ai, "attainable_flops": min(peak, ai * bandwidth),
            "bound": "memory" if ai < peak / bandwidth else "compute",
            "time_s": max(flops / peak, nbytes / bandwidth)}


def roofline(cfg: ModelConfig, seq_len: int, hw: Accelerator, micro_batch_size: int = 1, dtype_bytes: int = 2,
             model: nn.Module | None = None) -> dict:
    """Per phase: each kind's roofline point, and the totals. A phase's time lower bound sums the
    kinds' max(FLOPs / peak, bytes / bandwidth): each kind waits for whichever runs out first."""
    model = model if model is not None else meta_model(cfg)
    shapes = linear_shapes(model, cfg)
    peak, bw = hw.peak_flops(dtype_bytes), hw.hbm_bandwidth
    phases = {}
    for phase in PHASES:
        costs = phase_costs(shapes, cfg, phase, micro_batch_size, seq_len, dtype_bytes)
        kinds = {k: roof_point(f, b, peak, bw) for k, (f, b) in costs.items() if f > 0}
        flops, nbytes = sum(p["flops"] for p in kinds.values()), sum(p["bytes"] for p in kinds.values())
        time_s = sum(p["time_s"] for p in kinds.values())
        tokens = micro_batch_size * (1 if phase == "decode" else seq_len)
        phases[phase] = {"tokens": tokens, "flops": flops, "bytes": nbytes, "intensity": flops / nbytes,
                         "time_s": time_s, "tokens_per_s": tokens / time_s,
                         "utilization_bound": flops / (time_s * peak), "kinds": kinds}
    dtype = {v: k for k, v in DTYPE_BYTES.items()}.get(dtype_bytes, f"{8 * dtype_bytes}-bit")
    return {"hardware": hw.to_dict(), "dtype": dtype, "dtype_bytes": dtype_bytes,
            "micro_batch_size": micro_batch_size, "seq_len": seq_len, "peak_flops": peak, "bandwidth": bw,
            "ridge_point": peak / bw, "phases": phases, "notes": _notes(cfg, micro_batch_size)}


def _notes(cfg: ModelConfig, batch: int) -> list[str]:
    """What a reader of the table needs to know about this model's numbers."""
    notes = []
    if cfg.arch == "deepseek" and cfg.n_routed_experts:
        touched = experts_touched(batch, cfg.moe_top_k, cfg.n_routed_experts)
        per_expert = batch * cfg.moe_top_k / touched
        notes.append(f"Routed experts: each expert sees tokens x {cfg.moe_top_k} / {cfg.n_routed_experts} of the "
                     f"tokens; a decode step (one token for each of the micro-batch's {batch} sequences) reads the "
                     f"weights of about {touched:.1f} experts per layer, each for {per_expert:.2f} "
                     "tokens on average: memory bound.")
        notes.append(f"MLA decode: attention_scores reads the compressed cache ({kv_cache_per_token(cfg)} numbers "
                     "per token per layer) with the absorbed kernel, 2 x kv_lora_rank + qk_rope_head_dim "
                     "multiply-adds per head and position, so decode FLOPs here exceed the model-FLOPs count above "
                     "(qk + v head dims over a decompressed cache).")
    return notes


# -- plots ---------------------------------------------------------------------------------------

_PHASE_STYLE = {"train": ("o", "tab:blue"), "prefill": ("s", "tab:green"), "decode": ("^", "tab:red")}
# Kinds in the order a token meets them; a colour each on the roofline plot.
KIND_ORDER = ("attention", "attention_scores", "dense_mlp", "router", "routed_experts", "shared_experts", "head",
              "mtp")


def _kinds(rf: dict) -> list[str]:
    present = {k for d in rf["phases"].values() for k in d["kinds"]}
    return [k for k in KIND_ORDER if k in present] + sorted(present - set(KIND_ORDER))


def _figure(size=(9, 6)):
    # Figure + the Agg canvas directly, not pyplot (as monitoring/plot.py): no display, no global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _title(rf: dict) -> str:
    return (f"{rf['hardware']['name']}, {rf['dtype']}, micro-batch {rf['micro_batch_size']} x "
            f"{rf['seq_len']} tokens")


def plot_roofline(rf: dict, path) -> None:
    """Log-log: the roof min(peak, AI · bandwidth), the ridge, and a point per (phase, kind):
    colour = kind, marker = phase. Training and prefill matmuls share an intensity (the backward
    is the forward's shape twice more), so prefill's hollow square rings training's dot."""
    import numpy as np
    from matplotlib.lines import Line2D

    peak, bw, ridge = rf["peak_flops"], rf["bandwidth"], rf["ridge_point"]
    kinds = _kinds(rf)
    colors = {k: f"C{i}" for i, k in enumerate(kinds)}
    ais = [p["intensity"] for d in rf["phases"].values() for p in d["kinds"].values()] + [ridge]
    x = np.logspace(math.log10(min(ais) / 3), math.log10(max(ais) * 3), 200)
    fig = _figure()
    ax = fig.add_subplot()
    scale, unit = (1e12, "TFLOP/s") if peak >= 1e12 else (1e9, "GFLOP/s")  # a CPU's peak is GFLOP/s
    ax.loglog(x, np.minimum(peak, x * bw) / scale, color="black", linewidth=2)
    ax.axvline(ridge, color="gray", linestyle="--", linewidth=1)
    ax.annotate(f"ridge point {ridge:.0f} FLOP/B\npeak {peak / scale:.0f} {unit}, {bw / 1e9:.0f} GB/s",
                (ridge, peak / scale), xytext=(-8, 10), textcoords="offset points", ha="right", fontsize=8)
    for ph, d in rf["phases"].items():
        marker = _PHASE_STYLE[ph][0]
        for kind, p in d["kinds"].items():
            xy = (p["intensity"], p["attainable_flops"] / scale)
            if ph == "prefill":
                ax.scatter(*xy, marker=marker, s=140, facecolors="none", edgecolors=colors[kind], linewidths=1.5,
                           zorder=3)
            else:
                ax.scatter(*xy, marker=marker, s=45, color=colors[kind], zorder=4)
    _label_clusters(ax, rf, scale)
    by_kind = [Line2D([], [], color=colors[k], marker="o", linestyle="none", label=k) for k in kinds]
    by_phase = [Line2D([], [], color="black", marker=_PHASE_STYLE[ph][0], linestyle="none", label=ph,
                       markerfacecolor="none" if ph == "prefill" else "black") for ph in rf["phases"]]
    ax.add_artist(ax.legend(handles=by_kind, loc="lower right", fontsize=8, title="kind"))
    ax.legend(handles=by_phase, loc="upper left", fontsize=8, title="phase")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel(f"attainable {unit}")
    ax.set_ylim(top=peak / scale * 3)
    ax.set_title(f"Roofline: {_title(rf)}")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)


def _label_clusters(ax, rf: dict, scale: float) -> None:
    """Text labels. Memory-bound points: one label per spot where points pile up (train and prefill
    matmuls share an intensity; decode's matmuls all sit near AI = 1 in bf16). Compute-bound
    points crowd the flat roof: one block below it lists them with their intensities."""
    spots: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    flat: dict[tuple[str, int], list[str]] = defaultdict(list)  # (kind, intensity): phases
    where = {}
    for ph, d in rf["phases"].items():
        for kind, p in d["kinds"].items():
            if p["bound"] == "compute":
                flat[(kind, round(p["intensity"]))].append(ph)
                continue
            key = round(math.log10(p["intensity"]) * 20)  # within ~12% of each other
            spots[key][kind].append(ph)
            where.setdefault(key, (p["intensity"], p["attainable_flops"] / scale))
    for key, kinds in spots.items():
        ax.annotate("\n".join(f"{'+'.join(phs)}: {k}" for k, phs in kinds.items()), where[key], xytext=(10, -8),
                    textcoords="offset points", fontsize=6.5, va="top")
    if flat:
        lines = [f"{'+'.join(phs)}: {k} ({ai})" for (k, ai), phs in sorted(flat.items(), key=lambda kv: kv[0][1])]
        # x in axes coordinates, y in data: just under the flat roof, whatever the peak.
        ax.text(0.98, rf["peak_flops"] / scale / 1.4, "compute bound (FLOP/B):\n" + "\n".join(lines),
                transform=ax.get_yaxis_transform(), ha="right", va="top", fontsize=6.5)


def plot_intensity(rf: dict, path) -> None:
    """Bars: each kind's arithmetic intensity per phase, against the ridge point."""
    import numpy as np

    kinds = _kinds(rf)
    fig = _figure((max(8, 1.2 * len(kinds) + 3), 5))
    ax = fig.add_subplot()
    n = len(rf["phases"])
    width = 0.8 / n
    for i, (ph, d) in enumerate(rf["phases"].items()):
        ys = [d["kinds"][k]["intensity"] if k in d["kinds"] else np.nan for k in kinds]
        ax.bar(np.arange(len(kinds)) + (i - (n - 1) / 2) * width, ys, width, label=ph, color=_PHASE_STYLE[ph][1])
    ax.axhline(rf["ridge_point"], color="black", linestyle="--", linewidth=1,
               label=f"ridge point {rf['ridge_point']:.0f} FLOP/B")
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(kinds)), kinds, rotation=20, ha="right")
    ax.set_ylabel("arithmetic intensity (FLOP / byte)")
    ax.set_title(f"Arithmetic intensity: {_title(rf)}")
    ax.grid(alpha=0.3, axis="y", which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
