"""nano-train's ZeRO optimizer (stages 1, 2 and 3) vs torch's peers, gloo world of dp, CPU.

    python bench/zero.py [--stages 1,2,3] [--dp 2] [--d-model 256] [--layers 4] [--heads 4] [--vocab 512] [--seq 128]
                         [--batch 8] [--steps 10] [--rounds 3] [--bucket-mb 25]

Six implementations train the same model (TransformerModel, fp32, untied embeddings, same
init) on the same synthetic batches (each rank takes its --batch rows of a global batch of
dp * --batch sequences), with the same AdamW (lr 1e-3, betas (0.9, 0.99), eps 1e-8, weight
decay 0.1 on tensors of dim >= 2 only, via two param groups; foreach kernels), no gradient
clipping anywhere (grad_clip=0), a constant learning rate:

  stage 1  nano-train ZeroOptimizer(model, 1, ps, cfg, bucket_mb): gradients all-reduced,
           each rank steps its slices of fp32 master weights + moments, then all-gathers;
           torch ZeroRedundancyOptimizer(optimizer_class=AdamW, parameters_as_bucket_view=True)
           around a DistributedDataParallel(bucket_cap_mb=bucket_mb, gradient_as_bucket_view=True)
           model: gradients all-reduced by DDP, each rank steps whole parameters assigned to
           it, then broadcasts them.
  stage 2  nano-train ZeroOptimizer(model, 2, ...): gradients reduce-scattered bucket by bucket;
           torch FSDP2 fully_shard(block, reshard_after_forward=False) per transformer block,
           then the root: parameters sharded too (gathered once per step for forward and
           backward), gradients reduce-scattered, AdamW on the local shards.
  stage 3  nano-train ZeroOptimizer(model, 3, ...): parameters sharded too, each block gathered
           for its forward and again for its backward (the next one prefetched), freed after;
           torch FSDP2 fully_shard(block, reshard_after_forward=True) per block, then the root:
           the same sharding (the same gathers, one per block per direction).

Losses: ours divides the summed cross entropy by the global batch's token count (the all-reduce
and the reduce-scatter sum over ranks); DDP and FSDP2 average over ranks, so they get each rank's
own token count: the same gradient. The first step (same weights) must give the same loss on
every side, and every later one too if the updates agree (fp32: ~1e-5 relative).

Time: every implementation lives in one world; rounds of --steps steps alternate the order
(machine speed drifts), round 0 warms up; median per-step time, and the ratio is the median
of the per-round paired ratios.

Memory, per rank (rank 0 printed), measured separately in a fresh world per implementation
(3 steps, so peak RSS is that implementation's own): bytes of parameters + gradients +
optimizer state (moments; our fp32 master slices are the parameters themselves) held at the step of
step 3 (after backward and the gradient sync, when all three exist), counted from the actual
tensors by distinct storage (a view counts its whole storage once: flat buckets, padding
included; DTensors by their local shards); peak RSS (ru_maxrss) of the process (it includes
torch itself, ~the same for all); and the peak RSS above the RSS just before the model was
built: the most the implementation ever held at once, transient buffers included (FSDP2's
all-gathered parameters during forward and backward, our gradient buckets in flight).

Goal: ours / peer <= 1.0 in time, and no more memory than the peer.
"""

from __future__ import annotations

import argparse
import resource
import statistics

from common import alternate_rounds, table

import torch
import torch.distributed as dist

from nanotrain.config import ModelConfig, OptimizerConfig
from nanotrain.models.transformer import TransformerModel
from nanotrain.parallel.launch import run_world
from nanotrain.parallel.layout import Layout
from nanotrain.parallel.state import init_parallel
from nanotrain.parallel.zero import ZeroOptimizer

SEED, N_BATCHES, LR = 1234, 8, 1e-3
OPT = OptimizerConfig(lr=LR, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, grad_clip=0.0)
PROBE_STEP = 2  # memory: counted at the optimizer step of this step (the moments exist from step 0's update)

LABELS = {
    "ours1": "nano-train ZeroOptimizer stage 1",
    "zro": "torch ZeroRedundancyOptimizer + DDP",
    "ours2": "nano-train ZeroOptimizer stage 2",
    "fsdp2": "torch FSDP2 fully_shard (no reshard after fwd)",
    "ours3": "nano-train ZeroOptimizer stage 3",
    "fsdp2_rs": "torch FSDP2 fully_shard (reshard after fwd)",
}
PAIRS = [("ours1", "zro", "ZeroRedundancyOptimizer"), ("ours2", "fsdp2", "FSDP2"),
         ("ours3", "fsdp2_rs", "FSDP2 resharding after forward")]


def build(cfg: ModelConfig) -> TransformerModel:
    model = TransformerModel(cfg)
    model.init_weights(SEED)
    return model


