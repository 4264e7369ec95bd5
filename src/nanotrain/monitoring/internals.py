"""Inside the blocks: attention logits and entropy, residual-stream and norm-output scale.

On a logging step the monitor arms a few *sentinel* blocks (monitoring.sentinel_blocks;
by default the first, middle and last; every block in debug mode) for that step's
forward passes:

  attention      max logit q·k/√d over the allowed (causal) positions: growing logits
                 saturate the softmax (the "attention entropy collapse" of Zhai et al.
                 2023); mean normalised entropy of each query's attention row (1: it
                 attends evenly over its prefix, 0: to one position). The first row,
                 which has a single position to attend to, is left out.
  residual       RMS of the block's output, and the fraction of entries above 10x their
                 token's RMS (massive activations, Sun et al. 2024; per token, so the
                 figure does not depend on how the batch is split).
  norms          RMS and max |a| of the block's two norm outputs (what the projections see).

Each figure is kept as sums and counts (or a max) and reduced over the whole world,
so it is the one-process value: attention heads are split over tp (their sums add),
the residual stream is whole on every tp rank unless sequence parallelism splits it
(then it is counted on tp rank 0 only), data-parallel ranks see different sequences,
pipeline stages different blocks.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from ..compiling import eager
from ..module_spec import module_spec
from ..parallel import collectives
from ..recompute import recomputing, unrecorded


SUMS = ("ent_sum", "ent_n", "res_sq", "res_n", "res_out", "norm_sq", "norm_n")
MAXES = ("attn_max", "norm_max")


def attention_stats(q: torch.Tensor, k: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """q [B, H, T, d], k [B, Hkv, T, d] (GQA: each kv head serves H/Hkv query heads)."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = (q.float() @ k.float().transpose(-1, -2)) * scale  # [B, H, T, T]
    T = s.shape[-1]
    allowed = torch.ones(T, T, dtype=torch.bool, device=s.device).tril()
    s = s.masked_fill(~allowed, float("-inf"))
    # health.entropy(s, normalised=True), written for the causal square (row t has t+1
    # positions), with fewer passes over the B·H·T² scores: this runs inside the forward.
    logp = torch.log_softmax(s, dim=-1)
    ent = -(logp.exp() * logp.masked_fill(~allowed, 0.0)).sum(-1)[..., 1:]  # row 0 attends to one position
    ent = ent / torch.log(torch.arange(2, T + 1, device=s.device, dtype=ent.dtype))
    return {"attn_max": s.max(), "ent_sum": ent.double().sum(), "ent_n": torch.tensor(float(ent.numel()))}


def residual_stats(x: torch.Tensor, k: float = 10.0) -> dict[str, torch.Tensor]:
    x = x.detach().float()
    token_rms = x.pow(2).mean(-1, keepdim=True).sqrt()
    return {"res_sq": x.double().pow(2).sum(), "res_n": torch.tensor(float(x.numel())),
            "res_out": (x.abs() > k * token_rms).double().sum()}


def norm_stats(a: torch.Tensor) -> dict[str, torch.Tensor]:
    a = a.detach().float()
    return {"norm_sq": a.double().pow(2).sum(), "norm_n": torch.tensor(float(a.numel())), "norm_max": a.abs().max()}


