"""Corpora beyond .txt (data/sources.py) and a model's own tokenizer (PretrainedTokenizer): jsonl,
parquet, `datasets` folders and mixed folders read as documents, never split between train and
val; a tokenizer.json or model folder whose EOS ends each document; every bad input a named error.
The oracle for the token files is `tokenizers`' own encoding of the documents."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nanotrain.config import ConfigError, DataConfig, load_config
from nanotrain.data import DataError, prepare_data
from nanotrain.data.sources import documents, find_sources
from nanotrain.runtime.components import check_vocabulary

SHAKESPEARE = Path(__file__).resolve().parents[2] / "data" / "tinyshakespeare.txt"
DOCS = [p for p in SHAKESPEARE.read_text(encoding="utf-8")[:40_000].split("\n\n") if p.strip()]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def write_parquet(path: Path, docs: list[str], field: str = "text") -> Path:
    pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), path, row_group_size=50)
    return path


def write_dataset(folder: Path, docs: list[str]) -> Path:
    """What datasets.Dataset.from_dict({...}).save_to_disk(folder) writes: an Arrow *stream* file
    beside dataset_info.json and state.json."""
    folder.mkdir(parents=True)
    table = pa.table({"text": docs})
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=64)
    (folder / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    return folder


def bpe_tokenizer_json(path: Path, eos: str = "<|endoftext|>", config: dict | None = None) -> Path:
    """A small byte-level BPE with an EOS special token, trained here (nothing downloaded); with
    `config`, a model folder with tokenizer.json and tokenizer_config.json."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[eos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(DOCS, trainer=trainer)
    if config is None:
        tok.save(str(path))
        return path
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_each_format_gives_the_same_documents(tmp_path):
    sources = {"jsonl": write_jsonl(tmp_path / "c.jsonl", DOCS), "parquet": write_parquet(tmp_path / "c.parquet", DOCS),
               "datasets": write_dataset(tmp_path / "ds", DOCS)}
    for name, path in sources.items():
        files = find_sources(path)
        assert [d for f in files for d in documents(f)] == DOCS, name
    # A folder mixing them: each file in sorted order; a datasets folder's JSON files are no documents.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "a.jsonl", DOCS[:3])
    write_parquet(mixed / "b.parquet", DOCS[3:5])
    write_dataset(mixed / "c", DOCS[5:7])
    (mixed / "d.txt").write_text("running text", encoding="utf-8")
    files = find_sources(mixed)
    assert [f.rel for f in files] == ["a.jsonl", "b.parquet", "c/data-00000-of-00001.arrow", "d.txt"]
    assert [d for f in files for d in documents(f)] == DOCS[:7] + ["running text"]


def test_documents_are_never_split_between_train_and_val(tmp_path):
    pd = prepare_data(DataConfig(path=str(write_jsonl(tmp_path / "c.jsonl", DOCS))), 16, log=lambda s: None)
    train = pd.tokenizer.decode(pd.tokens("train").tolist())
    val = pd.tokenizer.decode(pd.tokens("val").tolist())
    assert pd.meta["documents"] == len(DOCS)
    # The cut is at a document boundary (the newline between two documents goes with the first).
    k = next(k for k in range(len(DOCS)) if "\n".join(DOCS[:k]) + "\n" == train)
    assert val == "\n".join(DOCS[k:])
    assert abs(pd.n_val_tokens / (pd.n_train_tokens + pd.n_val_tokens) - 0.1) < 0.02


