"""Data preparation: a corpus (data/sources.py) -> tokenizer + flat token files train.bin / val.bin.

Like nanoGPT's prepare.py, the corpus is tokenized once into a flat array of
token ids (raw uint16, or uint32 for vocabularies over 65536) that training
reads through np.memmap: no parsing, no RAM copy, random access to any window.

Layout (next to the data unless data.prepared_dir is set):

    data/tinyshakespeare.txt
    data/tinyshakespeare.nanotrain/char/      <- or bpe-2048/, one per tokenizer
        train.bin  val.bin  tokenizer.json  meta.json

meta.json holds a fingerprint of everything the output depends on. It is
written last, and removed before anything else is rewritten, so a crash midway
never leaves a preparation that looks finished. Re-running with the same
inputs only hashes the files and returns.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from nanotrain.atomic import atomic_write
from nanotrain.config import DataConfig
from nanotrain.data.sources import SourceFile, documents, find_sources, fingerprint_files
from nanotrain.data.tokenizer import (AnyTokenizer, DataError, PretrainedTokenizer, build_tokenizer, is_pretrained,
                                      load_tokenizer, text_chunks)

FORMAT_VERSION = 2  # bump when the on-disk format changes: old preparations are then redone


@dataclass
class PreparedData:
    dir: Path
    train_path: Path
    val_path: Path
    tokenizer_path: Path
    meta: dict
    tokenizer: AnyTokenizer
    vocab_size: int
    n_train_tokens: int
    n_val_tokens: int

    def tokens(self, split: str) -> np.memmap:
        """The token ids of "train" or "val" as a read-only memmap (pages load on demand)."""
        paths = {"train": self.train_path, "val": self.val_path}
        if split not in paths:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return np.memmap(paths[split], dtype=np.dtype(self.meta["dtype"]), mode="r")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id: half the disk and page cache of uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def prepare_data(cfg: DataConfig, seq_len: int, log: Callable[[str], None] = print) -> PreparedData:
    """Tokenize cfg.path into train/val token files, or reuse them if the inputs are unchanged.

    Every input problem raises DataError before anything is written.
    """
    t0 = time.perf_counter()
    files = find_sources(Path(cfg.path))
    pretrained = PretrainedTokenizer.load(cfg.tokenizer) if is_pretrained(cfg.tokenizer) else None
    fingerprint = _fingerprint(cfg, files, pretrained)
    out = _out_dir(cfg, pretrained)

    cached = _load_if_current(out, fingerprint)
    if cached is not None:
        _check_length(cached.n_train_tokens, cached.n_val_tokens, seq_len, cfg.val_fraction)
        log(f"data up to date: {out} ({cached.n_train_tokens:,} train + {cached.n_val_tokens:,} val tokens, "
            f"{_tokenizer_name(cfg, cached.tokenizer)} vocab {cached.vocab_size})")
        return cached

    # Read and tokenize; everything here may still fail, so nothing is written yet.
    docs = [d for f in files for d in documents(f, cfg.text_field)]
    if not any(docs):
        raise DataError(f"data.path={cfg.path!r} holds no text: its {len(docs)} document(s) are all empty. "
                        "Point data.path at a corpus with text in it.")
    tok = pretrained or build_tokenizer(cfg.tokenizer, "\n".join(docs), cfg.vocab_size)
    dtype = token_dtype(tok.vocab_size)
    ids, ends = _encode_documents(tok, docs, dtype)
    n_docs = len(docs)
    del docs
    # .txt files are running text (nanoGPT's corpora): cut by tokens. Rows are documents: whole.
    n_train = _split(len(ids), ends if any(f.kind != "txt" for f in files) else [], cfg.val_fraction)
    _check_length(n_train, len(ids) - n_train, seq_len, cfg.val_fraction)

    meta = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "tokenizer": _tokenizer_name(cfg, tok),
        "documents": n_docs,
        "text_field": cfg.text_field,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "n_train_tokens": n_train,
        "n_val_tokens": len(ids) - n_train,
        "val_fraction": cfg.val_fraction,
        "source": str(Path(cfg.path)),
        "files": [{"path": f.rel, "bytes": f.path.stat().st_size} for f in files],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # from here on, the folder is "not prepared"
    atomic_write(out / "train.bin", ids[:n_train].tofile)
    atomic_write(out / "val.bin", ids[n_train:].tofile)
    atomic_write(out / "tokenizer.json", lambda f: f.write(tok.to_json().encode("utf-8")))
    atomic_write(out / "meta.json", lambda f: f.write(json.dumps(meta, indent=2).encode("utf-8")))

    note = ""
    if cfg.tokenizer == "bpe" and tok.vocab_size < cfg.vocab_size:
        note = f" (asked for {cfg.vocab_size}: the corpus has too few distinct merges)"
    log(f"prepared {out}: {meta['n_train_tokens']:,} train + {meta['n_val_tokens']:,} val tokens, "
        f"{meta['tokenizer']} vocab {tok.vocab_size}{note}, {dtype.name}, "
        f"{len(files)} file(s), {n_docs:,} document(s), {time.perf_counter() - t0:.1f}s")
    return _result(out, meta, tok)


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------

def _fingerprint(cfg: DataConfig, files: list[SourceFile], pretrained: PretrainedTokenizer | None) -> str:
    """sha256 over everything the prepared output depends on: the files' names and bytes, the
    tokenizer (a pretrained one by its content), the text field, the split."""
    h = hashlib.sha256()
    vocab = cfg.vocab_size if cfg.tokenizer == "bpe" else 0
    kind = "pretrained:" + hashlib.sha256(pretrained.to_json().encode()).hexdigest() if pretrained else cfg.tokenizer
    h.update(f"nanotrain-data v{FORMAT_VERSION}|{kind}|{vocab}|{cfg.val_fraction!r}|{cfg.text_field}|".encode())
    fingerprint_files(h, files)
    return h.hexdigest()


def _tokenizer_name(cfg: DataConfig, tok: AnyTokenizer) -> str:
    return f"pretrained ({tok.name})" if isinstance(tok, PretrainedTokenizer) else cfg.tokenizer


def _out_dir(cfg: DataConfig, pretrained: PretrainedTokenizer | None) -> Path:
    if cfg.prepared_dir:
        return Path(cfg.prepared_dir)
    src = Path(cfg.path).resolve()
    if pretrained is not None:  # one folder per tokenizer content, named after its model
        key = f"{pretrained.name or 'tokenizer'}-{hashlib.sha256(pretrained.to_json().encode()).hexdigest()[:8]}"
    else:
        key = "char" if cfg.tokenizer == "char" else f"bpe-{cfg.vocab_size}"
    stem = src.stem if src.is_file() else src.name
    return src.parent / f"{stem}.nanotrain" / key


def _split(n: int, ends: list[int], val_fraction: float) -> int:
    """Train tokens: the first (1 - val_fraction) of the stream, as nanoGPT, moved to the nearest
    boundary between documents (`ends`: where each ends; a document is never split between train
    and val); with no documents to keep whole (running text, one document), exactly there."""
    target = int(n * (1 - val_fraction))
    inner = ends[:-1]  # the boundaries between documents
    if not inner:
        return target
    return min(inner, key=lambda e: (abs(e - target), e))


def _check_length(n_train: int, n_val: int, seq_len: int, val_fraction: float) -> None:
    """Each split must hold at least one window of seq_len inputs + 1 target."""
    if min(n_train, n_val) < seq_len + 1:
        raise DataError(
            f"corpus too short for train.seq_len={seq_len}: the train split has {n_train:,} tokens and the "
            f"val split {n_val:,} (data.val_fraction={val_fraction}); each needs at least seq_len + 1 = "
            f"{seq_len + 1}. Use a smaller train.seq_len, a different data.val_fraction, or more text.")


# ---------------------------------------------------------------------------
# Tokenizing and writing
# ---------------------------------------------------------------------------

def _encode_documents(tok: AnyTokenizer, docs: list[str], dtype: np.dtype) -> tuple[np.ndarray, list[int]]:
    """The token stream and where each document ends in it. A pretrained tokenizer ends each
    document with its EOS; a trained one (char, bpe) joins them with a newline, which belongs to
    the document before it. Short documents are encoded in batches (HF tokenizers' threads), a long
    text in ~1 MB pieces (_encode_long): memory stays bounded, a Python list of ints costing ~36
    bytes per token and the numpy array 2."""
    pretrained = isinstance(tok, PretrainedTokenizer)
    separator = np.asarray([] if pretrained else tok.encode("\n"), dtype=dtype)
    parts: list[np.ndarray] = []
    ends: list[int] = []
    batch: list[str] = []

    def add(ids: np.ndarray) -> None:
        if ends and separator.size:
            parts.append(separator)
            ends[-1] += separator.size
        parts.append(ids)
        ends.append((ends[-1] if ends else 0) + ids.size)

    def flush() -> None:
        for ids in tok.encode_documents(batch) if pretrained else tok.encode_batch(batch):
            add(np.asarray(ids, dtype=dtype))
        batch.clear()

    for doc in docs:
        if not pretrained and len(doc) > 1 << 20:
            flush()
            add(_encode_long(tok, doc, dtype))
            continue
        batch.append(doc)
        if len(batch) == 256:
            flush()
    flush()
    return (np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)), ends


def _encode_long(tok: AnyTokenizer, text: str, dtype: np.dtype) -> np.ndarray:
    """One long text in pieces cut where the ids are unaffected (text_chunks: GPT-2's byte-level
    split, which char and our BPE use; a pretrained tokenizer's own split may differ, so its
    documents are encoded whole)."""
    parts = []
    chunks = text_chunks(text)
    while group := list(itertools.islice(chunks, 16)):
        parts += [np.asarray(ids, dtype=dtype) for ids in tok.encode_batch(group)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _load_if_current(out: Path, fingerprint: str) -> PreparedData | None:
    """The existing preparation if it matches the fingerprint and its files are complete, else None."""
    try:
        meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
        if meta.get("fingerprint") != fingerprint:
            return None
        itemsize = np.dtype(meta["dtype"]).itemsize
        if ((out / "train.bin").stat().st_size != meta["n_train_tokens"] * itemsize
                or (out / "val.bin").stat().st_size != meta["n_val_tokens"] * itemsize):
            return None
        tok = load_tokenizer(out / "tokenizer.json")
    except (OSError, ValueError, KeyError, TypeError):  # missing/corrupt: prepare again (DataError is a ValueError)
        return None
    return _result(out, meta, tok)


def _result(out: Path, meta: dict, tok: AnyTokenizer) -> PreparedData:
    return PreparedData(dir=out, train_path=out / "train.bin", val_path=out / "val.bin",
                        tokenizer_path=out / "tokenizer.json", meta=meta, tokenizer=tok,
                        vocab_size=meta["vocab_size"], n_train_tokens=meta["n_train_tokens"],
                        n_val_tokens=meta["n_val_tokens"])
