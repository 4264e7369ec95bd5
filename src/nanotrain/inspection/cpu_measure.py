"""The physics of this CPU machine, measured: how fast a process multiplies matrices, and how long
the project's gloo collectives take, so a planner can predict a layout's step time *here*.

Why measure instead of using peaks. hardware.measure_cpu() times large square products with every
core: the best case. A small model's training step is made of much smaller GEMMs, run by N processes
that share C cores, and its communication goes through gloo over loopback TCP, whose cost has
little to do with any datasheet. Both are cheap to time, so we time them.

Compute: the rate at a shape. A GEMM [m, k] @ [k, n] does 2 m k n FLOPs; its FLOP/s falls as the
shape shrinks (less reuse of each loaded element, fixed per-call overhead), so `gemm_seconds`
times the exact shape the planner asks about (cached), and `gemm_rate` reports the rate over a set
of shapes typical of a tiny transformer (m = batch x seq tokens, k = d, n = 4d: an MLP's first
linear). A training step runs each linear three times: forward [m,k]@[k,n], the input's gradient
[m,n]@[n,k] and the weight's gradient [k,m]@[m,n]; the planner should ask for all three.

Compute under N processes on C cores. Each rank gets threads = max(1, C // N) (the project's worlds
use one thread per rank: launch.run_world, OMP_NUM_THREADS=1 under torchrun). While N x threads <= C
every rank runs at rate(threads). Beyond that the ranks time-share the cores: the machine's
aggregate rate stays about C x rate(1 thread) (`concurrent_gemm_rate` measures it), so one rank
progresses at

    effective rate = rate(threads) x min(1, C / (N x threads))          (`effective_rate`)

i.e. for one thread each, rate(1 thread) x C / N: a step's compute takes N / C times as long. Measured
on a 2-core AMX Xeon VM, 8 processes lose another 10% or so to switching between them (aggregate
1.75-1.85 x one thread's rate, where 2 processes reach 1.9-2.1 x): a planner may multiply by ~0.9 there.
Threads need cores of their own: two threads of one process, on two cores one of which other work
keeps busy, wait for each other at every GEMM (a small bf16 GEMM ran 100x slower: `OtherWork`).

Communication: the alpha-beta (Hockney) model. Sending a message of s bytes costs

    time(s) = alpha + s / beta

alpha is the fixed latency of one call (syscalls, gloo's bookkeeping, waking the peer), beta the
bandwidth (bytes/s) once the message is large. Fitting the
two from a sweep of sizes (1 KiB .. 16 MiB) gives the planner a formula for any message. The line
is fitted per collective and per world size, so the algorithm's factors (a ring all-reduce moves
2 (n-1)/n x s per rank, inspection/comm.py's WIRE) and gloo's reduction arithmetic are folded into
beta: it is an *effective* bandwidth in message bytes, not the wire's. Message size follows
nccl-tests (as inspection/comm.py and monitoring/comm.py do): the all-reduce's tensor, the
all-gather's whole output, the reduce-scatter's whole input, what a rank hands all_to_all, what a
rank sends.

Each op is timed through the function of parallel/collectives.py that training calls, so the
number is the cost of the call the code really makes on gloo (torch 2.13: all_gather_single and
reduce_scatter_single, which gloo accepts; all_to_all_single; batch_isend_irecv).

What to expect on a small VM (2 cores, measured): alpha ~0.1-0.4 ms and beta ~1-2 GB/s with 2
processes; with more processes than cores the ranks take turns on the cores and alpha becomes
milliseconds (4 ranks: ~0.5-8 ms; 8 ranks: ~5-30 ms, all-reduce and reduce-scatter the worst, as
their ring has the most steps). Waking a process that waits on another core can take a whole timer
tick (4 ms at HZ=250), so single calls are bimodal: measure_gloo averages a few calls per timing
and keeps the median of several timings.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from ..parallel import collectives as C
from ..parallel.launch import run_world
from .hardware import _best_seconds

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# (m, k, n) of a tiny model's MLP-in linear: m = b*s tokens, k = d, n = 4d.
TRAINING_SHAPES = ((512, 64, 256), (1024, 128, 512), (2048, 256, 1024), (4096, 512, 2048))

# 1 KiB .. 16 MiB in steps of 4: eight sizes, from latency-bound to bandwidth-bound. A world with more
# processes than cores pays milliseconds per call (the ranks wait for each other's turn on a core), so
# it gets five sizes, steps of 16 (measure_gloo).
SIZES = tuple(1024 * 4 ** i for i in range(8))
SPARSE_SIZES = (2 ** 10, 2 ** 14, 2 ** 18, 2 ** 22, 2 ** 24)
OPS = ("all_reduce", "all_gather", "all_gather_into", "reduce_scatter", "all_to_all", "send_recv")

_GEMM_CACHE: dict[tuple, float] = {}


def _dtype(dtype) -> torch.dtype:
    return DTYPES[dtype] if isinstance(dtype, str) else dtype


@contextmanager
def _threads(n: int):
    """torch's intra-op threads set to n for the block, restored after (the caller's setting is its own)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def cores() -> int:
    from ..runtime.machine import job_cores  # the affinity mask, as the runtime counts cores
    return job_cores()


