"""`nanotrain plan ... --html FILE`: the search's candidates as one page to explore offline.

The page (monitoring/html/plan.js draws it) computes nothing: every number on it is the planner's,
embedded as JSON. This module gathers them:

    candidates   what the search kept: the ranked ones (the same entries --json prints) and the
                 fastest that do not fit (weighed in full here, marked fits: false)
    what if      for each of those, the same layout with one knob changed (tp x2 / /2, pp x2 / /2,
                 micro-batch x2 / /2, another recompute mode, the ZeRO stage +-1), weighed in
                 full by the same Planner and checked by the same config checks; each becomes an
                 entry of its own, so that a click can move to it
    per entry    the --json fields, memory per rank by kind, the device's capacity, and the
                 timetable the step model played (steptime.played_timetable), with at most
                 TIMELINE_ACTIONS actions (a long step is drawn for its first micro-batches)

Deltas are tokens/s per GPU and GB per rank against the entry the neighbour was made from.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError
from ..monitoring.page import DOCS_NAME, write_page
from .memory import Plan
from .plan import Planner, Request, config_errors, entry, make_plan
from .steptime import pipeline_period

TIMELINE_ACTIONS = 400  # per entry: a few kB of JSON each; enough to see warm-up, steady state, drain


def key(e: dict) -> str:
    """An entry's id: its layout, schedule and recompute mode, as text."""
    lay = ",".join(f"{k}={v}" for k, v in e["layout"].items())
    return f"{lay} {e['schedule']} {e['recompute']}"


def plan_of(req: Request, e: dict) -> Plan:
    """The Plan an entry describes (the inverse of plan.entry)."""
    lay = e["layout"]
    schedule = "1f1b" if e["schedule"] == "none" else e["schedule"]
    return make_plan(req, lay["tp"], lay["cp"], lay["pp"], lay["dp"], lay["ep"], lay["etp"], lay["zero"],
                     lay["micro"], schedule, lay["vp"], e["recompute"])


