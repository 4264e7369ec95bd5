"""What does sorting tokens by expert buy over the straightforward per-expert masked loop?

Both sides compute the same DeepSeek-V3 MoE layer from the same parameters and
inputs: `LocalRoutedMoE` (route, argsort the (token, slot) pairs by expert, one
matmul per expert on a contiguous slice, index_add_ back) against the loop
most first implementations write (for each expert: mask of its tokens, gather,
SwiGLU, y += w * out). Timed: one forward + backward, in alternating rounds
(machine speed drifts), median seconds per step and the ratio.

    python bench/moe.py [--steps 20] [--rounds 6] [--threads 1]

Later: the same layer with expert parallelism, ep=2 against ep=1, joins this bench.
"""

from __future__ import annotations

import argparse

from common import ROOT, alternate_rounds, median, table  # noqa: F401  (sets sys.path)

import torch
import torch.nn.functional as F

from nanotrain.layers import init_parameters
from nanotrain.models.moe import LocalRoutedMoE


def masked_loop(m: LocalRoutedMoE, x: torch.Tensor) -> torch.Tensor:
    """The reference: for each expert, mask the tokens routed to it and add its weighted output."""
    B, T, d = x.shape
    tokens = x.reshape(-1, d)
    w, idx, _ = m.router(tokens, T)
    ex = m.experts
    y = torch.zeros_like(tokens)
    for e in range(m.n_experts):
        hit = idx == e  # [N, k]
        mask = hit.any(-1)
        if not mask.any():
            continue
        xe = tokens[mask]
        out = F.linear(F.silu(F.linear(xe, ex.w1[e])) * F.linear(xe, ex.w3[e]), ex.w2[e])
        y = y.index_add(0, mask.nonzero().squeeze(1), out * (w * hit).sum(-1)[mask].unsqueeze(-1))
    return (y + m.shared_experts(tokens)).view(B, T, d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--moe-d-ff", type=int, default=128)
    ap.add_argument("--shared", type=int, default=1)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    m = LocalRoutedMoE(args.d_model, args.experts, args.top_k, args.moe_d_ff, args.shared,
                       score_func="sigmoid", init_std=0.02, out_std=0.02)
    init_parameters(m, seed=0)
    x = torch.randn(args.batch, args.seq, args.d_model, requires_grad=True)
    g = torch.randn(args.batch, args.seq, args.d_model)

    # Same function, checked before timing.
    torch.testing.assert_close(m(x), masked_loop(m, x), rtol=0, atol=1e-6)

    def step(forward):
        def run(_step):
            m.zero_grad(set_to_none=True)
            x.grad = None
            loss = (forward(x) * g).sum()
            loss.backward()
            return loss.detach()
        return run

    times, losses = alternate_rounds({"masked loop": step(lambda t: masked_loop(m, t)),
                                      "sorted (LocalRoutedMoE)": step(m)},
                                     args.steps, args.rounds, barrier=lambda: None)
    base = median(times["masked loop"])
    rows = [[name, median(ts) * 1e3, base / median(ts)] for name, ts in times.items()]
    tokens = args.batch * args.seq
    print(f"d_model={args.d_model} experts={args.experts} top_k={args.top_k} moe_d_ff={args.moe_d_ff} "
          f"shared={args.shared} tokens={args.batch}x{args.seq}={tokens} threads={args.threads} "
          f"steps={args.steps} rounds={args.rounds}")
    print(table(rows, ["forward+backward", "ms/step (median)", "speed-up vs masked loop"]))
    print(f"max |loss difference|: {max(abs(a - b) for a, b in zip(*losses.values())):.2e}")


if __name__ == "__main__":
    main()
