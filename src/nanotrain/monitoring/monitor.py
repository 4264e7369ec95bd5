"""TrainingMonitor: the health of a run, as the same figures under every parallel layout.

monitoring.mode:
  minimal   loss (raw, EMA, spike ratio, perplexity), val loss and the train-val gap, data
            (tokens seen, tokens per update, fraction of ignored targets), time (data wait,
            forward+backward, optimizer, and communication per parallel group, timed around
            the collectives: monitoring/comm.py; tokens/s, MFU) and memory.
  standard  + optimisation on logging steps: global gradient norm before clipping, clip
            coefficient and clip rate, parameter norm, update-to-weight ratio (global, p50,
            p95, max over tensors), per-block gradient, weight and update norms, the first/last
            block gradient ratio, and whether every optimizer state is finite.
  debug     + the per-tensor update ratios themselves.

Cross-shard sums. A figure such as "the norm of layers.3.attn.wq's gradient" is a figure
of the logical (one-process) tensor. Each rank adds the squares of what it holds, under
the rule of the optimizer's gradient norm (data_parallel.grad_norm / reduce_squares): a tp
shard counts on every tp rank (the shards add up to the whole), anything whole over tp
counts on tp rank 0 only, an expert shard is summed over the ep group, a ZeRO slice of a
gradient over the dp (or expert-dp) group, and pipeline stages hold different tensors,
summed over pp. So every rank ends with the value one process would compute
(tests/parity/test_monitoring_layouts.py checks it at tp=2 with sequence parallelism, pp=2,
dp=2 with ZeRO-2 and ep=2).
"""

from __future__ import annotations

import contextlib
import math
import re
import time

import torch
import torch.distributed as dist
from torch import nn

from ..params import spec
from ..parallel import collectives
from ..parallel.data_parallel import reduce_squares
from . import health
from .internals import Internals, default_sentinels

_BLOCK = re.compile(r"^(?:layers|mtp)\.(\d+)\.")


def block_of(name: str) -> str:
    """The block a parameter belongs to: "layers.3", or the part outside the blocks."""
    m = _BLOCK.match(name)
    if m:
        return name[:m.end() - 1]
    return name.split(".")[0]  # tok_emb, pos_emb, norm, head