def drawn_micro_batches(plan: Plan) -> int:
    """How many micro-batches the picture plays: all of them, or whole rounds of the schedule up to
    TIMELINE_ACTIONS actions (at least one round)."""
    period = pipeline_period(plan)
    per_mb = 3 * plan.pp * plan.pp_virtual_stages
    rounds = max(1, TIMELINE_ACTIONS // (per_mb * period))
    return min(plan.micro_batches, rounds * period)


def timetable(events: list[tuple], n: int, of: int, pp: int) -> dict:
    """The played actions of each rank, column by column: kinds as one string ("FFBFBW..."), then
    local chunk, micro-batch, start and end, times in integer units of `unit_s` (1/2000 of the
    drawn span: finer than a screen shows, and a few bytes each)."""
    span = max(e[5] for e in events) or 1.0
    unit = span / 2000
    ranks = [{"kind": "", "chunk": [], "mb": [], "start": [], "end": []} for _ in range(pp)]
    for r, kind, chunk, mb, start, end in sorted(events, key=lambda e: (e[0], e[4])):
        row = ranks[r]
        row["kind"] += kind
        row["chunk"].append(chunk)
        row["mb"].append(mb)
        row["start"].append(round(start / unit))
        row["end"].append(round(end / unit))
    return {"micro_batches": n, "of": of, "unit_s": unit, "span_s": span, "ranks": ranks}


def weigh_entry(req: Request, planner: Planner, plan: Plan, source: str) -> dict:
    """One page entry: plan.entry's fields (--json's) and what the panel draws."""
    n = drawn_micro_batches(plan)
    result = planner.weigh(plan, full=True, timetable=n)
    out = entry(req, plan, result)
    out.update(id=key(out), source=source, memory_by_kind_gb=result["memory_by_kind_gb"],
               timetable=timetable(result["timetable"], n, plan.micro_batches, plan.pp), neighbours=[])
    return out


def knob_changes(e: dict) -> list[tuple[str, dict, str, str]]:
    """(label, layout changes, schedule, recompute) of each one-knob neighbour. tp and pp trade
    with dp (the GPUs stay); the micro-batch changes how many a step runs, not the global batch."""
    lay, out = e["layout"], []
    sched, rec = e["schedule"], e["recompute"]
    for knob in ("tp", "pp"):
        for label, new in ((f"{knob} x2", lay[knob] * 2), (f"{knob} /2", lay[knob] // 2)):
            if new >= 1 and new != lay[knob] and (lay["dp"] * lay[knob]) % new == 0:
                change = {knob: new, "dp": lay["dp"] * lay[knob] // new}
                if knob == "tp":
                    change.update(sp=int(new > 1), etp=new if lay["etp"] > 1 else 1)
                if knob == "pp" and new == 1:
                    change["vp"] = 1
                out.append((label, change, "none" if knob == "pp" and new == 1 else
                            ("1f1b" if sched == "none" else sched), rec))
    for label, new in (("micro x2", lay["micro"] * 2), ("micro /2", lay["micro"] // 2)):
        if new >= 1 and new != lay["micro"]:
            out.append((label, {"micro": new}, sched, rec))
    out += [(f"recompute {r}", {}, sched, r) for r in ("none", "selective", "full") if r != rec]
    out += [(f"ZeRO {z}", {"zero": z}, sched, rec) for z in (lay["zero"] - 1, lay["zero"] + 1) if 0 <= z <= 3]
    return out


def neighbour(req: Request, planner: Planner, e: dict, change: dict, schedule: str, recompute: str) -> dict | None:
    """The neighbour weighed, or None where the planner or the config checks refuse it (a batch
    its dp does not divide, experts its ep does not, a schedule its micro-batches cannot fill)."""
    n = {**e, "layout": {**e["layout"], **change}, "schedule": schedule, "recompute": recompute}
    lay = n["layout"]
    if req.global_batch % (lay["dp"] * lay["micro"]) or lay["dp"] % lay["ep"] or lay["pp"] > req.m.n_layers:
        return None
    try:
        plan = plan_of(req, n)
        if config_errors(req, plan):
            return None
        return weigh_entry(req, planner, plan, "what if")
    except (ValueError, ConfigError):
        return None


def page_entries(req: Request, planner: Planner, result: dict) -> list[dict]:
    """The candidates the search kept, then their neighbours, each once; every kept one lists its
    neighbours, a neighbour those of its own that are on the page."""
    entries: dict[str, dict] = {}
    for e in result["candidates"]:
        entries[key(e)] = weigh_entry(req, planner, plan_of(req, e), "search")
    for e in result["not_fitting"]:
        entries.setdefault(key(e), weigh_entry(req, planner, plan_of(req, e), "search"))
    made: dict[str, dict | None] = {}
    for e in list(entries.values()):
        for label, change, schedule, recompute in knob_changes(e):
            lay = {**e["layout"], **change}
            k = key({"layout": lay, "schedule": schedule, "recompute": recompute})
            if k not in entries and k not in made:
                made[k] = neighbour(req, planner, e, change, schedule, recompute)
            n = entries.get(k) or made[k]
            if n is not None:
                e["neighbours"].append(_delta(label, e, n))
    entries.update({k: n for k, n in made.items() if n is not None})
    for e in entries.values():  # a neighbour's own neighbours: those already on the page
        if e["source"] == "what if":
            for label, change, schedule, recompute in knob_changes(e):
                k = key({"layout": {**e["layout"], **change}, "schedule": schedule, "recompute": recompute})
                if k in entries:
                    e["neighbours"].append(_delta(label, e, entries[k]))
    return list({e["id"]: e for e in reversed(entries.values())}.values())[::-1]  # once each, first kept


def _delta(label: str, e: dict, n: dict) -> dict:
    return {"knob": label, "id": n["id"], "fits": n["fits"],
            "d_tokens_per_s_per_gpu": n["tokens_per_s_per_gpu"] - e["tokens_per_s_per_gpu"],
            "d_memory_per_rank_gb": n["memory_per_rank_gb"] - e["memory_per_rank_gb"]}


def page_data(req: Request, planner: Planner, result: dict) -> dict:
    """Everything the page shows: the request, the device's capacity, the entries."""
    return {"request": {"gpus": req.gpus, "global_batch": req.global_batch, "seq_len": req.seq_len,
                        "dtype": req.dtype, "cluster": req.cluster.describe(), "model": req.m.arch,
                        "capacity_gb": req.cluster.accelerator.hbm_bytes / 1e9},
            "explanation": result.get("explanation", ""), "notes": result.get("notes", []),
            "docs": DOCS_NAME,
            "candidates": page_entries(req, planner, result)}


def write_plan_page(path: Path, req: Request, planner: Planner, result: dict) -> tuple[Path, int]:
    """The page at path; returns it and the number of entries it holds."""
    data = page_data(req, planner, result)
    title = f"nanotrain plan: {req.gpus} x {req.cluster.accelerator.name}, global batch {req.global_batch} x " \
            f"{req.seq_len}"
    write_page(Path(path), title, "plan", json.dumps(data, separators=(",", ":")))
    return Path(path), len(data["candidates"])
