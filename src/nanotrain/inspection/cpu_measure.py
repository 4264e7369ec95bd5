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

A tiny model's pieces (its blocks, its ends, the optimizer step, a GEMM at a shape not seen
before, drawing a batch) are timed whole, at a rank's shapes, as a step runs them: the section
"a tiny model's pieces" below says why.

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
and keeps the median of several timings, and their mean, which is what a step pays (the planner's,
timed between computations: measure_gloo's gap_s).
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

# How a training step hands its operands to torch.mm (autograd's, for a Linear y = x W^T with W
# stored [out, in]): "nt" the forward (W^T, a transposed view), "nn" the input's gradient dY W, "tn"
# the weight's gradient X^T dY (X^T a transposed view).
LAYOUTS = ("nn", "nt", "tn")


def gemm_seconds(m: int, k: int, n: int, dtype=torch.float32, threads: int = 1, budget_s: float = 0.003,
                 repeats: int = 3, layout: str = "nn") -> float:
    """Seconds of one torch.mm([m, k] @ [k, n]) in `dtype` with `threads` threads; cached per shape.

    As a training step calls it: each call allocates its output (autograd's GEMMs never write into
    a buffer of their own; with the runtime's allocator setting, runtime/allocator.py, which this
    process then takes too), and `layout` says which operand is a transposed view (LAYOUTS). Both
    matter on a CPU: measured on a 2-core AMX Xeon, [768 x 128] @ [128 x 512] in bf16 takes 74 us
    into a reused output and 145 us into a fresh one, and oneDNN packs a transposed operand
    differently.

    A shape that takes microseconds is looped until one timing lasts about budget_s, so the timer's
    resolution and the call's jitter average out; the best of `repeats` timings is kept (the others
    lost time to something else: hardware._best_seconds)."""
    from ..runtime.allocator import keep_freed_memory

    dtype = _dtype(dtype)
    key = (m, k, n, dtype, threads, layout)
    if key in _GEMM_CACHE:
        return _GEMM_CACHE[key]
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: one of {', '.join(LAYOUTS)}")
    keep_freed_memory()
    g = torch.Generator().manual_seed(0)  # private: never shift the global RNG of a run
    a = torch.randn(k, m, generator=g).to(dtype).t() if layout == "tn" else torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, k, generator=g).to(dtype).t() if layout == "nt" else torch.randn(k, n, generator=g).to(dtype)
    with _threads(threads):
        torch.mm(a, b)  # warm up: oneDNN picks (and may JIT) a kernel per shape
        once = _best_seconds(lambda: torch.mm(a, b), 1)
        calls = max(1, min(1000, round(budget_s / max(once, 1e-7))))

        def loop():
            for _ in range(calls):
                torch.mm(a, b)

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


# -- a tiny model's pieces, timed whole --------------------------------------------------------------
#
# On a GPU a block's time is its GEMMs and its bytes. A tiny model on a CPU is another machine: one
# block of shakespeare_char (d = 128, 768 tokens) runs ~60 PyTorch operations forward and ~100
# backward, each costing 5-10 us of dispatch, autograd and allocation before any arithmetic (measured
# on a 2-core AMX Xeon: the block at 1 x 4 tokens still takes 0.6 ms forward and 0.8 ms backward, a
# fifth of its time at 12 x 64); its elementwise kernels (GELU, LayerNorm, RoPE, the autocast casts)
# run at a fraction of the copy bandwidth; its attention core is a CPU flash kernel in fp32. Modelled
# op by op, each of these needs a constant. Timed whole, the block at this rank's shapes gives them
# all at once, as gemm_seconds gives a GEMM's: the planner builds the rank's block (its tensor-
# parallel shard, its share of the experts), runs its forward and backward as the runtime would
# (autocast, the attention core's dtype, the allocator setting) and keeps the median of a few runs.
# What the stand-in leaves out is modelled apart: the collectives (tensor parallelism's run through
# groups of one here, expert parallelism's experts are run locally on the same number of routed
# rows), and the GEMMs at shapes oneDNN has not seen (new_shape_seconds).

PIECES_MAX_PARAMS = 20e6  # a block larger than this is not timed (the analytic model stands in)
_PIECE_CACHE: dict[tuple, tuple] = {}


