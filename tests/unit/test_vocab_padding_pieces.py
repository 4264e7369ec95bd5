"""A vocabulary that tp does not divide is padded to a multiple of tp (parallel/tensor_parallel.py):
the pieces that make the padded model the unpadded one, checked on one process. The worlds
(losses, gradients, resume, export) are in tests/parity/test_vocab_padding.py."""

import pytest
import torch
from torch import nn

from nanotrain.checkpoint import flat_pieces, local_slice, model_pieces
from nanotrain.config import ConfigError, load_config
from nanotrain.layers import Embedding, Linear, Shard, full_shape, init_parameters, logical_numel
from nanotrain.monitoring.probe import logit_sums
from nanotrain.parallel.tensor_parallel import (TensorParallel, VocabParallelEmbedding, VocabParallelHead,
                                                padded_vocab)
from nanotrain.runtime.components import resolve_model_config
from nanotrain.params import spec

V, D = 65, 8


def one_process() -> nn.Module:
    m = nn.Module()
    m.tok_emb, m.head = Embedding(V, D), Linear(D, V)
    init_parameters(m, seed=7)
    return m


def rank(r: int, tp: int) -> nn.Module:
    m = nn.Module()
    group = TensorParallel(None, r, tp)
    m.tok_emb, m.head = VocabParallelEmbedding(V, D, 0.02, group), VocabParallelHead(D, V, 0.02, group)
    init_parameters(m, seed=7)
    return m


@pytest.mark.parametrize("tp", [2, 4])
def test_padded_shards_hold_the_unpadded_rows_bit_for_bit_and_zeros(tp):
    """Invariant 1 with padding: the real rows are the one-process tensor's (drawn from (seed,
    name) at the logical shape [65, d]), the padding rows are zero, and each shard's logical
    shape and count are the unpadded model's."""
    full = one_process()
    rows = padded_vocab(V, tp) // tp
    for r in range(tp):
        part = rank(r, tp)
        for name in ("tok_emb.weight", "head.weight"):
            p = part.get_parameter(name)
            start, stop = spec(p).shard.span(rows)
            assert p.shape == (rows, D) and full_shape(p) == (V, D)
            assert torch.equal(p[:stop - start], full.get_parameter(name)[start:stop])
            assert torch.equal(p[stop - start:], torch.zeros(rows - (stop - start), D))
        assert part.head.real_rows == stop - start
        assert logical_numel(part) == 2 * V * D


def test_divisible_vocabulary_is_not_padded():
    emb = VocabParallelEmbedding(68, D, 0.02, TensorParallel(None, 1, 4))
    assert emb.weight.shape == (17, D) and spec(emb.weight).shard == Shard(0, 1, 4)


def test_checkpoint_boxes_and_whole_tensors_leave_the_padding_out():
    """tp=4 over 65 rows: 17 rows per rank, the last rank 14 real rows and 3 of padding. Its box
    is rows [51, 65) of the logical [65, d] tensor; a box of padding only is no piece at all;
    local_slice gives back the padded shard, and the shards' real rows make the logical tensor."""
    full = one_process()
    last = rank(3, 4)
    piece, = model_pieces(last.tok_emb)
    assert (piece.offsets, piece.sizes, piece.shape) == ((51, 0), (14, D), (V, D))
    w = last.tok_emb.weight
    assert flat_pieces("m", w.detach().reshape(-1), w, 14 * D, 17 * D) == []  # the padding's flat range
    tail, = flat_pieces("m", w.detach().reshape(-1)[13 * D:], w, 13 * D, 17 * D)
    assert (tail.offsets, tail.sizes) == ((64, 0), (1, D))
    assert torch.equal(local_slice(full.tok_emb.weight.detach(), spec(w).shard), w.detach())
    parts = [rank(r, 4).tok_emb.weight.detach() for r in range(4)]
    assert torch.equal(torch.cat(parts)[:V], full.tok_emb.weight.detach())


def test_probe_figures_ignore_padding_logits():
    """Padding columns arrive as -inf (VocabParallelHead): the probe's loss, entropy and top-k
    mass are those of the unpadded logits, with no 0 x -inf in the entropy."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, V, generator=g)
    targets = torch.randint(0, V, (2, 5), generator=g)
    padded = torch.cat([logits, torch.full((2, 5, 3), float("-inf"))], dim=-1)
    sums = logit_sums(padded, targets)
    assert torch.isfinite(sums).all()
    torch.testing.assert_close(sums, logit_sums(logits, targets), rtol=1e-12, atol=1e-12)


def test_tokenizer_vocabulary_is_padded_and_an_explicit_one_is_obeyed():
    cfg = load_config("configs/shakespeare_char.toml", ["--parallel.tp=2"])
    note = resolve_model_config(cfg, 65)
    assert cfg.model.vocab_size == 65  # the logical size: checkpoints and their config are tp=1's
    assert "65 tokens padded to 66 rows for parallel.tp=2" in note
    assert resolve_model_config(load_config("configs/shakespeare_char.toml", ["--parallel.tp=1"]), 65) is None
    explicit = load_config("configs/shakespeare_char.toml", ["--parallel.tp=2", "--model.vocab_size=65"])
    with pytest.raises(ConfigError, match=r"model.vocab_size=65 is not divisible by parallel.tp=2: "
                                          r"set model.vocab_size=66, or 0 .* pad it automatically"):
        resolve_model_config(explicit, 65)
    even = load_config("configs/shakespeare_char.toml", ["--parallel.tp=2", "--model.vocab_size=66"])
    assert resolve_model_config(even, 65) is None and even.model.vocab_size == 66


def test_inspect_plans_the_padded_layout(capsys):
    """`nanotrain inspect` with the tokenizer's 65 at tp=2 plans what training runs, 66 rows:
    the same memory and traffic as an explicit 66, and says so (it used to refuse: 'pad it')."""
    import json

    from nanotrain.cli import main

    plans = {}
    for vocab in (65, 66):
        assert main(["inspect", "--config", "configs/shakespeare_char.toml", f"--model.vocab_size={vocab}",
                     "--layout", "tp=2,dp=2", "--json"]) == 0
        plans[vocab] = json.loads(capsys.readouterr().out)
    padded, even = plans[65]["plan"], plans[66]["plan"]
    assert padded.pop("vocab_padded") == 66 and "vocab_padded" not in even
    assert padded == even
    assert plans[65]["params_total"] == plans[66]["params_total"] - 128  # the logical model: 65 rows, tied
