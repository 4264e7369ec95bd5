"""torchrun, unchanged, except how it ends on a signal: `python -m nanotrain.torchrun ARGS` takes
torchrun's arguments (ARGS) and runs torch.distributed.run's main.

On SIGTERM or SIGINT torchrun forwards the signal to its workers, which finish their step and
save a checkpoint (runtime/preemption.py), and then ends itself by raising SignalException: a
25-line traceback under the workers' one-line messages, at every Ctrl-C. Here it ends with one
line and the shell's code for the signal (143, 130) instead. Everything else (rendezvous,
restarts, its report of a failed worker) is torchrun's own.
"""

from __future__ import annotations

import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main


def run() -> int:
    try:
        main()
    except SignalException as e:
        name = signal.Signals(e.sigval).name
        print(f"torchrun: {name} forwarded to the workers; each saved its checkpoint or said why above",
              file=sys.stderr)
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(run())