# -- compute ---------------------------------------------------------------------------------------

def gemm_seconds(m: int, k: int, n: int, dtype=torch.float32, threads: int = 1, budget_s: float = 0.003,
                 repeats: int = 3) -> float:
    """Seconds of one torch.mm([m, k] @ [k, n]) in `dtype` with `threads` threads; cached per shape.

    A shape that takes microseconds is looped until one timing lasts about budget_s, so the timer's
    resolution and the call's jitter average out; the best of `repeats` timings is kept (the others
    lost time to something else: hardware._best_seconds)."""
    dtype = _dtype(dtype)
    key = (m, k, n, dtype, threads)
    if key in _GEMM_CACHE:
        return _GEMM_CACHE[key]
    g = torch.Generator().manual_seed(0)  # private: never shift the global RNG of a run
    a = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(k, n, generator=g).to(dtype)
    c = torch.empty(m, n, dtype=dtype)
    with _threads(threads):
        torch.mm(a, b, out=c)  # warm up: oneDNN picks (and may JIT) a kernel per shape
        once = _best_seconds(lambda: torch.mm(a, b, out=c), 1)
        calls = max(1, min(1000, round(budget_s / max(once, 1e-7))))

        def loop():
            for _ in range(calls):
                torch.mm(a, b, out=c)

        seconds = _best_seconds(loop, repeats) / calls
    _GEMM_CACHE[key] = seconds
    return seconds


def gemm_rate(dtype=torch.float32, threads: int = 1, shapes=TRAINING_SHAPES) -> float:
    """FLOP/s over `shapes` (total FLOPs / total seconds: the rate a model made of these GEMMs sees,
    so the slow small shapes weigh by their time, not by one vote each)."""
    flops = sum(2 * m * k * n for m, k, n in shapes)
    return flops / sum(gemm_seconds(m, k, n, dtype, threads) for m, k, n in shapes)


