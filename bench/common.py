"""Helpers shared by the benchmarks: repo paths and timing statistics."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def alternate_rounds(fns: dict, steps: int, rounds: int, barrier) -> tuple[dict, dict]:
    """Time `steps` calls of each fn(step) -> loss per round, alternating which goes first
    (machine speed drifts); round 0 warms up and is not timed. Returns (seconds per step
    per round, every loss) by name. `barrier` lines the ranks of a world up around each run."""
    import time

    names = list(fns)
    times = {k: [] for k in names}
    losses = {k: [] for k in names}
    step = {k: 0 for k in names}
    for r in range(rounds + 1):
        for name in (names if r % 2 == 0 else names[::-1]):
            barrier()
            t0 = time.perf_counter()
            for _ in range(steps):
                losses[name].append(float(fns[name](step[name])))
                step[name] += 1
            barrier()
            if r > 0:
                times[name].append((time.perf_counter() - t0) / steps)
    return times, losses


def cpu_kind() -> str:
    """This machine's CPU for a benchmark's header: the model name and the matrix/vector
    extensions that decide its bf16 and fp32 speed (/proc/cpuinfo on Linux)."""
    import platform

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    if "amx_bf16" in flags:
        kind = "amx_bf16 (AMX tiles)"
    elif "avx512_bf16" in flags:
        kind = "avx512_bf16 (no AMX)"
    elif "avx2" in flags:
        kind = "only avx2 (no AVX-512, no AMX)"
    else:
        kind = "no avx2"
    return f"{name}, {kind}"