def process_memory(device: torch.device) -> dict[str, float]:
    """This process's memory in MB: resident set on CPU; allocated and reserved on CUDA."""
    if device.type == "cuda":
        return {"mem/allocated_mb": torch.cuda.memory_allocated(device) / 2**20,
                "mem/reserved_mb": torch.cuda.memory_reserved(device) / 2**20}
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        import os
        return {"mem/rss_mb": pages * os.sysconf("SC_PAGE_SIZE") / 2**20}
    except (OSError, ValueError, IndexError):
        import resource
        return {"mem/rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10}


class TrainingMonitor:
    def __init__(self, cfg, ctx, model: nn.Module, opt):
        self.cfg, self.mode = cfg.monitoring, cfg.monitoring.mode
        self.ps, self.device = ctx.parallel, ctx.device
        self.grad_clip = cfg.optimizer.grad_clip
        self.model, self.opt = model, opt
        self.loss_ema: float | None = None
        self.clipped = torch.zeros((), device=ctx.device)  # a tensor: no host sync per step
        self.steps = self.skipped = 0
        self.spent = 0.0  # seconds in the monitor's own work (besides its timers), for bench/monitoring.py
        self.timing = {"data": 0.0, "compute": 0.0, "optimizer": 0.0}
        # Seconds and bytes per parallel group, around the collectives themselves (monitoring/comm.py:
        # the run's meter, which the groups report to); the compute and optimizer times above are
        # reported without them.
        self.comm = self.ps.meter if self.mode != "off" and ctx.world_size > 1 else None
        self._comm_mark = 0.0
        self._before: dict[str, torch.Tensor] | None = None
        self._grad_sq: torch.Tensor | None = None
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        # One index of logical names for the whole world (stages hold different ones).
        local = list(self.params)
        if dist.is_initialized() and dist.get_world_size() > 1:
            everyone = [None] * dist.get_world_size()
            collectives.all_gather_object(everyone, local, self.ps.world_group)
            local = [n for names in everyone for n in names]
        self.names = sorted(set(local), key=lambda n: (_order_key(n), n))
        self.index = {n: i for i, n in enumerate(self.names)}
        self.blocks = list(dict.fromkeys(block_of(n) for n in self.names))
        sentinels = default_sentinels(cfg.model.n_layers, self.cfg.sentinel_blocks, self.mode)
        sp = model.sequence_parallel  # (the model is a TransformerModel, built with its tp)
        self.internals = Internals(model, sentinels, self.ps.tp_rank, sp, self.ps.world_group) if self.deep else None

    def arm(self) -> None:
        """Before a logging step's forward passes: watch inside the sentinel blocks."""
        if self.internals is not None:
            self.internals.arm()

    def disarm(self) -> None:
        if self.internals is not None:
            self.internals.disarm()

    # -- per step (cheap) -------------------------------------------------------------

    @contextlib.contextmanager
    def metering(self):
        """Around a training step: the communication meter counts the collectives issued in it."""
        if self.comm is None:
            yield
            return
        # Collectives outside the step's timed phases are communication time, and no phase's: the
        # next step's phases start from here. (The MoE bias update, an optimizer post-step hook,
        # runs inside the optimizer phase.)
        self._comm_mark = sum(self.comm.seconds.values())
        with self.comm.counting():
            yield

    def add_time(self, kind: str, seconds: float) -> None:
        """A phase of the step took `seconds`; the collectives inside it are counted apart."""
        if self.comm is not None:
            spent = sum(self.comm.seconds.values())
            seconds -= spent - self._comm_mark
            self._comm_mark = spent
        self.timing[kind] += seconds

    def after_step(self, grad_norm: torch.Tensor, skipped: bool) -> None:
        """Every step: count clipped steps (clip_grad_norm_ scales when norm + 1e-6 > max_norm)
        and steps skipped for a non-finite gradient (monitoring.nonfinite=skip)."""
        self.steps += 1
        self.skipped += int(skipped)
        if self.grad_clip > 0:
            self.clipped += grad_norm.detach() + 1e-6 > self.grad_clip

    def loss_metrics(self, losses: dict[int, float]) -> dict[str, float]:
        """EMA, spike ratio and perplexity from each step's loss since the last report."""
        out = {}
        for step in sorted(losses):
            loss = losses[step]
            spike = health.spike_ratio(loss, self.loss_ema)
            self.loss_ema = health.ema(self.loss_ema, loss, self.cfg.ema_beta)
            out = {"loss_ema": self.loss_ema, "loss_spike": spike, "perplexity": health.perplexity(loss)}
        return out

    def time_metrics(self, steps: int) -> dict[str, float]:
        steps = max(steps, 1)
        out = {f"time/{k}_ms": v / steps * 1e3 for k, v in self.timing.items()}
        self.timing = dict.fromkeys(self.timing, 0.0)
        if self.comm is not None:  # per parallel group: time in (or waiting for) collectives, and bytes
            for group, seconds in sorted(self.comm.seconds.items()):
                out[f"time/comm_{group}_ms"] = seconds / steps * 1e3
                out[f"comm/{group}_mb"] = self.comm.bytes[group] / steps / 2**20
            for group, seconds in sorted(self.comm.hidden.items()):  # behind another thread's compute
                out[f"comm/{group}_hidden_ms"] = seconds / steps * 1e3
            self.comm.reset()
            self._comm_mark = 0.0
        return {**out, **process_memory(self.device)}

    def report(self, losses: dict[int, float], grad_norm: float, steps: int, targets: torch.Tensor,
               tokens_per_step: int) -> dict:
        """Everything this mode reports at a logging step (`steps` since the last one)."""
        if self.mode == "off":
            return {}
        start = time.perf_counter()
        out = self.loss_metrics(losses)
        out.update(self.time_metrics(steps))
        out["ignored_targets"] = 1.0 - targets.item() / tokens_per_step  # targets: the non-ignored count
        out["tokens_per_update"] = tokens_per_step
        self.spent += time.perf_counter() - start
        out.update(self.update_metrics(grad_norm))
        if self.internals is not None:
            out.update(self.internals.collect())
        return out

    def own_seconds(self) -> float:
        """Time spent computing the monitor's figures so far (its hooks included)."""
        return self.spent + (self.internals.spent if self.internals is not None else 0.0)

    def val_metrics(self, val_loss: float) -> dict[str, float]:
        """The train-val gap: val loss minus the train loss EMA (> 0 and growing: overfitting)."""
        if self.mode == "off" or self.loss_ema is None:
            return {}
        return {"train_val_gap": val_loss - self.loss_ema}

    # -- logging steps (standard mode): norms across shards ---------------------------

    @property
    def deep(self) -> bool:
        return self.mode in ("standard", "debug")

    def before_update(self, loss_scale: float | None = None) -> None:
        """Called between the gradient sync and the optimizer step of a logging step: the
        gradients' squares per logical tensor (fp16: the loss scale divided out), and the
        weights before the update."""
        if not self.deep:
            return
        start = time.perf_counter()
        self._grad_sq = self._reduce(self._squares(self.opt_grads()), self.opt.stage > 0) \
            / (loss_scale or 1.0) ** 2
        self._before = {n: w.detach().float().clone() for n, w in self._weights()}
        self.spent += time.perf_counter() - start

    def update_metrics(self, grad_norm: float) -> dict[str, float | list]:
        """After the step: parameter and update norms, ratios, per-block figures."""
        if not self.deep or self._before is None:
            return {}
        start = time.perf_counter()
        try:
            return self._update_metrics(grad_norm)
        finally:
            self.spent += time.perf_counter() - start

    def _update_metrics(self, grad_norm: float) -> dict[str, float | list]:
        weights = dict(self._weights())
        sliced = self._weights_sliced()
        w_sq = self._reduce(self._squares(weights.items()), sliced)
        names = list(self._before)
        updates = torch._foreach_sub([weights[n].float() for n in names], [self._before[n] for n in names])
        u_sq = self._reduce(self._squares(zip(names, updates)), sliced)
        g_sq = self._grad_sq
        self._before = self._grad_sq = None
        ratios = health.update_ratio(u_sq.sqrt(), w_sq.sqrt())
        p50, p95 = health.quantiles(ratios)
        out: dict[str, float | list] = {
            "param_norm": w_sq.sum().sqrt().item(),
            "update_ratio": health.update_ratio(u_sq.sum().sqrt(), w_sq.sum().sqrt()).item(),
            "update_ratio_p50": p50, "update_ratio_p95": p95, "update_ratio_max": ratios.max().item(),
            "clip_coef": health.clip_coefficient(grad_norm, self.grad_clip),
            "clip_rate": self.clipped.item() / max(self.steps, 1),
            "skipped_nonfinite": self.skipped,
            "optimizer_state_finite": float(self._states_finite()),
        }
        if not math.isfinite(out["param_norm"]):
            # The engine adds what to do, from the run's config (runtime/divergence.py).
            raise FloatingPointError(f"a parameter became non-finite (parameter norm {out['param_norm']})")
        per_block = {}
        for kind, sq in (("grad", g_sq), ("weight", w_sq), ("update", u_sq)):
            sums = torch.zeros(len(self.blocks), dtype=torch.float64)
            sums.index_add_(0, self._block_index(), sq)
            per_block[kind] = sums.sqrt()
            for b, v in zip(self.blocks, sums.sqrt().tolist()):
                out[f"blocks/{b}/{kind}_norm"] = v
        layers = [i for i, b in enumerate(self.blocks) if b.startswith("layers.")]
        if layers:
            first, last = per_block["grad"][layers[0]], per_block["grad"][layers[-1]]
            out["grad_depth_ratio"] = (first / last.clamp(min=1e-30)).item()  # first / last block
        if self.mode == "debug":
            out.update({f"update_ratio/{n}": r for n, r in zip(self.names, ratios.tolist())})
        return out

    # -- the pieces -------------------------------------------------------------------

    def _weights_sliced(self) -> bool:
        return self.opt.stage == 3

    def _weights(self):
        """(name, tensor) of the weights this rank holds, as used (a low-bit weight dequantised);
        under ZeRO-3 its parts of them (the optimizer's slices)."""
        if self._weights_sliced():
            yield from self.opt.weight_parts()
            return
        for n, p in self.params.items():
            store = spec(p).lowbit
            yield n, (store.dequantize() if store is not None else p)

    def opt_grads(self):
        """(name, this rank's part of the gradient) from the optimizer (whole, or ZeRO slices)."""
        return self.opt.grad_parts()

    def _squares(self, named) -> torch.Tensor:
        """[2, N] float64: this rank's squares per logical name, dense row 0, experts row 1,
        counted by the tensor-parallel rule (see the module docstring). One multi-tensor
        norm over all of them (torch._foreach_norm), not a pass per tensor."""
        sq = torch.zeros(2, len(self.names), dtype=torch.float64)
        rows, cols, tensors = [], [], []
        for n, t in named:
            p = self.params[n]
            if not spec(p).counts_in_norm(self.ps.tp_rank):
                continue
            rows.append(int(spec(p).expert_parallel))
            cols.append(self.index[n])
            tensors.append(t.detach() if t.dtype == torch.float32 else t.detach().float())
        if tensors:
            norms = torch.stack(torch._foreach_norm(tensors)).double().cpu()
            sq.index_put_((torch.tensor(rows), torch.tensor(cols)), norms.pow(2), accumulate=True)
        return sq

    def _reduce(self, sq: torch.Tensor, sliced: bool = False) -> torch.Tensor:
        """The logical squares from every rank's: experts over ep; ZeRO slices (gradients at stages
        1-3, weights at 3) over dp (dense) or expert-dp; then tp and pp. Returns [N]."""
        # data_parallel.reduce_squares: the optimizer's norm rule, per tensor here (both rows always
        # reduced: the expert row is zeros in a dense model).
        return reduce_squares(sq, self.ps, sliced, experts=True)

    def _block_index(self) -> torch.Tensor:
        pos = {b: i for i, b in enumerate(self.blocks)}
        return torch.tensor([pos[block_of(n)] for n in self.names])

    def _states_finite(self) -> bool:
        states = [t for s in self.opt.opt.state.values() for t in s.values()
                  if torch.is_tensor(t) and t.dim() > 0]
        ok = torch.tensor(float(all(torch.isfinite(torch.stack(torch._foreach_norm(states))).tolist())
                                if states else 1.0))
        if dist.is_initialized() and dist.get_world_size() > 1:
            collectives.all_reduce(ok, self.ps.world_group, dist.ReduceOp.MIN)
        return bool(ok.item())


def _order_key(name: str) -> tuple:
    """Embedding first, then the blocks in depth order, then the rest."""
    m = _BLOCK.match(name)
    if m:
        return (1 if name.startswith("layers.") else 2, int(m.group(1)))
    return (0, 0) if "emb" in name else (3, 0)


def timed():
    """A perf_counter stopwatch: t = timed(); ...; seconds = t()."""
    start = time.perf_counter()
    return lambda: time.perf_counter() - start
