"""What does sorting tokens by expert buy over the straightforward per-expert masked loop?

Both sides compute the same DeepSeek-V3 MoE layer from the same parameters and
inputs: `LocalRoutedMoE` (route, argsort the (token, slot) pairs by expert, one
matmul per expert on a contiguous slice, index_add_ back) against the loop
most first implementations write (for each expert: mask of its tokens, gather,
SwiGLU, y += w * out). Timed: one forward + backward, in alternating rounds
(machine speed drifts), median seconds per step and the ratio.

    python bench/moe.py [--steps 20] [--rounds 6] [--threads 1] [--ep-steps 30] [--grouped 8,32,64]

Part 2: grouped expert GEMMs (models/grouped.py, model.moe_grouped_gemm) against the per-expert
loop they replace, inside the same LocalRoutedMoE (same routing, same sorted tokens), for each
expert count of --grouped: forward + backward, alternating rounds, median ms and grouped / loop
(goal: below 1 at 32 experts and more), and the largest output difference (fp32).

Part 3: expert parallelism. configs/deepseek_tiny.toml trained by the RuntimeEngine in a
gloo world of 2 (1 thread each) as dp=2 with every expert on each rank (ep=1), and as
dp=2 with the experts split over the two ranks (ep=2, two all-to-alls per MoE layer),
same batches; median step time of each and the ratio, plus the losses of both.
"""

from __future__ import annotations

import argparse
import dataclasses

from common import ROOT, alternate_rounds, median, table  # noqa: F401  (sets sys.path)

import torch

from nanotrain.config import Config, load_config
from nanotrain.layers import init_parameters
from nanotrain.models.moe import LocalRoutedMoE, masked_loop_moe
from nanotrain.parallel.launch import run_world
from nanotrain.runtime import RuntimeEngine


def _train(cfg_dict: dict) -> dict:
    r = RuntimeEngine(Config.from_dict(cfg_dict)).run()
    return {"step_s": r.train_time_s / r.final_step, "losses": r.losses}


def ep_compare(steps: int, rounds: int) -> None:
    def cfg(ep, i):
        return dataclasses.asdict(load_config(ROOT / "configs/deepseek_tiny.toml", [
            f"--data.path={ROOT / 'data/tinyshakespeare.txt'}", "--parallel.dp=2", f"--parallel.ep={ep}",
            "--train.batch_size=12",  # 6 sequences of 64 per rank, as docs/deepseek.md's table was measured
            f"--train.max_steps={steps}", "--train.eval_interval=0", "--train.eval_steps=1",
            "--schedule.warmup_steps=2", "--schedule.decay_steps=1000", "--checkpoint.save_final=false", "--logging.progress=none",
            "--logging.tensorboard=false", "--logging.plot=false", f"--train.out_dir=/tmp/nanotrain-bench-ep{ep}-{i}"]))
    times = {1: [], 2: []}
    for i in range(rounds):
        for ep in ((1, 2) if i % 2 == 0 else (2, 1)):
            res = run_world(_train, 2, cfg(ep, i))[0]
            times[ep].append(res["step_s"])
            losses = res["losses"]
            if ep == 1:
                ep1_losses = losses
            else:
                ep2_losses = losses
    rows = [[f"ep={ep} (dp=2)", median(ts) * 1e3] for ep, ts in times.items()]
    print(table(rows, ["deepseek_tiny, gloo world of 2", "step ms (median)"]))
    ratio = median([a / b for a, b in zip(times[2], times[1])])
    diff = max(abs(ep1_losses[s] - ep2_losses[s]) / abs(ep1_losses[s]) for s in ep1_losses)
    print(f"ratio ep=2 / ep=1 = {ratio:.3f} (median of {rounds} paired runs of {steps} steps); "
          f"largest relative loss difference (bf16): {diff:.1e}")


