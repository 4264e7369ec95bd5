"""DeepSeekModel: the DeepSeek-V3 decoder, built from the same skeleton as TransformerModel.

    tokens -> embedding -> n_layers x DeepSeekBlock -> RMSNorm -> head -> logits

DeepSeekBlock: x = x + MLA(norm(x)); x = x + FFN(norm(x)), where FFN is a dense
SwiGLU for the first `first_k_dense_replace` layers and a routed mixture of
experts (plus shared experts) after them. Only the block differs from
TransformerModel, so this class overrides just `make_block` (and the RoPE
dimension: MLA rotates only the decoupled qk_rope_head_dim channels).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from ..config import ModelConfig, whole_sequence_errors
from ..layers import RMSNorm
from ..parallel.expert_parallel import ExpertParallel
from ..parallel.tensor_parallel import TensorParallel
from ..recompute import recomputing
from .documents import Positions
from .mla import MLAttention
from .mlp import GatedMLP
from .moe import ExpertParallelMoE, LocalRoutedMoE
from .transformer import TransformerModel


def make_moe(cfg: ModelConfig, ep=None, etp: TensorParallel | None = None) -> nn.Module:
    """All experts here (ep None), or split over the expert-parallel group; each expert's width
    split over the tp group too under expert tensor parallelism (etp: parallel.etp = parallel.tp)."""
    kind = LocalRoutedMoE
    extra = {"etp": etp}
    if ep is not None:
        kind, extra = ExpertParallelMoE, {"ep": ep, "etp": etp}
    moe = kind(
        cfg.d_model, cfg.n_routed_experts, cfg.moe_top_k, cfg.moe_d_ff, cfg.n_shared_experts,
        score_func=cfg.score_func, n_group=cfg.n_group, topk_group=cfg.topk_group,
        norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor,
        bias_update_rate=cfg.bias_update_rate, aux_loss_coef=cfg.aux_loss_coef,
        init_std=cfg.init_std, out_std=cfg.init_std / math.sqrt(2 * cfg.n_layers),
        capacity_factor=cfg.moe_capacity_factor, **extra)
    # Tokens per expert summed over the micro-batches of one optimizer step (not saved).
    moe.experts.grouped = cfg.moe_grouped_gemm
    moe.register_buffer("step_load", torch.zeros(cfg.n_routed_experts, dtype=torch.long), persistent=False)
    moe.register_buffer("step_dropped", torch.zeros((), dtype=torch.long), persistent=False)
    # The router's normalised entropy summed over the step's tokens, and the token count (monitoring).
    moe.register_buffer("step_entropy", torch.zeros(2, dtype=torch.float64), persistent=False)
    return moe


class DeepSeekBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, tp: TensorParallel | None = None, ep=None):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = MLAttention(cfg.d_model, cfg.n_heads, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim,
                                cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.norm_eps, cfg.init_std,
                                cfg.init_std / math.sqrt(2 * cfg.n_layers), cfg.rope_scaling_dict(), tp)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = index >= cfg.first_k_dense_replace
        etp = tp if tp is not None and tp.experts else None
        self.mlp = make_moe(cfg, ep, etp) if self.is_moe else GatedMLP(cfg, tp)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, pos: Positions) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), pos))
        x = x + self.dropout(self.mlp(self.mlp_norm(x)))
        if self.training and self.is_moe and not recomputing():  # a recomputed forward counts once
            # Tokens per expert summed over the step's micro-batches, for the bias update
            # after the optimizer step. Kept here, in the block, so that a pipeline stage
            # (which runs blocks, not DeepSeekModel.forward) counts its layers too.
            self.mlp.step_load += self.mlp.last_stats["tokens_per_expert"]
            self.mlp.step_dropped += self.mlp.last_stats["dropped"]
            self.mlp.step_entropy += self.mlp.last_stats["router_entropy"]
        return x


class DeepSeekModel(TransformerModel):
    """Under tensor parallelism MLA splits its heads; the experts stay whole on every tp
    rank (no expert tensor parallelism yet): without sequence parallelism each tp rank
    routes the same tokens, with it each routes its own sequence shard."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None = None, ep: ExpertParallel | None = None):
        errors = whole_sequence_errors(cfg, tp is not None and tp.sequence_parallel)  # config.py's rule, for
        if errors:  # a model built without a validated Config
            raise ValueError(errors[0])
        super().__init__(cfg, tp, ep)
        # Multi-token prediction (training only, models/mtp.py): one more block after the
        # last layer, sharing tok_emb and head; its parameters are named mtp.*.
        from .mtp import MTPModule

        self.mtp = MTPModule(cfg, partial(self.make_block, ep=ep), tp) if cfg.mtp_depth else None
        self._last_counts: dict[str, torch.Tensor] = {}  # per MoE layer, set by update_expert_bias

    def make_block(self, cfg: ModelConfig, index: int, tp: TensorParallel | None,
                   ep: ExpertParallel | None = None) -> nn.Module:
        return DeepSeekBlock(cfg, index, tp, ep)

    def rope_head_dim(self, cfg: ModelConfig) -> int:
        return cfg.qk_rope_head_dim

    def moe_layers(self, with_mtp: bool = True) -> dict[str, nn.Module]:
        """Every MoE layer by name, the multi-token-prediction block's included (as "mtp")."""
        layers = {name: block.mlp for name, block in self.layers.items() if block.is_moe}
        if with_mtp and self.mtp is not None and self.mtp.block.is_moe:
            layers["mtp"] = self.mtp.block.mlp
        return layers

    def num_matmul_params(self) -> int:
        """Matmul parameters a token *uses* (the 6N of MFU): every Linear (attention, dense
        MLPs, shared experts, head), each router, and top_k of the n routed experts."""
        n = super().num_matmul_params()  # on a pipeline stage: the layers it holds
        for moe in self.moe_layers().values():
            expert_params = sum(p.numel() for p in moe.experts.parameters())
            n += moe.router.weight.numel() + expert_params * moe.top_k // moe.n_experts
        return n

    @torch.no_grad()
    def update_expert_bias(self, parallel) -> None:
        """Auxiliary-loss-free balancing: each router moves its expert biases towards equal
        load, using the tokens each expert received during the step, summed over
        micro-batches here, over data-parallel ranks, and over tp ranks when each routes
        its own sequence shard, so every replica applies the same update (the one a
        single process would). The optimizer runs it after each step that updated: a post-step
        hook (runtime/components.register_moe_load_balancing_hook)."""
        from ..parallel.collectives import all_reduce

        layers = self.moe_layers()
        if not layers:
            return
        # One collective for every layer: rows of [tokens per expert..., dropped tokens, router
        # entropy sum, tokens routed] (float64: exact for counts below 2^53).
        counts = torch.stack([torch.cat([m.step_load.double(), m.step_dropped.view(1).double(), m.step_entropy])
                              for m in layers.values()])
        counts = all_reduce(counts, parallel.dp_group)
        if self.sequence_parallel:
            counts = all_reduce(counts, parallel.tp_group)
        for moe, row in zip(layers.values(), counts):
            moe.router.update_bias(row[:-3])
            moe.step_load.zero_()
            moe.step_dropped.zero_()
            moe.step_entropy.zero_()
        self._last_counts = dict(zip(layers, counts))

    def step_metrics(self) -> dict[str, float | list]:
        """Per-layer load figures of the last optimizer step, built only when a report asks
        (each .item() / .tolist() is a host sync, which a CUDA step should not pay)."""
        metrics = {}
        for name, row in self._last_counts.items():
            load, bias = row[:-3].long(), self.moe_layers()[name].router.expert_bias
            loadf = load.float()
            metrics[f"moe/layer{name}/dropped_tokens"] = int(row[-3])
            # 1: every token spreads its scores evenly over the experts; 0: each picks one for sure.
            metrics[f"moe/layer{name}/router_entropy"] = (row[-2] / row[-1].clamp(min=1)).item()
            metrics[f"moe/layer{name}/imbalance"] = (loadf.max() / loadf.mean().clamp(min=1e-9)).item()
            metrics[f"moe/layer{name}/bias_abs_max"] = bias.abs().max().item()
            # Whole vectors go to metrics.jsonl; TensorBoard gets one scalar per entry.
            metrics[f"moe/layer{name}/tokens_per_expert"] = load.tolist()
            metrics[f"moe/layer{name}/expert_bias"] = bias.tolist()
        return metrics

    def forward(self, input_ids, targets=None, loss_denominator=None, chunk: int = 0, tokens=None):
        use_mtp = self.mtp is not None and self.training and targets is not None
        if not use_mtp:
            out = super().forward(input_ids, targets, loss_denominator, chunk, tokens)
        else:
            # MTP starts from the last hidden states before the final norm: run the trunk and
            # keep them (no pipeline here: the config refuses mtp_depth with pp > 1).
            from .mtp import mtp_targets
            from .transformer import count_targets, token_loss_sum

            x, pos = self.trunk(input_ids)
            out = self.output(x, targets, loss_denominator)
            denom = loss_denominator if loss_denominator is not None else count_targets(targets)
            # Same denominator as the main loss (DESIGN, invariant 3), weighted lambda / depth.
            mtp_logits = self.mtp(x, input_ids, self.tok_emb, self.head, pos)
            out = out + self.mtp.loss_weight * token_loss_sum(mtp_logits, mtp_targets(targets), self.tp) / denom
        ran = self.moe_layers(with_mtp=use_mtp)  # the MTP block runs only in training with targets
        if targets is None or (self.stage is not None and not self.stage.is_last_chunk(chunk)):
            return out  # no loss here (a pipeline stage refuses the auxiliary loss: config)
        # The sequence-wise auxiliary loss is a mean over this batch's sequences; weighting
        # it by this batch's share of the global batch keeps the sum over micro-batches and
        # ranks equal to the global mean (DESIGN, invariant 3).
        aux = sum(m.aux_loss for m in ran.values())
        if isinstance(aux, torch.Tensor):
            share = 1.0 if loss_denominator is None else (targets != -100).sum() / loss_denominator
            out = out + aux * share
        return out
