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
from nanotrain.data.shards import ShardWriter, TokenShards
from nanotrain.data.sources import SourceFile, documents, find_sources, fingerprint_files
from nanotrain.data.tokenizer import (AnyTokenizer, DataError, PretrainedTokenizer, build_tokenizer, is_pretrained,
                                      load_tokenizer, text_chunks)

FORMAT_VERSION = 4  # bump when the on-disk format changes: old preparations are then redone


@dataclass
class PreparedData:
    dir: Path
    files: dict[str, list[Path]]  # "train"/"val" -> its token files: [<split>.bin], or its shards in order
    tokenizer_path: Path
    meta: dict
    tokenizer: AnyTokenizer
    vocab_size: int
    n_train_tokens: int
    n_val_tokens: int

    @property
    def train_path(self) -> Path:
        return self.files["train"][0]

    def tokens(self, split: str) -> np.memmap | TokenShards:
        """The token ids of "train" or "val", read-only by memory map (pages load on demand): one
        memmap, or the shards (data.shard_tokens) read as one sequence (data/shards.py)."""
        if split not in self.files:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        parts = [np.memmap(f, dtype=np.dtype(self.meta["dtype"]), mode="r") for f in self.files[split]]
        return parts[0] if len(parts) == 1 else TokenShards(parts)


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
    cfg = _shipped_corpus(cfg, log)
    files = find_sources(Path(cfg.path))
    # A tokenizer known before reading the corpus: a model's own, or a mixture's shared one.
    given = tokenizer or (PretrainedTokenizer.load(cfg.tokenizer) if is_pretrained(cfg.tokenizer) else None)
    given_hash = hashlib.sha256(given.to_json().encode()).hexdigest() if given else ""  # (once: a model's is MBs)
    fingerprint = _fingerprint(cfg, files, given_hash)
    out = _out_dir(cfg, given, given_hash)

    cached = _load_if_current(out, fingerprint, log=lambda _: None)  # (said below, once, if it must be redone)
    if cached is None:
        # One preparation of a corpus at a time: a second process (another `prepare`, a second run
        # on a new corpus) waits here, then finds the first one's result.
        with corpus_lock(Path(cfg.path), log):
            cached = _load_if_current(out, fingerprint, log)
            if cached is None:
                return _prepare(cfg, seq_len, log, files, given, fingerprint, out, t0)
    _check_length(cached.n_train_tokens, cached.n_val_tokens, seq_len, cfg.val_fraction)
    log(f"data up to date: {out} ({cached.n_train_tokens:,} train + {cached.n_val_tokens:,} val tokens, "
        f"{_tokenizer_name(cfg, cached.tokenizer)} vocab {cached.vocab_size})")
    return cached


def _shipped_corpus(cfg: DataConfig, log: Callable[[str], None]) -> DataConfig:
    """A relative data.path that is not here but is a corpus nano-train ships (the default,
    data/tinyshakespeare.txt, run from outside the checkout): the shipped copy, said in one line.
    Its tokens go where the relative path would have put them (data/tinyshakespeare.nanotrain/ here),
    not beside the installed package."""
    from ..shipped import shipped

    path = Path(cfg.path)
    bundled = shipped(path) if not path.is_absolute() and not path.exists() else None
    if bundled is None or bundled.resolve() == path.resolve():
        return cfg
    prepared = cfg.prepared_dir or str(path.parent / f"{path.stem}.nanotrain" / _trained_key(cfg))
    log(f"data.path={cfg.path} is not in {Path.cwd()}: using the copy shipped with nano-train ({bundled}), "
        f"prepared into {prepared}")
    return dataclasses.replace(cfg, path=str(bundled), prepared_dir=prepared)


