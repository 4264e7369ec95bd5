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

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

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


def prepare_data(cfg: DataConfig, seq_len: int, log: Callable[[str], None] = print,
                 tokenizer: AnyTokenizer | None = None) -> PreparedData:
    """Tokenize cfg.path into train/val token files, or reuse them if the inputs are unchanged.
    `tokenizer`: use this one (a mixture's, shared by its corpora) instead of cfg.tokenizer's.

    Every input problem raises DataError before anything is written.
    """
    t0 = time.perf_counter()
    files = find_sources(Path(cfg.path))
    # A tokenizer known before reading the corpus: a model's own, or a mixture's shared one.
    given = tokenizer or (PretrainedTokenizer.load(cfg.tokenizer) if is_pretrained(cfg.tokenizer) else None)
    given_hash = hashlib.sha256(given.to_json().encode()).hexdigest() if given else ""  # (once: a model's is MBs)
    fingerprint = _fingerprint(cfg, files, given_hash)
    out = _out_dir(cfg, given, given_hash)

    cached = _load_if_current(out, fingerprint)
    if cached is not None:
        _check_length(cached.n_train_tokens, cached.n_val_tokens, seq_len, cfg.val_fraction)
        log(f"data up to date: {out} ({cached.n_train_tokens:,} train + {cached.n_val_tokens:,} val tokens, "
            f"{_tokenizer_name(cfg, cached.tokenizer)} vocab {cached.vocab_size})")
        return cached

    # Stream: the documents are read file by file and tokenized batch by batch into temporary
    # files in the output folder; memory holds one batch, not the corpus. The previous
    # preparation stays valid until the commit below, and a problem found midway (a bad line in
    # the last file) removes the temporary files: nothing prepared before is lost.
    tok = given or _train_tokenizer(cfg, files)
    dtype = token_dtype(tok.vocab_size)
    made = [d for d in [out, *out.parents] if not d.exists()]  # removed again if this fails
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".prepare.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    committed = False
    try:
        n, n_docs, chars = _write_tokens(tok, files, cfg.text_field, dtype, tmp, log)
        if not chars:
            raise DataError(f"data.path={cfg.path!r} holds no text: its {n_docs} document(s) are all empty. "
                            "Point data.path at a corpus with text in it.")
        # .txt files are running text (nanoGPT's corpora): cut by tokens. Rows are documents: whole.
        ends = np.fromfile(tmp / "ends.bin", dtype=np.int64) if any(f.kind != "txt" for f in files) else None
        n_train = _split(n, ends, cfg.val_fraction)
        del ends
        _check_length(n_train, n - n_train, seq_len, cfg.val_fraction)
        meta = {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "tokenizer": _tokenizer_name(cfg, tok),
            "documents": n_docs,
            "text_field": cfg.text_field,
            "vocab_size": tok.vocab_size,
            "dtype": dtype.name,
            "n_train_tokens": n_train,
            "n_val_tokens": n - n_train,
            "val_fraction": cfg.val_fraction,
            "source": str(Path(cfg.path)),
            "files": [{"path": f.rel, "bytes": f.path.stat().st_size} for f in files],
        }
        _split_file(tmp / "tokens.bin", n_train * dtype.itemsize, tmp / "val.bin")
        (out / "meta.json").unlink(missing_ok=True)  # from here on, the folder is "not prepared"
        os.replace(tmp / "tokens.bin", out / "train.bin")
        os.replace(tmp / "val.bin", out / "val.bin")
        committed = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in [] if committed else made:  # a failed first preparation leaves no empty folders
            with contextlib.suppress(OSError):
                d.rmdir()
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