def fwd_bwd(m: LocalRoutedMoE, x: torch.Tensor, g: torch.Tensor, forward):
    """One timed step: forward(x), a fixed upstream gradient g, backward."""
    def run(_step):
        m.zero_grad(set_to_none=True)
        x.grad = None
        loss = (forward(x) * g).sum()
        loss.backward()
        return loss.detach()
    return run


def grouped_compare(args) -> None:
    rows = []
    for n in [int(e) for e in args.grouped.split(",")]:
        m = LocalRoutedMoE(args.d_model, n, args.top_k, args.moe_d_ff, args.shared, score_func="sigmoid",
                           init_std=0.02, out_std=0.02)
        init_parameters(m, seed=0)
        x = torch.randn(args.batch, args.seq, args.d_model, requires_grad=True)
        g = torch.randn(args.batch, args.seq, args.d_model)

        def step(grouped: bool):
            def forward(t):
                m.experts.grouped = grouped
                return m(t)
            return fwd_bwd(m, x, g, forward)
        outs = []
        for grouped in (True, False):
            m.experts.grouped = grouped
            outs.append(m(x).detach())
        diff = ((outs[0] - outs[1]).abs().max() / outs[1].abs().max()).item()
        times, _ = alternate_rounds({"grouped": step(True), "loop": step(False)}, args.steps, args.rounds,
                                    barrier=lambda: None)
        ratio = median([a / b for a, b in zip(times["grouped"], times["loop"])])
        rows.append([n, median(times["loop"]) * 1e3, median(times["grouped"]) * 1e3, ratio, f"{diff:.1e}"])
    kind = "torch._grouped_mm" if hasattr(torch, "_grouped_mm") else "padded bmm"
    print(f"grouped expert GEMMs ({kind}) vs the per-expert loop: d_model={args.d_model} top_k={args.top_k} "
          f"moe_d_ff={args.moe_d_ff} tokens={args.batch}x{args.seq} threads={args.threads} fp32")
    print(table(rows, ["experts", "loop ms", "grouped ms", "grouped / loop (median of rounds)",
                       "max output difference (relative)"]))


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
    ap.add_argument("--ep-steps", type=int, default=30, help="steps per run of part 2; 0 skips it")
    ap.add_argument("--ep-rounds", type=int, default=2)
    ap.add_argument("--grouped", default="8,32,64", help="expert counts for part 2; empty skips it")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    m = LocalRoutedMoE(args.d_model, args.experts, args.top_k, args.moe_d_ff, args.shared,
                       score_func="sigmoid", init_std=0.02, out_std=0.02)
    init_parameters(m, seed=0)
    x = torch.randn(args.batch, args.seq, args.d_model, requires_grad=True)
    g = torch.randn(args.batch, args.seq, args.d_model)

    # Same function, checked before timing.
    torch.testing.assert_close(m(x), masked_loop_moe(m, x), rtol=0, atol=1e-6)

    times, losses = alternate_rounds({"masked loop": fwd_bwd(m, x, g, lambda t: masked_loop_moe(m, t)),
                                      "sorted, grouped GEMMs (LocalRoutedMoE)": fwd_bwd(m, x, g, m)},
                                     args.steps, args.rounds, barrier=lambda: None)
    base = median(times["masked loop"])
    rows = [[name, median(ts) * 1e3, base / median(ts)] for name, ts in times.items()]
    tokens = args.batch * args.seq
    print(f"d_model={args.d_model} experts={args.experts} top_k={args.top_k} moe_d_ff={args.moe_d_ff} "
          f"shared={args.shared} tokens={args.batch}x{args.seq}={tokens} threads={args.threads} "
          f"steps={args.steps} rounds={args.rounds}")
    print(table(rows, ["forward+backward", "ms/step (median)", "speed-up vs masked loop"]))
    print(f"max |loss difference|: {max(abs(a - b) for a, b in zip(*losses.values())):.2e}")
    if args.grouped:
        print()
        grouped_compare(args)
    if args.ep_steps:
        print()
        ep_compare(args.ep_steps, args.ep_rounds)


if __name__ == "__main__":
    main()
