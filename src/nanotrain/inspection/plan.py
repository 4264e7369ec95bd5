"""`nanotrain plan`: search the layouts of a model on N GPUs, predict each one's step, rank them.

    for every layout the config checks accept (tp, cp, pp, vp, dp, ep, etp, sp, ZeRO stage,
    micro-batch, schedule, recomputation):
        memory per rank  (memory.py, the same figures `nanotrain inspect` prints)
        step time        (steptime.py: compute, exposed communication, bubble, optimizer)
    drop what does not fit, rank the rest by tokens/s per GPU

What --layout, --schedule and --recompute fix stays fixed; the rest is searched. The space is
large (DeepSeek-V3 on 2048 GPUs has ~10^5 combinations), so the search prunes where the answer
is known without looking:
  - sp is on whenever tp > 1: the same bytes as tp alone, and less activation memory;
  - tp stays inside a node, and cp at most 8, unless --layout asks for more;
  - the ZeRO stage is the lowest that fits: a higher one only adds communication;
  - each candidate is first weighed with its pipeline played up to 2 x pp micro-batches and
    extended at the steady pace, and its memory on its first and last stage; the best are then
    weighed again in full (every stage's memory, the longer play) and checked against the config.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..config import Config, ConfigError, ModelConfig, validate
from ..parallel.layout import Layout
from .cluster import Cluster
from .memory import Plan, RankModelView, memory_per_rank
from .report import run_config, without_balance_loss
from .steptime import StepPlan, model_flops, predict

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb_h1", "dualpipev")
RECOMPUTE = ("none", "selective", "full")
SPLIT = ("zb_h1", "dualpipev")  # backward split into B and W: no recomputation, no ZeRO-3 (config/rules.py)


@dataclass(frozen=True)
class Request:
    m: ModelConfig
    cfg: Config  # precision and the other sections a candidate's config check reads
    cluster: Cluster
    gpus: int
    global_batch: int
    seq_len: int
    fixed: dict  # --layout's keys: {"tp": 8, "sp": True, ...}
    schedule: str | None = None
    recompute: str | None = None
    dtype: str = "bf16"
    top: int = 10


def parse_fixed(text: str | None) -> dict:
    """The keys --layout gives, checked as every command's --layout is (parallel/layout.py)."""
    return Layout.keys(text) if text else {}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _options(req: Request, key: str, default: list) -> list:
    return [req.fixed[key]] if key in req.fixed else default