class Internals:
    """The hooks are registered once, on every block this rank holds (and its two norms), and
    stay: arm() and disarm() only flip `monitor_armed` on the sentinel blocks and set or clear
    their attention's probe. Adding and removing hooks per logging step would do under eager
    PyTorch, but torch.compile (train.compile) does not guard on hooks: a compiled block keeps
    the hooks it had when it was compiled. A flag is guarded, so a compiled block has two
    variants, armed and not, both compiled once; the recording itself runs eagerly (@eager).
    Every block carries the same hooks, so any block may reuse another's compiled code."""

    def __init__(self, model: nn.Module, sentinels: list[int], tp_rank: int, sequence_parallel: bool,
                 world=None):
        self.model, self.sentinels = model, sentinels
        self.world = world  # the default group, as a collectives.Group (None: an unnamed one)
        self.replicated_resid = not sequence_parallel and tp_rank != 0  # count the stream once over tp
        self._acc: dict[int, dict[str, torch.Tensor]] = {}
        self.spent = 0.0  # seconds inside the hooks (bench/monitoring.py reports it)
        self.armed = False
        for i, block in self._blocks(every=True):
            hooked = hasattr(block, "monitor_owner")  # by an earlier monitor of this model: take them over
            for module in self._watched(block):
                module.monitor_armed, module.monitor_owner = False, (self, i)
            if not self.replicated_resid and not hooked:
                block.register_forward_hook(_residual_hook)
                for norm in (block.attn_norm, block.mlp_norm):
                    norm.register_forward_hook(_norm_hook)

    def _blocks(self, every: bool = False) -> list[tuple[int, nn.Module]]:
        """(index, block) of the sentinel blocks this rank holds, or of all its blocks."""
        layers = self.model.layers
        if every:
            return [(int(i), block) for i, block in layers.items()]
        return [(i, layers[str(i)]) for i in self.sentinels if str(i) in layers]

    @staticmethod
    def _watched(block: nn.Module) -> list[nn.Module]:
        """Every block (models/transformer.Block, models/deepseek.DeepSeekBlock) has these."""
        return [block, block.attn, block.attn_norm, block.mlp_norm]

    def _timed(self, i: int, fn, *args) -> None:
        start = time.perf_counter()
        # Figures, not the model's computation: nothing kept for backward, nothing for recompute.py's
        # selective mode to match in the recompute (which skips them).
        with torch.no_grad(), unrecorded():
            self._add(i, fn(*args))
        self.spent += time.perf_counter() - start

    def _add(self, i: int, stats: dict[str, torch.Tensor]) -> None:
        acc = self._acc.setdefault(i, {})
        for key, v in stats.items():
            v = v.detach().double().cpu()
            acc[key] = torch.maximum(acc[key], v) if key in MAXES and key in acc else acc.get(key, 0) + v

    def arm(self) -> None:
        """Watch the sentinel blocks this rank holds during the next forward passes."""
        self._acc, self.armed = {}, True
        for _, block in self._blocks():
            for module in self._watched(block):
                module.monitor_armed = True
            if module_spec(block.attn).cp is None:  # (a ring over cp: no whole rows to look at)
                block.attn.probe = _attention_probe

    def disarm(self) -> None:
        if not self.armed:
            return
        self.armed = False
        for _, block in self._blocks():
            for module in self._watched(block):
                module.monitor_armed = False
            block.attn.probe = None

    def collect(self) -> dict[str, float]:
        """Reduce over every rank; the figures of each sentinel block (every rank calls this)."""
        start = time.perf_counter()
        out = self._collect()
        self.spent += time.perf_counter() - start
        return out

    def _collect(self) -> dict[str, float]:
        n = len(self.sentinels)
        sums = torch.zeros(n, len(SUMS), dtype=torch.float64)
        maxes = torch.full((n, len(MAXES)), float("-inf"), dtype=torch.float64)
        for row, i in enumerate(self.sentinels):
            acc = self._acc.get(i, {})
            for j, key in enumerate(SUMS):
                sums[row, j] = float(acc.get(key, 0.0))
            for j, key in enumerate(MAXES):
                if key in acc:
                    maxes[row, j] = float(acc[key])
        if dist.is_initialized() and dist.get_world_size() > 1:
            collectives.all_reduce(sums, self.world)
            collectives.all_reduce(maxes, self.world, dist.ReduceOp.MAX)
        self._acc = {}
        out = {}
        for row, i in enumerate(self.sentinels):
            s = dict(zip(SUMS, sums[row].tolist()))
            m = dict(zip(MAXES, maxes[row].tolist()))
            if s["res_n"] == 0:  # not run this step (a stage that holds no block of these)
                continue
            p = f"internals/layers.{i}/"
            out[p + "attn_max_logit"] = m["attn_max"]
            out[p + "attn_entropy"] = s["ent_sum"] / max(s["ent_n"], 1)
            out[p + "resid_rms"] = (s["res_sq"] / s["res_n"]) ** 0.5
            out[p + "resid_outlier_rate"] = s["res_out"] / s["res_n"]
            out[p + "norm_rms"] = (s["norm_sq"] / max(s["norm_n"], 1)) ** 0.5
            out[p + "norm_max_abs"] = m["norm_max"]
        return out


# The hooks: one function object each for every block, so that compiled blocks can share code.
# The flag test is traced (a guard); the recording is not (a graph break, only when armed).

def _residual_hook(block: nn.Module, args, out: torch.Tensor) -> None:
    if block.monitor_armed:
        _record(block, residual_stats, out)


def _norm_hook(norm: nn.Module, args, out: torch.Tensor) -> None:
    if norm.monitor_armed:
        _record(norm, norm_stats, out)


def _attention_probe(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, scale: float) -> None:
    _record(attn, attention_stats, q, k, scale)


@eager
def _record(module: nn.Module, fn, *args) -> None:
    if recomputing():  # backward recomputing the block (train.recompute): its first forward was recorded
        return
    internals, i = module.monitor_owner
    internals._timed(i, fn, *args)


def default_sentinels(n_layers: int, chosen: list[int], mode: str) -> list[int]:
    if mode == "debug":
        return list(range(n_layers))
    if chosen:
        return sorted(set(chosen))
    return sorted({0, n_layers // 2, n_layers - 1})
