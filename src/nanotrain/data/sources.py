"""Corpus sources: the documents of data.path, whatever the files they come in.

    .txt                     running text: the whole file (tiny Shakespeare), split between train
                             and val by tokens, as nanoGPT does
    .jsonl / .json           one JSON object a line; its data.text_field is a document
    .parquet                 each row's data.text_field column is a document (pyarrow)
    a `datasets` folder      what datasets.Dataset.save_to_disk writes: Arrow stream files
                             (data-00000-of-00001.arrow, ...) beside dataset_info.json/state.json
    a folder                 any of these, found recursively, in sorted order

Each file is read as a stream of documents (a parquet or Arrow file batch by batch, a jsonl file
line by line), so a file need not fit in memory to be read. Every problem is a DataError naming
the file (and line) and the fix, raised before anything is written.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .tokenizer import DataError

KINDS = {".txt": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}
DATASET_MARKERS = ("dataset_info.json", "state.json")  # datasets.Dataset.save_to_disk's folder


@dataclass(frozen=True)
class SourceFile:
    rel: str  # the name under data.path (the order and the fingerprint use it)
    path: Path
    kind: str  # txt | jsonl | parquet | arrow


def find_sources(path: Path) -> list[SourceFile]:
    """The corpus files of data.path, sorted by their name under it."""
    if not path.exists():
        raise DataError(f"data.path={str(path)!r} does not exist (looked in {Path.cwd()}). Point data.path at "
                        "a .txt, .jsonl or .parquet file, a `datasets` folder, or a folder of them; the default "
                        "corpus is data/tinyshakespeare.txt, relative to the repository root (run from there, or "
                        "give an absolute path).")
    if path.exists() and not path.is_file() and not path.is_dir():
        raise DataError(f"data.path={str(path)!r} is not a regular file or a folder (a pipe, socket or device): a "
                        "corpus is read twice (its fingerprint, then its text), which a stream cannot give. Save it "
                        "to a .txt, .jsonl or .parquet file and point data.path there.")
    if path.is_file():
        kind = KINDS.get(path.suffix.lower())
        if kind is None or kind == "arrow":
            raise DataError(f"data.path={str(path)!r}: {path.suffix or 'no suffix'} is not a corpus format. Use "
                            ".txt, .jsonl (.json: one object a line) or .parquet, or the folder that "
                            "datasets.Dataset.save_to_disk wrote.")
        return [SourceFile(path.name, path, kind)]
    try:
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in KINDS)
    except PermissionError as e:
        raise DataError(f"cannot list {e.filename or path}: permission denied. Fix its permissions "
                        "(chmod u+rx) or point data.path elsewhere.") from None
    # Arrow files count inside a `datasets` folder only (elsewhere they may be anyone's cache);
    # its JSON files describe the dataset and are no documents.
    datasets = {p.parent for p in found if p.suffix.lower() == ".arrow" and _is_dataset(p.parent)}
    files = [SourceFile(p.relative_to(path).as_posix(), p, KINDS[p.suffix.lower()]) for p in found
             if (p.parent in datasets) == (p.suffix.lower() == ".arrow") and not
             (p.parent in datasets and p.name in DATASET_MARKERS)]
    if not files:
        raise DataError(f"data.path={str(path)!r} is a folder with no corpus files (searched recursively for .txt, "
                        ".jsonl, .json, .parquet and `datasets` folders). Add some or point data.path at one.")
    return files


def _is_dataset(folder: Path) -> bool:
    return any((folder / m).is_file() for m in DATASET_MARKERS)


def fingerprint_files(h: "hashlib._Hash", files: list[SourceFile]) -> None:
    """Add each file's name, size and content digest to h (length-prefixed: no ambiguity)."""
    for f in files:
        name = f.rel.encode("utf-8")
        stat = f.path.stat()
        h.update(len(name).to_bytes(8, "little") + name + stat.st_size.to_bytes(8, "little"))
        h.update(_digest(f.path, stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=4096)
def _digest(path: Path, size: int, mtime_ns: int) -> bytes:
    """sha256 of a file, read in 1 MB blocks; once per (path, size, modification time) in a process
    (a mixture's shared tokenizer and each of its corpora fingerprint the same files)."""
    h = hashlib.sha256()
    with _reading(path):
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.digest()


@contextlib.contextmanager
def _reading(path: Path):
    """A file that cannot be read is a DataError naming it and the fix."""
    try:
        yield
    except PermissionError:
        raise DataError(f"cannot read {path}: permission denied. Fix its permissions (chmod u+r {path}) "
                        "or remove it from data.path.") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}. Check the file, or remove it from "
                        "data.path.") from None


