"""nano-train's 1F1B pipeline vs torch.distributed.pipelining Schedule1F1B, gloo world of pp.

    python bench/pp.py [--pp 2] [--layers 4] [--d-model 256] [--seq 128] [--micro 4] [--n-micro 8]
                       [--steps 10] [--rounds 3] [--precision fp32]

Both sides train the same model split (chunk_layers(n_layers, pp): same layers per
rank, embedding on the first rank, norm/head/loss on the last), from the same init,
on the same synthetic batches (n_micro micro-batches of micro sequences each), in
the same pp-process gloo world, one thread per process, with the same optimizer
(AdamW, foreach):
  nano-train: parallel/pipeline pipeline_stage + PipelineRunner, schedule "1f1b";
  torch:      torch.distributed.pipelining PipelineStage around the very same stage
              module class (our stage's model called without targets: ids -> hidden on
              the first rank, hidden -> hidden in the middle, hidden -> logits on the
              last), driven by Schedule1F1B with loss_fn = sum cross entropy / (target
              count of the whole batch) and scale_grads=False, i.e. our loss and
              gradients exactly.
Rounds alternate which side goes first (machine speed drifts); the ratio is the
median over rounds of the paired per-round ratios.

Goal: ratio (nano-train / torch Schedule1F1B) <= 1.0, and the same losses.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

from common import alternate_rounds, table

import torch
import torch.distributed as dist

from nanotrain.config import ModelConfig
from nanotrain.models.transformer import IGNORE_INDEX, TransformerModel, cross_entropy_sum
from nanotrain.parallel.launch import run_world
from nanotrain.parallel.layout import Layout
from nanotrain.parallel.pipeline import chunk_layers, pipeline_stage
from nanotrain.parallel.pipeline.runner import PipelineRunner
from nanotrain.parallel.state import init_parallel

SEED, N_BATCHES, LR = 1234, 8, 1e-3


def build_stage(cfg: ModelConfig, rank: int, pp: int) -> TransformerModel:
    model = TransformerModel(cfg)
    model.init_weights(SEED)  # the full model's init on every rank: both sides start equal
    return pipeline_stage(model, rank, pp, chunk_layers(cfg.n_layers, pp)[rank])


class Autocast(torch.nn.Module):
    """torch's pipeline stage calls submodule(x): run it under the same autocast as ours."""

    def __init__(self, inner: torch.nn.Module, autocast):
        super().__init__()
        self.inner, self.autocast = inner, autocast

    def forward(self, x):
        with self.autocast():
            return self.inner(x)


