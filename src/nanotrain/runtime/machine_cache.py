"""A CPU's matmul rates, measured once per machine and kept in a cache file.

Two decisions of every CPU run come from how fast torch.mm runs (runtime/machine.py):
precision.recipe = "auto" (bf16 or fp32) and the MFU's peak. Timed again at every start, they
follow the machine's load rather than the machine: with other processes on the cores, the same
command picked fp32 in one run and bf16 in the next, and a peak timed at 1% of the idle one made
a run report 1723% MFU. So the rates are measured once per machine, kept, and read back:

    key       CPU model, matmul units (AMX, AVX512-BF16, ...), cores the job may use, torch version:
              what the rates depend on. Another machine, a wider affinity mask or a new torch
              (another oneDNN) is a new key, measured anew.
    where     $NANOTRAIN_CACHE_DIR, else $XDG_CACHE_HOME/nanotrain, else ~/.cache/nanotrain;
              one JSON file, machine.json, with an entry per key.
    measure   `nanotrain machine --measure` measures again and replaces the entry.

A measurement repeats until it is stable: torch.mm is timed until the best two tries agree
within TOLERANCE (a try only reads low, never high: time lost to other work adds to it), and the
best is kept. A measurement that reads far below what the hardware does is rejected with a
warning (node_rate): with all cores, under half of what one thread reaches (one thread's rate
stands in, and is kept marked as such until --measure finds the machine idle); with one thread,
under the floor of the CPU's kind (FLOOR_PER_CORE: the floor stands in, for this run only).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import torch

from ..atomic import atomic_write

CACHE_ENV = "NANOTRAIN_CACHE_DIR"
TOLERANCE = 0.05  # the best two timings of a stable measurement agree within 5%
MOST_TRIES = 8

# The least FLOP/s one idle core of each kind reaches in torch.mm with one thread: a tenth of the
# plain expectation, so that only a core that was busy reads below it. fp32: two 256-bit FMA units
# at 2 GHz give 64 GFLOP/s, torch.mm ~50 (one core of the AMX Xeon of docs/performance.md: 0.2 TFLOP/s);
# AVX512-BF16 about twice fp32; AMX bf16 ~1.4 TFLOP/s on that Xeon (2026-12-06). No bf16 floor where
# bf16 has no units (AVX2, AVX-512: oneDNN converts in software, slow by nature), or oneDNN is told
# not to use them (ONEDNN_MAX_CPU_ISA).
FLOOR_PER_CORE = {
    "fp32": {"AVX2": 5e9, "AVX-512": 5e9, "AVX512-BF16": 5e9, "AMX": 5e9},
    "bf16": {"AVX512-BF16": 10e9, "AMX": 50e9},
}


def cache_file() -> Path:
    """The cache file: $NANOTRAIN_CACHE_DIR, else $XDG_CACHE_HOME/nanotrain, else ~/.cache/nanotrain."""
    folder = os.environ.get(CACHE_ENV)
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        folder = Path(base) / "nanotrain"
    return Path(folder) / "machine.json"


def machine_key(name: str, kind: str, cores: int) -> str:
    """What the rates depend on, as one readable string (the cache's key)."""
    return f"{name} | {kind} | {cores} cores | torch {torch.__version__}"


def floor(kind: str, dtype: str, cores: int) -> float:
    """The least FLOP/s `cores` cores of this kind reach in `dtype` (0: no floor known)."""
    units, _, limited = kind.partition(",")  # "AMX, limited to AVX2 by ONEDNN_MAX_CPU_ISA"
    if limited and dtype != "fp32":
        return 0.0
    return FLOOR_PER_CORE.get(dtype, {}).get(units, 0.0) * cores


def stable_rate(measure: Callable[[], float], tolerance: float = TOLERANCE,
                most: int = MOST_TRIES) -> tuple[float, int]:
    """(the best of `measure`'s rates, how many it took): measured until the best two agree within
    `tolerance`, at most `most` times. Each try already keeps its fastest timing; other work on the
    cores only makes a try read low, so the best try is the machine's rate."""
    rates: list[float] = []
    while len(rates) < most:
        rates.append(measure())
        best, second = (sorted(rates, reverse=True) + [0.0])[:2]
        if second >= best * (1 - tolerance):
            break
    return max(rates), len(rates)


def _read() -> dict:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):  # none yet, or unreadable: measure (and write a good one)
        return {}


