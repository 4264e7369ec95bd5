"""train.compile: torch.compile each transformer block, and what stays outside the compiled graphs.

What is compiled: every block in `model.layers` (on a pipeline stage, the stage's blocks), in
place with nn.Module.compile(). The module tree is untouched, so parameter names, state dicts,
checkpoints, hooks, the pipeline split and the optimizer's parameters are those of the eager
model. Per block rather than the whole model, because a block is the unit every layout shares:
a pipeline stage runs a slice of the layers, and what sits between blocks differs by layout
(the pipeline's send/recv, the vocab-parallel embedding and loss with their tp collectives, the
DeepSeek MTP module). And blocks of one kind share one compiled graph: Dynamo caches compiled
code per function and guards (shapes, dtypes, flags), not per module, so a 4-layer and a
40-layer model compile once. Left eager: the embedding, the final norm, the head, the loss and
DeepSeek's MTP module.

What runs eagerly inside a compiled block: the functions marked @eager below. Dynamo stops the
graph at each call (a graph break), runs the function as plain Python and starts a new graph
after it. They are:
  - the tp / sequence-parallel collectives (parallel/collectives.py): communication stays the
    plain functions of parallel/collectives.py, which report to the communication meter
    (monitoring/comm.py, Python state that changes each step); traced, they would become
    functional collectives inside the graph, out of the meter's sight;
  - a module's own GEMM recipe (precision/policy.py: low-bit formats, per-module overrides,
    persistent low-bit weights): amax histories, generators and gradient hand-over hooks are
    Python state that changes on every call;
  - the MoE layer (models/moe.py): how many tokens each expert gets changes every step
    (data-dependent shapes), and expert parallelism's all-to-alls live there;
  - the training monitor's recorders (monitoring/internals.py).

Compile failures are not hidden behind a fallback to eager: check_compiler() runs at start-up,
the engine compiles every block before the first step (warm_up), errors name the problem and
`train.compile=false`, and a block that keeps recompiling stops the run
(fail_on_recompile_limit_hit) instead of silently running eagerly.

Rounding: inductor fuses elementwise ops and reorders reductions, so a compiled block rounds
differently from an eager one (~1e-7 relative in fp32), and compiled dropout draws its masks
from the same generator but differently from eager dropout. A compiled run is compared with a
compiled run (nanotrain verify ... --train.compile=true compiles both sides).
"""

from __future__ import annotations

import functools
import os
import time
import types
from typing import Callable

import torch
from torch import nn

from .config import ConfigError
from .module_spec import mark

RECOMPILE_LIMIT = 32  # variants per block kind: train, train with the monitor armed, one per eval shape


class CompileError(ConfigError):
    """train.compile cannot work here: the message names the problem and the fix."""


# -- functions that stay outside the compiled graphs --------------------------------------

class eager:
    """Decorator: run the function outside any torch.compile'd graph (Dynamo breaks the graph at
    the call and runs it as plain Python, with everything it calls).

    mark_eager() (a compiled run calls it) makes __call__ torch.compiler.disable'd for every
    such function at once. Deferred because it imports torch._dynamo, about a second of
    start-up that runs without train.compile do not pay; until then a call goes straight
    through. Works on methods too (__get__ binds like a function)."""

    def __init__(self, fn: Callable):
        functools.update_wrapper(self, fn)
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __get__(self, obj, objtype=None):
        return self if obj is None else types.MethodType(self, obj)


_marked = False


def mark_eager() -> None:
    """From now on (this process), every @eager function breaks the graph where it is called."""
    global _marked
    if not _marked:
        eager.__call__ = torch.compiler.disable(eager.__call__)
        _marked = True


# -- start-up ---------------------------------------------------------------------------

