"""What the pipeline ranks did over one step: measured intervals, bubble, picture.

With record=True, PipelineRunner keeps per-rank events (kind, chunk, mb, start, end):

    F, B    forward / backward of micro-batch mb through local chunk `chunk`: compute
    W       the weights' gradients of a backward split in two (zero-bubble schedules)
    wait    blocked on the receive an action needs (its chunk and mb)
    comm    posting one slot's batched send/recv exchange (chunk = mb = -1)
    send    waiting for the last sends at the end of the step (chunk = mb = -1)

Times are seconds after the runner's t0_wall, a time.time() taken at the start of
the step on *that* rank; ranks start at slightly different moments, so they are
aligned on absolute wall time, t0_wall + start. (Clocks of different hosts agree
only to NTP precision; on one machine they are the same clock.)

The bubble is everything that is not compute, as in the textbook definition: time
spent waiting for a neighbour, posting messages, and plainly idle all count. The
textbook value (pp - 1) / (m + pp - 1) assumes free communication; the measured one
shows what the schedule costs on real hardware.

timetable_timelines() turns a schedule's play-through (actions.py) into the same
kind of timeline without running any process: the textbook pictures in the docs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...config import chunks_per_rank
from ...monitoring.comm import union_length
from .actions import Action, Timetable
from .schedules import cached_timetable

Event = tuple[str, int, int, float, float]  # (kind, chunk, mb, start_s, end_s)
COMPUTE = ("F", "B", "W")


@dataclass
class RankTimeline:
    rank: int  # pipeline rank (row in the picture)
    t0_wall: float  # time.time() at the start of the step; event times are relative to it
    events: list[Event]
    v: int = 1  # chunks per rank (interleaved: label bars "F3a", "F3b", ...)

    @classmethod
    def from_runner(cls, runner) -> RankTimeline:
        """The timeline a PipelineRunner recorded in its last train_step(record=True)."""
        return cls(runner.stage.rank, runner.t0_wall, list(runner.events or []), runner.stage.v)


def _origin(timelines: list[RankTimeline]) -> float:
    """Earliest absolute event start over all ranks: time zero of the aligned picture."""
    starts = [tl.t0_wall + e[3] for tl in timelines for e in tl.events]
    if not starts:
        raise ValueError("no pipeline events recorded (run train_step with record=True)")
    return min(starts)


def align(timelines: list[RankTimeline]) -> list[list[Event]]:
    """Per rank, its events with times in seconds after the earliest event of any rank."""
    t0 = _origin(timelines)
    out = []
    for tl in timelines:
        shift = tl.t0_wall - t0  # this rank's clock started `shift` seconds after the origin
        out.append([(k, c, mb, s + shift, e + shift) for k, c, mb, s, e in tl.events])
    return out


def measured_bubble(timelines: list[RankTimeline]) -> float:
    """Fraction of the step the ranks did not compute: 1 - mean(busy) / span.

    span is from the first event of any rank to the last one to end (absolute times);
    busy is the time a rank computed F, B or W (the union: a pair can overlap). Waiting,
    communication and idle all count as bubble, as in the textbook definition."""
    aligned = align(timelines)
    span = max(e for events in aligned for *_, e in events)  # aligned: the earliest start is 0
    if span <= 0:
        raise ValueError("pipeline events span no time")
    # The union: DualPipeV's paired forward and backward can run at once.
    busy = [union_length((s, e) for k, _, _, s, e in events if k in COMPUTE) for events in aligned]
    return 1 - sum(busy) / len(busy) / span


def textbook_bubble(pp: int, m: int, v: int = 1, name: str = "1f1b") -> float:
    """Idle fraction of a step, with a backward twice a forward and free communication.

    GPipe and 1F1B: (pp - 1) / (m + pp - 1). Interleaving makes fill and drain v times
    shorter: Narayanan et al. give the bubble as (1/v) (pp - 1) / m of the compute time,
    i.e. (pp - 1) / (v m + pp - 1) of the step, about the 1F1B fraction divided by v.
    The split schedules' is their play-through's (timeline.timetable_timelines: F, B and W
    one unit each). For ZB-H1 with m >= pp that is pp - 1 idle units per rank beside 3 m of
    work, (pp - 1) / (3 m + pp - 1); DualPipeV has no short formula."""
    if name in ("zb_h1", "dualpipev"):
        return measured_bubble(timetable_timelines(cached_timetable(name, pp, chunks_per_rank(name, v), m)))
    return (pp - 1) / (v * m + pp - 1)


def format_bubble(measured: float, textbook: float | None = None) -> str:
    """One log line, e.g. 'pipeline bubble: measured 31.2%, textbook 27.3% (...)'."""
    line = f"pipeline bubble: measured {measured:.1%}"
    if textbook is not None:
        line += f", textbook {textbook:.1%} (backward = 2 x forward, free communication: textbook_bubble)"
    return line


def timetable_timelines(tt: Timetable, slot_ms: float = 1.0, backward_cost: float = 2.0) -> list[RankTimeline]:
    """Synthetic timelines from a schedule's play-through, with no process running.

    A forward lasts slot_ms and a backward backward_cost * slot_ms (real backwards
    cost about 2x a forward); a backward split into B and W gives B one slot and W the
    rest (the input's and the weights' gradients are one GEMM each per linear). Each rank
    runs its actions in the timetable's order, each as soon as the rank is free and its input (a message in tt.messages) has
    been produced; communication is free. With backward_cost=1 this is exactly the
    unit-slot play-through (the action in slot t runs over [t, t + 1) * slot_ms);
    GPipe and 1F1B keep their (pp - 1) / (m + pp - 1) bubble at any backward_cost."""
    producer: dict[tuple[int, Action], tuple[int, Action]] = {(m.dst, m.consumer): (m.src, m.action)
                                                                for m in tt.messages}
    end: dict[tuple[int, Action], float] = {}  # (rank, action) -> end time, ms
    free = [0.0] * tt.pp  # when each rank finishes its previous action
    events: list[list[Event]] = [[] for _ in range(tt.pp)]
    split = [tt.split(r) for r in range(tt.pp)]
    ends = [set(tt.finishes(r)) for r in range(tt.pp)]
    # Slot by slot: an action's producer always ran in an earlier slot, so its end is known.
    for t in range(tt.n_slots):
        for r in range(tt.pp):
            a = tt.slots[r][t]
            if a is None or (a.kind == "W" and a not in ends[r]):
                continue  # (the first chunk's W: its B ran whole)
            src = producer.get((r, a))
            start = max(free[r], end[src] if src else 0.0)
            cost = {"F": 1.0, "W": backward_cost - 1.0}.get(a.kind, 1.0 if (a.chunk, a.mb) in split[r] else backward_cost)
            free[r] = end[(r, a)] = start + slot_ms * cost
            events[r].append((a.kind, a.chunk, a.mb, start / 1e3, free[r] / 1e3))
    return [RankTimeline(r, 0.0, events[r], tt.v) for r in range(tt.pp)]


def format_timetable(tt: Timetable) -> str:
    """The play-through as text, one row per rank, as in the schedules' docstrings
    (F3b: forward of micro-batch 3 through the rank's second chunk)."""
    width = 3 + (tt.v > 1)

    def cell(a: Action | None) -> str:
        return "." if a is None else f"{a.kind}{a.mb + 1}" + (chr(ord("a") + a.chunk) if tt.v > 1 else "")

    rows = [f"rank {r} |" + " ".join(cell(a).ljust(width) for a in row).rstrip() + "|" for r, row in enumerate(tt.slots)]
    return "\n".join(rows) + f"\n{tt.n_slots} slots, bubble {tt.bubble():.1%} (every action one slot)"


def _darker(rgb, f: float = 0.6):
    return tuple(c * f for c in rgb[:3])


def _lighter(rgb, f: float = 0.55):
    return tuple(c + (1 - c) * f for c in rgb[:3])


def plot_timeline(timelines: list[RankTimeline], path: str | Path, title: str = "",
                  textbook: float | None = None, measured: float | None = None) -> Path:
    """Draw the step as one row per pipeline rank (rank 0 on top), time in ms; return the PNG's path.

    Forward bars take their micro-batch's colour; backward bars (B) the same colour,
    darker and hatched; weight-gradient bars (W) the same colour, pale and dotted. Thin grey
    bars: waiting on a receive (light) and posting or finishing sends (dark). Blank: the rank had nothing to do."""
    # Figure + the Agg canvas directly, not pyplot: no display, no global figure state.
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    aligned = align(timelines)
    span_ms = max(e for events in aligned for *_, e in events) * 1e3 or 1.0
    n_ranks = len(timelines)
    # tab10 is qualitative (neighbouring micro-batches look different); its grey is left
    # out, grey being the colour of waiting.
    palette = [c for i, c in enumerate(colormaps["tab10"].colors) if i != 7]
    fontsize, dpi = 8, 120
    char_px = 0.62 * fontsize * dpi / 72
    # Wide enough that the shortest compute bar can hold a 3-character label, within
    # limits: a long real run drops labels rather than growing a huge picture.
    shortest = min((e - s for events in aligned for k, _, _, s, e in events if k in COMPUTE), default=1.0) * 1e3
    width = min(max(36 * span_ms / max(shortest, 1e-9) / (0.85 * dpi), 10.0), 24.0)

    fig = Figure(figsize=(width, 1.0 + 0.55 * n_ranks), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xlim(0, span_ms)
    px_per_ms = 0.85 * width * dpi / span_ms  # the axes is ~85% of the figure's width

    for tl, events in zip(timelines, aligned):
        y = n_ranks - 1 - tl.rank  # rank 0 on top
        for kind, chunk, mb, s, e in events:
            x, w = s * 1e3, (e - s) * 1e3
            if kind in COMPUTE:
                base = palette[mb % len(palette)]
                fill, hatch, edge, ink = {"F": (base, None, "white", "black"),
                                          "B": (_darker(base), "//", base, "white"),
                                          "W": (_lighter(base), "..", base, "black")}[kind]
                # The hatch takes the edge colour: the micro-batch's own, so it stays faint under the label.
                ax.barh(y, w, left=x, height=0.8, color=fill, hatch=hatch, edgecolor=edge, linewidth=0.5)
                label = f"{kind}{mb + 1}" + (chr(ord("a") + chunk) if tl.v > 1 else "")
                if w * px_per_ms > len(label) * char_px + 4:
                    ax.text(x + w / 2, y, label, ha="center", va="center", fontsize=fontsize,
                            color=ink, fontweight="bold" if kind == "B" else None)
            else:  # waiting and messaging: thin, under the row's centre line
                ax.barh(y - 0.3, w, left=x, height=0.15, color="0.75" if kind == "wait" else "0.4", linewidth=0)

    ax.set_yticks(range(n_ranks), [f"rank {n_ranks - 1 - y}" for y in range(n_ranks)])
    ax.set_ylim(-0.6, n_ranks - 0.4)
    ax.set_xlabel("time (ms)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    parts = [title] if title else []
    if measured is not None:
        tb = f" (textbook {textbook:.1%})" if textbook is not None else ""
        parts.append(f"bubble: measured {measured:.1%}{tb}")
    elif textbook is not None:
        parts.append(f"bubble: textbook {textbook:.1%}")
    ax.set_title(" — ".join(parts))
    handles = [Patch(color="0.6", label="forward (colour: micro-batch)"),
               Patch(facecolor=_darker((0.6,) * 3), hatch="//", edgecolor="0.6", label="backward (B: input gradient)")]
    if any(k == "W" for events in aligned for k, *_ in events):
        handles.append(Patch(facecolor=_lighter((0.6,) * 3), hatch="..", edgecolor="0.6", label="W: weight gradient"))
    if any(k not in COMPUTE for events in aligned for k, *_ in events):
        handles += [Patch(color="0.75", label="wait (recv)"), Patch(color="0.4", label="comm / send")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    fig.clear()  # no pyplot figure manager to close; drop the artists now
    return path


def draw_schedule(name: str, pp: int, m: int, v: int, path: str | Path) -> Path:
    """The textbook picture of a schedule (no process runs): docs/img/pp_*.png."""
    tt = cached_timetable(name, pp, v, m)
    label = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved": "interleaved 1F1B", "zb_h1": "ZB-H1",
             "dualpipev": "DualPipeV"}[name]
    title = f"{label}, pp={pp}" + (f", v={v}" if v > 1 else "") + f", m={m} (backward = 2 x forward = B + W)"
    timelines = timetable_timelines(tt)
    return plot_timeline(timelines, path, title, textbook_bubble(pp, m, v, name), measured_bubble(timelines))


if __name__ == "__main__":  # python -m nanotrain.parallel.pipeline.timeline docs/img
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/img")
    for name, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb_h1", 1), ("dualpipev", 2)):
        print(draw_schedule(name, 4, 8, v, out / f"pp_{name}.png"))