def _stand_in(m, kind: str, chain: int, tp: int, sp: bool, etp: int, ep: int, dtype: str):
    """The model whose blocks [first, first + chain) are `chain` blocks of `kind` ("dense", "moe") as
    one rank holds them: tp shards built with a group of one (every collective the identity), the
    routed experts as this rank's share (n_routed_experts / ep of them, run locally: under balanced
    routing a rank's experts receive as many rows from the ep group as it routes). Returns (model,
    blocks)."""
    from dataclasses import replace

    from ..models import build_model
    from ..models.attention import Attention
    from ..module_spec import mark
    from ..parallel.tensor_parallel import TensorParallel

    first = m.first_k_dense_replace if kind == "moe" else 0
    cfg = replace(m, n_layers=first + chain, mtp_depth=0, dropout=0.0, aux_loss_coef=0.0)
    if kind == "dense" and m.arch == "deepseek":
        cfg = replace(cfg, first_k_dense_replace=first + chain)
    if ep > 1:
        groups = max(1, m.n_group // ep)
        cfg = replace(cfg, n_routed_experts=m.n_routed_experts // ep, n_group=groups,
                      topk_group=min(m.topk_group, groups))
    tpo = TensorParallel(None, 0, tp, sp, etp > 1) if tp > 1 else None
    model = build_model(cfg, tpo)
    model.init_weights(0)
    model.train()
    for mod in model.modules():  # precision/policy.attention_core_dtype: fp32 under bf16 on a CPU
        if isinstance(mod, Attention) and dtype != "fp32":
            mark(mod, core_dtype=torch.float32)
    return model, [model.layers[str(i)] for i in range(first, first + chain)]


class _Evict:
    """Other work between two timed runs (EVICT_S of GEMMs and a pass over 16 MiB, more than a core's
    L2): a step runs each of its pieces once, after the rest of the step has evicted its code and
    data from the core's caches and TLB, never back to back as a timing loop does. Measured on the
    2-core AMX Xeon: the optimizer step of shakespeare_char takes 1.3 ms back to back, 2.4 ms after
    such work and 2.5-2.6 ms in a training step; drawing a batch 0.03, 0.48 and 0.41-0.44 ms."""

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.a = torch.randn(768, 512, generator=g).to(torch.bfloat16)
        self.b = torch.randn(512, 512, generator=g).to(torch.bfloat16)
        self.x = torch.randn(4 << 20, generator=g)

    def __call__(self) -> None:
        end = time.perf_counter() + EVICT_S
        while time.perf_counter() < end:
            torch.mm(self.a, self.b)
            torch.nn.functional.gelu(self.x)


EVICT_S = 0.01


def _median_runs(fn, runs: int, warmup: int = 2, evict: bool = False) -> list[float]:
    """fn() -> (seconds, ...) run warmup + runs times, each after other work where `evict` (_Evict);
    the median of each field over the timed runs."""
    other = _Evict() if evict else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        other()
        times.append(fn())
    return [sorted(t[i] for t in times)[len(times) // 2] for i in range(len(times[0]))]


def block_seconds(m, kind: str, micro_batch: int, seq: int, tp: int = 1, sp: bool = False, etp: int = 1,
                  ep: int = 1, dtype: str = "bf16", threads: int = 1, chain: int = 1,
                  runs: int = 5) -> tuple[float, float] | None:
    """(forward, backward) seconds of one block of `kind` for one micro-batch of micro_batch x seq
    tokens on one rank (see _stand_in), timed as `chain` such blocks in a row (a chunk's blocks keep
    each other's activations for backward, which a block timed alone would find in cache: on the
    2-core Xeon four shakespeare blocks in a row take 7-10% longer than four timed one at a time),
    their weights updated between two runs as a step's optimizer updates them (untimed); cached.
    None where the block is too large to time (PIECES_MAX_PARAMS)."""
    from ..runtime.allocator import keep_freed_memory

    key = ("block", repr(m), kind, micro_batch, seq, tp, sp, etp, ep, dtype, threads, chain)
    if key in _PIECE_CACHE:
        return _PIECE_CACHE[key]
    keep_freed_memory()
    with _threads(threads), torch.random.fork_rng():  # build and time without moving the caller's RNG
        model, blocks = _stand_in(m, kind, 1, tp, sp, etp, ep, dtype)
        if sum(p.numel() for p in blocks[0].parameters()) > PIECES_MAX_PARAMS:
            _PIECE_CACHE[key] = None
            return None
        model, blocks = _stand_in(m, kind, chain, tp, sp, etp, ep, dtype)
        pos, _ = model.positions(None)
        x = torch.randn(micro_batch, seq, m.d_model)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != "fp32")
        params = [p for b in blocks for p in b.parameters()]
        opt = torch.optim.AdamW(params, lr=1e-6, fused=True)

        def run():
            h = x0 = x.clone().requires_grad_()
            start = time.perf_counter()
            with autocast:
                for block in blocks:
                    h = block(h, pos)
            mid = time.perf_counter()
            h.backward(torch.ones_like(h))
            end = time.perf_counter()
            del x0
            # Between two passes a step updates every weight (untimed here): the next forward finds
            # them as the optimizer left them, not as its own last pass did.
            opt.step()
            opt.zero_grad(set_to_none=True)
            return mid - start, end - mid

        fwd, bwd = _median_runs(run, runs)
    _PIECE_CACHE[key] = (fwd / chain, bwd / chain)
    return _PIECE_CACHE[key]


def ends_seconds(m, micro_batch: int, seq: int, vocab: int, dtype: str = "bf16", threads: int = 1,
                 runs: int = 5) -> tuple[float, float, float, float] | None:
    """(embedding forward, its backward, output forward, its backward) seconds for one micro-batch:
    the token embedding, and the final norm, head and cross entropy over `vocab` rows (this rank's
    slice of the vocabulary; the vocabulary-parallel loss's collectives are modelled apart); cached.
    None where the head is too large to time."""
    from dataclasses import replace

    from ..models import build_model
    from ..runtime.allocator import keep_freed_memory

    key = ("ends", repr(m), micro_batch, seq, vocab, dtype, threads)
    if key in _PIECE_CACHE:
        return _PIECE_CACHE[key]
    if vocab * m.d_model > PIECES_MAX_PARAMS:
        _PIECE_CACHE[key] = None
        return None
    keep_freed_memory()
    with _threads(threads), torch.random.fork_rng():
        model = build_model(replace(m, n_layers=1, vocab_size=vocab, mtp_depth=0, dropout=0.0,
                                    first_k_dense_replace=min(m.first_k_dense_replace, 1)))
        model.init_weights(0)
        model.train()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (micro_batch, seq), generator=g)
        targets = torch.randint(0, vocab, (micro_batch, seq), generator=g)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != "fp32")

        def run():
            t0 = time.perf_counter()
            with autocast:
                h = model.embed(ids)
            t1 = time.perf_counter()
            h.backward(torch.ones_like(h))
            t2 = time.perf_counter()
            x = torch.randn(micro_batch, seq, m.d_model, requires_grad=True)
            t3 = time.perf_counter()
            with autocast:
                loss = model.output(x, targets, float(micro_batch * seq))
            t4 = time.perf_counter()
            loss.backward()
            t5 = time.perf_counter()
            for p in model.parameters():
                p.grad = None
            return t1 - t0, t2 - t1, t4 - t3, t5 - t4

        out = tuple(_median_runs(run, runs))
    _PIECE_CACHE[key] = out
    return out


