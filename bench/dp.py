"""nano-train's data parallel vs torch.nn.parallel.DistributedDataParallel, gloo world of 2.

    python bench/dp.py [--steps 30] [--rounds 4] [--bucket-mb 25] [--config configs/shakespeare_char.toml]

Both sides train the same model (same init) on the same batches in the same
2-process world: rank r takes rows [r*B/2, (r+1)*B/2) of each global batch.
nano-train: parallel/zero.py's ZeroOptimizer at stage 0, the runtime's optimizer for plain data
parallelism (data_parallel.BucketedAllReduce: flat buckets all-reduced from backward hooks; sum of
per-rank losses normalised by the global token count; clipping and torch's AdamW per parameter).
DDP: the model wrapped in DistributedDataParallel (gradients averaged, so each
rank's loss is its local mean: the same gradient). Same optimizer (optim.build_adamw:
AdamW), same clipping, same bucket size, same precision policy. Rounds
alternate which side goes first; the ratio is the median over rounds.

Goal: ratio (nano-train / DDP) <= 1.0, and the same losses.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

from common import ROOT, alternate_rounds, table

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanotrain.config import Config, load_config
from nanotrain.data import BatchSampler, prepare_data
from nanotrain.models import build_model
from nanotrain.models.attention import Attention
from nanotrain.module_spec import mark
from nanotrain.optim import build_adamw
from nanotrain.parallel.launch import run_world
from nanotrain.parallel.layout import Layout
from nanotrain.parallel.state import init_parallel
from nanotrain.parallel.zero import ZeroOptimizer


def build(cfg: Config) -> torch.nn.Module:
    model = build_model(cfg.model)
    model.init_weights(cfg.train.seed)
    for m in model.modules():  # the engine's CPU precision policy: attention core in fp32 under bf16
        if isinstance(m, Attention) and cfg.precision.recipe == "bf16":
            mark(m, core_dtype=torch.float32)
    return model


def worker(cfg_dict: dict, steps: int, rounds: int, bucket_mb: float) -> dict:
    cfg = Config.from_dict(cfg_dict)
    rank, world = dist.get_rank(), dist.get_world_size()
    t = cfg.train
    data = prepare_data(cfg.data, t.seq_len, log=lambda *_: None)
    cfg.model.vocab_size, cfg.model.max_seq_len = data.vocab_size, t.seq_len
    sampler = BatchSampler(data.tokens("train"), t.seq_len, t.batch_size, t.seed)
    rows = slice(rank * t.batch_size // world, (rank + 1) * t.batch_size // world)
    global_tokens = t.batch_size * t.seq_len
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision.recipe == "bf16")

    ours = build(cfg)
    ours_opt = ZeroOptimizer(ours, 0, init_parallel(Layout.from_config(cfg)), cfg.optimizer, bucket_mb)

    ddp = DDP(build(cfg), bucket_cap_mb=bucket_mb)
    ddp_opt = build_adamw(ddp.module, cfg.optimizer, torch.device("cpu"))

    def step_ours(s):
        x, y = sampler.batch(s, rows)
        with autocast:
            loss = ours(x, y, loss_denominator=global_tokens)  # this rank's share of the global mean
        with ours_opt.backward_context(last=True):
            loss.backward()
        ours_opt.sync_grads()
        ours_opt.step(cfg.optimizer.lr)
        return loss.detach()

    def step_ddp(s):
        x, y = sampler.batch(s, rows)
        with autocast:
            loss = ddp(x, y)  # local mean; DDP averages the gradients over ranks
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), cfg.optimizer.grad_clip)
        ddp_opt.step()
        ddp_opt.zero_grad(set_to_none=True)
        return loss.detach() / world

    times, losses = alternate_rounds({"nano-train": step_ours, "DDP": step_ddp}, steps, rounds, dist.barrier)
    # Global mean loss per step (sum of the ranks' shares) for both: they must agree.
    for name in losses:
        stacked = torch.tensor(losses[name])
        dist.all_reduce(stacked)
        losses[name] = stacked.tolist()
    return {"times": times, "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/shakespeare_char.toml"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    args = ap.parse_args()
    cfg = load_config(args.config, [f"--data.path={ROOT / 'data/tinyshakespeare.txt'}", "--parallel.dp=2"])
    # Prepared here, once: the ranks then find it up to date (two ranks preparing a fresh clone's
    # data at once would race on the same temporary files).
    prepare_data(cfg.data, cfg.train.seq_len, log=lambda *_: None)
    res = run_world(worker, 2, dataclasses.asdict(cfg), args.steps, args.rounds, args.bucket_mb)[0]
    ours, ddp = (statistics.median(res["times"][k]) for k in ("nano-train", "DDP"))
    ratio = statistics.median(a / b for a, b in zip(res["times"]["nano-train"], res["times"]["DDP"]))
    diff = max(abs(a - b) / abs(b) for a, b in zip(res["losses"]["nano-train"], res["losses"]["DDP"]))
    print(table([["DDP (torch)", ddp * 1e3], ["nano-train ZeroOptimizer(stage 0)", ours * 1e3]],
                ["gloo world of 2, 1 thread each", "step ms (median)"]))
    print(f"\nratio nano-train/DDP = {ratio:.3f} (median over {args.rounds} rounds; goal <= 1.0), "
          f"bucket {args.bucket_mb} MB")
    print(f"largest relative loss difference over {len(res['losses']['DDP'])} steps: {diff:.1e}")


if __name__ == "__main__":
    main()