def cached(key: str) -> dict[str, dict]:
    """{dtype: {"flops": FLOP/s, "measured": UTC date}} kept for this machine ({} if none)."""
    entry = _read().get(key, {})
    return entry if isinstance(entry, dict) else {}


def store(key: str, rates: dict[str, dict]) -> Path:
    """Keep `rates` (cached()'s form) for this machine, beside what is kept for others."""
    path = cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    everything = _read()
    everything[key] = {**cached(key), **rates}
    atomic_write(path, json.dumps(everything, indent=1, sort_keys=True) + "\n")
    return path


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


ONE_THREAD = "one thread's rate: more threads were slowed by busy cores"


def node_rate(dtype: str, kind: str, cores: int,
              measure: Callable[[str, int], float]) -> tuple[float, str | None, bool]:
    """(the FLOP/s of `cores` cores in `dtype`, why it is not what `cores` threads measured or None,
    whether to keep it).

    torch.mm is timed with one thread and with `cores` threads, each until stable. The many-thread
    figure is the node's rate, unless it reads under half of one thread's: threads wait for each
    other at every product, so one busy core slows them all (2 threads of the 2-core Xeon of
    docs/performance.md beside two busy processes: 0.002-0.005 TFLOP/s in fp32, one thread 0.2).
    It is then rejected, and one thread's rate, which busy cores disturb least, stands in: a
    peak that is low rather than wrong (a run faster than it raises it, monitoring/mfu.py).
    One thread below the floor of the CPU's kind ran on a busy core too: the floor stands in."""
    one = stable_rate(lambda: measure(dtype, 1))[0]
    many = stable_rate(lambda: measure(dtype, cores))[0] if cores > 1 else one
    least = floor(kind, dtype, 1)
    if one < least:
        why = (f"torch.mm in {dtype} measured {one / 1e12:.3g} TFLOP/s on one core, below the "
               f"{least / 1e12:.3g} that an idle core of this kind ({kind}) reaches: the cores were busy")
        return max(many, least * cores), why, False
    if many < one / 2:
        why = (f"torch.mm in {dtype} measured {many / 1e12:.3g} TFLOP/s with {cores} threads, under half of "
               f"one thread's {one / 1e12:.3g}: other work held some of the cores")
        return one, why, True
    return max(many, one), None, True


def measure_rates(key: str, kind: str, cores: int, dtypes: tuple[str, ...], measure: Callable[[str, int], float],
                  fresh: bool = False) -> tuple[dict[str, float], list[str], str]:
    """({dtype: FLOP/s}, warnings, where they came from) for this machine: from the cache, or measured
    now (node_rate; every dtype with `fresh`) and cached. measure(dtype, threads) times torch.mm once.
    What stands in for a rejected measurement is kept only where it is one thread's rate and no
    full measurement is kept already; a floor is never kept."""
    before = cached(key)
    kept = {} if fresh else before
    missing = [d for d in dtypes if d not in kept]
    rates = {d: kept[d]["flops"] for d in dtypes if d in kept}
    warnings, new = [], {}
    for d in missing:
        rates[d], why, keep = node_rate(d, kind, cores, measure)
        if why:
            warnings.append(f"warning: {why}. This run takes {rates[d] / 1e12:.3g} TFLOP/s ("
                            + ("kept as one thread's rate" if keep else "the floor, not kept")
                            + "); `nanotrain machine --measure` on an idle machine measures again.")
        if keep and not (why and d in before and not before[d].get("note")):  # never over a full measurement
            new[d] = {"flops": rates[d], "measured": now(), **({"note": ONE_THREAD} if why else {})}
    if new:
        store(key, new)
    provisional = sorted(d for d in dtypes if d in kept and kept[d].get("note"))
    notes = "".join(f"; {d}: {ONE_THREAD}" for d in provisional)
    if missing:
        return rates, warnings, "measured now, kept" if new else "measured now, not kept"
    dates = sorted(kept[d]["measured"] for d in dtypes)
    return rates, warnings, (f"cached from {dates[0]}" if dates else "no rates needed") + notes