def param_groups(model: torch.nn.Module) -> list[dict]:
    """Ours decays tensors of dim >= 2 only: the same two groups for torch's optimizers."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": OPT.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


ADAMW = dict(lr=LR, betas=(OPT.beta1, OPT.beta2), eps=OPT.eps, foreach=True)  # ours: foreach=True too


def held_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (DTensors: their local shards). 0-dim
    tensors (AdamW's step counters) are left out, as ZeroOptimizer.state_bytes does."""
    from torch.distributed.tensor import DTensor

    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        if isinstance(t, DTensor):
            t = t.to_local()
        if t.dim() == 0:
            continue
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]


def worker(mcfg: dict, a: dict, names: list[str], probe: bool) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    cfg = ModelConfig(**mcfg)
    dp, batch, seq = a["dp"], a["batch"], a["seq"]
    ps = init_parallel(Layout(dp=dp))
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, cfg.vocab_size, (dp * batch, seq + 1), generator=g) for _ in range(N_BATCHES)]
    rows = slice(rank * batch, (rank + 1) * batch)
    batches = [(b[rows, :-1].contiguous(), b[rows, 1:].contiguous()) for b in batches]
    global_tokens = dp * batch * seq  # every target counts (random ids are never IGNORE_INDEX)
    memory: dict[str, dict] = {}

    def count(name, s, params, grads, state):
        if probe and s == PROBE_STEP:
            memory[name] = {"params": held_bytes(params), "grads": held_bytes(grads), "optimizer": held_bytes(state)}

    def make_ours(name, stage):
        model = build(cfg)  # ZeroOptimizer turns the parameters into views of its flat buckets
        opt = ZeroOptimizer(model, stage, ps, OPT, a["bucket_mb"])

        def step(s):
            x, y = batches[s % N_BATCHES]
            with opt.backward_context(last=True):
                loss = model(x, y, loss_denominator=global_tokens)  # this rank's share of the global mean
                loss.backward()
            opt.sync_grads()
            # The parameters' storage: the buckets (stage 3: this rank's slices; the gathered
            # buffers are freed by now); the fp32 master slices are views of them.
            params = list(model.parameters()) + [b.flat for b in opt.buckets]
            count(name, s, params, [p.grad for p in model.parameters()] + list(opt.grad.values()),
                  state_tensors(opt.opt))
            opt.step(LR)
            return loss.detach()
        return step

    def make_zro():
        # gradient_as_bucket_view=True: the gradients are views of DDP's reducer buckets, so the
        # counted .grad tensors are the gradient memory DDP holds (without it the reducer keeps
        # its own bucket copies too, invisible from Python: 2x the gradient bytes). zero_grad
        # then keeps them (set_to_none=False): set to None, autograd would allocate fresh
        # gradients every step that the reducer copies into the buckets.
        # parameters_as_bucket_view=True: ZeroRedundancyOptimizer's faster mode (one broadcast
        # per rank's flat bucket instead of one per parameter), the analogue of our flat buckets.
        ddp = DDP(build(cfg), bucket_cap_mb=a["bucket_mb"], gradient_as_bucket_view=True)
        opt = ZeroRedundancyOptimizer(param_groups(ddp.module), optimizer_class=torch.optim.AdamW,
                                      parameters_as_bucket_view=True, **ADAMW)

        def step(s):
            x, y = batches[s % N_BATCHES]
            loss = ddp(x, y)  # local mean; DDP averages the gradients over ranks
            loss.backward()
            params = list(ddp.parameters())
            count("zro", s, params, [p.grad for p in params], state_tensors(opt.optim))  # opt.optim: this rank's shard
            opt.step()
            opt.zero_grad(set_to_none=False)
            return loss.detach() / dp
        return step

    def make_fsdp2(name, reshard):
        model = build(cfg)
        mesh = init_device_mesh("cpu", (dp,))  # CPU mesh: FSDP2 runs its collectives on gloo
        for block in model.layers.values():
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
        opt = torch.optim.AdamW(param_groups(model), **ADAMW)  # DTensor params: foreach works on them

        def step(s):
            x, y = batches[s % N_BATCHES]
            loss = model(x, y)  # local mean; FSDP2 averages the reduce-scattered gradients
            loss.backward()
            params = list(model.parameters())
            count(name, s, params, [p.grad for p in params], state_tensors(opt))
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach() / dp
        return step

    makers = {"ours1": lambda: make_ours("ours1", 1), "zro": make_zro,
              "ours2": lambda: make_ours("ours2", 2), "fsdp2": lambda: make_fsdp2("fsdp2", False),
              "ours3": lambda: make_ours("ours3", 3), "fsdp2_rs": lambda: make_fsdp2("fsdp2_rs", True)}
    rss_start = current_rss()  # before the model exists: the peak above it is the implementation's own
    fns = {n: makers[n]() for n in names}
    times, losses = alternate_rounds(fns, a["steps"], a["rounds"], dist.barrier)
    for name in losses:  # global mean loss per step: the sum of the ranks' shares
        stacked = torch.tensor(losses[name], dtype=torch.float64)
        dist.all_reduce(stacked)
        losses[name] = stacked.tolist()
    return {"times": times, "losses": losses, "memory": memory,
            "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # kB on Linux
            "rss_start": rss_start}


