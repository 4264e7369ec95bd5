"""The bubble of every pipeline schedule, measured with the timeline recorder, beside the textbook's.

    python bench/pp_bubble.py [--pp 4] [--n-micro 8] [--layers 8] [--d-model 256] [--seq 128]
                              [--micro 2] [--steps 3] [--img DIR | --update-docs]

One gloo world of pp processes (one thread each) trains the same model with GPipe, 1F1B,
interleaved 1F1B (v = 2), ZB-H1 and DualPipeV in turn: a warm-up step, then `steps` recorded
steps (PipelineRunner.train_step(record=True), the recorder behind logging.timeline_step).
For each schedule it prints:
  - the textbook bubble (the play-through with a backward = 2 forwards, B = W = 1, free
    communication: pipeline.textbook_bubble) and the measured one (timeline.measured_bubble:
    everything that is not F, B or W compute, median over the recorded steps);
  - the peak activations in flight per rank, as (chunk, micro-batch) pairs and in layers x
    micro-batches (a chunk counts its layers), from the runner's count;
and draws the median step's timeline to <img>/pp_measured_<schedule>.png, and each schedule's
textbook picture to <img>/pp_<schedule>.png. <img> is bench/out/ (git-ignored) unless named;
--update-docs writes docs/img/, the pictures pipeline_parallel.md shows, and only then.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import ROOT, cpu_kind, table

import torch

from nanotrain.config import ModelConfig
from nanotrain.models.transformer import TransformerModel
from nanotrain.parallel.launch import run_world
from nanotrain.parallel.layout import Layout
from nanotrain.parallel.pipeline import cached_timetable, chunk_ids, chunk_layers, pipeline_stage, textbook_bubble
from nanotrain.parallel.pipeline.runner import PipelineRunner
from nanotrain.parallel.pipeline.timeline import RankTimeline, draw_schedule, measured_bubble, plot_timeline
from nanotrain.parallel.state import init_parallel

SCHEDULES = {"gpipe": 1, "1f1b": 1, "interleaved": 2, "zb_h1": 1, "dualpipev": 2}  # name: chunks per rank


def worker(mcfg: dict, a: dict) -> dict:
    cfg = ModelConfig(**mcfg)
    pp, micro, m, seq = a["pp"], a["micro"], a["n_micro"], a["seq"]
    state = init_parallel(Layout(pp=pp))
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (micro * m, seq + 1), generator=g)
    x, y = ids[:, :-1], ids[:, 1:]
    batches = list(zip(x.split(micro), y.split(micro)))
    out = {}
    for name, v in SCHEDULES.items():
        model = TransformerModel(cfg)
        model.init_weights(1234)
        placement = chunk_ids(name, pp, v)
        chunks = chunk_layers(cfg.n_layers, pp, v, None, placement)[state.pp_rank]
        stage = pipeline_stage(model, state.pp_rank, pp, chunks, placement[state.pp_rank])
        runner = PipelineRunner.from_state(stage, name, state)
        runner.train_step(batches, y.numel())  # warm-up
        steps = []
        for _ in range(a["steps"]):
            stage.zero_grad(set_to_none=True)
            torch.distributed.barrier()
            runner.train_step(batches, y.numel(), record=True)
            steps.append((runner.t0_wall, list(runner.events)))
        tt = cached_timetable(name, pp, v, m)
        layers_held = tt.peak_in_flight(state.pp_rank, lambda k: len(stage.stage.chunks[k]))
        out[name] = {"steps": steps, "in_flight": runner.max_in_flight, "layers_in_flight": layers_held, "v": v}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--n-micro", type=int, default=8)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--img", default=str(ROOT / "bench" / "out"), help="folder of the pictures (default bench/out)")
    where.add_argument("--update-docs", action="store_true", help="write the pictures into docs/img (tracked files)")
    args = ap.parse_args()
    if args.update_docs:
        args.img = str(ROOT / "docs" / "img")
    Path(args.img).mkdir(parents=True, exist_ok=True)
    mcfg = dict(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                max_seq_len=args.seq, tie_embeddings=False)
    a = dict(pp=args.pp, micro=args.micro, n_micro=args.n_micro, seq=args.seq, steps=args.steps)
    results = run_world(worker, args.pp, mcfg, a)
    rows = []
    for name, v in SCHEDULES.items():
        per_step = []
        for s in range(args.steps):
            tls = [RankTimeline(r, res[name]["steps"][s][0], res[name]["steps"][s][1], v) for r, res in enumerate(results)]
            per_step.append((measured_bubble(tls), tls))
        per_step.sort(key=lambda t: t[0])
        measured, tls = per_step[len(per_step) // 2]
        textbook = textbook_bubble(args.pp, args.n_micro, v, name)
        span = max(tl.t0_wall + e[4] for tl in tls for e in tl.events) - min(tl.t0_wall + e[3] for tl in tls
                                                                                for e in tl.events)
        plot_timeline(tls, f"{args.img}/pp_measured_{name}.png",
                      f"{name}, pp={args.pp}, m={args.n_micro}, measured", textbook, measured)
        draw_schedule(name, args.pp, args.n_micro, v, f"{args.img}/pp_{name}.png")
        rows.append([name, f"{textbook:.1%}", f"{measured:.1%}", f"{span * 1e3:.0f}",
                     " / ".join(str(res[name]["in_flight"]) for res in results),
                     " / ".join(str(res[name]["layers_in_flight"]) for res in results)])
    print(f"pipeline schedules, pp={args.pp}, m={args.n_micro} micro-batches of {args.micro} x {args.seq} tokens, "
          f"{args.layers} layers, d_model {args.d_model}, fp32, gloo, 1 thread per process, {cpu_kind()}; "
          f"measured: median of {args.steps} recorded steps\n")
    print(table(rows, ["schedule", "textbook bubble", "measured bubble", "step ms", "peak in flight (chunks) per rank",
                       "peak in flight (layers x micro-batches) per rank"]))


if __name__ == "__main__":
    main()
