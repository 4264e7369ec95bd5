"""Data preparation: text file(s) -> tokenizer + flat token files train.bin / val.bin.

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
from nanotrain.data.tokenizer import AnyTokenizer, DataError, build_tokenizer, load_tokenizer, text_chunks

FORMAT_VERSION = 1  # bump when the on-disk format changes: old preparations are then redone


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
    files = _find_files(Path(cfg.path))
    blobs = [_read(path) for _, path in files]
    fingerprint = _fingerprint(cfg, [(rel, b) for (rel, _), b in zip(files, blobs)])
    out = _out_dir(cfg)

    cached = _load_if_current(out, fingerprint)
    if cached is not None:
        _check_length(cached.n_train_tokens, cached.n_val_tokens, seq_len, cfg.val_fraction)
        log(f"data up to date: {out} ({cached.n_train_tokens:,} train + {cached.n_val_tokens:,} val tokens, "
            f"{cached.meta['tokenizer']} vocab {cached.vocab_size})")
        return cached

    # Decode and tokenize; everything here may still fail, so nothing is written yet.
    text = "\n".join(_decode(path, b) for (_, path), b in zip(files, blobs))
    del blobs
    tok = build_tokenizer(cfg.tokenizer, text, cfg.vocab_size)
    dtype = token_dtype(tok.vocab_size)
    ids = _encode(tok, text, dtype)
    n_train = int(len(ids) * (1 - cfg.val_fraction))  # first 90% train, last 10% val, as nanoGPT
    _check_length(n_train, len(ids) - n_train, seq_len, cfg.val_fraction)

    meta = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "tokenizer": cfg.tokenizer,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "n_train_tokens": n_train,
        "n_val_tokens": len(ids) - n_train,
        "val_fraction": cfg.val_fraction,
        "source": str(Path(cfg.path)),
        "files": [{"path": rel, "bytes": path.stat().st_size} for rel, path in files],
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
        f"{cfg.tokenizer} vocab {tok.vocab_size}{note}, {dtype.name}, "
        f"{len(files)} file(s), {time.perf_counter() - t0:.1f}s")
    return _result(out, meta, tok)


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------

def _find_files(path: Path) -> list[tuple[str, Path]]:
    """(relative name, path) of the corpus files, in a stable order (sorted by relative path)."""
    if not path.exists():
        raise DataError(f"data.path={str(path)!r} does not exist (looked in {Path.cwd()}). Point data.path at "
                        "a .txt file or a folder of .txt files; the default corpus is data/tinyshakespeare.txt, "
                        "relative to the repository root (run from there, or give an absolute path).")
    if path.is_file():
        return [(path.name, path)]
    try:
        files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*.txt") if p.is_file())
    except PermissionError as e:
        raise DataError(f"cannot list {e.filename or path}: permission denied. Fix its permissions "
                        "(chmod u+rx) or point data.path elsewhere.") from None
    if not files:
        raise DataError(f"data.path={str(path)!r} is a folder with no .txt files (searched recursively). "
                        "Add .txt files to it or point data.path at a .txt file.")
    return files


def _read(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except PermissionError:
        raise DataError(f"cannot read {path}: permission denied. Fix its permissions (chmod u+r {path}) "
                        "or remove it from data.path.") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}. Check the file, or remove it from data.path.") from None
    if not data:
        raise DataError(f"{path} is empty (0 bytes): put text in it or remove it from data.path.")
    return data


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8: byte 0x{data[e.start]:02x} at byte offset {e.start} "
                        f"({e.reason}). Convert the file to UTF-8, e.g. "
                        f"`iconv -f latin1 -t utf-8 {path} > fixed.txt`.") from None


def _fingerprint(cfg: DataConfig, files: list[tuple[str, bytes]]) -> str:
    """sha256 over everything the prepared output depends on (length-prefixed: no ambiguity)."""
    h = hashlib.sha256()
    vocab = cfg.vocab_size if cfg.tokenizer == "bpe" else 0
    h.update(f"nanotrain-data v{FORMAT_VERSION}|{cfg.tokenizer}|{vocab}|{cfg.val_fraction!r}|".encode())
    for rel, data in files:
        name = rel.encode("utf-8")
        h.update(len(name).to_bytes(8, "little") + name + len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _out_dir(cfg: DataConfig) -> Path:
    if cfg.prepared_dir:
        return Path(cfg.prepared_dir)
    src = Path(cfg.path).resolve()
    key = "char" if cfg.tokenizer == "char" else f"bpe-{cfg.vocab_size}"
    stem = src.stem if src.is_file() else src.name
    return src.parent / f"{stem}.nanotrain" / key


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

def _encode(tok: AnyTokenizer, text: str, dtype: np.dtype) -> np.ndarray:
    """Encode in ~1 MB pieces (cut where ids are unaffected) so memory stays bounded:
    a Python list of ints costs ~36 bytes per token, the numpy array 2."""
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
