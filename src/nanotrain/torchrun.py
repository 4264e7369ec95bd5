"""torchrun, unchanged, except how it ends on a signal: `python -m nanotrain.torchrun ARGS` takes
torchrun's arguments (ARGS) and runs torch.distributed.run's main.

On SIGTERM or SIGINT torchrun forwards the signal to its workers, which finish their step and
save a checkpoint (runtime/preemption.py), and then ends itself by raising SignalException: a
25-line traceback under the workers' one-line messages, at every Ctrl-C. Here it ends with one
line and the shell's code for the signal (143, 130) instead.

When the workers stop on bad input (a config, data or checkpoint error: exit code 2, which each
names in one line, cli.named_error), torchrun would add a traceback and a table of the failed
workers; here it ends with one line and code 2. Likewise when its workers stopped on a signal
sent to another node's torchrun (which forwarded it to its own workers; the preemption agreement
made every rank save the same step, runtime/preemption.py): one line and the signal's code (143,
130). Everything else (rendezvous, restarts, its log
lines, its report of a worker that crashed or diverged) is torchrun's own.

One default differs: a launch that names no rendezvous (no --nnodes, --rdzv-*, --master-*,
--node-rank or --standalone) gets --standalone, a store on a free port of this machine. torchrun's
own default is port 29500 for every job, so two single-machine jobs started side by side (two
users, two tests) join one world and hang; a multi-node launch names its rendezvous and is left
as it is (docs/multinode.md).
"""

from __future__ import annotations

import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main

from .cli import BAD_INPUT


def stopped_on_bad_input(e: ChildFailedError) -> bool:
    """Some worker exited with the bad-input code and the others with it too or were stopped by
    torchrun (a negative code: the signal torchrun sent when the first one exited)."""
    codes = [f.exitcode for f in e.failures.values()]
    return BAD_INPUT in codes and all(c == BAD_INPUT or c < 0 for c in codes)


def stopped_by_signal(e: ChildFailedError) -> int | None:
    """The signal the workers stopped on after saving (they exit 128 + signal; a negative code: one
    that torchrun stopped when the first had exited), or None."""
    codes = {f.exitcode for f in e.failures.values() if f.exitcode >= 0}
    stopped = {128 + int(s) for s in (signal.SIGTERM, signal.SIGINT)}
    return codes.pop() - 128 if len(codes) == 1 and codes <= stopped else None


RENDEZVOUS = ("--nnodes", "--rdzv", "--master", "--node-rank", "--node_rank", "--standalone")


def with_standalone(args: list[str]) -> list[str]:
    """torchrun's arguments with --standalone added where the launcher part (before the script or
    `-m module`) names no rendezvous."""
    end = next((i for i, a in enumerate(args) if a == "-m" or a.endswith(".py") or a == "--module"), len(args))
    if any(a.startswith(RENDEZVOUS) for a in args[:end]):
        return args
    return ["--standalone", *args]


def run() -> int:
    try:
        main(with_standalone(sys.argv[1:]))
    except SignalException as e:
        name = signal.Signals(e.sigval).name
        print(f"torchrun: {name} forwarded to the workers; each saved its checkpoint or said why above",
              file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        if (sig := stopped_by_signal(e)) is not None:
            print(f"torchrun: the workers stopped on {signal.Signals(sig).name} (sent to them, or to the torchrun of "
                  "another node) and saved their checkpoint", file=sys.stderr)
            return 128 + sig
        if not stopped_on_bad_input(e):
            raise
        print("torchrun: the workers stopped on the input error above; fix it and run again", file=sys.stderr)
        return BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(run())
