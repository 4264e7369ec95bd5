"""nano-train's tensor parallel vs PyTorch DTensor tensor parallel, gloo world of 2.

    python bench/tp.py [--steps 20] [--rounds 4] [--config configs/shakespeare_char.toml]

Both sides start from the same model (same init: weights drawn whole, then
sharded) and train on the same batches with tp=2:
  nano-train: TransformerModel built with parallel/tensor_parallel.py layers
              (column/row-parallel projections, vocabulary-parallel embedding,
              head and cross entropy);
  DTensor:    the single-process TransformerModel, then
              torch.distributed.tensor.parallel.parallelize_module with
              ColwiseParallel on wq/wk/wv/w1/w3 and the head, RowwiseParallel on
              wo/w2 and the embedding, and loss_parallel() for the cross entropy
              (the plan torchtitan uses for Llama).
Untied embeddings and no gradient clipping on both sides (clip_grad_norm_ does
not mix DTensor and plain-tensor gradients). Rounds alternate which side goes
first; the ratio is the median over rounds.

Goal: ratio (nano-train / DTensor) <= 1.0, and the same losses.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

from common import ROOT, alternate_rounds, table

import torch
import torch.distributed as dist

from nanotrain.config import Config, load_config
from nanotrain.data import BatchSampler, prepare_data
from nanotrain.models import build_model
from nanotrain.models.attention import Attention
from nanotrain.module_spec import mark
from nanotrain.optim import build_adamw
from nanotrain.parallel.launch import run_world
from nanotrain.parallel.tensor_parallel import TensorParallel


def policy(model, cfg):
    for m in model.modules():  # the engine's CPU precision policy: attention core in fp32 under bf16
        if isinstance(m, Attention) and cfg.precision.recipe == "bf16":
            mark(m, core_dtype=torch.float32)
    return model


def dtensor_model(cfg: Config):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = build_model(cfg.model)
    model.init_weights(cfg.train.seed)  # whole weights on every rank; distribute_tensor keeps rank r's rows
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    plan = {"tok_emb": RowwiseParallel(input_layouts=Replicate()),
            "head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)}
    for i in model.layers:
        for name in ("attn.wq", "attn.wk", "attn.wv", "mlp.w1") + (("mlp.w3",) if cfg.model.mlp == "swiglu" else ()):
            plan[f"layers.{i}.{name}"] = ColwiseParallel()
        for name in ("attn.wo", "mlp.w2"):
            plan[f"layers.{i}.{name}"] = RowwiseParallel()
    return policy(parallelize_module(model, mesh, plan), cfg)


def worker(cfg_dict: dict, steps: int, rounds: int) -> dict:
    from torch.distributed.tensor.parallel import loss_parallel

    cfg = Config.from_dict(cfg_dict)
    rank, world = dist.get_rank(), dist.get_world_size()
    t = cfg.train
    data = prepare_data(cfg.data, t.seq_len, log=lambda *_: None)
    cfg.model.vocab_size = -(-data.vocab_size // world) * world  # padded to split over tp
    cfg.model.max_seq_len = t.seq_len
    sampler = BatchSampler(data.tokens("train"), t.seq_len, t.batch_size, t.seed)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision.recipe == "bf16")

    ours = policy(build_model(cfg.model, TensorParallel(dist.group.WORLD, rank, world)), cfg)
    ours.init_weights(t.seed)
    ours_opt = build_adamw(ours, cfg.optimizer, torch.device("cpu"))

    theirs = dtensor_model(cfg)
    theirs_opt = build_adamw(theirs, cfg.optimizer, torch.device("cpu"))

    def step_ours(s):
        x, y = sampler.batch(s)
        with autocast:
            loss = ours(x, y)
        loss.backward()
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)
        return loss.detach()

    def step_theirs(s):
        x, y = sampler.batch(s)
        with autocast, loss_parallel():
            loss = theirs(x, y)
            loss.backward()
        theirs_opt.step()
        theirs_opt.zero_grad(set_to_none=True)
        loss = loss.detach()
        return loss.full_tensor() if hasattr(loss, "full_tensor") else loss

    times, losses = alternate_rounds({"nano-train": step_ours, "DTensor": step_theirs}, steps, rounds, dist.barrier)
    return {"times": times, "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs/shakespeare_char.toml"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--optimizer-impl", default="foreach", choices=["fused", "foreach", "loop"])
    args = ap.parse_args()
    cfg = load_config(args.config, [f"--data.path={ROOT / 'data/tinyshakespeare.txt'}", "--model.tie_embeddings=false",
                                     "--optimizer.grad_clip=0", f"--precision.recipe={args.precision}",
                                     f"--optimizer.impl={args.optimizer_impl}"])
    # Prepared here, once: the ranks then find it up to date (two ranks preparing a fresh clone's
    # data at once would race on the same temporary files).
    prepare_data(cfg.data, cfg.train.seq_len, log=lambda *_: None)
    res = run_world(worker, 2, dataclasses.asdict(cfg), args.steps, args.rounds)[0]
    ours, theirs = (statistics.median(res["times"][k]) for k in ("nano-train", "DTensor"))
    ratio = statistics.median(a / b for a, b in zip(res["times"]["nano-train"], res["times"]["DTensor"]))
    diff = max(abs(a - b) / abs(b) for a, b in zip(res["losses"]["nano-train"], res["losses"]["DTensor"]))
    print(table([["DTensor parallelize_module", theirs * 1e3], ["nano-train tensor_parallel", ours * 1e3]],
                [f"tp=2, gloo, 1 thread each, {args.precision}", "step ms (median)"]))
    print(f"\nratio nano-train/DTensor = {ratio:.3f} (median over {args.rounds} rounds; goal <= 1.0)")
    print(f"largest relative loss difference over {len(res['losses']['DTensor'])} steps: {diff:.1e}")


if __name__ == "__main__":
    main()