def optimizer_seconds(numels: tuple[int, ...], units: tuple[int, ...], threads: int = 1, runs: int = 5) -> float:
    """Seconds of one optimizer step as parallel/zero.ZeroOptimizer runs it on this rank's fp32
    parameters: the global norm over each parameter's gradient (`numels`, torch._foreach_norm), the
    clipping (_foreach_mul_) and torch's fused AdamW over the units it updates (`units`: every
    parameter at stage 0, this rank's slice of each bucket otherwise), then the gradients zeroed,
    each run after other work (_Evict), as a step runs it after its backward. Per-tensor costs and a
    cold core, not bytes, rule a tiny model's: the 34 tensors of shakespeare_char (0.8M parameters,
    ~0.5 ms of bytes at the copy bandwidth) take ~2.4 ms on the 2-core Xeon (1.3 ms back to back;
    2.5-2.6 ms in a training step); cached."""
    key = ("optimizer", numels, units, threads)
    if key in _PIECE_CACHE:
        return _PIECE_CACHE[key]
    with _threads(threads):
        grads = [torch.full((n,), 1e-3) for n in numels]
        masters = [torch.nn.Parameter(torch.zeros(n)) for n in units]
        unit_grads = [torch.full((n,), 1e-3) for n in units]
        opt = torch.optim.AdamW(masters, lr=1e-3, fused=True)

        def run():
            start = time.perf_counter()
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            torch._foreach_mul_(unit_grads, (1.0 / (norm + 1e-6)).clamp(max=1.0))
            for p, g in zip(masters, unit_grads):
                p.grad = g
            opt.step()
            for p in masters:
                p.grad = None
            for g in grads:
                g.zero_()
            return (time.perf_counter() - start,)

        out = _median_runs(run, runs, evict=True)[0]
    _PIECE_CACHE[key] = out
    return out


