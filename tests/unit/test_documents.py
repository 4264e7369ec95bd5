"""Packed documents (data.document_mask, models/documents.py): a window of several documents joined
by EOS gives every document the logits and per-token losses it gets alone (1e-5, fp32), for the
Llama block (RoPE), GPT-2's (learned positions), DeepSeek's (MLA, routed experts, MTP) and a model
cut into pipeline stages (later stages see only hidden states and get the token ids beside them).
Without the mask they differ: the test can see a mask that leaks."""

import copy

import pytest
import torch
import torch.nn.functional as F

from nanotrain.config import ConfigError, ModelConfig, load_config
from nanotrain.models import build_model
from nanotrain.models.documents import document_ids, document_mask, document_positions
from nanotrain.module_spec import mark, module_spec
from nanotrain.parallel.pipeline import pipeline_stage

from test_deepseek import TINY  # noqa: E402  (tests/unit is on sys.path through conftest)

V, EOS, T = 50, 49, 16
TOL = 1e-5
VARIANTS = {
    "llama": dict(norm="rmsnorm", mlp="swiglu", pos_emb="rope", n_kv_heads=2),
    "gpt2": dict(norm="layernorm", mlp="gelu", pos_emb="learned", bias=True, tie_embeddings=False),
}


def test_ids_positions_and_mask_of_the_docstring_example():
    tokens = torch.tensor([[1, 2, EOS, 3, 4, 5, EOS, 6]])
    docs = document_ids(tokens, EOS)
    assert docs.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2]]
    assert document_positions(docs).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    mask = document_mask(docs)[0, 0]
    assert mask.shape == (8, 8)
    assert mask[2].tolist() == [True, True, True, False, False, False, False, False]
    assert mask[6].tolist() == [False, False, False, True, True, True, True, False]
    assert mask[7].tolist() == [False] * 7 + [True]


def documents(seed: int) -> list[torch.Tensor]:
    """Three documents of 5, 7 and 4 tokens, each ended by EOS: one window of T = 16."""
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.randint(0, V - 1, (n - 1,), generator=g), torch.tensor([EOS])]) for n in (5, 7, 4)]


def per_token(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [T, V], cross-entropy of each position against the next token [T - 1]) of one row."""
    logits = model(x[None])[0]
    return logits, F.cross_entropy(logits[:-1], x[1:], reduction="none")


def check_packed_equals_alone(model, docs, run=per_token) -> float:
    """Every document's logits and within-document losses, packed vs alone; returns the largest
    difference of the packed run without the mask (what the mask must remove)."""
    packed = torch.cat(docs)
    logits, losses = run(model, packed)
    start = 0
    for d in docs:
        alone_logits, alone_losses = run(model, d)
        n = len(d)
        torch.testing.assert_close(logits[start:start + n], alone_logits, rtol=TOL, atol=TOL)
        torch.testing.assert_close(losses[start:start + n - 1], alone_losses, rtol=TOL, atol=TOL)
        start += n
    eos = module_spec(model).document_eos
    mark(model, document_eos=None)
    leaked = run(model, packed)[0]
    mark(model, document_eos=eos)
    return (leaked[len(docs[0]):] - logits[len(docs[0]):]).abs().max().item()


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_documents_match_each_alone(variant):
    model = build_model(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=T,
                                    **VARIANTS[variant])).eval()
    model.init_weights(seed=7)
    mark(model, document_eos=EOS)
    assert check_packed_equals_alone(model, documents(0)) > 1e-3


def test_deepseek_packed_documents_match_each_alone():
    """MLA (its shared RoPE key) and routed experts; capacity off, so routing is per token."""
    cfg = load_config(None, TINY + ["--train.seq_len=16"]).model
    cfg.max_seq_len = T
    cfg.vocab_size = V
    model = build_model(cfg).eval()
    model.init_weights(seed=3)
    mark(model, document_eos=EOS)
    assert check_packed_equals_alone(model, documents(1)) > 1e-3


def test_deepseek_mtp_sees_the_documents():
    """Training with MTP: the MTP block attends with the main model's mask (its first T-1 rows).
    Replacing the first document leaves the loss terms of the later ones as they were; without
    the mask they change."""
    cfg = load_config(None, TINY + ["--train.seq_len=16", "--model.mtp_depth=1"]).model
    cfg.max_seq_len, cfg.vocab_size = T, V
    model = build_model(cfg)
    model.init_weights(seed=3)
    mark(model, document_eos=EOS)
    model.train()
    docs = documents(2)
    x = torch.cat(docs)[None]
    other = torch.cat([torch.tensor([7, 8, 9, 10, EOS])] + docs[1:])[None]
    # Targets inside the later documents only, from their second token on: the MTP term at
    # position i predicts token i + 2 from position i's hidden state, so none starts from the
    # first document's EOS.
    y = torch.full_like(x, -100)
    start = len(docs[0])
    for d in docs[1:]:
        end = start + len(d)
        y[0, start + 1:end - 1] = x[0, start + 2:end]
        start = end
    torch.testing.assert_close(model(x, y), model(other, y), rtol=TOL, atol=TOL)
    mark(model, document_eos=None)  # without the mask the later documents see the first
    assert (model(x, y) - model(other, y)).abs().item() > 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_pipeline_stages_get_the_documents_from_the_token_ids(variant):
    """The model cut in two stages, run one after the other in this process: the second stage
    gets hidden states and builds the mask from the token ids beside them (tokens=)."""
    whole = build_model(ModelConfig(vocab_size=V, d_model=32, n_layers=4, n_heads=4, max_seq_len=T,
                                    **VARIANTS[variant])).eval()
    whole.init_weights(seed=5)
    first = pipeline_stage(copy.deepcopy(whole), 0, 2, [[0, 1]]).eval()
    last = pipeline_stage(copy.deepcopy(whole), 1, 2, [[2, 3]]).eval()
    for m in (whole, first, last):
        mark(m, document_eos=EOS)

    def staged(_, x):
        logits = last(first(x[None]), tokens=x[None])[0]
        return logits, F.cross_entropy(logits[:-1], x[1:], reduction="none")

    docs = documents(3)
    torch.testing.assert_close(staged(None, torch.cat(docs))[0], whole(torch.cat(docs)[None])[0], rtol=TOL, atol=TOL)
    for m in (whole, first, last):
        mark(m, document_eos=EOS)
    check_packed_equals_alone(whole, docs, run=staged)


def test_the_mask_needs_a_tokenizer_with_an_eos():
    with pytest.raises(ConfigError, match="data.document_mask=true needs a tokenizer with an end-of-text token"):
        load_config(None, ["--data.document_mask=true", "--data.tokenizer=char"])


def test_the_mask_is_saved_once_per_forward_not_once_per_layer():
    """Every layer hands SDPA the same additive mask: adding layers adds no mask bytes to what
    backward keeps (a boolean mask is converted, and saved, by each layer)."""
    def saved_bytes(layers: int, eos: int | None) -> int:
        model = build_model(ModelConfig(vocab_size=V, d_model=32, n_layers=layers, n_heads=4, max_seq_len=64,
                                        **VARIANTS["llama"]))
        model.init_weights(seed=0)
        mark(model, document_eos=eos)
        x = torch.randint(0, V, (2, 64), generator=torch.Generator().manual_seed(0))
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, x)
        return sum(storages.values())

    per_layer = {eos: saved_bytes(3, eos) - saved_bytes(2, eos) for eos in (None, EOS)}
    assert per_layer[EOS] == per_layer[None]
