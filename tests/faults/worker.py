"""A training process with a fault injected at a step, for the fault tests: `nanotrain train`, plus
  --fault SIGNAL@STEP[:rankR][:first]   at step STEP (after its backward) rank R (default 0) sends
                                        SIGNAL (TERM, INT, KILL, STOP) to itself; `:parent` sends it to
                                        the parent (torchrun's agent) instead; `:first` only once in
                                        the run folder (the first attempt of a torchrun --max-restarts
                                        job: a marker file there, whatever the agents' restart counts)
  --fault ENOSPC@STEP[:rankR]           from step STEP on, rank R's checkpoint writes fail as on a full
                                        disk; the wall time of the first is written to <out_dir>/.enospc_at
  --losses FILE                         rank 0 writes {step: loss} of this process's run as JSON
Run directly (one process, or a world from the RANK/WORLD_SIZE/MASTER_* environment) or by torchrun."""

import errno
import json
import os
import signal
import sys
import time
from pathlib import Path

from nanotrain.cli import named_error
from nanotrain.config import load_config
from nanotrain.runtime import RuntimeEngine


def full_disk(out_dir: Path):
    """The checkpoint writer of this process, failing from now on as on a full disk."""
    from nanotrain.checkpoint import manager

    def save_file(tensors, path):
        (out_dir / ".enospc_at").write_text(repr(time.time()))
        raise OSError(errno.ENOSPC, "No space left on device", path)

    manager.save_file = save_file


def injector(spec: str):
    what, _, where = spec.partition("@")
    step, *opts = where.split(":")
    rank = next((int(o[4:]) for o in opts if o.startswith("rank")), 0)
    if what == "ENOSPC":
        return lambda done, model, ctx: full_disk(Path(ctx.out_dir)) if (done, ctx.rank) == (int(step), rank) else None
    sig = getattr(signal, f"SIG{what}")

    def on_grads(done, model, ctx):
        if done != int(step) or ctx.rank != rank:
            return
        if "first" in opts:
            marker = Path(ctx.out_dir) / f".fault_{spec}"
            if marker.exists():
                return
            marker.touch()
        os.kill(os.getppid() if "parent" in opts else os.getpid(), sig)
    return on_grads


def main(argv: list[str]) -> int:
    fault = losses = None
    rest = []
    while argv:
        arg = argv.pop(0)
        if arg == "--fault":
            fault = argv.pop(0)
        elif arg == "--losses":
            losses = argv.pop(0)
        else:
            rest.append(arg)
    try:
        cfg = load_config(None, rest)
        result = RuntimeEngine(cfg, on_grads=injector(fault) if fault else None).run()
    except Exception as e:  # as `nanotrain train` reports it
        code = named_error(e)
        if code is None:
            raise
        return code
    if losses and result.rank == 0:
        with open(losses, "w") as f:
            json.dump(result.losses, f)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
