"""Mixture of experts, DeepSeek-V3 style (DeepSeek-AI 2024, arXiv:2412.19437, §2.1.2).

    y = SharedExperts(x) + Σ_{i ∈ TopK(s + b)} g_i · Expert_i(x)

- TopKRouter: affinities s = softmax|sigmoid(x W^T) in fp32; a bias b picks the
  experts (aux-loss-free balancing) but the combine weights g come from s alone;
  optional group-limited routing and sequence-wise auxiliary loss.
- ExpertMLP: E SwiGLU experts as stacked [E, ...] parameters, run over tokens
  already sorted by expert: grouped GEMMs over all of them (grouped.py), or one
  matmul per expert on a contiguous slice.
- LocalRoutedMoE: route -> sort the (token, slot) pairs by expert -> experts ->
  scale by g -> scatter-add back to tokens, plus shared experts on every token.
  All experts live on this process; expert parallelism swaps the middle for an
  all-to-all and keeps the two ends.

Routing follows HF transformers' DeepseekV3TopkRouter so that HF checkpoints
give the same logits (names map: gate.weight -> router.weight,
gate.e_score_correction_bias -> router.expert_bias, experts.gate_up_proj ->
experts.w1|w3, experts.down_proj -> experts.w2, shared_experts.{gate,up,down}_proj
-> shared_experts.{w1,w3,w2}).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..compiling import eager
from ..params import Shard, declare, spec
from ..parallel.collectives import all_gather_into, copy_to_region, gather_seq, reduce_from_region, reduce_scatter_seq
from ..parallel.expert_parallel import ExpertParallel, expert_parallel_forward
from ..parallel.tensor_parallel import TensorParallel
from ..layers import Linear
from ..module_spec import GEMM, mark, module_spec
from ..precision.policy import gemm
from .grouped import group_offsets, grouped_mm

NORM_EPS = 1e-20  # HF's DeepseekV3TopkRouter adds this to the sum of the top-k weights


class TopKRouter(nn.Module):
    """x [N, d] -> (weights [N, k] fp32, expert indices [N, k] int64, aux loss scalar)."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, score_func: str = "softmax",
                 n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
                 routed_scaling_factor: float = 1.0, bias_update_rate: float = 0.0,
                 aux_loss_coef: float = 0.0, init_std: float = 0.02):
        super().__init__()
        if score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")
        if n_experts % n_group or not 1 <= topk_group <= n_group:
            raise ValueError(f"n_experts={n_experts} must split into n_group={n_group} groups "
                             f"and 1 <= topk_group={topk_group} <= n_group")
        if not 1 <= top_k <= topk_group * (n_experts // n_group):
            raise ValueError(f"top_k={top_k} must be in [1, experts in the kept groups]")
        self.n_experts, self.top_k, self.score_func = n_experts, top_k, score_func
        self.n_group, self.topk_group = n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor
        self.bias_update_rate, self.aux_loss_coef = bias_update_rate, aux_loss_coef
        # The gate is a Linear weight in all but name: kept in fp32 by the optimizer like the rest.
        self.weight = declare(nn.Parameter(torch.empty(n_experts, d_model)), init="normal", init_std=init_std)
        # b_i of §2.1.2: not learned by gradient but by update_bias, so a buffer, saved in checkpoints.
        self.register_buffer("expert_bias", torch.zeros(n_experts, dtype=torch.float32))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Affinities s [N, E] in fp32: routing decisions are too sensitive for bf16, autocast or not."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        return logits.softmax(-1) if self.score_func == "softmax" else logits.sigmoid()

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Indices [N, k] of the top-k experts by biased score, among the topk_group best groups."""
        biased = scores.detach() + self.expert_bias  # selection is discrete: no gradient through it
        if self.n_group > 1:
            n, per_group = biased.shape[0], self.n_experts // self.n_group
            grouped = biased.view(n, self.n_group, per_group)
            # A group's score is the sum of its 2 best biased scores (DeepSeek-V3, HF).
            group_scores = grouped.topk(min(2, per_group), dim=-1).values.sum(-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            biased = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(n, -1)
        return biased.topk(self.top_k, dim=-1).indices

    def aux_loss(self, scores: torch.Tensor, indices: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Sequence-wise balance loss (eq. 17-20), averaged over the sequences of the batch:
        L = α Σ_i f_i P_i,  f_i = E/(k T) · #{t : i ∈ TopK_t},  P_i = 1/T Σ_t s_it / Σ_j s_jt."""
        if self.aux_loss_coef == 0.0:
            return scores.new_zeros(())
        n_seq = scores.shape[0] // seq_len
        counts = torch.zeros(n_seq, self.n_experts, device=scores.device)
        counts.scatter_add_(1, indices.view(n_seq, -1), torch.ones_like(indices.view(n_seq, -1), dtype=counts.dtype))
        f = counts * self.n_experts / (self.top_k * seq_len)  # 1 for every expert when balanced
        p = (scores / scores.sum(-1, keepdim=True)).view(n_seq, seq_len, -1).mean(1)
        return self.aux_loss_coef * (f * p).sum(-1).mean()

    def forward(self, x: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = self.scores(x)
        self.last_scores = scores.detach()  # read by the MoE layer's monitoring figures
        indices = self.select(scores)
        weights = scores.gather(1, indices)  # unbiased: the bias only decides who, never how much
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + NORM_EPS)
        weights = weights * self.routed_scaling_factor
        return weights, indices, self.aux_loss(scores, indices, seq_len)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: torch.Tensor) -> None:
        """b_i += γ · sign(mean load - load_i): overloaded experts become less attractive (§2.1.2).
        Called after the optimizer step with the load summed over the step (and over ranks)."""
        if self.bias_update_rate == 0.0:
            return
        load = tokens_per_expert.to(self.expert_bias.device, torch.float32)
        self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)


