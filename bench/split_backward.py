"""The backward split in B and W (parallel/pipeline/split_backward.py) vs one whole backward, and vs
torch.distributed.pipelining's own split (stage_backward_input / stage_backward_weight).

    python bench/split_backward.py [--layers 2] [--d-model 256] [--seq 128] [--micro 2] [--repeats 20]

One pipeline chunk (the last stage of a 2-stage cut: `layers` blocks, final norm, head, loss)
from a hidden-state input, one thread. Each repeat runs, for each of three ways in a rotating
order, a fresh forward and then that backward: whole (loss.backward()), ours (backward_input, then
WeightGradients.run), torch's.
Prints the medians and the ratios: what moving W into the bubble costs in extra work.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import cpu_kind, table

import torch

from nanotrain.config import ModelConfig
from nanotrain.models.transformer import TransformerModel
from nanotrain.parallel.pipeline import pipeline_stage
from nanotrain.parallel.pipeline.split_backward import backward_input


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    torch.set_num_threads(1)
    cfg = ModelConfig(vocab_size=512, d_model=args.d_model, n_layers=2 * args.layers, n_heads=4,
                      max_seq_len=args.seq, tie_embeddings=False, norm="rmsnorm", mlp="swiglu", pos_emb="rope")
    model = TransformerModel(cfg)
    model.init_weights(1)
    stage = pipeline_stage(model, 1, 2, [list(range(args.layers, 2 * args.layers))])
    weights = list(stage.parameters())
    tokens = torch.randint(0, cfg.vocab_size, (args.micro, args.seq))

    def forward():
        x = torch.randn(args.micro, args.seq, args.d_model, requires_grad=True)
        return x, stage(x, tokens, float(tokens.numel()), chunk=0, tokens=tokens)

    def whole(x, y):
        y.backward()

    def ours(x, y):
        _, rest = backward_input(y, None, x)
        rest.run()

    def theirs(x, y):
        _, groups = stage_backward_input([y], None, [x], iter(weights))
        stage_backward_weight(iter(weights), groups)

    ways = {"whole backward": whole, "nano-train B + W": ours, "torch stage_backward_input + _weight": theirs}
    times: dict[str, list[float]] = {k: [] for k in ways}
    names = list(ways)
    for r in range(args.repeats + 2):
        for name in names[r % 3:] + names[:r % 3]:  # each way first in turn: no place in the round favoured
            fn = ways[name]
            stage.zero_grad(set_to_none=True)
            x, y = forward()
            start = time.perf_counter()
            fn(x, y)
            if r >= 2:  # two warm-up rounds
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"one chunk: {args.layers} Llama blocks + norm/head/loss, d_model {args.d_model}, seq {args.seq}, "
          f"micro-batch {args.micro}, fp32, 1 thread, {cpu_kind()}; median of {args.repeats}\n")
    print(table([[k, f"{v * 1e3:.2f}", f"{v / med['whole backward']:.2f}"] for k, v in med.items()],
                ["backward", "ms", "/ whole"]))
    print(f"\nours / torch's split = {med['nano-train B + W'] / med['torch stage_backward_input + _weight']:.2f}")


if __name__ == "__main__":
    main()