def threads_per_process(procs: int, ncores: int | None = None) -> int:
    """The threads each of `procs` processes gets on the cores: max(1, C // N)."""
    return max(1, (ncores or cores()) // procs)


def effective_rate(rate: float, procs: int, threads: int = 1, ncores: int | None = None) -> float:
    """One process's FLOP/s when `procs` processes of `threads` threads, each alone reaching `rate`,
    share the cores: unchanged while they fit, scaled by C / (N x threads) once they time-share."""
    return rate * min(1.0, (ncores or cores()) / (procs * threads))


def _gemm_loop(m: int, k: int, n: int, dtype, seconds: float) -> tuple[float, float]:
    """One rank of concurrent_gemm_rate: run the GEMM for `seconds`; (this rank's FLOP/s, the CPU seconds
    this process has used since it was forked, its start-up included)."""
    a, b = torch.ones(m, k, dtype=dtype), torch.ones(k, n, dtype=dtype)
    c = torch.empty(m, n, dtype=dtype)
    torch.mm(a, b, out=c)
    dist.barrier()  # everyone starts together: the ranks must really compete for the cores
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        torch.mm(a, b, out=c)
        calls += 1
    return 2 * m * k * n * calls / (time.perf_counter() - start), time.process_time()


def concurrent_gemm_rate(procs: int, m: int = 2048, k: int = 256, n: int = 1024, dtype=torch.float32,
                         threads: int | None = None, seconds: float = 0.4) -> float:
    """The machine's aggregate FLOP/s when `procs` processes run the same GEMM at once (a gloo
    world of `procs` ranks, `threads` each, default max(1, C // N)): the sum of the ranks' rates."""
    return _concurrent_gemm(procs, m, k, n, dtype, threads, seconds)[0]


def _concurrent_gemm(procs, m, k, n, dtype, threads, seconds) -> tuple[float, float]:
    """(aggregate FLOP/s, the ranks' CPU seconds and ours while we waited for them)."""
    cpu = time.process_time()
    ranks = run_world(_gemm_loop, procs, m, k, n, _dtype(dtype), seconds, threads=threads or threads_per_process(procs))
    return sum(r for r, _ in ranks), sum(c for _, c in ranks) + time.process_time() - cpu


# -- communication ---------------------------------------------------------------------------------

def _op_call(op: str, nbytes: int, world: int, rank: int):
    """A no-argument closure that runs `op` once on a message of `nbytes` (nccl-tests convention),
    through the collectives.py function training calls; fp32 elements."""
    numel = max(world, nbytes // 4 // world * world)  # divisible by the world: every part equal
    part = numel // world
    t = torch.ones(numel)
    if op == "all_reduce":
        return lambda: C.all_reduce(t, None)
    if op == "all_gather":  # a list of parts: what tensor/sequence parallelism gathers into
        parts, mine = [torch.empty(part) for _ in range(world)], torch.ones(part)
        return lambda: C.all_gather(parts, mine, None)
    if op == "all_gather_into":  # one flat output: what ZeRO gathers its parameters into
        mine = torch.ones(part)
        return lambda: C.all_gather_into(t, mine, None)
    if op == "reduce_scatter":
        out = torch.empty(part)
        return lambda: C.reduce_scatter(out, t, None)
    if op == "all_to_all":
        out = torch.empty(numel)
        return lambda: C.all_to_all_single(out, t, None)
    if op == "send_recv":  # a ring: send to the next rank, receive from the previous (as pipeline stages do)
        buf = torch.empty(numel)
        return lambda: [w.wait() for w in C.batch_isend_irecv([(t, (rank + 1) % world)],
                                                               [(buf, (rank - 1) % world)], None)]
    raise ValueError(f"unknown op {op!r}: one of {', '.join(OPS)}")


def _calls_per_timing(nbytes: int, world: int) -> int:
    """Back-to-back calls per timing. On a VM an idle core can take a timer tick (~4 ms) to wake, so
    now and then a small message costs 10x its usual time: a batch of four averages those in, as a
    training step's many calls do (the median over batches still drops a batch that other work
    slowed). Large messages, and worlds with more processes than cores (a call there is already
    milliseconds of the ranks taking turns), need no batch."""
    return 4 if nbytes <= 2 ** 16 and world <= cores() else 1


def _time_ops(ops: tuple[str, ...], sizes: tuple[int, ...], repeats: int) -> tuple[list[list[float]], float]:
    """One rank of measure_gloo: seconds per call, [op][size]. Each size runs once untimed (gloo sets
    up buffers on a size's first use, and the call lines the ranks up as a barrier would), then
    `repeats` timings of a batch of calls; a timing counts for the slowest rank (the collective is
    over for the group when its last rank is done), and the median of the repeats is kept. Also
    returns the CPU seconds this process has used since it was forked."""
    world, rank = dist.get_world_size(), dist.get_rank()
    times = torch.zeros(len(ops), len(sizes), repeats, dtype=torch.float64)
    for i, op in enumerate(ops):
        for j, nbytes in enumerate(sizes):
            call, calls = _op_call(op, nbytes, world, rank), _calls_per_timing(nbytes, world)
            call()
            for r in range(repeats):
                start = time.perf_counter()
                for _ in range(calls):
                    call()
                times[i, j, r] = (time.perf_counter() - start) / calls
    dist.all_reduce(times, op=dist.ReduceOp.MAX)  # one collective for the whole table
    return times.median(dim=2).values.tolist(), time.process_time()


def fit_alpha_beta(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(alpha seconds, beta bytes/s) of time = alpha + size / beta, by least squares on the *relative*
    error (weights 1 / time^2): plain least squares would fit the 16 MiB points and leave alpha, the
    whole cost of a 1 KiB message, to their noise. alpha is kept >= 0 and beta > 0."""
    w = [1.0 / t ** 2 for _, t in points]
    sw = sum(w)
    sx = sum(wi * s for wi, (s, _) in zip(w, points))
    sy = sum(wi * t for wi, (_, t) in zip(w, points))
    sxx = sum(wi * s * s for wi, (s, _) in zip(w, points))
    sxy = sum(wi * s * t for wi, (s, t) in zip(w, points))
    det = sw * sxx - sx * sx
    slope = (sw * sxy - sx * sy) / det if det > 0 else 0.0
    alpha = (sy - slope * sx) / sw
    if alpha < 0:  # a line through the origin instead: the same weighted fit with alpha = 0
        alpha, slope = 0.0, sxy / sxx
    if slope <= 0:  # flat or falling (a noisy sweep of tiny sizes): bandwidth from the largest message
        size, t = max(points)
        slope = max(t - alpha, 1e-12) / size
    return alpha, 1.0 / slope


def predict_seconds(fit: dict, nbytes: float) -> float:
    """The alpha-beta line of one op's fit at a message of nbytes."""
    return fit["alpha_s"] + nbytes / fit["bytes_per_s"]


def measure_gloo(world: int, sizes: tuple[int, ...] | None = None, ops: tuple[str, ...] = OPS,
                 repeats: int | None = None) -> dict:
    """Time each op over `sizes` in a fresh gloo world of `world` one-thread processes on 127.0.0.1;
    fit the alpha-beta line. Returns {op: {"alpha_s", "bytes_per_s", "points": [(bytes, seconds)]}}.
    Defaults: SIZES and 5 repeats; where the world has more processes than cores (each call then
    costs milliseconds), SPARSE_SIZES and 3 repeats, to stay within a few seconds."""
    return _measure_gloo(world, sizes, ops, repeats)[0]


def _measure_gloo(world, sizes, ops, repeats) -> tuple[dict, float]:
    """(measure_gloo's table, the ranks' CPU seconds and ours while we waited for them)."""
    cpu = time.process_time()
    fits = world <= cores()
    sizes, repeats = sizes or (SIZES if fits else SPARSE_SIZES), repeats or (5 if fits else 3)
    ranks = run_world(_time_ops, world, tuple(ops), tuple(sizes), repeats, threads=1)
    out = {}
    for op, row in zip(ops, ranks[0][0]):
        points = list(zip(sizes, row))
        alpha, beta = fit_alpha_beta(points)
        out[op] = {"alpha_s": alpha, "bytes_per_s": beta, "points": points}
    return out, sum(c for _, c in ranks) + time.process_time() - cpu


class OtherWork:
    """How many cores other work kept busy while a measurement ran: the machine's busy CPU time
    (/proc/stat, steal included: a hypervisor's other guests count too) minus the measurement's own
    CPU seconds (told by the caller), over the wall time. A figure taken beside other work is lower
    than this machine can do (two threads on a core someone else uses can run a small GEMM 100x
    slower), so the planner should re-measure, or warn, where this is well above 0 (a world's own start
and teardown, which its ranks do not count, shows as 0.1-0.2 core)."""

    def __enter__(self):
        self.start, self.busy = time.perf_counter(), _busy_seconds()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.start
        end = _busy_seconds()
        self.busy = None if end is None or self.busy is None else end - self.busy

    def cores(self, own_cpu_s: float) -> float | None:
        """Cores busy with other work, on average; None where /proc/stat is missing (not Linux)."""
        return None if self.busy is None else max(0.0, self.busy - own_cpu_s) / self.wall


def _busy_seconds() -> float | None:
    """CPU seconds the machine has spent busy since boot, all cores (not idle, not waiting on I/O)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except OSError:
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


# -- python -m nanotrain.inspection.cpu_measure ---------------------------------------------------

def _size(n: float) -> str:
    return f"{n / 2 ** 20:g}M" if n >= 2 ** 20 else f"{n / 1024:g}K"


def _others(meter: OtherWork, own_cpu_s: float) -> str:
    cores = meter.cores(own_cpu_s)
    # ~0.1-0.2 core is our own: a world's fork and teardown, which its ranks cannot count.
    return "other work: ?" if cores is None else f"other work: {cores:.2f} cores" + (" (!)" if cores > 0.3 else "")


def _print_gemm(ncores: int) -> None:
    for name in ("fp32", "bf16"):
        with OtherWork() as meter:
            cpu = time.process_time()
            rates = {th: gemm_rate(name, th) for th in sorted({1, ncores})}
            cpu = time.process_time() - cpu
        line = ", ".join(f"{th} thread{'s' if th > 1 else ''} {r / 1e9:.1f}" for th, r in rates.items())
        print(f"gemm {name}, GFLOP/s over the training shapes: {line}  ({meter.wall:.2f} s; {_others(meter, cpu)})")
        for m, k, n in TRAINING_SHAPES:
            cells = "  ".join(f"{th}t {2 * m * k * n / gemm_seconds(m, k, n, name, th) / 1e9:7.1f}" for th in rates)
            print(f"    [{m:5d} x {k:4d}] @ [{k:4d} x {n:5d}]  {cells}")


def _print_concurrency(ncores: int) -> None:
    m, k, n = 2048, 256, 1024
    for name in ("fp32", "bf16"):
        one = gemm_rate(name, 1, ((m, k, n),))
        print(f"concurrent gemm {name} [{m}x{k}]@[{k}x{n}], N processes of max(1, {ncores} // N) threads, "
              f"aggregate GFLOP/s (1 process x 1 thread: {one / 1e9:.1f}):")
        for procs in (1, 2, 4, 8):
            with OtherWork() as meter:
                agg, cpu = _concurrent_gemm(procs, m, k, n, name, None, 0.4)
            print(f"    N={procs}: {agg / 1e9:7.1f} = {agg / one:.2f}x 1 thread's  ({meter.wall:.2f} s; "
                  f"{_others(meter, cpu)})")


def _print_gloo(world: int) -> None:
    with OtherWork() as meter:
        table, cpu = _measure_gloo(world, None, OPS, None)
    sizes = [size for size, _ in next(iter(table.values()))["points"]]
    print(f"gloo world {world}, microseconds per call  ({meter.wall:.2f} s; {_others(meter, cpu)})")
    print(f"    {'op':16s} {'alpha us':>9s} {'beta GB/s':>9s}   " + " ".join(f"{_size(s):>7s}" for s in sizes)
          + "   fit/measured")
    for op, fit in table.items():
        cells = " ".join(f"{t * 1e6:7.0f}" for _, t in fit["points"])
        ratios = [predict_seconds(fit, s) / t for s, t in fit["points"]]
        print(f"    {op:16s} {fit['alpha_s'] * 1e6:9.1f} {fit['bytes_per_s'] / 1e9:9.3f}   {cells}"
              f"   {min(ratios):.2f}..{max(ratios):.2f}")


def main() -> None:
    from ..runtime.machine import cpu_name_and_kind

    name, kind = cpu_name_and_kind()
    ncores = cores()
    print(f"{name} ({kind}), {ncores} cores, torch {torch.__version__}")
    t0 = time.perf_counter()
    run_world(math.sqrt, 1, 1.0)  # start the forkserver once (it imports torch): not a measurement's cost
    print(f"forkserver start: {time.perf_counter() - t0:.2f} s")
    _print_gemm(ncores)
    _print_concurrency(ncores)
    for world in (2, 4, 8):
        _print_gloo(world)


if __name__ == "__main__":
    main()
