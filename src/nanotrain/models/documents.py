"""Packed documents that do not see each other (data.document_mask).

Pretraining packs documents end to end, each ended by the tokenizer's EOS, and cuts the stream
into windows. By default (GPT-2, nanoGPT) a token attends to every earlier token of its window,
across document boundaries: cheap, and it works. With data.document_mask each token attends
only within its own document, and the positions restart at each document's first token, so a
window computes for each document exactly what that document alone would (Llama 3 trained so):

    tokens     a  b  EOS  c  d  e  EOS  f
    document   0  0  0    1  1  1  1    2      the EOS belongs to the document it ends
    position   0  1  2    0  1  2  3    0      RoPE angles / learned embedding rows

    mask[i, j] (may row i see column j?)  =  j <= i  and  document[j] == document[i]

                  a b E c d e E f
              a   x
              b   x x
              E   x x x
              c         x
              d         x x
              e         x x x
              E         x x x x
              f                 x

Everything is computed from the token ids, so every rank builds the same mask from its micro-
batch: tensor-parallel ranks (whose attention sees the whole sequence after sequence
parallelism's all-gather) and every pipeline stage (the runner hands each stage the micro-batch's
token ids) alike. The mask is a dense [B, 1, T, T] boolean, built once per forward and handed to
SDPA in its additive form (Positions.attention_mask), one tensor shared by every layer. Megatron builds the same from its EOD token (get_ltor_masks_and_
position_ids with reset_position_ids and reset_attention_mask); torchtitan uses flex_attention's
BlockMask, which skips whole masked tiles: the long-sequence GPU version of this mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Positions:
    """What every block's attention needs besides its input: where each token sits.

    rope: (cos, signed sin) of rope.rotary_tables: the model's whole tables [max_seq_len, d]
          (each attention takes their first T rows), or one row per token [B, 1, T, d]
          (positions that restart in each document). None without RoPE.
    mask: None: causal over the whole window; else [B, 1, T, T] bool, True where row i may
          attend to column j."""

    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    mask: torch.Tensor | None = None
    _additive: dict = field(default_factory=dict, compare=False, repr=False)  # dtype -> attention_mask

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The mask as SDPA's additive form (0 where seen, -inf elsewhere) in the attention's
        dtype, made once per forward. Every layer then hands SDPA the same tensor, which its
        backward saves once; a boolean mask would be converted, and saved, by every layer
        (measured: one [B, 1, T, T] fp32 copy per layer, tests/unit/test_documents.py)."""
        if self.mask is None:
            return None
        if dtype not in self._additive:
            self._additive[dtype] = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device
                                                ).masked_fill_(~self.mask, float("-inf"))
        return self._additive[dtype]

    def head(self, n: int) -> "Positions":
        """The first n positions (DeepSeek's MTP block runs on T - 1 of them)."""
        rope = self.rope
        if rope is not None and rope[0].dim() == 4:
            rope = (rope[0][..., :n, :], rope[1][..., :n, :])
        return Positions(rope, None if self.mask is None else self.mask[..., :n, :n])


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[B, T] -> [B, T]: the index of each token's document in its window (an EOS ends its own)."""
    ends = (tokens == eos_id).to(torch.int32)
    return ends.cumsum(-1) - ends


def document_positions(docs: torch.Tensor) -> torch.Tensor:
    """[B, T] document ids -> each token's position in its document, int64 [B, T]."""
    T = docs.shape[-1]
    index = torch.arange(T, device=docs.device).expand_as(docs)
    starts = torch.ones_like(docs, dtype=torch.bool)
    starts[..., 1:] = docs[..., 1:] != docs[..., :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(-1).values  # the document's first index
    return index - first


def document_mask(docs: torch.Tensor) -> torch.Tensor:
    """[B, T] document ids -> [B, 1, T, T] bool: causal and within the same document."""
    T = docs.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=docs.device).tril()
    return (causal & (docs[:, :, None] == docs[:, None, :])).unsqueeze(1)


def packed_positions(tokens: torch.Tensor, eos_id: int, rope: tuple[torch.Tensor, torch.Tensor] | None
                     ) -> tuple[Positions, torch.Tensor]:
    """The Positions of a packed window (RoPE rows by position in the document, the document
    mask) and the positions themselves [B, T] (for learned position embeddings)."""
    docs = document_ids(tokens, eos_id)
    pos = document_positions(docs)
    if rope is not None:
        rope = (rope[0][pos].unsqueeze(1), rope[1][pos].unsqueeze(1))
    return Positions(rope, document_mask(docs)), pos