def documents(f: SourceFile, text_field: str = "text") -> Iterator[str]:
    """The documents of one file, in order."""
    if f.kind == "txt":
        yield _txt(f.path)
    elif f.kind == "jsonl":
        yield from _jsonl(f.path, text_field)
    else:
        yield from _columnar(f, text_field)


def _txt(path: Path) -> str:
    with _reading(path):
        data = path.read_bytes()
    if not data:
        raise DataError(f"{path} is empty (0 bytes): put text in it or remove it from data.path.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8: byte 0x{data[e.start]:02x} at byte offset {e.start} "
                        f"({e.reason}). Convert the file to UTF-8, e.g. "
                        f"`iconv -f latin1 -t utf-8 {path} > fixed.txt`.") from None


def _jsonl(path: Path, field: str) -> Iterator[str]:
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except ValueError as e:
                raise DataError(f"{path}:{number} is not JSON ({e}). Each line of a .jsonl file must be one "
                                "JSON object; fix or delete that line.") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number} is JSON but not an object ({type(row).__name__}): each line "
                                f"must be an object with a {field!r} field.")
            if field not in row:
                raise DataError(f"{path}:{number} has no field {field!r} (its fields: "
                                f"{', '.join(map(repr, row)) or 'none'}). Set data.text_field to the one "
                                "that holds the text.")
            text = row[field]
            if not isinstance(text, str):
                raise DataError(f"{path}:{number}: field {field!r} is {type(text).__name__}, not text. Set "
                                "data.text_field to a field that holds strings.")
            yield text


def _columnar(f: SourceFile, field: str) -> Iterator[str]:
    """A parquet or Arrow stream file, one record batch at a time."""
    try:
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise DataError(f"{f.path}: reading {f.kind} needs pyarrow (pip install pyarrow).") from None
    try:
        if f.kind == "parquet":
            source = pyarrow.parquet.ParquetFile(f.path)
            columns = source.schema_arrow.names
            _has_column(f, field, columns)
            batches = source.iter_batches(columns=[field], batch_size=4096)
        else:
            reader = _open_arrow(f.path)
            _has_column(f, field, reader.schema.names)
            batches = reader
        for batch in batches:
            column = batch.column(batch.schema.get_field_index(field))
            for text in column.to_pylist():
                if not isinstance(text, str):
                    raise DataError(f"{f.path}: column {field!r} holds {type(text).__name__} values, not text. "
                                    "Set data.text_field to a string column.")
                yield text
    except DataError:
        raise
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid / ArrowIOError are these
        raise DataError(f"{f.path} cannot be read as {f.kind} ({type(e).__name__}: {e}). Check the file, or "
                        "remove it from data.path.") from None


def _open_arrow(path: Path):
    """`datasets` writes Arrow *stream* files; an Arrow *file* (random-access format) is read too."""
    import pyarrow.ipc

    try:
        return pyarrow.ipc.open_stream(pyarrow.memory_map(str(path)))
    except Exception:  # noqa: BLE001 (ArrowInvalid: not the stream format)
        return pyarrow.ipc.open_file(pyarrow.memory_map(str(path)))


def _has_column(f: SourceFile, field: str, columns: list[str]) -> None:
    if field not in columns:
        raise DataError(f"{f.path} has no column {field!r} (its columns: {', '.join(map(repr, columns))}). "
                        "Set data.text_field to the one that holds the text.")