def test_pretrained_tokenizer_files_equal_tokenizers_own_encoding(tmp_path):
    """Documents joined by EOS, as `tokenizers` encodes them; the tokenizer travels with the data."""
    tok_path = bpe_tokenizer_json(tmp_path / "tokenizer.json")
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    pd = prepare_data(DataConfig(path=str(corpus), tokenizer=str(tok_path)), 16, log=lambda s: None)
    oracle = Tokenizer.from_file(str(tok_path))
    eos = oracle.token_to_id("<|endoftext|>")
    expected = [i for d in DOCS for i in oracle.encode(d).ids + [eos]]
    assert np.concatenate([pd.tokens("train"), pd.tokens("val")]).tolist() == expected
    assert pd.vocab_size == oracle.get_vocab_size() and pd.tokenizer.eos == "<|endoftext|>"
    assert pd.tokens("train")[-1] == eos  # train ends where a document does
    assert pd.tokenizer.decode(oracle.encode(DOCS[0]).ids) == DOCS[0]
    # A model folder: tokenizer_config.json names the EOS.
    folder = bpe_tokenizer_json(tmp_path / "model", eos="</s>", config={"eos_token": {"content": "</s>"}})
    pd = prepare_data(DataConfig(path=str(corpus), tokenizer=str(folder)), 16, log=lambda s: None)
    assert pd.tokenizer.eos == "</s>" and pd.tokens("train")[-1] == pd.tokenizer.eos_id
    assert pd.dir.name.startswith("model-")


def test_a_model_smaller_than_its_tokenizer_stops_before_any_work(tmp_path):
    tok_path = bpe_tokenizer_json(tmp_path / "tokenizer.json")
    cfg = load_config(None, [f"--data.tokenizer={tok_path}", "--model.vocab_size=300"])
    with pytest.raises(ConfigError, match=r"model.vocab_size=300 is smaller than the vocabulary of .*\(400 tokens\)"):
        check_vocabulary(cfg)
    check_vocabulary(load_config(None, [f"--data.tokenizer={tok_path}", "--model.vocab_size=512"]))


@pytest.mark.parametrize("case, match", [
    ("bad_json", r"c\.jsonl:2 is not JSON .*fix or delete that line"),
    ("missing_field", r"c\.jsonl:1 has no field 'text' \(its fields: 'id', 'body'\)\. Set data\.text_field"),
    ("parquet_column", r"c\.parquet has no column 'text' \(its columns: 'id', 'body'\)\. Set data\.text_field"),
    ("empty", r"holds no text"),
    ("tokenizer_folder", r"the folder has no tokenizer\.json"),
    ("short", r"corpus too short for train\.seq_len=4096"),
])
def test_bad_input_is_a_named_error(tmp_path, case, match):
    tokenizer, seq_len = "char", 16
    if case == "bad_json":
        path = tmp_path / "c.jsonl"
        path.write_text('{"text": "a"}\n{"text": oops}\n')
    elif case == "missing_field":
        path = write_jsonl(tmp_path / "c.jsonl", DOCS, field="body")
    elif case == "parquet_column":
        path = write_parquet(tmp_path / "c.parquet", DOCS, field="body")
    elif case == "empty":
        path = write_jsonl(tmp_path / "c.jsonl", ["", ""])
    elif case == "tokenizer_folder":
        path = write_jsonl(tmp_path / "c.jsonl", DOCS)
        (tmp_path / "model").mkdir()
        tokenizer = str(tmp_path / "model")
    else:
        path, seq_len = write_jsonl(tmp_path / "c.jsonl", DOCS[:5]), 4096
    with pytest.raises(DataError, match=match):
        prepare_data(DataConfig(path=str(path), tokenizer=tokenizer), seq_len, log=lambda s: None)
    assert not list(tmp_path.glob("*.nanotrain"))  # nothing written


def test_prepare_streams_in_bounded_memory(tmp_path, monkeypatch):
    """Memory holds one batch of documents and its ids (and 8 bytes per document, where each
    ends), not the corpus: with 64 KB batches, a corpus 4 times larger raises the peak of Python
    and numpy allocations by under a tenth of the added size."""
    import tracemalloc

    from nanotrain.data import prepare

    monkeypatch.setattr(prepare, "BATCH_CHARS", 1 << 16)

    def peak(copies: int) -> tuple[int, int]:
        corpus = write_jsonl(tmp_path / f"c{copies}.jsonl", DOCS * copies)
        tracemalloc.start()
        try:
            pd = prepare_data(DataConfig(path=str(corpus)), 16, log=lambda s: None)
            top = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert pd.meta["documents"] == len(DOCS) * copies
        return corpus.stat().st_size, top

    (small, p_small), (big, p_big) = peak(50), peak(200)
    assert big > 8e6
    assert p_big - p_small < 0.1 * (big - small), f"{p_small / 2**20:.1f} MB -> {p_big / 2**20:.1f} MB"