def check_compiler(device: torch.device) -> None:
    """Inductor writes C++ (CPU) or Triton (CUDA) kernels: stop now, naming the missing tool."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise CompileError("train.compile=true needs Triton for CUDA kernels and it is not installed: "
                               "pip install triton (the version your torch wants), or set train.compile=false.")
        return
    from torch._inductor import config as inductor_config
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        tried = [c for c in inductor_config.cpp.cxx if c]
        raise CompileError(f"train.compile=true needs a C++ compiler for inductor's CPU kernels and none of "
                           f"{tried} runs: install g++ (apt-get install g++), point the CXX environment "
                           "variable at one, or set train.compile=false.") from None


def compile_blocks(model: nn.Module, world_size: int = 1) -> list[str]:
    """Compile every block of model.layers in place (lazily: the first call compiles, see
    warm_up). Returns the compiled blocks' names, which the model's record keeps
    (module_spec(model).compiled_blocks)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    mark_eager()
    separate_cache_by_isa()
    # A fresh cache per run: compiled code of an earlier run in this process (tests, notebooks)
    # would count against the recompile limit below, and in compile_stats().
    torch._dynamo.reset()
    counters.clear()
    cfg = torch._dynamo.config
    cfg.suppress_errors = False  # an error in Dynamo raises; never a silent fallback to eager
    cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
    cfg.fail_on_recompile_limit_hit = True  # past it: stop, rather than run that block eagerly
    # A block holds several compiled variants (training, monitor armed, evaluation), and Dynamo
    # tries the most recently used first. Recomputation replays a block's forward inside backward,
    # after other variants ran: an MoE block, whose routed part runs eagerly between compiled
    # pieces, then met another variant first and replayed its saved tensors in another order
    # (CheckpointError: "Recomputed values ... have different metadata", issue 43). Checked in the
    # order they were compiled, the forward and its replay meet the same graph. (PyTorch names this
    # fix itself, pytorch/pytorch#166926; no public API yet.)
    torch._C._dynamo.eval_frame._set_lru_cache(False)
    if world_size > 1:
        # Every process of a local world would start its own pool of compile workers on the
        # same cores; one thread each compiles as fast and keeps forked worlds simple.
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
    names = []
    for name, block in model.layers.items():
        # Shapes are fixed within a run (micro-batch, val batch, probe batch): static kernels,
        # one compile per distinct shape, instead of kernels for symbolic sizes.
        block.compile(dynamic=False)
        names.append(f"layers.{name}")
    mark(model, compiled_blocks=tuple(names))
    return names


def separate_cache_by_isa() -> str:
    """Point inductor's on-disk cache at a folder of its own per ATen CPU capability (AVX512,
    AVX2, ...), inside the one it would use. torch 2.13's cache does not key its kernels on it:
    a cache filled under ATEN_CPU_CAPABILITY=avx2 (how CI's AVX2-only CPUs are emulated here)
    and read by a default AVX-512 process corrupted the heap, and the reverse gave NaN losses."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    base = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()
    mine = f"cpu-{torch.backends.cpu.get_cpu_capability().lower()}"
    if os.path.basename(os.path.normpath(base)) != mine:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, mine)
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


@torch.no_grad()
def _restore(saved: dict[torch.Tensor, torch.Tensor]) -> None:
    for buf, value in saved.items():
        buf.copy_(value)


def warm_up(model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
            autocast, snapshot: Callable[[], Callable[[], None]] | None = None) -> float:
    """Compile now, at the training shapes, so that a block that cannot compile stops the run
    before its first step, named, and the compile time is measured apart from the step time.
    Returns the seconds it took.

    Each block runs one forward on a random input of the shape a block receives in training
    (micro-batch, sequence positions on this rank, d_model) and one backward to that input only
    (torch.autograd.grad): parameter gradients and their hooks (data-parallel buckets, ZeRO) stay
    untouched. The random state, the blocks' buffers (MoE load counters) and, through
    `snapshot` (precision.state.state_snapshot), the GEMM recipes' state are put back, so the
    run trains as if no warm-up had happened. Every rank of a world warms up the same blocks in
    the same order, so the collectives inside them pair up."""
    start = time.perf_counter()
    # The blocks' second input as training builds it: packed documents give per-token RoPE rows
    # and a mask, which compile differently from the plain tables (documents.py).
    seq = shape[1] * (model.tp.size if model.sequence_parallel else 1)  # this rank's tokens (1/cp under cp)
    pos, _ = model.positions(torch.zeros(shape[0], seq, dtype=torch.long, device=device))
    gen = torch.Generator(device=device).manual_seed(0)
    restore_state = snapshot() if snapshot is not None else (lambda: None)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for name, block in model.layers.items():
            buffers = {b: b.detach().clone() for b in block.buffers()}
            x = torch.randn(shape, generator=gen, device=device).to(dtype).requires_grad_()
            try:
                with autocast():
                    y = block(x, pos)
                torch.autograd.grad(y.float().square().sum(), x)
            except Exception as e:
                raise CompileError(f"train.compile: layers.{name} failed to compile ({first_line(e)}); set "
                                   "train.compile=false to train without compiling.") from e
            _restore(buffers)
    restore_state()
    return time.perf_counter() - start


def first_line(e: BaseException) -> str:
    """The innermost error's first line (Dynamo wraps a backend's error in a long report)."""
    while getattr(e, "inner_exception", None) is not None or e.__cause__ is not None:
        e = getattr(e, "inner_exception", None) or e.__cause__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def compile_stats() -> dict[str, int]:
    """Counts since compile_blocks (this process): frames Dynamo compiled, graphs, graph breaks,
    and recompiles: the variants each compiled function holds beyond its first (another shape,
    grad mode, monitor flag). A block's are: training, training with the monitor armed, and
    one per evaluation shape without gradients (val batch, probe batch)."""
    from torch._dynamo.convert_frame import input_codes
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.utils import counters

    codes = [c for c in (ref() for ref in input_codes.seen) if c is not None]
    variants = [len(_debug_get_cache_entry_list(c)) for c in codes]
    return {"frames": counters["frames"]["ok"], "graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "recompiles": sum(max(n - 1, 0) for n in variants)}