def prepare_mixture(cfg: DataConfig, seq_len: int, log: Callable[[str], None] = print,
                    tokenizer: PretrainedTokenizer | None = None
                    ) -> tuple[AnyTokenizer, list[tuple[PreparedData, float]]]:
    """data.sources: each corpus prepared on its own, all with one tokenizer (a model's own, or
    char/bpe trained on all of them together, kept beside the first corpus). `tokenizer`: the
    model's own, already loaded. Returns the tokenizer and (prepared corpus, weight) pairs."""
    pairs = cfg.mixture()
    files = [find_sources(Path(path)) for path, _ in pairs]
    if is_pretrained(cfg.tokenizer):
        tok: AnyTokenizer = tokenizer or PretrainedTokenizer.load(cfg.tokenizer)
    else:
        h = hashlib.sha256(f"mixture|{cfg.tokenizer}|{cfg.vocab_size if cfg.tokenizer == 'bpe' else 0}|"
                           f"{cfg.text_field}|".encode())
        fingerprint_files(h, [f for fs in files for f in fs])
        home = Path(cfg.prepared_dir) if cfg.prepared_dir else Path(pairs[0][0]).resolve().parent / "mixture.nanotrain"
        saved = home / f"{cfg.tokenizer}-{h.hexdigest()[:16]}" / "tokenizer.json"
        if saved.is_file():
            tok = load_tokenizer(saved)
        else:
            tok = _train_tokenizer(cfg, [f for fs in files for f in fs])
            saved.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(saved, lambda f: f.write(tok.to_json().encode("utf-8")))
    out = []
    for i, (path, weight) in enumerate(pairs):
        own = dataclasses.replace(cfg, path=path, sources=[],
                                  prepared_dir=str(Path(cfg.prepared_dir) / f"{i}-{Path(path).stem}")
                                  if cfg.prepared_dir else "")
        out.append((prepare_data(own, seq_len, log, tokenizer=tok), weight))
    return tok, out


def _fingerprint(cfg: DataConfig, files: list[SourceFile], given_hash: str) -> str:
    """sha256 over everything the prepared output depends on: the files' names and bytes, the
    tokenizer (one given or a model's own: by its content), the text field, the split."""
    h = hashlib.sha256()
    vocab = cfg.vocab_size if cfg.tokenizer == "bpe" else 0
    kind = "given:" + given_hash if given_hash else cfg.tokenizer
    h.update(f"nanotrain-data v{FORMAT_VERSION}|{kind}|{vocab}|{cfg.val_fraction!r}|{cfg.text_field}|".encode())
    fingerprint_files(h, files)
    return h.hexdigest()


def _tokenizer_name(cfg: DataConfig, tok: AnyTokenizer) -> str:
    return f"pretrained ({tok.name})" if isinstance(tok, PretrainedTokenizer) else cfg.tokenizer


def _out_dir(cfg: DataConfig, given: AnyTokenizer | None, given_hash: str) -> Path:
    if cfg.prepared_dir:
        return Path(cfg.prepared_dir)
    src = Path(cfg.path).resolve()
    if given is not None:  # one folder per tokenizer content (a model's: named after it; a mixture's)
        name = given.name if isinstance(given, PretrainedTokenizer) else f"mixture-{given.kind}"
        key = f"{name or 'tokenizer'}-{given_hash[:8]}"
    else:
        key = "char" if cfg.tokenizer == "char" else f"bpe-{cfg.vocab_size}"
    stem = src.stem if src.is_file() else src.name
    return src.parent / f"{stem}.nanotrain" / key


def _split(n: int, ends: np.ndarray | None, val_fraction: float) -> int:
    """Train tokens: the first (1 - val_fraction) of the stream, as nanoGPT, moved to the nearest
    boundary between documents (`ends`: where each ends; a document is never split between train
    and val); with no documents to keep whole (running text, one document), exactly there."""
    target = int(n * (1 - val_fraction))
    if ends is None or len(ends) < 2:
        return target
    inner = ends[:-1]  # the boundaries between documents, ascending
    i = int(np.searchsorted(inner, target))
    near = [int(inner[j]) for j in (i - 1, i) if 0 <= j < len(inner)]
    return min(near, key=lambda e: (abs(e - target), e))


def _check_length(n_train: int, n_val: int, seq_len: int, val_fraction: float) -> None:
    """Each split must hold at least one window of seq_len inputs + 1 target."""
    if min(n_train, n_val) < seq_len + 1:
        raise DataError(
            f"corpus too short for train.seq_len={seq_len}: the train split has {n_train:,} tokens and the "
            f"val split {n_val:,} (data.val_fraction={val_fraction}); each needs at least seq_len + 1 = "
            f"{seq_len + 1}. Use a smaller train.seq_len, a different data.val_fraction, or more text.")