class ExpertMLP(nn.Module):
    """E SwiGLU experts, w2(silu(w1 x) * w3 x), stored stacked: w1, w3 [E, d_ff, d], w2 [E, d, d_ff].

    Stacked so that one parameter holds every expert (expert parallelism shards dim 0,
    init and checkpoints see one logical tensor) and always receives a gradient. Each
    expert's GEMMs run in the recipe the precision policy gave this module."""

    grouped = True  # model.moe_grouped_gemm: all experts' GEMMs at once (grouped.py); False: the loop
    tp: TensorParallel | None = None  # expert tensor parallelism (parallel.etp): each expert's d_ff split

    def __init__(self, n_experts: int, d_model: int, d_ff: int, init_std: float, out_std: float):
        super().__init__()
        mark(self, kind=GEMM)  # the precision policy gives it a recipe
        self.w1 = declare(nn.Parameter(torch.empty(n_experts, d_ff, d_model)), init="normal", init_std=init_std)
        self.w3 = declare(nn.Parameter(torch.empty(n_experts, d_ff, d_model)), init="normal", init_std=init_std)
        self.w2 = declare(nn.Parameter(torch.empty(n_experts, d_model, d_ff)), init="normal", init_std=out_std)

    def split(self, ep: ExpertParallel | None, tp: TensorParallel | None) -> None:
        """Keep this rank's part of the stacked experts: its E/ep experts (ep, dim 0) and, under
        expert tensor parallelism, its d_ff/tp slice of each (tp: w1 and w3 by rows, dim 1, as a
        column-parallel linear; w2 by columns, dim 2, as a row-parallel one). One logical tensor
        per weight still: init and checkpoints see the single-process [E, ...] tensors."""
        for name, tp_dim in (("w1", 1), ("w3", 1), ("w2", 2)):
            full = getattr(self, name)
            shape, shards = list(full.shape), []
            if ep is not None:
                shape[0] //= ep.size
                shards.append(Shard(0, ep.rank, ep.size, axis="ep"))
            if tp is not None:
                if shape[tp_dim] % tp.size:
                    raise ValueError(f"model.moe_d_ff={shape[tp_dim]} is not divisible by parallel.etp={tp.size}")
                shape[tp_dim] //= tp.size
                shards.append(Shard(tp_dim, tp.rank, tp.size, axis="tp"))
            local = nn.Parameter(torch.empty(shape))
            declare(local, init=spec(full).init, init_std=spec(full).init_std,
                    shard=shards[0] if len(shards) == 1 else tuple(shards))
            setattr(self, name, local)
        self.tp = tp

    def forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x_sorted [M, d]: expert e's tokens are rows [sum(counts[:e]), sum(counts[:e+1]))."""
        if self.tp is not None:
            return self.tensor_parallel_forward(x_sorted, counts)
        return self.local_forward(x_sorted, counts)

    def tensor_parallel_forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Expert tensor parallelism (Megatron's expert-tensor-parallel size): each tp rank holds
        d_ff/tp of every local expert, so each expert's SwiGLU is a column -> row pair over the tp
        group, as the dense MLP's.

        Without sequence parallelism every tp rank routed the same tokens: enter the region (its
        backward all-reduces the input gradient), compute this rank's slice, all-reduce the outputs.
        With it each tp rank routed its own tokens: all-gather every tp rank's sorted tokens
        (padded to the longest: the ranks' counts differ), run each rank's rows through this rank's
        slices, and reduce-scatter the partial outputs back to the ranks the tokens came from."""
        tp, g = self.tp, self.tp.group
        if not tp.sequence_parallel:
            return reduce_from_region(self.local_forward(copy_to_region(x_sorted, g), counts), g)
        mine = torch.tensor(counts, dtype=torch.long, device=x_sorted.device)
        every = torch.empty(tp.size * len(counts), dtype=torch.long, device=x_sorted.device)
        all_gather_into(every, mine, g)
        rows = every.view(tp.size, -1).tolist()  # [tp rank][expert]
        most = max(sum(r) for r in rows)
        pad = x_sorted.new_zeros(most - x_sorted.shape[0], x_sorted.shape[1])
        gathered = gather_seq(torch.cat([x_sorted, pad])[None], g)[0]  # [tp x most, d]
        outs = []
        for r, row in enumerate(rows):
            part = self.local_forward(gathered[r * most:r * most + sum(row)], row)
            outs += [part, part.new_zeros(most - part.shape[0], part.shape[1])]
        return reduce_scatter_seq(torch.cat(outs)[None], g)[0][:x_sorted.shape[0]]

    def local_forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The experts (this rank's slices of them) on tokens sorted by expert."""
        if self.grouped and module_spec(self).gemm_recipe is None:
            return self.grouped_forward(x_sorted, counts)
        return self.loop_forward(x_sorted, counts)

    def grouped_forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Three grouped GEMMs over every expert (grouped.py). Autocast does not know
        torch._grouped_mm, so the operands are cast here as F.linear would be under it. (The
        low-bit recipes scale per expert and tensor: their experts run in loop_forward.)"""
        device = x_sorted.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_sorted.dtype
        x = x_sorted.to(dtype)
        w1, w3, w2 = (w.to(dtype).transpose(1, 2) for w in (self.w1, self.w3, self.w2))  # [E, in, out]
        offs = group_offsets(counts, x.device)
        h = F.silu(grouped_mm(x, w1, counts, offs)) * grouped_mm(x, w3, counts, offs)
        return grouped_mm(h, w2, counts, offs)

    def loop_forward(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """One GEMM per expert, on its contiguous slice, in the module's recipe."""
        # split and unbind, not x[a:b] and w1[e]: the backward of each slice or index writes a
        # zero-filled gradient of the whole tensor (E of them per tensor per step, half the step
        # time at E=16); split and unbind each have one backward that concatenates the pieces.
        w1, w3, w2 = self.w1.unbind(0), self.w3.unbind(0), self.w2.unbind(0)
        outs = []
        for e, xe in enumerate(x_sorted.split(counts)):
            if xe.shape[0] == 0:  # an idle expert costs nothing (and its weight gradient stays 0)
                continue
            h = F.silu(gemm(self, xe, w1[e], site="w1")) * gemm(self, xe, w3[e], site="w3")
            outs.append(gemm(self, h, w2[e], site="w2"))
        if not outs:
            # No tokens here (possible on an expert-parallel rank): return an empty output
            # that is still *connected* to x_sorted. A fresh tensor would cut the graph, and
            # this rank would skip the backward all-to-alls its ep peers wait in.
            return x_sorted * 0
        return torch.cat(outs)


class SwiGLU(nn.Module):
    """The shared experts: one SwiGLU of width n_shared · d_ff (same math as GatedMLP, explicit sizes)."""

    def __init__(self, d_model: int, d_ff: int, init_std: float, out_std: float):
        super().__init__()
        self.w1 = Linear(d_model, d_ff, init_std=init_std)
        self.w3 = Linear(d_model, d_ff, init_std=init_std)
        self.w2 = Linear(d_ff, d_model, init_std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LocalRoutedMoE(nn.Module):
    """DeepSeek-V3 MoE FFN with every routed expert on this process: x [B, T, d] -> y [B, T, d].

    After forward: `aux_loss` (with graph; add it to the loss) and `last_stats`
    (tokens_per_expert [E] int64, aux_loss, both detached) for balancing and monitoring."""

    def __init__(self, d_model: int, n_routed_experts: int, top_k: int, moe_d_ff: int,
                 n_shared_experts: int = 0, score_func: str = "softmax", n_group: int = 1,
                 topk_group: int = 1, norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0,
                 bias_update_rate: float = 0.0, aux_loss_coef: float = 0.0,
                 init_std: float = 0.02, out_std: float = 0.02, capacity_factor: float = 0.0,
                 etp: TensorParallel | None = None):
        super().__init__()
        self.n_experts, self.top_k = n_routed_experts, top_k
        # 0: dropless. Otherwise each expert takes at most ceil(factor * assignments / E) of
        # this forward's (token, slot) assignments, first come first served in token order;
        # the rest are dropped (their slot contributes nothing) and counted. The capacity
        # is per rank and per micro-batch, so which tokens drop depends on the layout.
        self.capacity_factor = capacity_factor
        self.router = TopKRouter(d_model, n_routed_experts, top_k, score_func, n_group, topk_group,
                                 norm_topk_prob, routed_scaling_factor, bias_update_rate,
                                 aux_loss_coef, init_std)
        self.experts = ExpertMLP(n_routed_experts, d_model, moe_d_ff, init_std, out_std)
        if etp is not None:  # each expert's width split over the tp group (parallel.etp)
            self.experts.split(None, etp)
        self.shared_experts = (SwiGLU(d_model, n_shared_experts * moe_d_ff, init_std, out_std)
                               if n_shared_experts > 0 else None)
        self.aux_loss: torch.Tensor | None = None
        self.last_stats: dict[str, torch.Tensor] = {}

    # Eager under train.compile (compiling.py): the tokens each expert gets, and with them the
    # shapes of its GEMMs and of the all-to-alls, change every step.
    @eager
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        tokens = x.reshape(B * T, d)
        weights, indices, aux_loss = self.router(tokens, T)
        with torch.no_grad():  # monitoring: how decided the router is (normalised entropy of its scores)
            p = self.router.last_scores / self.router.last_scores.sum(-1, keepdim=True).clamp(min=1e-20)
            h = -(p * p.clamp(min=1e-20).log()).sum(-1) / math.log(self.n_experts)
            router_entropy = torch.stack([h.double().sum(), torch.tensor(float(h.numel()), dtype=torch.float64,
                                                                         device=h.device)])

        # Permute: the N*k (token, slot) assignments, grouped by expert. A stable sort keeps
        # token order inside each expert, so the result does not depend on sort internals.
        flat_expert = indices.view(-1)
        order = torch.argsort(flat_expert, stable=True)
        token_of = order // self.top_k
        tokens_per_expert = torch.bincount(flat_expert, minlength=self.n_experts)
        kept_per_expert = tokens_per_expert
        if self.capacity_factor > 0:
            capacity = math.ceil(self.capacity_factor * flat_expert.numel() / self.n_experts)
            starts = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert
            rank_in_expert = torch.arange(order.numel(), device=x.device) - starts[flat_expert[order]]
            keep = rank_in_expert < capacity
            order, token_of = order[keep], token_of[keep]
            kept_per_expert = tokens_per_expert.clamp(max=capacity)
        counts = kept_per_expert.tolist()  # the one host sync: slice sizes must be Python ints

        expert_out = self.run_experts(tokens[token_of], kept_per_expert, counts)
        # Combine in fp32 (the weights are fp32): a token's k contributions are summed at full precision.
        contrib = expert_out.float() * weights.view(-1)[order].unsqueeze(-1)
        routed = torch.zeros(B * T, d, dtype=torch.float32, device=x.device)
        routed = routed.index_add_(0, token_of, contrib).to(expert_out.dtype)

        y = routed if self.shared_experts is None else routed + self.shared_experts(tokens)
        self.aux_loss = aux_loss
        self.last_stats = {"tokens_per_expert": tokens_per_expert.detach(), "aux_loss": aux_loss.detach(),
                           "dropped": (tokens_per_expert - kept_per_expert).sum().detach(),
                           "router_entropy": router_entropy}
        return y.view(B, T, d)

    def run_experts(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Every expert is here: run them on their contiguous slices. (Expert parallelism
        overrides this with a dispatch to the experts' ranks and back.)"""
        return self.experts(x_sorted, counts)


class ExpertParallelMoE(LocalRoutedMoE):
    """LocalRoutedMoE whose routed experts live on the ep ranks (parallel/expert_parallel.py);
    routing, shared experts and the combine are unchanged (the router is replicated: every
    rank routes its own tokens)."""

    def __init__(self, *args, ep: ExpertParallel, etp: TensorParallel | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.n_experts % ep.size:
            raise ValueError(f"model.n_routed_experts={self.n_experts} is not divisible by parallel.ep={ep.size}")
        self.ep = ep
        self.n_local = self.n_experts // ep.size
        self.experts.split(ep, etp)  # this rank's experts only (and their tp slice under etp)

    def run_experts(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return expert_parallel_forward(self.experts, x_sorted, tokens_per_expert, self.ep)


def masked_loop_moe(m: LocalRoutedMoE, x: torch.Tensor) -> torch.Tensor:
    """The same layer written the straightforward way, for reading and as the reference that
    tests/unit/test_moe.py and bench/moe.py hold LocalRoutedMoE to: for each expert, mask the
    tokens routed to it, run it on them and add its weighted output."""
    B, T, d = x.shape
    tokens = x.reshape(-1, d)
    w, idx, _ = m.router(tokens, T)
    ex = m.experts
    y = torch.zeros_like(tokens)
    for e in range(m.n_experts):
        hit = idx == e  # [N, k]; at most one slot per token
        mask = hit.any(-1)
        if not mask.any():
            continue
        xe = tokens[mask]
        out = F.linear(F.silu(F.linear(xe, ex.w1[e])) * F.linear(xe, ex.w3[e]), ex.w2[e])
        y = y.index_add(0, mask.nonzero().squeeze(1), out * (w * hit).sum(-1)[mask].unsqueeze(-1))
    if m.shared_experts is not None:
        y = y + m.shared_experts(tokens)
    return y.view(B, T, d)
