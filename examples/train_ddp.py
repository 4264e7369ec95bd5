"""Data-parallel training: each rank trains on its slice of every global batch.

    python -m nanotrain.torchrun --nproc-per-node 2 examples/train_ddp.py --config configs/shakespeare_char.toml

Same model, same losses as one process (`nanotrain verify --layout dp=2`); the
world size sets parallel.dp unless the command line says otherwise.
"""

import os
import sys

from nanotrain.cli import one_line_errors
from nanotrain.config import load_config
from nanotrain.runtime import RuntimeEngine


def main(argv: list[str]) -> None:
    config_path = argv[1] if argv[:1] == ["--config"] else None
    overrides = argv[2:] if config_path else argv
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = load_config(config_path, [f"--parallel.dp={world}", *overrides])
    RuntimeEngine(cfg).run()


if __name__ == "__main__":
    with one_line_errors():  # bad input: rank 0 says it in one line, every rank exits 2 (nanotrain.torchrun)
        main(sys.argv[1:])