@contextlib.contextmanager
def corpus_lock(path: Path, log: Callable[[str], None]):
    """Hold an exclusive lock on the corpus (flock on the file or folder itself: nothing is created,
    and the kernel releases it when its holder dies, so no lock is ever left stale). Where the
    filesystem has no locks (some network ones), preparation goes on unlocked."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process preparing {path} ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # no locks here (ENOLCK)
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _prepare(cfg: DataConfig, seq_len: int, log, files, given, fingerprint: str, out: Path, t0: float
             ) -> PreparedData:
    """Tokenize the corpus into out/ (the caller holds the corpus's lock)."""
    # Stream: the documents are read file by file and tokenized batch by batch into temporary
    # files in the output folder; memory holds one batch, not the corpus. The previous
    # preparation stays valid until the commit below, and a problem found midway (a bad line in
    # the last file) removes the temporary files: nothing prepared before is lost.
    _check_shards(cfg, files)
    tok = given or _train_tokenizer(cfg, files)
    if isinstance(tok, PretrainedTokenizer) and tok.eos_id is None:
        log(f"warning: the tokenizer {_tokenizer_name(cfg, tok)} has no end-of-text token (no eos_token in its "
            "tokenizer_config.json, none of the usual names in its vocabulary): the documents of "
            f"{cfg.path} are joined with nothing between them, so a sequence can run from one into the next "
            "unmarked. Use a tokenizer with an EOS token if the documents are separate texts.")
    dtype = token_dtype(tok.vocab_size)
    made = [d for d in [out, *out.parents] if not d.exists()]  # removed again if this fails
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".prepare.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    committed = False
    writer = ShardWriter(tmp, dtype, cfg.shard_tokens)
    try:
        n, n_docs, chars = _write_tokens(tok, files, cfg.text_field, writer, tmp / "ends.bin", log,
                                         cfg.prepare_workers)
        if not chars:
            raise DataError(f"data.path={cfg.path!r} holds no text: its {n_docs} document(s) are all empty. "
                            "Point data.path at a corpus with text in it.")
        # .txt files are running text (nanoGPT's corpora): cut by tokens. Rows are documents: whole.
        ends = np.fromfile(tmp / "ends.bin", dtype=np.int64) if any(f.kind != "txt" for f in files) else None
        n_train = _split(n, ends, cfg.val_fraction)
        del ends
        _check_length(n_train, n - n_train, seq_len, cfg.val_fraction)
        meta = _meta(cfg, files, fingerprint, tok, dtype, n_docs, n_train, n - n_train)
        (out / "meta.json").unlink(missing_ok=True)  # from here on, the folder is "not prepared"
        for old in [*out.glob("train*.bin"), *out.glob("val*.bin")]:  # a previous preparation's (shards)
            old.unlink()
        meta["token_files"] = writer.split(n_train, out, sharded=cfg.shard_tokens > 0)
        meta["checks"] = {name: _file_check(out / name, dtype) for split in ("train", "val")
                          for name, _ in meta["token_files"][split]}
        meta["max_id"] = max((c["max_id"] for c in meta["checks"].values()), default=-1)
        committed = True
    finally:
        writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        for d in [] if committed else made:  # a failed first preparation leaves no empty folders
            with contextlib.suppress(OSError):
                d.rmdir()
    atomic_write(out / "tokenizer.json", lambda f: f.write(tok.to_json().encode("utf-8")))
    atomic_write(out / "meta.json", lambda f: f.write(json.dumps(meta, indent=2).encode("utf-8")))

    log(_prepared_line(cfg, out, meta, tok, len(files), time.perf_counter() - t0))
    return _result(out, meta, tok)


MAX_SHARD_FILES = 100_000  # token files one preparation may write (a folder beyond that is hard to use)


def _check_shards(cfg: DataConfig, files: list[SourceFile]) -> None:
    """Refuse a data.shard_tokens that would write more than MAX_SHARD_FILES files, before any work:
    a corpus has at most one token per byte (a character or more each), so its bytes bound the count."""
    if not cfg.shard_tokens:
        return
    most = sum(f.path.stat().st_size for f in files) // cfg.shard_tokens
    if most > MAX_SHARD_FILES:
        raise DataError(f"data.shard_tokens={cfg.shard_tokens:,} would cut {cfg.path} ({most * cfg.shard_tokens:,} "
                        f"bytes) into up to {most:,} token files: give shards of at least "
                        f"{-(-most * cfg.shard_tokens // MAX_SHARD_FILES):,} tokens (e.g. 100000000), or 0 for "
                        "one file per split.")


def _meta(cfg: DataConfig, files, fingerprint: str, tok, dtype, n_docs: int, n_train: int, n_val: int) -> dict:
    """meta.json of a preparation (token_files is added once the shards are in place)."""
    return {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "tokenizer": _tokenizer_name(cfg, tok),
        "documents": n_docs,
        "text_field": cfg.text_field,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "n_train_tokens": n_train,
        "n_val_tokens": n_val,
        "val_fraction": cfg.val_fraction,
        "shard_tokens": cfg.shard_tokens,
        "source": str(Path(cfg.path)),
        "files": [{"path": f.rel, "bytes": f.path.stat().st_size} for f in files],
    }


def _prepared_line(cfg: DataConfig, out: Path, meta: dict, tok, n_files: int, seconds: float) -> str:
    note = ""
    if cfg.tokenizer == "bpe" and tok.vocab_size < cfg.vocab_size:
        note = f" (asked for {cfg.vocab_size}: the corpus has too few distinct merges)"
    shards = f", {len(meta['token_files']['train'])} + {len(meta['token_files']['val'])} shards" \
        if cfg.shard_tokens else ""
    return (f"prepared {out}: {meta['n_train_tokens']:,} train + {meta['n_val_tokens']:,} val tokens, "
            f"{meta['tokenizer']} vocab {tok.vocab_size}{note}, {meta['dtype']}{shards}, "
            f"{n_files} file(s), {meta['documents']:,} document(s), {seconds:.1f}s")


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
    h.update(f"nanotrain-data v{FORMAT_VERSION}|{kind}|{vocab}|{cfg.val_fraction!r}|{cfg.text_field}|"
             f"{cfg.shard_tokens}|".encode())
    fingerprint_files(h, files)
    return h.hexdigest()


def _tokenizer_name(cfg: DataConfig, tok: AnyTokenizer) -> str:
    return f"pretrained ({tok.name})" if isinstance(tok, PretrainedTokenizer) else cfg.tokenizer


def _trained_key(cfg: DataConfig) -> str:
    """The folder of a preparation with a tokenizer trained on the corpus: char/ or bpe-<vocab>/."""
    return "char" if cfg.tokenizer == "char" else f"bpe-{cfg.vocab_size}"


def _out_dir(cfg: DataConfig, given: AnyTokenizer | None, given_hash: str) -> Path:
    if cfg.prepared_dir:
        return Path(cfg.prepared_dir)
    src = Path(cfg.path).resolve()
    if given is not None:  # one folder per tokenizer content (a model's: named after it; a mixture's)
        name = given.name if isinstance(given, PretrainedTokenizer) else f"mixture-{given.kind}"
        key = f"{name or 'tokenizer'}-{given_hash[:8]}"
    else:
        key = _trained_key(cfg)
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


def _write_tokens(tok: AnyTokenizer, files: list[SourceFile], field: str, writer: ShardWriter, ends_path: Path,
                  log: Callable[[str], None], workers: int = 0) -> tuple[int, int, int]:
    """Tokenize the documents into the writer's files and where each ends into ends_path (int64).
    A pretrained tokenizer ends each document with its EOS; a trained one (char, bpe) joins them
    with a newline, which belongs to the document before it. `workers` processes encode the
    batches (0: this one; data.prepare_workers). Returns (tokens, documents, characters)."""
    pretrained = isinstance(tok, PretrainedTokenizer)
    separator = None  # encoded at the second document: a one-document corpus needs no joiner (nor has it)
    total_bytes = sum(f.path.stat().st_size for f in files)
    n = n_docs = chars = 0
    end = None  # the end of the last document, written once we know whether a separator follows
    start = last_report = time.perf_counter()
    with open(ends_path, "wb") as ends:
        for n_batch, n_chars, encoded in _encoded(tok, _batches(files, field), writer.dtype, workers):
            for ids in encoded:
                if end is not None:
                    if separator is None:
                        separator = np.asarray([] if pretrained else tok.encode("\n"), dtype=writer.dtype)
                    if separator.size:
                        writer.write(separator)
                        n += separator.size
                    np.asarray([n], dtype=np.int64).tofile(ends)
                writer.write(ids)
                n += len(ids)
                end = n
            n_docs += n_batch
            chars += n_chars
            now = time.perf_counter()
            if now - last_report > 5:  # long work shows progress
                last_report = now
                log(_progress(chars, total_bytes, n, now - start))
        if end is not None:
            np.asarray([end], dtype=np.int64).tofile(ends)
    return n, n_docs, chars


def _progress(chars: int, total_bytes: int, n: int, seconds: float) -> str:
    """A progress line. The files' bytes include markup (JSON keys, parquet's encoding), so the
    text read so far is a lower bound of how far the reading is: the bar ends below 100%."""
    done = min(1.0, chars / max(total_bytes, 1))
    bar = "#" * int(30 * done) + "." * (30 - int(30 * done))
    return (f"prepare [{bar}] {chars / 2**20:,.0f} MB of text of {total_bytes / 2**20:,.0f} MB of files, "
            f"{n:,} tokens, {chars / 2**20 / seconds:.1f} MB/s")


def _encode(tok: AnyTokenizer, batch: list[str], dtype: np.dtype) -> tuple[int, int, list[np.ndarray]]:
    """One batch: (documents, characters, each document's ids). Short documents are encoded
    together (HF tokenizers' threads), a long text in ~1 MB pieces (_encode_long)."""
    if isinstance(tok, PretrainedTokenizer):
        encoded = tok.encode_documents(batch)
    elif len(batch) == 1 and len(batch[0]) > BATCH_CHARS:
        encoded = [_encode_long(tok, batch[0], dtype)]
    else:
        encoded = tok.encode_batch(batch)
    return len(batch), sum(len(d) for d in batch), [np.asarray(ids, dtype=dtype) for ids in encoded]


def _encoded(tok: AnyTokenizer, batches: Iterator[list[str]], dtype: np.dtype, workers: int
             ) -> Iterator[tuple[int, int, list[np.ndarray]]]:
    """_encode of each batch, in order: here, or by `workers` processes. At most two batches per
    worker are in flight, so memory holds a few MB of text whatever the corpus (Pool.imap would
    read the whole corpus ahead into its queue). The order is the batches', so the token files are
    the same for any number of workers. (torch.utils.data.DataLoader with num_workers would do the
    same for a map over an iterable; this is the one pool prepare needs.)"""
    if workers <= 0:
        for batch in batches:
            yield _encode(tok, batch, dtype)
        return
    from collections import deque

    from nanotrain.parallel.launch import _context  # processes from a clean forkserver, not forks of this one

    with _context().Pool(workers, initializer=_start_worker, initargs=(tok.to_json(), dtype.str)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


_worker: tuple[AnyTokenizer, np.dtype] | None = None  # a worker process's tokenizer and dtype


def _start_worker(tokenizer_json: str, dtype: str) -> None:
    global _worker
    # One thread each: the workers are the parallelism (HF tokenizers would otherwise start a
    # thread per core in every worker).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from nanotrain.data.tokenizer import tokenizer_from_json

    _worker = (tokenizer_from_json(tokenizer_json), np.dtype(dtype))


def _encode_in_worker(batch: list[str]) -> tuple[int, int, list[np.ndarray]]:
    return _encode(_worker[0], batch, _worker[1])


def _encode_long(tok: AnyTokenizer, text: str, dtype: np.dtype) -> np.ndarray:
    """One long text in pieces cut where the ids are unaffected (text_chunks: GPT-2's byte-level
    split, which char and our BPE use; a pretrained tokenizer's own split may differ, so its
    documents are encoded whole)."""
    parts = []
    chunks = text_chunks(text)
    while group := list(itertools.islice(chunks, 16)):
        parts += [np.asarray(ids, dtype=dtype) for ids in tok.encode_batch(group)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _load_if_current(out: Path, fingerprint: str, log: Callable[[str], None] = print) -> PreparedData | None:
    """The existing preparation if it matches the fingerprint and its token files are the ones it
    wrote (their sizes; where a file was modified since, its checksum; every id inside the
    vocabulary), else None: prepare again."""
    try:
        meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
        if meta.get("fingerprint") != fingerprint:
            return None
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in ("train", "val"):
            listed = meta["token_files"][split]
            if sum(n for _, n in listed) != meta[f"n_{split}_tokens"] or \
                    any((out / name).stat().st_size != n * itemsize for name, n in listed):
                log(f"warning: {out}: a token file's size is not what meta.json says: preparing again")
                return None
        changed = [name for name, check in meta["checks"].items() if not _same_file(out / name, check)]
        if changed:
            log(f"warning: {out / changed[0]} changed since it was prepared (its checksum differs): preparing again")
            return None
        tok = load_tokenizer(out / "tokenizer.json")
        if not meta["max_id"] < tok.vocab_size == meta["vocab_size"]:
            log(f"warning: {out}: token id {meta['max_id']} does not fit the vocabulary of {tok.vocab_size}: "
                "preparing again")
            return None
    except (OSError, ValueError, KeyError, TypeError):  # missing/corrupt: prepare again (DataError is a ValueError)
        return None
    return _result(out, meta, tok)


def _file_check(path: Path, dtype: np.dtype) -> dict:
    """What a token file must still be when it is used: its checksum, the time it was last written
    (a file not written since need not be read again to trust it), and its largest token id."""
    tokens = np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)
    top = max((int(tokens[i:i + (1 << 24)].max()) for i in range(0, len(tokens), 1 << 24)), default=-1)
    del tokens
    return {"sha256": _sha256(path), "mtime_ns": path.stat().st_mtime_ns, "max_id": top}


def _same_file(path: Path, check: dict) -> bool:
    """Unchanged since _file_check: not written since, or written with the same bytes (a copy)."""
    return path.stat().st_mtime_ns == check["mtime_ns"] or _sha256(path) == check["sha256"]


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _result(out: Path, meta: dict, tok: AnyTokenizer) -> PreparedData:
    files = {split: [out / name for name, _ in meta["token_files"][split]] for split in ("train", "val")}
    return PreparedData(dir=out, files=files, tokenizer_path=out / "tokenizer.json", meta=meta, tokenizer=tok,
                        vocab_size=meta["vocab_size"], n_train_tokens=meta["n_train_tokens"],
                        n_val_tokens=meta["n_val_tokens"])
