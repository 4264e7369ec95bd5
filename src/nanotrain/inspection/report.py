"""`nanotrain inspect`: a model's parameters, FLOPs, memory per rank and communication for a layout,
and its roofline, from a config, before it runs."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from pathlib import Path

from ..config import Config, ConfigError, ModelConfig, load_config
from .comm import comm_per_step, wire_bytes
from .counts import KINDS, flops_per_token, meta_model, param_counts
from .hardware import Accelerator
from ..parallel.layout import Layout
from .memory import Plan, memory_per_rank, rank_model, vocab_per_rank
from .roofline import DTYPE_BYTES, PHASES, plot_intensity, plot_roofline, roofline


def without_balance_loss(m: ModelConfig, layout: Layout | None = None) -> str | None:
    """DeepSeek-V3's sequence-wise balance loss (model.aux_loss_coef) costs a few FLOPs, but the runtime
    cannot split it over pp, cp or sequence parallelism yet, which would rule out every layout the model
    was trained with. For inspect and plan it is set to 0 in place (auxiliary-loss-free balancing) where
    the layout splits it (any layout: None, plan's search); returns the note to print, or None."""
    splits = layout is None or layout.pp > 1 or layout.cp > 1 or layout.sp
    if m.arch != "deepseek" or not m.aux_loss_coef or not splits:
        return None
    m.aux_loss_coef = 0.0
    return ("counted with model.aux_loss_coef=0 (auxiliary-loss-free balancing): the runtime cannot split the "
            "sequence-wise balance loss over pp, cp or sequence parallelism yet; its cost is negligible.")


def model_config(config: str | None, hf_config: str | None, overrides: list[str], seq_len: int | None
                 ) -> tuple[ModelConfig, int]:
    """The model config (ours, or a Hugging Face config.json: Llama family, DeepSeek-V3) and the
    sequence length, with vocab_size and max_seq_len resolved."""
    if hf_config:
        from ..models.hf import model_config_from_hf

        path = Path(hf_config)
        if not path.exists():
            raise ConfigError(f"--hf-config {path} does not exist: pass a Hugging Face config.json.")
        try:
            hf = json.loads(path.read_text())
        except ValueError as e:
            raise ConfigError(f"--hf-config {path} is not valid JSON ({e}).") from None
        try:
            m = model_config_from_hf(hf)
        except ValueError as e:
            raise ConfigError(f"--hf-config {path}: {e}") from None
        seq = seq_len or m.max_seq_len
    else:
        cfg = load_config(config, overrides)
        m = cfg.model
        seq = seq_len or cfg.train.seq_len
        if not m.vocab_size:
            raise ConfigError("model.vocab_size is 0 (it comes from the tokenizer at training time): give it, "
                              "e.g. --model.vocab_size=65 for the character-level Shakespeare data.")
    m.max_seq_len = m.max_seq_len or seq
    return m, seq


def inspect_model(m: ModelConfig, seq_len: int, *, hardware: Accelerator | None = None, micro_batch_size: int = 1,
                  dtype: str = "bf16") -> dict:
    """Counts and FLOPs; with hardware, also the roofline of one micro-batch (roofline.py)."""
    model = meta_model(m)
    counts = param_counts(model, m)
    flops = flops_per_token(model, m, seq_len)
    r = {"arch": m.arch, "seq_len": seq_len, "params_total": counts["all"]["total"],
         "params_active": counts["all"]["active"], "params_active_matmul": counts["all"]["active_matmul"],
         "params_by_kind": {k: v for k, v in counts.items() if k != "all"},
         "flops_per_token": flops["train"], "flops_per_token_prefill": flops["prefill"],
         "flops_per_token_decode": flops["decode"], "train_flops_by_kind": flops["train_per_kind"]}
    if hardware is not None:
        r["roofline"] = roofline(m, seq_len, hardware, micro_batch_size, DTYPE_BYTES[dtype], model)
    return r


def run_config(cfg: Config, m: ModelConfig, layout: Layout, schedule: str, vp: int, recompute: str,
               global_batch: int, seq_len: int) -> Config:
    """The config `nanotrain train` would run for a layout: cfg with m as its model, the layout's
    sizes (tp, cp, pp, dp, ep, etp, sp, ZeRO stage, micro-batch), this pipeline schedule and chunks,
    recomputation, global batch and sequence length. inspect and plan put every layout they show
    through the config checks this way, so that they refuse what train refuses, in its words."""
    cfg = Config.from_dict(dataclasses.asdict(cfg))
    cfg.model = replace(m)
    p = cfg.parallel
    p.tp, p.cp, p.pp, p.dp, p.ep, p.etp = layout.tp, layout.cp, layout.pp, layout.dp, layout.ep, layout.etp
    p.sequence_parallel, p.pp_schedule = layout.sp, schedule
    p.pp_virtual_stages = vp if schedule == "interleaved" else 1
    cfg.optimizer.zero_stage = layout.zero
    cfg.train.micro_batch_size, cfg.train.batch_size, cfg.train.seq_len = layout.micro, global_batch, seq_len
    cfg.train.recompute = recompute
    cfg.resolve()
    return cfg


def fewest_micro_batches(schedule: str, pp: int) -> int:
    """The fewest micro-batches a step of `schedule` over pp stages runs: pp (DualPipeV: 2 pp)."""
    return pp * (2 if schedule == "dualpipev" else 1)


def plan_layout(m: ModelConfig, seq_len: int, cfg: Config, layout: Layout, micro_batch_size: int,
                micro_batches: int | None, hardware: Accelerator | None, capacity: float | None = None) -> dict:
    """Memory per rank and communication per step for a layout (inspection/memory.py, comm.py).

    cfg supplies what the layout does not: precision (dtypes), the pipeline schedule and the
    recomputation. capacity: the device's memory in bytes (default: the hardware's); when the
    largest rank does not fit, `fix` names the cheapest change that makes it fit (fit_changes).
    The layout's vp meets the config's schedule here, in no validated config: a vp the schedule
    cannot run is the config check's line (config.check_chunks, with pp > 1 as there), not an assert
    in the schedule's order. DualPipeV holds 2 chunks per rank whatever vp says (chunks_per_rank)."""
    from ..parallel.pipeline import check_chunks, chunks_per_rank

    p, t = cfg.parallel, cfg.train
    if layout.pp > 1 and (errors := check_chunks(p.pp_schedule, layout.vp)):
        raise ConfigError("--layout: " + " ".join(errors))
    fill = fewest_micro_batches(p.pp_schedule, layout.pp)
    lay = Plan(replace(layout, micro=micro_batch_size), seq_len=seq_len, micro_batches=micro_batches or fill,
               pp_schedule=p.pp_schedule,  # no pipeline, no chunks: pp=1 ignores vp, as the runtime does
               pp_virtual_stages=chunks_per_rank(p.pp_schedule, layout.vp) if layout.pp > 1 else 1,
               pp_partition=p.pp_partition, recompute=t.recompute, recompute_layers=t.recompute_layers)
    out = _plan(m, lay, cfg, hardware)
    capacity = capacity or (hardware.hbm_bytes if hardware is not None else None)
    if capacity:
        out["capacity_bytes"] = capacity
        out["fits"] = out["memory_per_rank_bytes"] <= capacity
        if not out["fits"]:
            out["fix"] = fit_changes(m, lay, cfg, hardware, capacity)
    return out


# The changes `--gpu-memory` tries, cheapest first: each costs more compute or communication than
# the one before it (selective recomputation ~2-4% more FLOPs, full ~33%; smaller micro-batches
# lose GEMM efficiency and, with pp, add bubbles; a ZeRO stage adds dp traffic; tp and pp move
# ranks away from dp at the same world size).
FIT_ORDER = ("selective recomputation", "smaller micro-batch", "full recomputation", "ZeRO stage", "tp", "pp")


def fit_changes(m: ModelConfig, lay: Plan, cfg: Config, hardware, capacity: float) -> dict | None:
    """The first plan that fits, changing in FIT_ORDER and keeping each change made (the global
    batch, world size and sequence stay): {"changes": [...], "layout", "memory_per_rank_bytes"};
    None when even all of them do not fit."""
    changes: list[str] = []

    def fits(plan: Plan):
        try:
            _check_layout(m, plan)
            total = _plan(m, plan, cfg, hardware, with_comm=False)["memory_per_rank_bytes"]
        except ConfigError:
            return None
        return total if total <= capacity else None

    plan = lay
    for kind in FIT_ORDER:  # within a kind, the mildest change first; a kind that never fits stays applied
        last = None
        for label, option in _fit_options(plan, kind):
            last = (label, option)
            total = fits(option)
            if total is not None:
                return {"changes": _applied(changes, label), "layout": option.to_dict(),
                        "memory_per_rank_bytes": total}
        if last is not None:
            changes, plan = _applied(changes, last[0]), last[1]
    return None


def _fit_options(plan: Plan, kind: str):
    """The changes of one FIT_ORDER kind to `plan`, mildest first: (label, changed plan)."""
    if kind == "selective recomputation" and plan.recompute == "none":
        yield "selective recomputation", replace(plan, recompute="selective")
    elif kind == "smaller micro-batch":
        mbs, n = plan.micro_batch_size, plan.micro_batches
        while mbs > 1 and mbs % 2 == 0:  # the same batch in twice as many micro-batches
            mbs, n = mbs // 2, n * 2
            yield f"micro-batch {mbs} x {n} micro-batches", replace(plan, layout=replace(plan.layout, micro=mbs),
                                                                    micro_batches=n)
    elif kind == "full recomputation" and (plan.recompute != "full" or plan.recompute_layers):
        yield "full recomputation", replace(plan, recompute="full", recompute_layers=0)
    elif kind == "ZeRO stage" and plan.dp > 1:
        for stage in range(plan.zero_stage + 1, 4):
            yield f"ZeRO-{stage}", replace(plan, layout=replace(plan.layout, zero=stage))
    elif kind == "tp":
        tp, dp = plan.tp, plan.dp
        while dp % 2 == 0 and dp // 2 >= plan.ep and tp * 2 <= 8:  # tp stays inside a node of 8
            tp, dp = tp * 2, dp // 2
            yield f"tp={tp} (dp={dp})", replace(plan, layout=replace(plan.layout, tp=tp, dp=dp))
    elif kind == "pp":
        pp, dp = plan.pp, plan.dp
        while dp % 2 == 0 and dp // 2 >= plan.ep:
            pp, dp = pp * 2, dp // 2
            yield f"pp={pp} (dp={dp})", replace(plan, layout=replace(plan.layout, pp=pp, dp=dp),
                                                 micro_batches=plan.micro_batches * 2)


def _applied(changes: list[str], label: str) -> list[str]:
    """changes, then `label` (full recomputation supersedes selective)."""
    if label.startswith("full"):
        changes = [c for c in changes if not c.startswith("selective")]
    return changes + [label]


def _plan(m: ModelConfig, lay: Plan, cfg: Config, hardware, with_comm: bool = True) -> dict:
    """Memory per rank (and, with_comm, communication per step) of one plan."""
    _check_layout(m, lay)
    device = "cpu" if hardware is not None and hardware.name.startswith("cpu") else "cuda"
    try:  # the model refuses what it cannot run (e.g. an auxiliary loss under sequence parallelism)
        model = rank_model(m, lay)
        stages = memory_per_rank(m, lay, cfg.precision, device, model)
    except ValueError as e:
        raise ConfigError(f"--layout: {e}") from None
    comm = [comm_per_step(m, lay, cfg.precision, s, model) for s in range(lay.pp)] if with_comm else []
    link = hardware.interconnect_bandwidth if hardware is not None else None
    for stage, groups in zip(stages, comm):
        stage["comm_bytes"] = {g: sum(ops.values()) for g, ops in groups.items()}
        stage["comm_by_collective"] = groups
        stage["comm_wire_bytes"] = wire_bytes(groups, lay)
        if link:
            stage["comm_seconds_at_link"] = {g: b / link for g, b in stage["comm_wire_bytes"].items()}
    worst = max(stages, key=lambda st: st["total"])
    out = {"layout": lay.to_dict(), "world_size": lay.world, "precision": {
        k: getattr(cfg.precision, k) for k in ("recipe", "param_dtype", "master_dtype", "grad_dtype", "exp_avg_dtype",
                                                "exp_avg_sq_dtype")},
        "memory_per_rank_bytes": worst["total"], "stages": stages}
    padded = vocab_per_rank(m, lay.tp) * lay.tp
    if padded != m.vocab_size:  # as training pads a tokenizer's vocabulary (tensor_parallel.py)
        out["vocab_padded"] = padded
    return out


def _check_layout(m: ModelConfig, lay: Plan) -> None:
    """What this model cannot split this way (the layout's own rules, ep dividing dp among them, were
    checked by Layout.parse)."""
    problems = []
    if m.n_heads % lay.tp:
        problems.append(f"tp={lay.tp} does not divide the {m.n_heads} attention heads")
    if lay.pp * lay.pp_virtual_stages > m.n_layers:
        problems.append(f"pp={lay.pp} x {lay.pp_virtual_stages} chunks is more than the {m.n_layers} layers")
    if lay.ep > 1 and (m.arch != "deepseek" or m.n_routed_experts % lay.ep):
        problems.append(f"ep={lay.ep} needs a model whose routed experts it divides")
    if problems:
        raise ConfigError("--layout: " + "; ".join(problems) + ".")


def layout_markdown(plan: dict) -> list[str]:
    lay = plan["layout"]
    name = ", ".join(f"{k}={lay[k]}" for k in ("tp", "cp", "pp", "dp", "ep") if lay[k] > 1) or "one process"
    pr = plan["precision"]
    lines = [f"## Memory per rank: {name}{' with sequence parallelism' if lay['sp'] else ''}, ZeRO-{lay['zero_stage']}",
             "", f"{plan['world_size']} ranks; micro-batch {lay['micro_batch_size']} x {lay['seq_len']} tokens"
             + (f" ({lay['seq_len'] // lay['cp']} of each sequence per rank: context parallel)" if lay['cp'] > 1 else "")
             + ", "
             f"{lay['micro_batches']} micro-batches per step ({lay['pp_schedule']} when pp > 1); "
             f"recipe {pr['recipe']}, "
             f"parameters {pr['param_dtype']}, master {pr['master_dtype']}, gradients {pr['grad_dtype']}, moments "
             f"{pr['exp_avg_dtype']}/{pr['exp_avg_sq_dtype']}; recomputation {lay['recompute']}"
             + (f" (the first {lay['recompute_layers']} blocks of each chunk)" if lay['recompute'] == "full"
                and lay['recompute_layers'] else "")
             + ". Every tp, cp, dp and ep rank of a stage holds the same "
             "amount (expert ranks up to the router's imbalance). Activations are what backward will use, at the "
             "step's peak (temporaries inside an op are not counted); the columns none / selective / full give them "
             "under each train.recompute. ZeRO-3's gathered parameters: the root's and two blocks' at a time.", "",
             "| stage | layers | weights | gradients | master | optimizer | gathered (ZeRO-3) "
             "| activations / micro-batch | in flight | activations none / selective / full | total |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    if "vocab_padded" in plan:
        v = plan["vocab_padded"]
        lines[2] += (f" The vocabulary is padded to {v} rows ({v // lay['tp']} per tp rank), as training pads the "
                     "tokenizer's when tp does not divide it: weights, logits and traffic count the padding.")
    for st in plan["stages"]:
        lines.append(f"| {st['stage']} | {st['layers']} | {_bytes(st['weights'])} | {_bytes(st['gradients'])} | "
                     f"{_bytes(st['master'])} | {_bytes(st['optimizer'])} | {_bytes(st['gathered_params'])} | "
                     f"{_bytes(st['activations_per_micro_batch'])} | {st['in_flight']} | "
                     + " / ".join(_bytes(st['activations_by_recompute'][k]) for k in ("none", "selective", "full"))
                     + f" | **{_bytes(st['total'])}** |")
    if "fits" in plan:
        lines += ["", f"Largest rank: {_bytes(plan['memory_per_rank_bytes'])}: "
                  f"{'fits' if plan['fits'] else 'does **not** fit'} in {_bytes(plan['capacity_bytes'])}."]
        if not plan["fits"]:
            fix = plan.get("fix")
            lines.append(f"Cheapest change that fits ({_bytes(fix['memory_per_rank_bytes'])} per rank): "
                         + ", then ".join(fix["changes"]) + "." if fix else
                         "Nothing in " + ", ".join(FIT_ORDER) + " makes it fit at this world size: more devices, "
                         "a shorter sequence or a smaller global batch.")
    lines += ["", "## Communication per optimizer step (one rank of each stage)", "",
              "Message sizes as nccl-tests counts them; on the wire, per rank, with ring algorithms; the time is the "
              "wire bytes over the scale-up link (a lower bound: it assumes every group is inside one node).", "",
              "| stage | group | collectives | bytes | on the wire | time at link |",
              "| ---: | --- | --- | ---: | ---: | ---: |"]
    for st in plan["stages"]:
        for g, ops in st["comm_by_collective"].items():
            t = st.get("comm_seconds_at_link", {}).get(g)
            lines.append(f"| {st['stage']} | {g} | {', '.join(ops)} | {_bytes(st['comm_bytes'][g])} | "
                         f"{_bytes(st['comm_wire_bytes'][g])} | {_seconds(t) if t else ''} |")
    return lines


def _n(x: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.2f}{unit}"
    return f"{x:.0f}"


def markdown(r: dict, images: bool = False) -> str:
    lines = [f"# {r['arch']} model, sequence length {r['seq_len']}", "",
             f"Parameters: **{_n(r['params_total'])}** total, **{_n(r['params_active'])}** active per token "
             f"({_n(r['params_active_matmul'])} without the embedding lookup).", "",
             "| kind | total | active per token | share of total |", "| --- | ---: | ---: | ---: |"]
    for kind in KINDS:
        c = r["params_by_kind"].get(kind)
        if c:
            lines.append(f"| {kind} | {_n(c['total'])} | {_n(c['active'])} | "
                         f"{c['total'] / r['params_total']:.1%} |")
    lines += ["", "FLOPs per token (training: forward + backward, attention over the full T x T square as PaLM "
              "counts it; prefill and decode: causal positions only):", "",
              "| phase | FLOPs per token |", "| --- | ---: |",
              f"| training | {_n(r['flops_per_token'])} |",
              f"| prefill (forward) | {_n(r['flops_per_token_prefill'])} |",
              f"| decode (one token, {r['seq_len']} in context) | {_n(r['flops_per_token_decode'])} |", "",
              "| training FLOPs by kind | per token | share |", "| --- | ---: | ---: |"]
    for kind, f in sorted(r["train_flops_by_kind"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {kind} | {_n(f)} | {f / r['flops_per_token']:.1%} |")
    if "plan" in r:
        lines += ["", *layout_markdown(r["plan"])]
    if "roofline" in r:
        lines += ["", *roofline_markdown(r["roofline"], images)]
    return "\n".join(lines) + "\n"


def _bytes(x: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:.0f} B"


def _rate(x: float, unit: str) -> str:
    """FLOP/s or B/s with an SI prefix: 989 TFLOP/s on an H100, 90 GFLOP/s on a busy CPU."""
    for prefix, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if abs(x) >= size:
            return f"{x / size:.3g} {prefix}{unit}/s"
    return f"{x:.3g} {unit}/s"


def _seconds(x: float) -> str:
    for unit, size in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if x >= size:
            return f"{x / size:.3g} {unit}"
    return f"{x * 1e9:.3g} ns"


def roofline_markdown(rf: dict, images: bool = False) -> list[str]:
    """The roofline section: where each (phase, kind) sits against the hardware's ridge point."""
    hw = rf["hardware"]
    b, t = rf["micro_batch_size"], rf["seq_len"]
    lines = [f"## Roofline: {hw['name']}, {rf['dtype']}", "",
             f"Peak {_rate(rf['peak_flops'], 'FLOP')} ({rf['dtype']} dense matmul), memory "
             f"{_rate(rf['bandwidth'], 'B')}: ridge point **{rf['ridge_point']:.0f} FLOP/byte**. Below it a "
             "kernel waits for memory, above it for the matmul units. Bytes are the ideal-cache lower bound "
             "(weights once, activations in and out once), so times are lower bounds and attainable FLOP/s upper "
             f"bounds. Phases, for a micro-batch of {b}: training step = forward + backward of {b} x {t} tokens; "
             f"prefill = forward of {b} x {t} tokens; decode = one new token per sequence, {t} positions in each "
             "KV cache. "
             "One device runs the whole model here; sharding it over g devices divides FLOPs and bytes alike, so "
             "the intensities stay and the times divide by g.", "",
             "| phase | tokens | FLOPs | bytes | intensity (FLOP/B) | time lower bound | tokens/s at most "
             "| MFU at most |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for ph in PHASES:
        d = rf["phases"][ph]
        lines.append(f"| {ph} | {d['tokens']} | {_n(d['flops'])} | {_bytes(d['bytes'])} | {d['intensity']:.1f} | "
                     f"{_seconds(d['time_s'])} | {d['tokens_per_s']:,.0f} | {d['utilization_bound']:.1%} |")
    lines += ["", "| phase | kind | FLOPs | bytes | intensity (FLOP/B) | bound | attainable |",
              "| --- | --- | ---: | ---: | ---: | --- | ---: |"]
    for ph in PHASES:
        for kind, p in sorted(rf["phases"][ph]["kinds"].items(), key=lambda kv: -kv[1]["flops"]):
            lines.append(f"| {ph} | {kind} | {_n(p['flops'])} | {_bytes(p['bytes'])} | {p['intensity']:.1f} | "
                         f"{p['bound']} | {_rate(p['attainable_flops'], 'FLOP')} |")
    lines += [f"\n{note}" for note in rf.get("notes", [])]
    if images:
        lines += ["", "![roofline](roofline.png)", "", "![arithmetic intensity per kind](intensity.png)"]
    return lines


def write_report(r: dict, out: str | Path) -> list[Path]:
    """DIR/report.md (the markdown with the figures embedded by relative path) and the PNGs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if "roofline" in r:
        for name, plot in (("roofline.png", plot_roofline), ("intensity.png", plot_intensity)):
            plot(r["roofline"], out / name)
            written.append(out / name)
    (out / "report.md").write_text(markdown(r, images=True), encoding="utf-8")
    return [out / "report.md", *written]