def test_mixture_shares_one_tokenizer_and_samples_by_weight(tmp_path):
    """data.sources: each corpus prepared on its own with one tokenizer (char trained on both);
    each row picks its corpus by weight, deterministically in (seed, step)."""
    from nanotrain.data.prepare import prepare_mixture
    from nanotrain.data.sampler import MixtureSampler

    a = write_jsonl(tmp_path / "a.jsonl", DOCS)
    b = write_jsonl(tmp_path / "b.jsonl", [d.upper() + " ~" for d in DOCS])  # '~' only in b
    cfg = DataConfig(sources=[f"{a}:3", f"{b}:1"], prepared_dir=str(tmp_path / "prep"))
    assert cfg.mixture() == [(str(a), 0.75), (str(b), 0.25)]
    tok, parts = prepare_mixture(cfg, 16, log=lambda s: None)
    assert "~" in tok.chars and all(p.tokenizer.to_json() == tok.to_json() for p, _ in parts)
    logs = []
    again, _ = prepare_mixture(cfg, 16, log=logs.append)
    assert again.to_json() == tok.to_json() and all("up to date" in line for line in logs)

    sampler = MixtureSampler([p.tokens("train") for p, _ in parts], [w for _, w in parts], 16, 8, seed=3)
    x, _ = sampler.batch(5)
    assert torch_equal(x, sampler.batch(5)[0]) and torch_equal(x[2:4], sampler.batch(5, slice(2, 4))[0])
    which = np.concatenate([sampler.offsets(s)[0] for s in range(500)])
    assert abs((which == 0).mean() - 0.75) < 0.03
    # Each row comes from its own corpus: b's text has no lower-case letters.
    rows = [tok.decode(r.tolist()) for r in sampler.batch(7)[0]]
    for text, corpus in zip(rows, sampler.offsets(7)[0]):
        assert (text == text.upper()) == (corpus == 1) or not any(c.isalpha() for c in text), (text, corpus)


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


@pytest.mark.parametrize("entry", ["corpus.jsonl", "corpus.jsonl:0", "corpus.jsonl:-1", ":1", "c.jsonl:x"])
def test_mixture_entries_are_checked(entry):
    with pytest.raises(ConfigError, match="is not PATH:WEIGHT with a positive weight"):
        load_config(None, [f"--data.sources={entry}"])


def test_a_run_trains_on_a_mixture(tmp_path, capsys):
    from nanotrain.runtime import RuntimeEngine

    a = write_jsonl(tmp_path / "a.jsonl", DOCS)
    b = write_parquet(tmp_path / "b.parquet", DOCS[::-1])
    cfg = load_config(None, [f"--data.sources={a}:0.7,{b}:0.3", f"--data.prepared_dir={tmp_path / 'prep'}",
                             f"--train.out_dir={tmp_path / 'run'}", "--model.d_model=32", "--model.n_layers=1",
                             "--train.seq_len=16", "--train.batch_size=4", "--train.max_steps=4",
                             "--schedule.warmup_steps=1",
                             "--train.eval_interval=2", "--train.eval_steps=1", "--precision.recipe=fp32",
                             "--logging.progress=none", "--logging.tensorboard=false", "--logging.plot=false",
                             "--logging.peak_tflops=1"])
    result = RuntimeEngine(cfg).run()
    assert np.isfinite(result.losses[4])
    out = capsys.readouterr().out
    assert "a.jsonl: weight 0.700" in out and "epochs in 4 steps" in out


def test_a_tokenizer_without_eos_is_warned_about(tmp_path):
    """Its documents are joined with nothing between them: prepared, but said (issue 40)."""
    tok_path = bpe_tokenizer_json(tmp_path / "noeos.json", eos="<pad>")  # no usual end-of-text name
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS)
    said = []
    pd = prepare_data(DataConfig(path=str(corpus), tokenizer=str(tok_path)), 16, log=said.append)
    assert pd.tokenizer.eos is None
    (warning,) = [line for line in said if line.startswith("warning:")]
    assert "has no end-of-text token" in warning and "joined with nothing between them" in warning