def structures(req: Request):
    """(tp, cp, pp, dp, ep, etp) that split the GPUs and the model evenly."""
    m, node = req.m, req.cluster.gpus_per_node
    kv = m.n_kv_heads or m.n_heads
    tps = [t for t in _options(req, "tp", [t for t in _divisors(req.gpus) if t <= node])
           if m.n_heads % t == 0 and kv % t == 0 and m.ffn_width() % t == 0]
    cps = _options(req, "cp", [c for c in (1, 2, 4, 8) if req.seq_len % (2 * c) == 0 or c == 1])
    moe = m.arch == "deepseek" and m.n_routed_experts
    for tp in tps:
        for cp in cps:
            if req.gpus % (tp * cp):
                continue
            for pp in _options(req, "pp", [p for p in _divisors(req.gpus // (tp * cp)) if p <= m.n_layers]):
                if req.gpus % (tp * cp * pp):
                    continue
                dp = req.gpus // (tp * cp * pp)
                if "dp" in req.fixed and req.fixed["dp"] != dp:
                    continue
                if req.global_batch % dp:
                    continue
                eps = [e for e in _divisors(dp) if m.n_routed_experts % e == 0] if moe else [1]
                for ep in _options(req, "ep", eps):
                    if dp % ep:  # expert-parallel groups are carved out of the data-parallel ranks
                        continue
                    etps = [1, tp] if moe and tp > 1 and m.moe_d_ff % tp == 0 else [1]
                    for etp in _options(req, "etp", etps):
                        if etp in (1, tp):
                            yield tp, cp, pp, dp, ep, etp


def schedules(req: Request, pp: int, micro_batches: int) -> list[tuple[str, int]]:
    """(schedule, chunks per rank) this pipeline can run with this many micro-batches."""
    if pp == 1:
        return [("1f1b", 1)]
    names = [req.schedule] if req.schedule else SCHEDULES
    out = []
    for name in names:
        if name == "interleaved":
            vs = [req.fixed["vp"]] if "vp" in req.fixed else [2, 4]
            out += [(name, v) for v in vs if v > 1 and pp * v <= req.m.n_layers and micro_batches % pp == 0]
        elif name == "dualpipev":
            if micro_batches >= 2 * pp and 2 * pp <= req.m.n_layers:
                out.append((name, 2))
        elif req.fixed.get("vp", 1) == 1:
            out.append((name, 1))
    return out


class Planner:
    """Weighs candidates, keeping what several of them share: the model built once per (tp, sp,
    etp, ep), the model FLOPs once."""

    def __init__(self, req: Request):
        self.req = req
        self.flops = model_flops(req.m, req.seq_len)
        self.views: dict = {}
        self.device = "cpu" if req.cluster.measured else "cuda"

    def view(self, plan: Plan) -> RankModelView:
        key = (plan.tp, plan.sp, plan.layout.etp, plan.ep)
        if key not in self.views:
            self.views[key] = RankModelView(self.req.m, plan)
        return self.views[key]

    def weigh(self, plan: Plan, full: bool = False, need_fit: bool = False, timetable: int = 0) -> dict:
        """A candidate's prediction and memory: quick (first and last stage, a short play) or full.
        need_fit: skip the time of a candidate that does not fit. timetable=n: also the schedule
        played with n micro-batches (steptime.played_timetable), for plan_page's picture."""
        req = self.req
        view = self.view(plan)
        stages = None if full else sorted({0, plan.pp - 1})
        mem = memory_per_rank(req.m, plan, req.cfg.precision, self.device, view, stages)
        worst = max(mem, key=lambda s: s["total"])
        capacity = req.cluster.accelerator.hbm_bytes
        if need_fit and worst["total"] > capacity:
            return {"fits": False, "memory_per_rank_gb": worst["total"] / 1e9}
        out = predict(req.m, StepPlan(plan, req.global_batch, req.dtype), req.cfg.precision, req.cluster, view,
                      self.flops, cap=512 if full else 0, timetable=timetable)
        out.update(memory_per_rank_gb=worst["total"] / 1e9, fits=worst["total"] <= capacity,
                   memory_by_kind_gb={k: worst[k] / 1e9 for k in ("weights", "gradients", "master", "optimizer",
                                                                  "activations", "gathered_params")})
        return out


def make_plan(req: Request, tp, cp, pp, dp, ep, etp, zero, micro, schedule, v, recompute) -> Plan:
    sp = req.fixed.get("sp", tp > 1)
    layout = Layout(tp=tp, cp=cp, pp=pp, vp=v if schedule == "interleaved" else 1, dp=dp, ep=ep, etp=etp,
                    sp=sp and tp > 1, zero=zero, micro=micro)
    return Plan(layout, seq_len=req.seq_len, micro_batches=req.global_batch // (dp * micro), pp_schedule=schedule,
                pp_virtual_stages=v, recompute=recompute)


def _zero_stages(req: Request, dp: int, cp: int, schedule: str, pp: int) -> list[int]:
    if "zero" in req.fixed:
        return [req.fixed["zero"]]
    if dp * cp == 1:
        return [0]
    return [z for z in (0, 1, 2, 3) if not (z == 3 and pp > 1 and schedule in SPLIT)]


def _micros(req: Request, dp: int) -> list[int]:
    per_rank = req.global_batch // dp
    return _options(req, "micro", [b for b in (1, 2, 4, 8) if per_rank % b == 0])


def screen(req: Request, planner: Planner) -> list[tuple[float, tuple]]:
    """Each structure (tp, cp, pp, dp, ep, etp) weighed once in its most frugal form (micro-batch 1,
    the highest ZeRO stage, full recomputation where the schedule allows it): one that does not fit
    then cannot fit at all. The rest, with their step time in that form, fastest first."""
    kept = []
    for s in structures(req):
        tp, cp, pp, dp, ep, etp = s
        micro = min(_micros(req, dp))
        options = schedules(req, pp, req.global_batch // (dp * micro))
        if not options:
            continue
        schedule, v = next(((n, v) for n, v in options if n == "1f1b"), options[0])
        recompute = req.recompute or ("none" if pp > 1 and schedule in SPLIT else "full")
        zero = max(_zero_stages(req, dp, cp, schedule, pp))
        plan = make_plan(req, tp, cp, pp, dp, ep, etp, zero, micro, schedule, v, recompute)
        try:
            result = planner.weigh(plan, need_fit=True)
        except (ValueError, ConfigError):
            continue
        if result["fits"]:
            kept.append((result["step_s"], s))
    return sorted(kept)


def candidates(req: Request, planner: Planner, structures_: list[tuple]):
    """Every candidate of these structures, weighed quickly: for each micro-batch, schedule and
    recompute mode, the lowest ZeRO stage that fits (or, when none does, the one that comes closest)."""
    recomputes = [req.recompute] if req.recompute else list(RECOMPUTE)
    for tp, cp, pp, dp, ep, etp in structures_:
        for micro in _micros(req, dp):
            mb = req.global_batch // (dp * micro)
            for schedule, v in schedules(req, pp, mb):
                for recompute in recomputes:
                    if pp > 1 and schedule in SPLIT and recompute != "none":
                        continue
                    best = None
                    for zero in _zero_stages(req, dp, cp, schedule, pp):
                        plan = make_plan(req, tp, cp, pp, dp, ep, etp, zero, micro, schedule, v, recompute)
                        try:
                            result = planner.weigh(plan)
                        except (ValueError, ConfigError):
                            break
                        if best is None or result["fits"] or \
                                (not best[1]["fits"] and result["memory_per_rank_gb"] < best[1]["memory_per_rank_gb"]):
                            best = (plan, result)
                        if result["fits"]:
                            break
                    if best is not None:
                        yield best


def config_errors(req: Request, plan: Plan) -> list[str]:
    """What the config checks say of this candidate (an empty list: accepted)."""
    cfg = candidate_config(req, plan)
    try:
        validate(cfg)
    except ConfigError as e:
        return [str(e)]
    return []


def candidate_config(req: Request, plan: Plan) -> Config:
    """The run config of a candidate: the request's config with its layout, schedule, recomputation,
    sequence and global batch (report.run_config, as inspect checks a layout)."""
    return run_config(req.cfg, req.m, plan.layout, plan.pp_schedule, plan.pp_virtual_stages, plan.recompute,
                      req.global_batch, req.seq_len)


def layout_dict(plan: Plan) -> dict:
    lay = plan.layout
    return {"tp": lay.tp, "cp": lay.cp, "pp": lay.pp, "vp": plan.pp_virtual_stages if plan.pp > 1 else 1,
            "dp": lay.dp, "ep": lay.ep, "etp": lay.etp, "sp": int(lay.sp), "zero": lay.zero, "micro": lay.micro}


FIELDS = ("layout", "schedule", "recompute", "dtype", "step_s", "tokens_per_s_per_gpu", "model_tflops_per_gpu",
          "mfu", "hfu", "memory_per_rank_gb", "fits", "breakdown")


def entry(req: Request, plan: Plan, result: dict) -> dict:
    """One candidate as --json prints it (FIELDS, in order)."""
    out = {"layout": layout_dict(plan), "schedule": plan.pp_schedule if plan.pp > 1 else "none",
           "recompute": plan.recompute, "dtype": req.dtype}
    out.update({k: result[k] for k in FIELDS[4:]})
    return out


def search(req: Request, shortlist: int = 40, structures_kept: int = 24, planner: Planner | None = None) -> dict:
    """Rank the candidates; the best `shortlist` quick ones are weighed again in full and checked
    against the config. Returns the --json object, plus "explanation" and "searched" for the table.
    planner: one to reuse afterwards (plan_page weighs the neighbours of the candidates with it)."""
    started = time.perf_counter()
    planner = planner or Planner(req)
    if not any(True for _ in structures(req)):
        raise ConfigError(_nothing_runs(req))
    screened = screen(req, planner)
    if not screened and fully_fixed(req):  # weigh the given layout whatever its memory
        screened = [(0.0, s) for s in structures(req)]
    if not screened:
        raise ConfigError(f"no layout of {req.gpus} GPUs fits {req.cluster.accelerator.hbm_bytes / 1e9:.0f} GB per "
                          "GPU, even with micro-batch 1, full recomputation and the highest ZeRO stage: add GPUs, "
                          "shorten --seq-len, or use a device with more memory (--cluster).")
    quick = list(candidates(req, planner, [s for _, s in screened[:structures_kept]]))
    fitting = sorted((c for c in quick if c[1]["fits"]), key=lambda c: -c[1]["tokens_per_s_per_gpu"])
    ranked, dropped = [], []
    for plan, _ in fitting[:shortlist]:
        result = planner.weigh(plan, full=True)
        errors = config_errors(req, plan)
        if errors:
            dropped.append((plan, errors))
            continue
        if result["fits"]:
            ranked.append(entry(req, plan, result))
    ranked.sort(key=lambda e: (-e["tokens_per_s_per_gpu"], e["memory_per_rank_gb"]))  # a tie: the smaller
    notes = []
    if not ranked:
        closest = min(quick, key=lambda c: c[1]["memory_per_rank_gb"]) if quick else None
        if dropped and all(not c[1]["fits"] for c in quick if c[0] not in {d[0] for d in dropped}):
            raise ConfigError(f"every layout that fits is refused by the config checks, e.g. "
                              f"{layout_text(dropped[0][0])}: {dropped[0][1][0]}")
        if closest is None or not fully_fixed(req):
            need = f"the smallest needs {closest[1]['memory_per_rank_gb']:.1f} GB ({layout_text(closest[0])})" \
                if closest else "none fits even with micro-batch 1, full recomputation and the highest ZeRO stage"
            raise ConfigError(f"no layout of {req.gpus} GPUs fits {req.cluster.accelerator.hbm_bytes / 1e9:.0f} GB per "
                              f"GPU: {need}. Add GPUs, shorten --seq-len or lower --global-batch.")
        # The layout was given whole: predict it all the same, marked as not fitting.
        plan = closest[0]
        ranked = [entry(req, plan, planner.weigh(plan, full=True))]
        notes.append(f"--layout does not fit: {ranked[0]['memory_per_rank_gb']:.1f} GB per rank against "
                     f"{req.cluster.accelerator.hbm_bytes / 1e9:.0f} GB (fits: false); the prediction is for it anyway.")
    best = ranked[0]
    out = {**best, "candidates": ranked[:max(req.top, 1)], "notes": notes}
    unfit = sorted((c for c in quick if not c[1]["fits"]), key=lambda c: -c[1]["tokens_per_s_per_gpu"])
    out["not_fitting"] = [entry(req, p, r) for p, r in unfit[:max(req.top, 1)]]
    out["explanation"] = explain(ranked)
    out["searched"] = {"structures": sum(1 for _ in structures(req)), "structures_fitting": len(screened),
                       "candidates": len(quick), "fitting": len(fitting), "seconds": time.perf_counter() - started}
    return out


def fully_fixed(req: Request) -> bool:
    """Whether --layout fixes how the GPUs split (tp, pp and dp; cp and ep default to 1 there)."""
    return all(k in req.fixed for k in ("tp", "pp", "dp"))


def layout_text(plan: Plan) -> str:
    d = layout_dict(plan)
    return ",".join(f"{k}={v}" for k, v in d.items()) + f" {plan.pp_schedule if plan.pp > 1 else ''} " \
        f"recompute={plan.recompute}".replace("  ", " ")


def _nothing_runs(req: Request) -> str:
    fixed = ",".join(f"{k}={int(v)}" for k, v in req.fixed.items())
    m = req.m
    return (f"no layout of this model splits {req.gpus} GPUs with global batch {req.global_batch}"
            + (f" and --layout {fixed}" if fixed else "") + ": tp x cp x pp x dp must equal --gpus, dp must divide "
            f"--global-batch, tp the {m.n_heads} attention heads and {m.n_kv_heads or m.n_heads} KV heads, pp at "
            f"most the {m.n_layers} layers. Change --gpus, --global-batch or --layout.")


def explain(ranked: list[dict]) -> str:
    """Why the best beats the runner-up, in a line: the parts of the step that differ most."""
    if len(ranked) < 2:
        return "only one layout was weighed." if not ranked or not ranked[0]["fits"] else "only one layout fits."
    a, b = ranked[0], ranked[1]
    diff = {k: b["breakdown"].get(k, 0.0) - a["breakdown"].get(k, 0.0) for k in set(a["breakdown"]) | set(b["breakdown"])}
    knobs = [f"{k}={a['layout'][k]} vs {b['layout'][k]}" for k in a["layout"] if a["layout"][k] != b["layout"][k]]
    for k in ("schedule", "recompute"):
        if a[k] != b[k]:
            knobs.append(f"{k} {a[k]} vs {b[k]}")
    gain = b["step_s"] / a["step_s"] - 1
    parts = sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:2]
    why = ", ".join(f"{k} {'-' if d > 0 else '+'}{abs(d) / b['step_s']:.1%} of the runner-up's step" for k, d in parts
                    if abs(d) > 1e-12)
    if not why:  # nothing the step model sees differs (e.g. the ZeRO stage of a layout with dp=1)
        return (f"best ({', '.join(knobs) or 'same layout'}) and the runner-up predict the same step; the best is "
                f"listed first for its memory per rank ({a['memory_per_rank_gb']:.2f} vs "
                f"{b['memory_per_rank_gb']:.2f} GB).")
    return (f"best ({', '.join(knobs) or 'same layout'}) is {gain:.1%} faster than the runner-up: {why}."
            + _link_note(a, b))


def _link_note(a: dict, b: dict) -> str:
    if a["layout"]["tp"] != b["layout"]["tp"] and max(a["layout"]["tp"], b["layout"]["tp"]) > 8:
        return " A tp group wider than a node sends its all-reduces over the NICs instead of NVLink."
    return ""


# -- the command -------------------------------------------------------------------------------


def plan_request(args, overrides: list[str]) -> tuple[Request, list[str]]:
    """`nanotrain plan`'s arguments as a Request, and the notes to print about what was assumed."""
    from ..config import load_config
    from .cluster import cpu_cluster, load_cluster, preset
    from .report import model_config

    if args.config and args.hf_config:
        raise ConfigError("plan takes --config (ours) or --hf-config (Hugging Face config.json), not both")
    if not (args.config or args.hf_config):
        raise ConfigError("plan needs a model: --config FILE.toml (e.g. configs/deepseek_v3.toml) or "
                          "--hf-config config.json")
    m, seq = model_config(args.config, args.hf_config, overrides, args.seq_len)
    cfg = load_config(args.config, [o for o in overrides if not o.startswith("--model.")] if args.hf_config
                      else overrides)
    notes = [note for note in [without_balance_loss(m)] if note]
    fixed = parse_fixed(args.layout)
    if args.hardware and args.hardware.strip().lower() == "cpu":
        cluster = cpu_cluster(args.gpus)
    elif args.hardware:
        cluster = preset(args.hardware)
    else:
        cluster = load_cluster(args.cluster)
    dtype = args.dtype or resolved_dtype(cfg.precision.recipe, cluster)
    if cfg.precision.recipe == "auto":  # memory's dtypes as a run there would pick them
        cfg.precision.recipe = "fp32" if dtype == "fp32" else "bf16"
    cluster.peak(dtype)  # one line if the device has no such matmul (fp8 on an A100)
    req = Request(m, cfg, cluster, args.gpus, args.global_batch, seq, fixed, args.schedule, args.recompute, dtype,
                  args.top)
    return req, notes


def resolved_dtype(recipe: str, cluster: Cluster) -> str:
    """The GEMM dtype of precision.recipe on this cluster: auto is bf16 where bf16 multiplies at least
    as fast as fp32 (runtime/machine.py's rule), the fp8 and fp4 recipes run fp8-or-narrower GEMMs
    (planned at the fp8 peak), fp16 has bf16's."""
    if recipe == "auto":
        acc = cluster.accelerator
        return "bf16" if acc.fp32_flops is None or acc.bf16_flops >= acc.fp32_flops else "fp32"
    if recipe in ("fp32", "bf16"):
        return recipe
    return "bf16" if recipe == "fp16" else "fp8"


def table(req: Request, result: dict) -> str:
    """The ranked candidates as text, the best one's parts, and why it wins."""
    head = (f"{req.gpus} x {req.cluster.describe()}; global batch {req.global_batch} x {req.seq_len} tokens, "
            f"{req.dtype} GEMMs")
    rows = [head, "", f"{'#':>2}  {'layout':44} {'schedule':11} {'recompute':9} {'step s':>8} {'tok/s/GPU':>10} "
                      f"{'MFU':>6} {'mem GB':>7}  parts of the step (s)"]
    for i, c in enumerate(result["candidates"], 1):
        lay = ",".join(f"{k}={v}" for k, v in c["layout"].items() if k != "sp") + (",sp" if c["layout"]["sp"] else "")
        parts = " ".join(f"{k} {v:.3g}" for k, v in c["breakdown"].items() if v > 0)
        rows.append(f"{i:>2}  {lay:44} {c['schedule']:11} {c['recompute']:9} {c['step_s']:8.3f} "
                    f"{c['tokens_per_s_per_gpu']:10,.0f} {c['mfu']:6.1%} {c['memory_per_rank_gb']:7.1f}"
                    f"{'' if c['fits'] else ' (does not fit)'}  {parts}")
    searched = result.get("searched")
    if searched:
        rows += ["", f"searched {searched['candidates']} candidates of {searched['structures_fitting']} splits that "
                     f"fit (of {searched['structures']}) in {searched['seconds']:.1f} s"]
    rows += ["", result.get("explanation", "")]
    return "\n".join(rows)
