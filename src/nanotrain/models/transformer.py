"""TransformerModel: a pre-norm decoder (GPT-2 / Llama family), built only from blocks.

    tokens -> embedding (+ learned positions) -> n_layers x Block -> norm -> head -> logits

Block: x = x + attn(norm(x)); x = x + mlp(norm(x)). The options cover nanoGPT
(layernorm, gelu, learned positions, tied embeddings) and Llama (rmsnorm,
swiglu, rope, GQA) from one class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..layers import Embedding, Linear, init_parameters, make_norm
from ..module_spec import module_spec
from ..params import declare, spec
from ..parallel.collectives import gather_last
from ..parallel.context_parallel import zigzag_index
from ..parallel.expert_parallel import ExpertParallel
from ..parallel.pipeline.stage import Stage
from ..parallel.tensor_parallel import TensorParallel, vocab_embedding, vocab_head, vocab_parallel_cross_entropy
from .attention import Attention
from .documents import Positions, packed_positions
from .mlp import make_mlp
from .rope import rotary_tables

IGNORE_INDEX = -100  # targets equal to this take no part in the loss


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None = None):
        super().__init__()
        self.attn_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.attn = Attention(cfg, tp)
        self.mlp_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.mlp = make_mlp(cfg, tp)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, pos: Positions) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), pos))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class TransformerModel(nn.Module):
    """`tp` (None for one process) makes the projections, the embedding and the head
    tensor-parallel; the model's code is otherwise the same under every layout. What the other
    steps of parallelize() decide for the whole model (context parallelism, recomputation, the
    document mask) is in its record, module_spec(model)."""

    stage: Stage | None = None  # set by keep_stage on a pipeline rank; None: the whole model

    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None = None, ep: ExpertParallel | None = None):
        super().__init__()
        if cfg.vocab_size <= 0 or cfg.max_seq_len <= 0:
            raise ValueError("resolve model.vocab_size and model.max_seq_len before building the model")
        self.cfg, self.tp = cfg, tp
        self.sequence_parallel = tp is not None and tp.sequence_parallel
        self.tok_emb = vocab_embedding(cfg.vocab_size, cfg.d_model, cfg.init_std, tp)
        self.pos_emb = Embedding(cfg.max_seq_len, cfg.d_model, cfg.init_std) if cfg.pos_emb == "learned" else None
        self.dropout = nn.Dropout(cfg.dropout)
        # A ModuleDict keyed by the global layer index keeps parameter names
        # ("layers.3.attn.wq.weight") the same when a pipeline stage holds only some layers.
        self.layers = nn.ModuleDict({str(i): self.make_block(cfg, i, tp, ep) for i in range(cfg.n_layers)})
        self.norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        # Vocabulary-parallel head: each rank computes the logits of its slice of the
        # vocabulary; the loss never gathers them (vocab_parallel_cross_entropy). Under tp the
        # vocabulary is padded to a multiple of tp, the padding's logits -inf (tensor_parallel.py).
        self.head = vocab_head(cfg.d_model, cfg.vocab_size, cfg.init_std, tp)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight  # one tensor, named tok_emb.weight
        if cfg.pos_emb == "rope":
            # rope_sin is signed (its first half negated), the form apply_rope takes (rope.py).
            cos, sin = rotary_tables(self.rope_head_dim(cfg), cfg.max_seq_len, cfg.rope_theta,
                                     cfg.rope_scaling_dict())
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None
        if self.sequence_parallel:
            # Parameters applied to a sequence shard (norms, row-parallel biases, learned
            # positions, and the experts, which are whole on every tp rank and each route
            # this rank's tokens) see only this rank's tokens: their gradients are partial
            # sums that the gradient sync all-reduces over the tp group.
            for p in self.parameters():
                if not spec(p).tp_sharded:
                    declare(p, sequence_parallel=True)

    def make_block(self, cfg: ModelConfig, index: int, tp: TensorParallel | None,
                   ep: ExpertParallel | None = None) -> nn.Module:
        """Block `index`. `ep` (expert parallelism) is for models whose blocks have routed
        experts (DeepSeekModel); this model's dense blocks have none (build_model refuses ep)."""
        return Block(cfg, tp)

    def rope_head_dim(self, cfg: ModelConfig) -> int:
        return cfg.d_model // cfg.n_heads

    def init_weights(self, seed: int) -> None:
        init_parameters(self, seed)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                loss_denominator: float | torch.Tensor | None = None, chunk: int = 0,
                tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, seq, vocab]; or, given targets, the loss.

        The loss is sum(token cross-entropy) / loss_denominator. Training passes the
        number of target tokens in the *whole global batch*, so summing the losses of
        every micro-batch (and every data-parallel rank) gives the global mean,
        whatever the layout (DESIGN, invariant 3). Left as None it is this batch's
        own count, i.e. the plain mean.

        On a pipeline stage (keep_stage) it runs this rank's chunk `chunk`: its input is
        input_ids for the first chunk of the model, else the previous chunk's hidden states;
        every chunk but the model's last returns hidden states. `tokens`: the micro-batch's token
        ids, which a later chunk needs where documents are masked (document_eos).
        """
        x, _ = self.trunk(input_ids, chunk, tokens)
        if self.stage is not None and not self.stage.is_last_chunk(chunk):
            return x  # hidden states, for the next pipeline chunk
        return self.output(x, targets, loss_denominator)

    def trunk(self, input_ids: torch.Tensor, chunk: int = 0, tokens: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, Positions]:
        """The hidden states after this chunk's blocks (all of them without a pipeline), before
        the final norm, and the positions the blocks used: forward's body, and the start of
        DeepSeek's multi-token prediction, which continues from them."""
        first = self.stage is None or self.stage.is_first_chunk(chunk)
        pos, index = self.positions(input_ids if first else tokens)
        x = self.embed(input_ids, index) if first else input_ids
        recompute = module_spec(self).recompute  # train.recompute (recompute.py)
        for position, layer in enumerate(self.chunk_layers(chunk)):
            x = recompute.run(layer, position, x, pos)
        return x, pos

    def positions(self, tokens: torch.Tensor | None) -> tuple[Positions, torch.Tensor | None]:
        """What every block's attention needs (documents.py), and each token's position for the
        learned embedding (None: 0..T-1). Packed documents restart both at each EOS."""
        rope = (self.rope_cos, self.rope_sin) if self.rope_cos is not None else None
        cp, eos = module_spec(self).cp, module_spec(self).document_eos  # (set by parallelize())
        if cp is not None:  # this rank's zigzag tokens: their positions in the whole sequence
            T = tokens.shape[1] * cp.size
            index = zigzag_index(T, cp.size, cp.rank, tokens.device)
            rope = (rope[0][index], rope[1][index]) if rope is not None else None
            return Positions(rope), index.expand(tokens.shape[0], -1)
        if eos is None:
            return Positions(rope), None
        if tokens is None:
            raise ValueError("document_eos is set: forward needs the micro-batch's token ids (tokens=)")
        return packed_positions(tokens, eos, rope)

    # -- pipeline parallelism: this rank's stage of the model (parallel/pipeline/stage.py) --

    def keep_stage(self, stage: Stage) -> None:
        """Delete what pipeline stage `stage` does not run, so that nothing keeps those weights
        alive: the other ranks' layers, the embeddings except on the first rank (the last keeps
        the token embedding when the head is tied to it), the final norm and head except on the
        last rank. Every kept module keeps its name."""
        keep = {str(i) for c in stage.chunks for i in c}
        for name in [n for n in self.layers if n not in keep]:
            del self.layers[name]
        if not stage.has_first:
            self.pos_emb = None
            if not (self.cfg.tie_embeddings and stage.has_last):
                self.tok_emb = None
        if not stage.has_last:
            self.norm = self.head = None
        self.stage = stage

    def chunk_layers(self, chunk: int = 0) -> list[nn.Module]:
        """The blocks forward runs: all of them, or those of this stage's chunk `chunk`."""
        if self.stage is None:
            return list(self.layers.values())
        return [self.layers[str(i)] for i in self.stage.chunks[chunk]]

    # The pieces of forward, shared by subclasses that need the hidden states
    # (DeepSeekModel's multi-token prediction).

    def embed(self, input_ids: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Token (and learned position) embeddings; under sequence parallelism this rank's T/tp
        positions. index: each token's position [B, T] (packed documents); None: 0..T-1."""
        T = input_ids.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self.tok_emb(input_ids)
        if self.pos_emb is not None:
            pos = self.pos_emb.weight[:T] if index is None else self.pos_emb.weight[index]
            if self.sequence_parallel:  # our rows only; the gradient sync sums the shards' parts
                pos = pos.chunk(self.tp.size, dim=-2)[self.tp.rank]
            x = x + pos
        return self.dropout(x)

    def output(self, x: torch.Tensor, targets: torch.Tensor | None = None,
               loss_denominator: float | torch.Tensor | None = None) -> torch.Tensor:
        """Final norm and head: logits (gathered over tp, without the vocabulary's padding), or
        the loss given targets."""
        logits = self.head(self.norm(x))  # [B, T, V/tp]
        if targets is None:
            if self.tp is None:
                return logits
            return gather_last(logits, self.tp.group)[..., :self.cfg.vocab_size]
        denom = loss_denominator if loss_denominator is not None else count_targets(targets)
        return token_loss_sum(logits, targets, self.tp) / denom

    # -- sizes, for logging and MFU -------------------------------------------------

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_matmul_params(self) -> int:
        """Parameters multiplied against activations: every Linear weight, including the
        output head even when it is tied to the embedding (the lookup itself is not a
        matmul). This N enters the 6N FLOPs per token."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, Linear))  # local shard under TP

    def step_metrics(self) -> dict[str, float | list]:
        """Figures of the last optimizer step for the log: none for a dense model (DeepSeekModel:
        the MoE load per layer). Pipeline stages borrow the method (parallel/pipeline/stage.py)."""
        return {}


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor, tp: TensorParallel | None) -> torch.Tensor:
    """Summed cross entropy over the targets (IGNORE_INDEX adds 0): vocabulary-parallel under
    tensor parallelism, never gathering the logits; fp32 softmax otherwise."""
    if tp is None:
        return cross_entropy_sum(logits, targets)
    return vocab_parallel_cross_entropy(logits, targets, tp).sum()


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # Softmax in fp32 even under bf16 autocast: log-sum-exp over a large vocab loses
    # too much precision in 8 mantissa bits.
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def count_targets(targets: torch.Tensor) -> torch.Tensor:
    return (targets != IGNORE_INDEX).sum().clamp(min=1)
