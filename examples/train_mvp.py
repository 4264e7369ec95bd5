"""The smallest complete training script: assemble the engine from its components and run it.

    python examples/train_mvp.py --config configs/shakespeare_char.toml --train.max_steps=200

Each component is one contract from nanotrain/runtime/contracts.py. To train a
different model, read a different data source or shard the optimizer, pass
your own object in its slot; the step loop in RuntimeEngine stays as it is.
"""

import sys

from nanotrain.cli import one_line_errors
from nanotrain.config import load_config
from nanotrain.runtime import RuntimeComponents, RuntimeEngine
from nanotrain.runtime.components import (AdamWRuntime, LocalBootstrap, LocalCheckpoints, TokenDataProvider,
                                          TransformerProvider, WarmupDecaySchedule)
from nanotrain.runtime.step import ForwardBackwardProvider


def main(argv: list[str]) -> None:
    config_path = None
    if len(argv) >= 2 and argv[0] == "--config":
        config_path, argv = argv[1], argv[2:]
    cfg = load_config(config_path, argv)  # --train.max_steps=N shortens the run, and the config's schedule alike
    components = RuntimeComponents(
        bootstrap=LocalBootstrap(),        # device, threads, seed, precision, out_dir
        data=TokenDataProvider(),          # prepared token files -> batches by step
        model=TransformerProvider(),       # TransformerModel, initialised from (seed, names)
        optimizer=AdamWRuntime(),          # AdamW + global-norm clipping (+ MoE bias update after each step)
        schedule=WarmupDecaySchedule(),    # warm-up, then cosine/linear decay
        checkpoint=LocalCheckpoints(),     # atomic saves, keep last N
        forward_backward=ForwardBackwardProvider(),  # each step's forwards and backwards (or a pipeline's)
    )
    result = RuntimeEngine(cfg, components).run()
    print(f"final val loss {result.val_losses[max(result.val_losses)]:.4f}")


if __name__ == "__main__":
    with one_line_errors():  # bad input (a config, the data, a checkpoint): one line and exit code 2, as the CLI
        main(sys.argv[1:])
