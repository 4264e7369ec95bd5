"""nano-train's sharded checkpoints vs torch.distributed.checkpoint (DCP), gloo world of dp, CPU.

    python bench/checkpoint.py [--dp 2] [--d-model 384] [--layers 6] [--vocab 512] [--rounds 3]
                               [--dir /tmp/nanotrain_bench_ckpt]

One model (TransformerModel, fp32) with AdamW state after one step (parallel/zero.py's ZeroOptimizer at stage 0,
no ZeRO: every rank holds the same model and moments, so both sides must write each value once),
saved and loaded by both sides from the same tensors, in the same world, rounds alternating:

  nano-train  CheckpointManager.save(step, model_pieces + opt.pieces, objects): boxes assigned to
              one writer each, one safetensors file per rank, metadata.json, atomic rename, `latest`
  DCP         dcp.save({"model", "optim"} from get_state_dict(model, optimizer)): its planner
              deduplicates replicated tensors, one .distcp file per rank, .metadata

  save        time from a barrier before the call to a barrier after it (the checkpoint complete)
  async       dcp.async_save vs save_async: time the training loop is blocked (the call), then
              time until the checkpoint is complete (future.result() / wait(), then a barrier)
  load        every rank restores model and optimizer from the folder (reader.fill / dcp.load)

Each number is the median over rounds of the slowest rank. Also printed: bytes on disk.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

from common import table

import torch
import torch.distributed as dist

from nanotrain.parallel.launch import run_world


def worker(a: dict) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from nanotrain.checkpoint import CheckpointManager, load_checkpoint, model_pieces
    from nanotrain.config import load_config
    from nanotrain.models import build_model
    from nanotrain.optim import build_adamw
    from nanotrain.parallel.layout import Layout
    from nanotrain.parallel.state import init_parallel
    from nanotrain.parallel.zero import ZeroOptimizer

    cfg = load_config(None, [f"--model.d_model={a['d_model']}", f"--model.n_layers={a['layers']}",
                             f"--model.vocab_size={a['vocab']}", "--model.max_seq_len=64", f"--parallel.dp={a['dp']}"])
    ps = init_parallel(Layout.from_config(cfg))
    rank = dist.get_rank()
    model = build_model(cfg.model)
    model.init_weights(0)
    opt = ZeroOptimizer(model, 0, ps, cfg.optimizer, cfg.parallel.bucket_mb)  # plain AdamW (stage 0)
    x = torch.randint(0, a["vocab"], (2, 64), generator=torch.Generator().manual_seed(rank))
    with opt.backward_context(last=True):
        model(x, x, loss_denominator=128.0).backward()
    opt.sync_grads()
    opt.step(1e-3)  # moments exist now
    # DCP's side: the same model and torch's AdamW after the same step. (get_state_dict maps an
    # optimizer's parameters to the model's names; our optimizer updates views of its buckets,
    # which it cannot name, and saves its state as boxes of the logical tensors instead.)
    peer = build_model(cfg.model)
    peer.init_weights(0)
    peer_opt = build_adamw(peer, cfg.optimizer, torch.device("cpu"))
    peer(x, x, loss_denominator=128.0).backward()
    for p in peer.parameters():  # the dp sum our optimizer did
        dist.all_reduce(p.grad)
    peer_opt.step()
    root = Path(a["dir"])
    objects = {"config": cfg.to_dict()}

    def timed(fn) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        t = torch.tensor(time.perf_counter() - t0)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def ours_save(r):
        CheckpointManager(root / f"ours_{r}").save(1, model_pieces(model) + opt.pieces(), objects)

    def dcp_state():
        msd, osd = get_state_dict(peer, peer_opt)
        return {"model": msd, "optim": osd}

    def dcp_save(r):
        dcp.save(dcp_state(), checkpoint_id=str(root / f"dcp_{r}"))

    def ours_async(r, out):
        mgr = CheckpointManager(root / f"ours_async_{r}")
        t0 = time.perf_counter()
        mgr.save_async(1, model_pieces(model) + opt.pieces(), objects)
        out.append(time.perf_counter() - t0)
        mgr.wait()

    def dcp_async(r, out):
        t0 = time.perf_counter()
        future = dcp.async_save(dcp_state(), checkpoint_id=str(root / f"dcp_async_{r}"))
        out.append(time.perf_counter() - t0)
        (future.result() if hasattr(future, "result") else future.upload_completion.result())

    def ours_load(r):
        reader = load_checkpoint(root / f"ours_{r}")
        for piece in model_pieces(model):
            reader.fill(piece)
        opt.load_pieces(reader)

    def dcp_load(r):
        state = dcp_state()
        dcp.load(state, checkpoint_id=str(root / f"dcp_{r}"))
        set_state_dict(peer, peer_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])

    res = {k: [] for k in ("ours save", "dcp save", "ours async total", "dcp async total", "ours load", "dcp load")}
    blocked = {"ours": [], "dcp": []}
    for r in range(a["rounds"] + 1):  # round 0 warms up
        order = ["ours", "dcp"] if r % 2 == 0 else ["dcp", "ours"]
        times = {}
        for side in order:
            times[f"{side} save"] = timed(lambda: (ours_save if side == "ours" else dcp_save)(r))
            b: list[float] = []
            times[f"{side} async total"] = timed(lambda: (ours_async if side == "ours" else dcp_async)(r, b))
            t = torch.tensor(b[0])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if r:
                blocked[side].append(float(t))
            times[f"{side} load"] = timed(lambda: (ours_load if side == "ours" else dcp_load)(r))
        if r:
            for k, v in times.items():
                res[k].append(v)
    sizes = {}
    if rank == 0:
        for side in ("ours", "dcp"):
            sizes[side] = sum(f.stat().st_size for f in (root / f"{side}_1").rglob("*") if f.is_file())
    n_params = sum(p.numel() for p in model.parameters())
    return {"res": res, "blocked": blocked, "sizes": sizes, "n_params": n_params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/nanotrain_bench_ckpt")
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    Path(args.dir).mkdir(parents=True)
    a = dict(dp=args.dp, d_model=args.d_model, layers=args.layers, vocab=args.vocab, rounds=args.rounds, dir=args.dir)
    try:
        out = run_world(worker, args.dp, a)[0]
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    res, blocked, sizes = out["res"], out["blocked"], out["sizes"]
    med = {k: statistics.median(v) * 1e3 for k, v in res.items()}
    blk = {k: statistics.median(v) * 1e3 for k, v in blocked.items()}
    MB = 2**20
    print(f"checkpoints: nano-train format v2 vs torch.distributed.checkpoint, dp={args.dp} (gloo, CPU); "
          f"{out['n_params'] / 1e6:.2f}M parameters + AdamW moments (fp32); median of {args.rounds} round(s)\n")
    rows = []
    for side, label in (("ours", "nano-train"), ("dcp", "torch DCP")):
        rows.append([label, f"{med[side + ' save']:.0f}", f"{blk[side]:.0f}", f"{med[side + ' async total']:.0f}",
                     f"{med[side + ' load']:.0f}", f"{sizes[side] / MB:.1f}"])
    print(table(rows, ["implementation", "save ms", "async: blocked ms", "async: complete ms", "load ms",
                       "on disk MB"]))
    print(f"\nours / DCP: save {med['ours save'] / med['dcp save']:.2f}, async blocked {blk['ours'] / blk['dcp']:.2f}, "
          f"async complete {med['ours async total'] / med['dcp async total']:.2f}, "
          f"load {med['ours load'] / med['dcp load']:.2f}, disk {sizes['ours'] / sizes['dcp']:.2f}")


if __name__ == "__main__":
    main()