def _split_file(path: Path, cut: int, tail: Path) -> None:
    """Move the bytes of `path` from `cut` on into `tail` (the val split: ~10%), then cut `path` there."""
    with open(path, "rb") as src, open(tail, "wb") as dst:
        src.seek(cut)
        shutil.copyfileobj(src, dst, 1 << 20)
    os.truncate(path, cut)


# ---------------------------------------------------------------------------
# Tokenizing and writing
# ---------------------------------------------------------------------------

BATCH_CHARS = 1 << 20  # documents are tokenized in batches of about this much text


def _batches(files: list[SourceFile], field: str) -> Iterator[list[str]]:
    """The documents in batches of about BATCH_CHARS of text; a longer document alone. (Reading
    on a thread of its own while the batch before is encoded measured no faster: 12.0 s either
    way for 104 MB on 2 cores, bench/prepare.py, tokenizers' Rust threads already busy both.)"""
    batch: list[str] = []
    size = 0
    for f in files:
        for doc in documents(f, field):
            if batch and size + len(doc) > BATCH_CHARS:
                yield batch
                batch, size = [], 0
            batch.append(doc)
            size += len(doc)
    if batch:
        yield batch


def _train_tokenizer(cfg: DataConfig, files: list[SourceFile]) -> AnyTokenizer:
    """char or bpe, trained on the corpus as it streams by (the documents joined by newlines)."""
    def text() -> Iterator[str]:
        first = True
        for batch in _batches(files, cfg.text_field):
            for doc in batch:
                if not first:
                    yield "\n"
                first = False
                yield from text_chunks(doc)

    return build_tokenizer(cfg.tokenizer, text(), cfg.vocab_size)


def _write_tokens(tok: AnyTokenizer, files: list[SourceFile], field: str, dtype: np.dtype, folder: Path,
                  log: Callable[[str], None]) -> tuple[int, int, int]:
    """Tokenize the documents into folder/tokens.bin and where each ends into folder/ends.bin (int64).
    A pretrained tokenizer ends each document with its EOS; a trained one (char, bpe) joins them
    with a newline, which belongs to the document before it. Short documents are encoded in
    batches (HF tokenizers' threads), a long text in ~1 MB pieces (_encode_long). Returns (tokens,
    documents, characters)."""
    pretrained = isinstance(tok, PretrainedTokenizer)
    separator = np.asarray([] if pretrained else tok.encode("\n"), dtype=dtype)
    total_bytes = sum(f.path.stat().st_size for f in files)
    n = n_docs = chars = 0
    end = None  # the end of the last document, written once we know whether a separator follows
    start = last_report = time.perf_counter()
    with open(folder / "tokens.bin", "wb") as out, open(folder / "ends.bin", "wb") as ends:
        for batch in _batches(files, field):
            if not pretrained and len(batch) == 1 and len(batch[0]) > BATCH_CHARS:
                encoded = [_encode_long(tok, batch[0], dtype)]
            else:
                encoded = tok.encode_documents(batch) if pretrained else tok.encode_batch(batch)
            for ids in encoded:
                if end is not None:
                    if separator.size:
                        separator.tofile(out)
                        n += separator.size
                    np.asarray([n], dtype=np.int64).tofile(ends)
                np.asarray(ids, dtype=dtype).tofile(out)
                n += len(ids)
                end = n
            n_docs += len(batch)
            chars += sum(len(d) for d in batch)
            now = time.perf_counter()
            if now - last_report > 5:  # long work shows progress
                last_report = now
                # (text read so far; the files are `total_bytes`, markup included)
                log(f"prepare: {chars / 2**20:,.0f} MB of text of {total_bytes / 2**20:,.0f} MB of files, "
                    f"{n:,} tokens, {chars / 2**20 / (now - start):.1f} MB/s")
        if end is not None:
            np.asarray([end], dtype=np.int64).tofile(ends)
    return n, n_docs, chars


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