def worker(mcfg: dict, a: dict) -> dict:
    from torch.distributed.pipelining import PipelineStage as TorchStage
    from torch.distributed.pipelining import Schedule1F1B

    cfg = ModelConfig(**mcfg)
    pp, micro, n_micro, seq = a["pp"], a["micro"], a["n_micro"], a["seq"]
    state = init_parallel(Layout(pp=pp))
    rank = state.pp_rank
    first, last = rank == 0, rank == pp - 1
    if a["precision"] == "bf16":
        def autocast():
            return torch.autocast("cpu", dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext

    # Same synthetic batches on every rank (the first uses the inputs, the last the targets).
    g = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, cfg.vocab_size, (micro * n_micro, seq + 1), generator=g) for _ in range(N_BATCHES)]
    batches = [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in batches]
    assert IGNORE_INDEX < 0  # random ids in [0, vocab) never hit it: every target counts
    denom = micro * n_micro * seq  # target count of the whole batch

    ours = build_stage(cfg, rank, pp)
    ours_opt = torch.optim.AdamW(ours.parameters(), lr=LR, foreach=True)
    runner = PipelineRunner.from_state(ours, "1f1b", state, autocast=autocast)

    theirs = build_stage(cfg, rank, pp)
    theirs_opt = torch.optim.AdamW(theirs.parameters(), lr=LR, foreach=True)
    # Quirks of torch.distributed.pipelining on gloo / CPU, torch 2.13:
    #  - device is torch.device("cpu"); no input_args/output_args: shapes are inferred
    #    from the first micro-batch at the first step() (a metadata exchange with
    #    send/recv_object_list, which gloo supports), so the warm-up round absorbs it;
    #  - every rank calls step(): the first with the whole batch (split into n_micro
    #    micro-batches along dim 0 by the schedule), the last with target= only, the
    #    middle ones with nothing;
    #  - scale_grads=False: loss_fn already divides by the whole batch's target count
    #    (default True would divide the gradients by n_micro once more);
    #  - return_outputs=False: otherwise the last rank keeps and concatenates every
    #    micro-batch's logits, work our runner does not do.
    torch_stage = TorchStage(Autocast(theirs, autocast), rank, pp, torch.device("cpu"), group=state.pp_group.pg)

    def loss_fn(logits, targets):
        return cross_entropy_sum(logits, targets) / denom

    schedule = Schedule1F1B(torch_stage, n_micro, loss_fn=loss_fn, scale_grads=False)

    def step_ours(s):
        x, y = batches[s % N_BATCHES]
        loss = runner.train_step(list(zip(x.split(micro), y.split(micro))), denom)
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)
        return loss

    def step_theirs(s):
        x, y = batches[s % N_BATCHES]
        losses = []
        if first:
            schedule.step(x, return_outputs=False)
        elif last:
            schedule.step(target=y, losses=losses, return_outputs=False)
        else:
            schedule.step(return_outputs=False)
        theirs_opt.step()
        theirs_opt.zero_grad(set_to_none=True)
        return torch.stack(losses).sum().detach() if losses else torch.zeros(())

    times, losses = alternate_rounds({"nano-train": step_ours, "torch": step_theirs},
                                     a["steps"], a["rounds"], dist.barrier)
    return {"times": times, "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro", type=int, default=4, help="sequences per micro-batch")
    ap.add_argument("--n-micro", type=int, default=8, help="micro-batches per step")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round (round 0 warms up)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()
    if args.n_micro < args.pp:
        ap.error(f"Schedule1F1B needs --n-micro >= --pp ({args.n_micro} < {args.pp})")
    mcfg = dict(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                max_seq_len=args.seq, tie_embeddings=False)
    a = dict(pp=args.pp, micro=args.micro, n_micro=args.n_micro, seq=args.seq, steps=args.steps,
             rounds=args.rounds, precision=args.precision)
    results = run_world(worker, args.pp, mcfg, a)
    times = results[0]["times"]  # ranks are lined up by barriers: rank 0's clock speaks for all
    losses = results[-1]["losses"]  # only the last rank computes the loss
    ours, theirs = (statistics.median(times[k]) for k in ("nano-train", "torch"))
    ratio = statistics.median(o / t for o, t in zip(times["nano-train"], times["torch"]))
    tokens = args.micro * args.n_micro * args.seq

    print(f"1F1B pipeline step: nano-train PipelineRunner vs torch.distributed.pipelining Schedule1F1B\n"
          f"pp={args.pp} (gloo, CPU, 1 thread per process), {args.layers} layers, d_model {args.d_model}, "
          f"vocab {args.vocab}, seq {args.seq}, {args.n_micro} micro-batches x {args.micro} sequences, "
          f"{args.precision}, AdamW; {args.rounds} timed round(s) x {args.steps} steps each side (+1 warm-up round)\n")
    l0, t0 = losses["nano-train"][0], losses["torch"][0]
    rel0 = abs(l0 - t0) / abs(t0)
    verdict = "losses agree" if rel0 <= 1e-5 else "WARNING: losses differ"
    print(f"first step, same weights: nano-train loss {l0:.6f}, torch loss {t0:.6f} "
          f"(relative difference {rel0:.1e}): {verdict}")
    diff = max(abs(o - t) / abs(t) for o, t in zip(losses["nano-train"], losses["torch"]))
    print(f"largest relative loss difference over {len(losses['torch'])} steps: {diff:.1e}\n")
    print(table([["torch.distributed.pipelining Schedule1F1B", f"{theirs * 1e3:.1f}", f"{tokens / theirs:,.0f}"],
                 ["nano-train PipelineRunner 1f1b", f"{ours * 1e3:.1f}", f"{tokens / ours:,.0f}"]],
                ["implementation", "step ms (median)", "tokens/s"]))
    print(f"\nours / torch.distributed.pipelining Schedule1F1B = {ratio:.2f} "
          f"(median of {args.rounds} paired round(s); goal <= 1.0)")


if __name__ == "__main__":
    main()