def current_rss() -> int:
    """Resident bytes of this process now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="sequences per rank")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round (round 0 warms up)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    ap.add_argument("--stages", default="1,2,3", help="which ZeRO stages to compare, e.g. 3")
    args = ap.parse_args()
    pairs = [PAIRS[int(k) - 1] for k in args.stages.split(",")]
    mcfg = dict(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                max_seq_len=args.seq, tie_embeddings=False)
    a = dict(dp=args.dp, batch=args.batch, seq=args.seq, steps=args.steps, rounds=args.rounds,
             bucket_mb=args.bucket_mb)
    names = [n for ours, peer, _ in pairs for n in (ours, peer)]

    res = run_world(worker, args.dp, mcfg, a, names, False)[0]  # ranks lined up by barriers: rank 0 speaks
    times, losses = res["times"], res["losses"]
    # Memory: one fresh world per implementation, so each peak RSS is its own.
    mem_a = dict(a, steps=PROBE_STEP + 1, rounds=0)
    mem = {}
    for n in names:
        r = run_world(worker, args.dp, mcfg, mem_a, [n], True)[0]
        mem[n] = dict(r["memory"][n], rss=r["rss"], rss_peak=r["rss"] - r["rss_start"])
        mem[n]["total"] = mem[n]["params"] + mem[n]["grads"] + mem[n]["optimizer"]

    n_params = sum(p.numel() for p in TransformerModel(ModelConfig(**mcfg)).parameters())
    print(f"ZeRO: nano-train ZeroOptimizer vs torch ZeroRedundancyOptimizer (stage 1) and FSDP2 (stages 2, 3)\n"
          f"dp={args.dp} (gloo, CPU, 1 thread per process), {args.layers} layers, d_model {args.d_model}, "
          f"{args.heads} heads, vocab {args.vocab}, seq {args.seq}, {args.batch} sequences per rank, fp32, "
          f"{n_params / 1e6:.2f}M parameters; AdamW foreach, no gradient clipping, bucket {args.bucket_mb} MB; "
          f"{args.rounds} timed round(s) x {args.steps} steps each (+1 warm-up round)\n")

    ok = True
    for ours, peer, label in pairs:
        lo, lp = losses[ours], losses[peer]
        rel0 = abs(lo[0] - lp[0]) / abs(lp[0])
        worst = max(abs(x - y) / abs(y) for x, y in zip(lo, lp))
        ok &= worst <= 1e-5
        print(f"losses, first steps: {LABELS[ours]:<34} " + " ".join(f"{v:.6f}" for v in lo[:3]))
        print(f"                     {LABELS[peer]:<34} " + " ".join(f"{v:.6f}" for v in lp[:3]))
        print(f"  first step (same weights) relative difference {rel0:.1e}; largest over {len(lo)} steps "
              f"{worst:.1e}: {'agree' if worst <= 1e-5 else 'WARNING: differ by more than 1e-5'}")
    print()

    MB = 2**20
    rows = []
    for n in names:
        m = mem[n]
        rows.append([LABELS[n], f"{statistics.median(times[n]) * 1e3:.1f}", f"{m['params'] / MB:.2f}",
                     f"{m['grads'] / MB:.2f}", f"{m['optimizer'] / MB:.2f}", f"{m['total'] / MB:.2f}",
                     f"{m['rss'] / MB:.0f}", f"{m['rss_peak'] / MB:.1f}"])
    print(table(rows, ["implementation", "step ms (median)", "params MB", "grads MB", "opt state MB",
                       "total MB", "peak RSS MB", "peak RSS above start MB"]))
    print(f"\nmemory is per rank (rank 0), at the optimizer step (after backward + gradient sync), "
          f"from distinct tensor storages; fp32 model = {4 * n_params / MB:.2f} MB")
    for ours, peer, label in pairs:
        ratio = statistics.median(o / p for o, p in zip(times[ours], times[peer]))
        mo, mp = mem[ours], mem[peer]
        print(f"ours / {label} = {ratio:.2f} (time), {mo['total'] / mp['total']:.2f} (state bytes)"
              f"   [optimizer state alone {mo['optimizer'] / mp['optimizer']:.2f}, peak RSS {mo['rss'] / mp['rss']:.2f}, "
              f"peak RSS above start {mo['rss_peak'] / mp['rss_peak']:.2f}]")
    print(f"(time: median of {args.rounds} paired round(s); goal <= 1.0 and no more memory than the peer)")
    if not ok:
        print("WARNING: losses differ by more than 1e-5 relative: the comparison is not like for like")


if __name__ == "__main__":
    main()
