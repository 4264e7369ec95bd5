"""Context parallelism on a long sequence: nano-train's ring (parallel.cp=2) against one process,
and against torch's context_parallel where this build runs it.

    python bench/cp.py [--seq 4096] [--d-model 64] [--layers 2] [--heads 4] [--steps 6] [--rounds 2]

The same model (the Llama block, fp32, seq --seq, one sequence per step) trains on the same
batches of tiny Shakespeare three ways:

  one process  RuntimeEngine, 2 threads (the world's cores)
  cp=2         RuntimeEngine in a gloo world of 2, 1 thread each: each rank keeps its zigzag half
               of every sequence, attention runs as a ring (parallel/context_parallel.py)
  torch        the same single-process TransformerModel under
               torch.distributed.tensor.experimental.context_parallel on a cp mesh of 2 (inputs,
               targets and RoPE tables sharded by its head-tail balancer), gradients averaged over
               the 2 ranks by DistributedDataParallel: torchtitan's recipe. On CPU, torch 2.13's
               context parallelism has no sharding rule for the CPU attention kernel
               (aten._scaled_dot_product_flash_attention_for_cpu); the bench then prints torch's
               own error instead of a figure.

Prints the median step time of each (rounds alternate the order; the machine's speed drifts),
the ratio cp=2 / one process, the peak RSS above the start of each process (rank 0), and the
largest relative loss difference between cp=2 and one process (fp32: ~1e-6).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics

from common import ROOT, table  # noqa: F401  (sets sys.path)

from nanotrain.config import Config, load_config
from nanotrain.parallel.launch import run_world
from nanotrain.runtime import RuntimeEngine


def config(args, out: str, *extra: str) -> Config:
    return load_config(None, [
        f"--data.path={ROOT / 'data/tinyshakespeare.txt'}", "--model.norm=rmsnorm", "--model.mlp=swiglu",
        f"--model.d_model={args.d_model}", f"--model.n_layers={args.layers}", f"--model.n_heads={args.heads}",
        f"--train.seq_len={args.seq}", "--train.batch_size=1", f"--train.max_steps={args.steps}",
        "--train.eval_interval=0", "--precision.recipe=fp32", "--schedule.warmup_steps=1",
        "--checkpoint.save_final=false", "--logging.progress=none", "--logging.tensorboard=false",
        "--logging.plot=false", "--monitoring.mode=minimal", f"--train.out_dir=/tmp/nanotrain-bench-cp-{os.getpid()}/{out}",
        *extra])


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train(cfg_dict: dict) -> dict:
    start = _rss()
    r = RuntimeEngine(Config.from_dict(cfg_dict)).run()
    # The first step builds and warms; the rest is the steady state.
    return {"step_s": r.train_time_s / r.final_step, "losses": r.losses, "peak_above_start": _rss() - start}


def torch_cp(cfg_dict: dict) -> str:
    """One step of torch's context_parallel on the single-process model; what happened, in a line."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.parallel import DistributedDataParallel

    from nanotrain.data import BatchSampler, prepare_data
    from nanotrain.models import build_model

    cfg = Config.from_dict(cfg_dict)
    data = prepare_data(cfg.data, cfg.train.seq_len, log=lambda *_: None)
    cfg.model.vocab_size, cfg.model.max_seq_len = data.vocab_size, cfg.train.seq_len
    model = build_model(cfg.model)
    model.init_weights(cfg.train.seed)
    ddp = DistributedDataParallel(model)
    x, y = BatchSampler(data.tokens("train"), cfg.train.seq_len, 1, cfg.train.seed).batch(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("cp",))
    try:
        with context_parallel(mesh, buffers=[x, y, model.rope_cos, model.rope_sin], buffer_seq_dims=[1, 1, 0, 0]):
            ddp(x, y).backward()
    except Exception as e:  # the build's refusal, reported as the figure
        return f"{type(e).__name__}: {str(e).splitlines()[0]}"
    return "ran"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    times: dict[str, list[float]] = {"one process": [], "cp=2": []}
    peaks, losses = {}, {}
    for i in range(args.rounds):
        for name in (("one process", "cp=2") if i % 2 == 0 else ("cp=2", "one process")):
            # Each in fresh processes, so that each peak RSS is its own.
            if name == "one process":
                r = run_world(train, 1, dataclasses.asdict(config(args, f"one{i}")), threads=2)[0]
            else:
                r = run_world(train, 2, dataclasses.asdict(config(args, f"cp{i}", "--parallel.cp=2")))[0]
            times[name].append(r["step_s"])
            peaks[name], losses[name] = r["peak_above_start"], r["losses"]
    peer = run_world(torch_cp, 2, dataclasses.asdict(config(args, "torch")))[0]

    base = statistics.median(times["one process"])
    rows = [[name, statistics.median(ts) * 1e3, statistics.median(ts) / base, peaks[name] / 2**20]
            for name, ts in times.items()]
    print(f"seq {args.seq}, d_model {args.d_model}, {args.layers} layers, {args.heads} heads, fp32, 1 sequence/step, "
          f"{args.steps} steps x {args.rounds} rounds; 2 cores: one process with 2 threads, cp=2 as 2 ranks x 1 thread")
    print(table(rows, ["", "step ms (median)", "/ one process", "peak RSS above start, MB (rank 0)"]))
    diff = max(abs(losses["cp=2"][s] - losses["one process"][s]) / abs(losses["one process"][s])
               for s in losses["one process"])
    print(f"largest relative loss difference, cp=2 vs one process: {diff:.1e}")
    print(f"torch context_parallel (cp mesh of 2, gloo, CPU): {peer}")


if __name__ == "__main__":
    main()