_NEW_SHAPE_BASE = [1000]  # row counts not met before in this process (each measurement takes new ones)


def new_shape_seconds(dtype: str = "bf16", threads: int = 1, layout: str = "nn", width: int = 128,
                      shapes: int = 8) -> float:
    """What a GEMM at a shape this process has not run before costs beyond one it has: oneDNN builds
    (and JIT-compiles) a kernel for each new shape. Routed experts meet new shapes all the time (the
    rows each expert receives change every step). `layout` as gemm_seconds', the varying size m in
    the place the expert's GEMM has it: the rows of [m x w] @ [w x w] ("nn", "nt"), the inner size of
    the weight's gradient [w x m] @ [m x w] ("tn"). On the 2-core AMX Xeon, bf16 at w = 128: ~0.9 ms
    more for nn and nt, ~2 ms for tn, against 0.04-0.06 ms at a shape built before (fp32: ~0.1 ms);
    cached per dtype and layout."""
    key = ("new_shape", dtype, threads, layout, width)
    if key in _PIECE_CACHE:
        return _PIECE_CACHE[key]
    dt = _dtype(dtype)
    g = torch.Generator().manual_seed(2)
    base = _NEW_SHAPE_BASE[0] + 1
    _NEW_SHAPE_BASE[0] += shapes + 1
    w = torch.randn(width, width, generator=g).to(dt)

    def call(m: int):
        x = torch.randn(m, width, generator=g).to(dt)
        if layout == "tn":
            return lambda: torch.mm(x.t(), x)
        return (lambda: torch.mm(x, w.t())) if layout == "nt" else (lambda: torch.mm(x, w))

    with _threads(threads):
        fresh = []
        for m in range(base, base + shapes):
            fn = call(m)
            start = time.perf_counter()
            fn()
            fresh.append(time.perf_counter() - start)
        fn = call(base)
        again = _best_seconds(fn, 5)
    out = max(0.0, sorted(fresh)[len(fresh) // 2] - again)
    _PIECE_CACHE[key] = out
    return out


def data_seconds(batch: int, seq: int, micro_batches: int, runs: int = 5) -> float:
    """Seconds one rank spends per step drawing its micro-batches (data/sampler.BatchSampler: the
    step's offsets, one gather from the token array per micro-batch, the conversion to torch), on
    a synthetic token array of 1M tokens, each run after other work (_Evict: 0.03 ms back to back,
    0.4-0.5 ms after it as in a step); cached."""
    import numpy as np

    from ..data.sampler import BatchSampler

    key = ("data", batch, seq, micro_batches)
    if key in _PIECE_CACHE:
        return _PIECE_CACHE[key]
    tokens = np.zeros(1 << 20, dtype=np.uint16)
    sampler = BatchSampler(tokens, seq, batch * micro_batches, 0)
    step = iter(range(1 << 30))

    def run():
        start = time.perf_counter()
        s = next(step)
        for i in range(micro_batches):
            sampler.batch(s, slice(i * batch, (i + 1) * batch))
        return (time.perf_counter() - start,)

    out = _median_runs(run, runs, evict=True)[0]
    _PIECE_CACHE[key] = out
    return out


# -- communication ---------------------------------------------------------------------------------

def _op_call(op: str, nbytes: int, world: int, rank: int):
    """A no-argument closure that runs `op` once on a message of `nbytes` (nccl-tests convention),
    through the collectives.py function training calls; fp32 elements."""
    numel = max(world, nbytes // 4 // world * world)  # divisible by the world: every part equal
    part = numel // world
    t = torch.ones(numel)
    if op == "all_reduce":
        return lambda: C.all_reduce(t, dist.group.WORLD)  # (None would be one process: nothing to do)
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


def _busy(seconds: float, a: torch.Tensor) -> None:
    """Compute for about `seconds` (small GEMMs on this rank's thread), as a step does between two
    collectives."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        torch.mm(a, a)


def _time_ops(ops: tuple[str, ...], sizes: tuple[int, ...], repeats: int, gap_s: float = 0.0
              ) -> tuple[list[list[float]], list[list[float]], float]:
    """One rank of measure_gloo: seconds per call, [op][size], the median and the mean of the
    repeats. Each size runs once untimed (gloo sets up buffers on a size's first use, and the call
    lines the ranks up as a barrier would), then `repeats` timings of a batch of calls; a timing
    counts for the slowest rank (the collective is over for the group when its last rank is done).
    With gap_s, each timing is of one call after gap_s of computing, and counts for each rank (the
    table is the ranks' average): what a rank pays in a step, waiting for its peers included.
    Also returns the CPU seconds this process has used since it was forked."""
    world, rank = dist.get_world_size(), dist.get_rank()
    times = torch.zeros(len(ops), len(sizes), repeats, dtype=torch.float64)
    a = torch.ones(64, 64)
    for i, op in enumerate(ops):
        for j, nbytes in enumerate(sizes):
            call = _op_call(op, nbytes, world, rank)
            calls = 1 if gap_s else _calls_per_timing(nbytes, world)
            call()
            for r in range(repeats):
                if gap_s:
                    _busy(gap_s, a)
                start = time.perf_counter()
                for _ in range(calls):
                    call()
                times[i, j, r] = (time.perf_counter() - start) / calls
    if gap_s:
        dist.all_reduce(times)
        times /= world
    else:
        dist.all_reduce(times, op=dist.ReduceOp.MAX)  # one collective for the whole table
    return times.median(dim=2).values.tolist(), times.mean(dim=2).tolist(), time.process_time()


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
                 repeats: int | None = None, gap_s: float = 0.0) -> dict:
    """Time each op over `sizes` in a fresh gloo world of `world` one-thread processes on 127.0.0.1;
    fit the alpha-beta line. Returns {op: {"alpha_s", "bytes_per_s", "points": [(bytes, seconds)],
    "mean": {the same three, fitted to the mean of the repeats instead of their median}}}.

    Two lines, for two questions. The median's is what one call typically costs (a timing that
    other work slowed drops out). The mean's is what a training step pays per call: every call's
    cost adds up, the slow ones included, and on a VM they are not rare: waking a rank that waits
    on another core now and then takes a timer tick, so a 4 KiB all-reduce between two processes
    on the 2-core Xeon costs 0.33 ms in the median but 0.57 ms on average (a 192 KiB one 0.39 and
    0.9 ms).

    gap_s: each call timed after gap_s of computing, as a training step makes its calls, not back
    to back. A rank that waits for a peer sleeps in the kernel, and on a VM a core that has gone
    idle can take milliseconds to wake: measured on the 2-core Xeon, a 192 KiB all-reduce between
    two processes costs 0.66 ms on average back to back, 1.0-1.2 ms after 0.3-1 ms of computing,
    1.8 ms after 3.5 ms. The planner (cluster.py) fits the mean of such calls, GAP_S apart.

    Defaults: SIZES and 5 repeats (GAP_REPEATS with gap_s); where the world has more processes
    than cores (each call then costs milliseconds), SPARSE_SIZES and 3 repeats, to stay within a
    few seconds."""
    return _measure_gloo(world, sizes, ops, repeats, gap_s)[0]


# The planner's gap between two collectives (measure_gloo's gap_s): what a tiny model's step
# computes between two of its calls on a CPU, a block's attention or MLP half, forward or backward
# (shakespeare_char on the 2-core Xeon: 0.5-1.5 ms).
GAP_S = 1e-3
GAP_REPEATS = 24


def _measure_gloo(world, sizes, ops, repeats, gap_s=0.0) -> tuple[dict, float]:
    """(measure_gloo's table, the ranks' CPU seconds and ours while we waited for them)."""
    cpu = time.process_time()
    fits = world <= cores()
    sizes = sizes or (SIZES if fits else SPARSE_SIZES)
    repeats = repeats or ((GAP_REPEATS if gap_s else 5) if fits else 3)
    ranks = run_world(_time_ops, world, tuple(ops), tuple(sizes), repeats, gap_s, threads=1)
    out = {}
    for op, row, means in zip(ops, ranks[0][0], ranks[0][1]):
        points, mean_points = list(zip(sizes, row)), list(zip(sizes, means))
        alpha, beta = fit_alpha_beta(points)
        mean_alpha, mean_beta = fit_alpha_beta(mean_points)
        out[op] = {"alpha_s": alpha, "bytes_per_s": beta, "points": points,
                   "mean": {"alpha_s": mean_alpha, "bytes_per_s": mean_beta, "points": mean_points}}
    return out, sum(c for *_, c in ranks) + time.process_time() - cpu


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
