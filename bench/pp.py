"""nano-train's pipeline schedules vs torch.distributed.pipelining's, gloo world of pp.

    python bench/pp.py [--schedule 1f1b|zb_h1|dualpipev] [--pp 2] [--layers 4] [--d-model 256]
                       [--seq 128] [--micro 4] [--n-micro 8] [--steps 10] [--rounds 3] [--precision fp32]

    --schedule  ours       torch's
    1f1b        1f1b       Schedule1F1B
    zb_h1       zb_h1      ScheduleInterleavedZeroBubble with one stage per rank (ZB1P: ZB-H1)
    dualpipev   dualpipev  ScheduleDualPipeV (two stages per rank, in the same V)

Both sides train the same model split (chunk_layers with the schedule's placement: same
layers per chunk, embedding with chunk 0, norm/head/loss with the last), from the same init,
on the same synthetic batches (n_micro micro-batches of micro sequences each), in
the same pp-process gloo world, one thread per process, with the same optimizer
(AdamW, foreach):
  nano-train: parallel/pipeline pipeline_stage + PipelineRunner;
  torch:      torch.distributed.pipelining PipelineStage around each chunk of the very same
              stage module class (our stage's model called without targets: ids -> hidden
              for chunk 0, hidden -> hidden in the middle, hidden -> logits for the last),
              driven by torch's schedule with loss_fn = sum cross entropy / (target count of
              the whole batch) and scale_grads=False, i.e. our loss and gradients exactly.
Rounds alternate which side goes first (machine speed drifts); the ratio is the
median over rounds of the paired per-round ratios.

Goal: ratio (nano-train / torch's schedule) <= 1.0, and the same losses.
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
from nanotrain.parallel.pipeline import chunk_ids, chunk_layers, chunks_per_rank, pipeline_stage
from nanotrain.parallel.pipeline.runner import PipelineRunner
from nanotrain.parallel.state import init_parallel

SEED, N_BATCHES, LR = 1234, 8, 1e-3
TORCH = {"1f1b": "Schedule1F1B", "zb_h1": "ScheduleInterleavedZeroBubble", "dualpipev": "ScheduleDualPipeV"}


def build_stage(cfg: ModelConfig, rank: int, pp: int, schedule: str) -> TransformerModel:
    model = TransformerModel(cfg)
    model.init_weights(SEED)  # the full model's init on every rank: both sides start equal
    v = chunks_per_rank(schedule, 1)
    ids = chunk_ids(schedule, pp, v)
    return pipeline_stage(model, rank, pp, chunk_layers(cfg.n_layers, pp, v, None, ids)[rank], ids[rank])


class Chunk(torch.nn.Module):
    """One chunk of our stage, as torch's PipelineStage wants it: submodule(x), under the same
    autocast as ours. Its parameters are the chunk's own (torch's W computes the gradients of
    submod.parameters())."""

    def __init__(self, model: TransformerModel, k: int, autocast):
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule: parameters() lists the chunk's
        self.k, self.autocast = k, autocast
        stage = model.stage
        parts = [model.layers[str(i)] for i in stage.chunks[k]]
        if stage.is_first_chunk(k):
            parts += [m for m in (model.tok_emb, model.pos_emb) if m is not None]
        if stage.is_last_chunk(k):
            parts += [model.norm, model.head]
        self.parts = torch.nn.ModuleList(parts)

    def forward(self, x):
        with self.autocast():
            return self.model(x, chunk=self.k)


def worker(mcfg: dict, a: dict) -> dict:
    import torch.distributed.pipelining as pipelining
    from torch.distributed.pipelining import PipelineStage as TorchStage

    cfg = ModelConfig(**mcfg)
    pp, micro, n_micro, seq, name = a["pp"], a["micro"], a["n_micro"], a["seq"], a["schedule"]
    state = init_parallel(Layout(pp=pp))
    rank = state.pp_rank
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

    ours = build_stage(cfg, rank, pp, name)
    ours_opt = torch.optim.AdamW(ours.parameters(), lr=LR, foreach=True)
    runner = PipelineRunner.from_state(ours, name, state, autocast=autocast)

    theirs = build_stage(cfg, rank, pp, name)
    first, last = theirs.stage.has_first, theirs.stage.has_last
    theirs_opt = torch.optim.AdamW(theirs.parameters(), lr=LR, foreach=True)
    # Quirks of torch.distributed.pipelining on gloo / CPU, torch 2.13:
    #  - device is torch.device("cpu"); no input_args/output_args: shapes are inferred
    #    from the first micro-batch at the first step() (a metadata exchange with
    #    send/recv_object_list, which gloo supports), so the warm-up round absorbs it;
    #  - every rank calls step(): the one with chunk 0 with the whole batch (split into
    #    n_micro micro-batches along dim 0 by the schedule), the one with the last chunk with
    #    target= (DualPipeV's rank 0: both), the others with nothing;
    #  - one PipelineStage per chunk, stage_index = the chunk's global index, num_stages = all
    #    chunks; ScheduleDualPipeV places them in the V itself (stage_index_to_group_rank);
    #  - scale_grads=False: loss_fn already divides by the whole batch's target count
    #    (default True would divide the gradients by n_micro once more);
    #  - return_outputs=False: otherwise the last rank keeps and concatenates every
    #    micro-batch's logits, work our runner does not do.
    stage = theirs.stage
    torch_stages = [TorchStage(Chunk(theirs, k, autocast), stage.ids[k], stage.n_chunks, torch.device("cpu"),
                               group=state.pp_group.pg) for k in range(stage.v)]

    def loss_fn(logits, targets):
        return cross_entropy_sum(logits, targets) / denom

    peer = getattr(pipelining, TORCH[name])
    schedule = peer(torch_stages[0] if name == "1f1b" else torch_stages, n_micro, loss_fn=loss_fn,
                    scale_grads=False)

    def step_ours(s):
        x, y = batches[s % N_BATCHES]
        loss = runner.train_step(list(zip(x.split(micro), y.split(micro))), denom)
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)
        return loss

    def step_theirs(s):
        x, y = batches[s % N_BATCHES]
        losses = []
        schedule.step(*([x] if first else []), **(dict(target=y, losses=losses) if last else {}),
                      return_outputs=False)
        theirs_opt.step()
        theirs_opt.zero_grad(set_to_none=True)
        return torch.stack(losses).sum().detach() if losses else torch.zeros(())

    times, losses = alternate_rounds({"nano-train": step_ours, "torch": step_theirs},
                                     a["steps"], a["rounds"], dist.barrier)
    return {"times": times, "losses": losses, "has_loss": last}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--schedule", default="1f1b", choices=list(TORCH))
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
    if args.n_micro < args.pp * chunks_per_rank(args.schedule, 1):
        ap.error(f"{TORCH[args.schedule]} needs --n-micro >= the stage count ({args.n_micro} < "
                 f"{args.pp * chunks_per_rank(args.schedule, 1)})")
    mcfg = dict(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                max_seq_len=args.seq, tie_embeddings=False)
    a = dict(pp=args.pp, micro=args.micro, n_micro=args.n_micro, seq=args.seq, steps=args.steps,
             rounds=args.rounds, precision=args.precision, schedule=args.schedule)
    results = run_world(worker, args.pp, mcfg, a)
    times = results[0]["times"]  # ranks are lined up by barriers: rank 0's clock speaks for all
    losses = next(r for r in results if r["has_loss"])["losses"]  # only the rank with the last chunk has it
    peer = f"torch.distributed.pipelining {TORCH[args.schedule]}"
    ours, theirs = (statistics.median(times[k]) for k in ("nano-train", "torch"))
    ratio = statistics.median(o / t for o, t in zip(times["nano-train"], times["torch"]))
    tokens = args.micro * args.n_micro * args.seq

    print(f"{args.schedule} pipeline step: nano-train PipelineRunner vs {peer}\n"
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
    print(table([[peer, f"{theirs * 1e3:.1f}", f"{tokens / theirs:,.0f}"],
                 [f"nano-train PipelineRunner {args.schedule}", f"{ours * 1e3:.1f}", f"{tokens / ours:,.0f}"]],
                ["implementation", "step ms (median)", "tokens/s"]))
    print(f"\nours / {peer} = {ratio:.2f} "
          f"(median of {args.rounds} paired round(s); goal <= 1.0)")


if __name__ == "__main__":
    main()
