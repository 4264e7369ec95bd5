"""Start a local gloo world of N processes and collect one result per rank.

Used by `nanotrain verify` and the distributed tests, so a learner (or pytest)
can run a parallel layout without torchrun. Each process gets the environment
torchrun would give it (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), joins the default process group, runs `fn(*args)`, and sends
back its return value. A failure on any rank is raised here: the rank's own exception
(a ConfigError stays a ConfigError, so a caller reports it as it would in one process),
caused by a RuntimeError that holds the rank's traceback.

torchrun is the launcher for real runs (`torchrun --nproc-per-node N -m
nanotrain train ...`); this is its in-process equivalent for one machine.
"""

from __future__ import annotations

import io
import os
import pickle
import queue as queue_module
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, port: int, threads: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # N processes share the machine's cores: one intra-op thread each keeps them from
    # oversubscribing (and makes results independent of the core count).
    torch.set_num_threads(threads)
    try:
        # The parent holds the store; each rank joins it as a client (see run_world).
        store = dist.TCPStore("127.0.0.1", port, is_master=False)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        # Serialise to bytes: a tensor put on the queue as-is travels as a shared-memory
        # handle that dies with this process, which may exit before the parent reads it.
        buf = io.BytesIO()
        torch.save(fn(*args), buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException as e:  # report everything, including KeyboardInterrupt, to the parent
        queue.put((rank, "error", (traceback.format_exc(), _pickled(e))))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _pickled(e: BaseException) -> bytes | None:
    """The exception as bytes, if it survives the trip (one whose class takes other arguments
    than it stores may not: then only its traceback travels)."""
    try:
        data = pickle.dumps(e)
        pickle.loads(data)
        return data
    except Exception:
        return None


def _context():
    """Processes forked from a forkserver that has imported torch and nanotrain once: a world
    starts in about 0.1 s instead of the seconds that every spawned process spends importing
    torch (the test suite starts a few hundred worlds). The server is a clean process that only
    imported modules (no threads, no CUDA, no process group), forked, as torchrun's processes
    would be started fresh. Where there is no forkserver (Windows), plain spawn."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


# What a rank imports on its way to its first step, imported once in the server instead. Beyond
# torch and nanotrain: torch._dynamo, which every torch optimizer imports in its __init__ (with
# sympy: ~800 modules, 1.5 s of CPU per process, 5 s of wall time in a world of 8 on 2 cores), and
# the torch.distributed modules that checkpointing and DTensor bring in.
PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "torch.distributed.tensor",
           "torch.distributed.fsdp", "nanotrain.runtime", "nanotrain.verify", "nanotrain.models.deepseek",
           "nanotrain.models.mtp"]


def run_world(fn: Callable[..., Any], world_size: int, *args: Any, threads: int = 1,
              timeout_s: float = 300.0) -> list[Any]:
    """Run fn(*args) on every rank of a fresh gloo world; return [result of rank 0, rank 1, ...].

    fn must be importable (a module-level function): the processes start from a clean server
    (see _context), not from a fork of the caller.
    """
    ctx = _context()
    queue = ctx.Queue()
    # The world's rendezvous store lives here, on a port the OS picks as it binds (port 0), as
    # torchrun's agent hosts it for its workers. Asking the OS for a free port and letting rank 0
    # bind it later is a race: with tests running side by side, another world can take the port
    # in between ("address already in use"). `store` must outlive the world: it is held until
    # this function returns.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    port = store.port
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, threads, fn, args, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    raised: BaseException | None = None  # the first failing rank's exception
    try:
        for _ in range(world_size):
            try:
                rank, status, value = queue.get(timeout=timeout_s)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and p.exitcode]
                errors.append(f"no result within {timeout_s:.0f}s (ranks that died: {dead or 'none'})")
                break
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                text, exc = value
                errors.append(f"--- rank {rank} ---\n{text}")
                raised = pickle.loads(exc) if exc is not None else None
                break  # the other ranks may now wait forever on a collective
    finally:
        for p in procs:
            p.join(timeout=timeout_s if not errors else 1.0)
            if p.is_alive():
                p.kill()
    if errors:
        report = RuntimeError(f"a rank of the {world_size}-process world failed:\n" + "\n".join(errors))
        if raised is not None:
            raise raised from report
        raise report
    return [results[r] for r in range(world_size)]
