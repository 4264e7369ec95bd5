"""Packed documents (data.document_mask) under tensor and pipeline parallelism.

Two checks, both fp32 at 1e-5:
- tp=2 with sequence parallelism, in a gloo world: a window of three documents gives each
  document the logits and per-token losses it gets alone (tests/unit/test_documents.py does the
  same on one process and across pipeline stages run in turn);
- training: each layout against one process (nanotrain verify, 10 steps: losses, step-1
  gradients, norms) on a jsonl corpus of short documents and a BPE tokenizer.json with an EOS,
  made here. A window of 32 tokens holds several documents, so the masks differ row by row."""

import pytest
import torch
import torch.nn.functional as F

from conftest import CORPUS
from nanotrain.config import ModelConfig, load_config
from nanotrain.parallel.launch import run_world

from test_deepseek import TINY  # noqa: E402  (tests/unit is on sys.path through conftest)
from test_sources import bpe_tokenizer_json, write_jsonl  # noqa: E402
from test_tp_dp import check_layout  # noqa: E402

TOL = 1e-5
V, EOS = 50, 49


def _tp_logits(model_cfg: dict, windows: list[torch.Tensor]) -> list[torch.Tensor]:
    """The logits of each window (one row each) under tp=2 with sp (the head gathers the sequence)."""
    import torch.distributed as dist

    from nanotrain.models import build_model
    from nanotrain.module_spec import mark
    from nanotrain.parallel.tensor_parallel import TensorParallel

    tp = TensorParallel(dist.group.WORLD, dist.get_rank(), dist.get_world_size(), sequence_parallel=True)
    model = build_model(ModelConfig(**model_cfg), tp).eval()
    model.init_weights(seed=11)
    mark(model, document_eos=EOS)
    with torch.no_grad():
        return [model(w[None])[0] for w in windows]


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_tp2_sp_packed_documents_match_each_alone(pos_emb):
    g = torch.Generator().manual_seed(0)
    docs = [torch.cat([torch.randint(0, V - 1, (n - 1,), generator=g), torch.tensor([EOS])]) for n in (4, 6, 6)]
    cfg = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, norm="rmsnorm", mlp="swiglu",
               pos_emb=pos_emb, n_kv_heads=2)
    ranks = run_world(_tp_logits, 2, cfg, [torch.cat(docs), *docs])
    torch.testing.assert_close(ranks[0], ranks[1], rtol=0, atol=0)
    packed, *alone = ranks[0]
    start = 0
    for d, logits in zip(docs, alone):
        n = len(d)
        torch.testing.assert_close(packed[start:start + n], logits, rtol=TOL, atol=TOL)
        torch.testing.assert_close(F.cross_entropy(packed[start:start + n - 1], d[1:], reduction="none"),
                                   F.cross_entropy(logits[:-1], d[1:], reduction="none"), rtol=TOL, atol=TOL)
        start += n


def config(tmp_path, *extra):
    lines = [line for line in CORPUS.read_text(encoding="utf-8")[:30_000].splitlines() if line.strip()]
    corpus = write_jsonl(tmp_path / "lines.jsonl", lines)  # one line a document: ~10 tokens each
    tokenizer = bpe_tokenizer_json(tmp_path / "tokenizer.json")
    return load_config(None, [
        f"--data.path={corpus}", f"--data.tokenizer={tokenizer}", "--data.document_mask=true",
        f"--data.prepared_dir={tmp_path / 'prep'}", f"--train.out_dir={tmp_path / 'run'}",
        "--model.d_model=32", "--model.n_layers=4", "--model.n_heads=4", "--model.vocab_size=0",
        "--model.norm=rmsnorm", "--model.mlp=swiglu", "--model.pos_emb=rope", "--precision.recipe=fp32",
        "--train.seq_len=32", "--train.batch_size=8", "--train.micro_batch_size=2", "--schedule.warmup_steps=2",
        "--optimizer.lr=3e-3", "--logging.progress=none", *extra])


LAYOUTS = {
    "tp2_sp": ("tp=2,sp", []),
    "tp2_sp_gpt2": ("tp=2,sp", ["--model.norm=layernorm", "--model.mlp=gelu", "--model.pos_emb=learned",
                                "--model.bias=true"]),
    "pp2": ("pp=2", []),
    # MLA and routed experts (the vocabulary stays the tokenizer's)
    "deepseek_dp2_ep2": ("dp=2,ep=2", [o for o in TINY if "vocab_size" not in o] + ["--model.n_layers=2"]),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_document_mask_layout_matches_one_process(tmp_path, name):
    layout, extra = LAYOUTS[name]
    check_layout(config(tmp_path, *extra), layout, TOL)
