"""Continuing an imported model with its own tokenizer, end to end (nothing downloaded): a tiny
transformers Llama and a BPE tokenizer.json made here; `prepare` a jsonl corpus with that
tokenizer; train 20 steps from the HF weights (checkpoint.init_from); `convert --to-hf`; reload
with transformers' AutoModelForCausalLM and AutoTokenizer. The reloaded model's logits are the
run's last checkpoint's, and AutoTokenizer encodes as the token files were written."""

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from test_sources import DOCS, bpe_tokenizer_json, write_jsonl  # noqa: E402

transformers = pytest.importorskip("transformers")

from nanotrain.cli import main  # noqa: E402
from nanotrain.config import load_config  # noqa: E402
from nanotrain.data import prepare_data  # noqa: E402
from nanotrain.models import load_model  # noqa: E402
from nanotrain.models.hf import model_config_from_hf  # noqa: E402
from nanotrain.runtime import RuntimeEngine  # noqa: E402


def test_imported_model_trains_on_its_own_tokenizer_and_exports_back(tmp_path):
    folder = bpe_tokenizer_json(tmp_path / "hf", eos="</s>", config={"eos_token": "</s>"})
    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False, eos_token_id=vocab - 1)
    transformers.LlamaForCausalLM(hf_cfg).float().save_pretrained(folder)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", DOCS)

    cfg = load_config(None, [
        f"--data.path={corpus}", f"--data.tokenizer={folder}", f"--data.prepared_dir={tmp_path / 'prep'}",
        f"--checkpoint.init_from={folder}", f"--train.out_dir={tmp_path / 'run'}", "--train.max_steps=20",
        "--train.seq_len=32", "--train.batch_size=4", "--train.eval_interval=0", "--precision.recipe=fp32",
        "--schedule.warmup_steps=2", "--logging.progress=none", "--logging.tensorboard=false",
        "--logging.plot=false", "--logging.peak_tflops=1"])
    cfg.model = model_config_from_hf(json.loads((folder / "config.json").read_text()))
    cfg.model.max_seq_len = 64

    # The token files are the documents as `tokenizers` encodes them, each ended by the EOS.
    prepared = prepare_data(cfg.data, cfg.train.seq_len, log=lambda s: None)
    oracle = Tokenizer.from_file(str(folder / "tokenizer.json"))
    eos = oracle.token_to_id("</s>")
    assert np.concatenate([prepared.tokens("train"), prepared.tokens("val")]).tolist() == \
        [i for d in DOCS for i in oracle.encode(d).ids + [eos]]

    result = RuntimeEngine(cfg).run()
    assert result.losses[20] < result.losses[1]  # it trained

    out = tmp_path / "export"
    assert main(["convert", "--to-hf", "--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= \
        {p.name for p in out.iterdir()}
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "</s>"
    assert tokenizer(DOCS[3], add_special_tokens=False)["input_ids"] == oracle.encode(DOCS[3]).ids

    ids = torch.from_numpy(prepared.tokens("val")[:32].astype(np.int64))[None]
    ours, _ = load_model(tmp_path / "run")
    before = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        want, got, start = ours(ids), model(input_ids=ids).logits, before(input_ids=ids).logits
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
    assert (start - want).abs().max().item() > 1e-3  # the export holds the trained weights
