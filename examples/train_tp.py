"""Tensor parallel (with sequence parallel) x data parallel training.

    python -m nanotrain.torchrun --nproc-per-node 4 examples/train_tp.py --config configs/shakespeare_char.toml

tp=2 splits every layer's matrices over 2 ranks (attention by heads, the MLP by
its hidden width, the vocabulary of the embedding and head); the remaining
factor of the world is data parallel. The character vocabulary (65) does not
split over tp=2: the run pads it to 66 rows (the padding row is never a target
and is masked out of the softmax, so the model is the 65-token one) and says so.
"""

import os
import sys

from nanotrain.cli import one_line_errors
from nanotrain.config import ConfigError, load_config
from nanotrain.runtime import RuntimeEngine

TP = 2


def main(argv: list[str]) -> None:
    config_path = argv[1] if argv[:1] == ["--config"] else None
    overrides = argv[2:] if config_path else argv
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % TP:
        raise ConfigError(f"examples/train_tp.py uses tp={TP}: launch an even number of processes "
                          "(python -m nanotrain.torchrun --nproc-per-node 4 ...)")
    cfg = load_config(config_path, [f"--parallel.tp={TP}", f"--parallel.dp={world // TP}",
                                    "--parallel.sequence_parallel=true", *overrides])
    RuntimeEngine(cfg).run()


if __name__ == "__main__":
    with one_line_errors():  # bad input: rank 0 says it in one line, every rank exits 2 (nanotrain.torchrun)
        main(sys.argv[1:])
