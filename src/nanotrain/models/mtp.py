"""Multi-token prediction (DeepSeek-V3 §2.2), depth 1: a training-only extra objective.

Besides the next token t_{i+1} (main head), position i also predicts t_{i+2} through one
extra module that keeps the causal chain (eq. 21-25, k = 1):

    h'_i   = M [RMSNorm(h_i); RMSNorm(Emb(t_{i+1}))]     M: Linear 2d -> d
    h_i^1  = Block(h'_{0..T-2})                           one more transformer block
    P_i    = Head(RMSNorm(h_i^1))                         predicts t_{i+2}

h_i is the main model's last hidden state *before* its final norm; Emb and Head are the
main model's own embedding and output head (shared, not copied: they are passed in at
call time, so their parameters keep a single name, tok_emb.weight / head.weight).
Only positions 0..T-2 take part: the last position's t_{i+2} lies past the batch (as a
full-length target it would be IGNORE_INDEX), so the module runs on T-1 positions, as in
the report (i = 1..T-k). The loss is lambda/D * sum(CE) / loss_denominator, with the
denominator of the main loss, so the sum over micro-batches and ranks stays a global
mean (DESIGN, invariant 3). Inference never runs it: the model skips it in eval mode.

Tensor parallelism: the block is built with the model's own make_block (heads split
like every other layer) and the shared head is vocabulary-parallel, so the loss uses
the same vocab_parallel_cross_entropy as the main loss. M is a plain Linear replicated
on every tp rank: its inputs (normed hidden states and embeddings) are whole and
identical on every rank without sequence parallelism, so its gradients agree too; the
model refuses MTP under sequence parallelism, where they would be sequence shards.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..config import ModelConfig
from ..layers import Linear, RMSNorm
from ..parallel.tensor_parallel import TensorParallel


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, block_factory: Callable[[ModelConfig, int, TensorParallel | None], nn.Module],
                 tp: TensorParallel | None = None):
        super().__init__()
        if cfg.mtp_depth != 1:
            raise ValueError(f"model.mtp_depth={cfg.mtp_depth}: only depth 1 is implemented.")
        d = cfg.d_model
        self.hidden_norm = RMSNorm(d, cfg.norm_eps)  # RMSNorm(h_i)
        self.emb_norm = RMSNorm(d, cfg.norm_eps)  # RMSNorm(Emb(t_{i+1}))
        self.proj = Linear(2 * d, d, False, cfg.init_std)  # M, replicated under tp (see above)
        # Index n_layers: the block is built like a layer after the last one (MoE or dense
        # by first_k_dense_replace) and its parameters are named mtp.block.*.
        self.block = block_factory(cfg, cfg.n_layers, tp)
        self.norm = RMSNorm(d, cfg.norm_eps)  # before the shared head
        self.loss_weight = cfg.mtp_loss_weight / cfg.mtp_depth  # lambda / D

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor, embed: nn.Module, head: nn.Module,
                pos) -> torch.Tensor:
        """Logits [B, T-1, V (/tp)] for t_{i+2} at positions i = 0..T-2.

        hidden: the main model's last hidden states [B, T, d], before its final norm;
        input_ids: [B, T]; t_{i+1} at position i is input_ids[:, i+1]; pos: the main model's
        Positions (documents.py), of which the block takes the first T-1."""
        h = self.hidden_norm(hidden[:, :-1])
        e = self.emb_norm(embed(input_ids[:, 1:]))
        x = self.proj(torch.cat([h, e], dim=-1))
        x = self.block(x, pos.head(x.shape[1]))  # the main model's positions 0..T-2
        return head(self.norm(x))


def mtp_targets(targets: torch.Tensor) -> torch.Tensor:
    """Targets of the MTP logits: the main targets shifted one more position (t_{i+2} at i).
    Same length as the logits (T-1); the last position, whose target would be past the
    batch, is not computed at all."""
    return targets[:, 1:]
