"""Token files in shards (data.shard_tokens), written as a stream and read as one sequence.

A corpus of billions of tokens is easier to copy, check and cache as files of a fixed size
(nanoGPT's FineWeb script writes shards of 100M tokens; Megatron's indexed datasets are one
file per split). prepare writes the token stream into files of `shard_tokens` tokens each, then
cuts it into train and val at a document boundary:

    stream    | shard 0 | shard 1 | shard 2 | shard 3 |
    split                      ^ n_train
    train     train-00000  train-00001 (shard 1 up to the cut)
    val                    val-00000 (shard 1 after the cut)  val-00001  val-00002

TokenShards reads them back by memory map as one sequence: window i of a batch starts at the
same global offset whatever the shard size, so a run's batches do not depend on how the files
were cut (tests/unit/test_shards.py), and a window that crosses two files is joined from both.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np


class TokenShards:
    """Several token arrays (memmaps) read as their concatenation."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = [p for p in parts if len(p)]
        self.ends = np.cumsum([len(p) for p in self.parts])  # where each part ends, globally

    @classmethod
    def of(cls, tokens: "np.ndarray | TokenShards") -> "TokenShards":
        return tokens if isinstance(tokens, TokenShards) else cls([tokens])

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def windows(self, starts: np.ndarray, n: int) -> np.ndarray:
        """[len(starts), n]: tokens[s : s + n] for each start."""
        if len(self.parts) == 1:  # one fancy-indexing gather, as from a single file
            return self.parts[0][starts[:, None] + np.arange(n)]
        return np.stack([self.read(int(s), int(s) + n) for s in starts])

    def read(self, start: int, stop: int) -> np.ndarray:
        """tokens[start:stop], joined from the parts it spans."""
        pieces, i = [], int(np.searchsorted(self.ends, start, side="right"))
        while start < stop:
            begin = int(self.ends[i - 1]) if i else 0
            take = min(stop, int(self.ends[i])) - start
            pieces.append(self.parts[i][start - begin:start - begin + take])
            start += take
            i += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


class ShardWriter:
    """Writes a token stream into folder/stream-00000.bin, ... of at most `shard_tokens` tokens
    each (0: one file). files/sizes: what was written, in order."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int = 0):
        self.folder, self.dtype, self.limit = folder, dtype, shard_tokens or None
        self.files: list[Path] = []
        self.sizes: list[int] = []
        self._f = None

    def write(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=self.dtype)
        while ids.size:
            if self._f is None or (self.limit and self.sizes[-1] == self.limit):
                self._next()
            room = ids.size if self.limit is None else self.limit - self.sizes[-1]
            ids[:room].tofile(self._f)
            self.sizes[-1] += min(room, ids.size)
            ids = ids[room:]

    def _next(self) -> None:
        if self._f is not None:
            self._f.close()
        self.files.append(self.folder / f"stream-{len(self.files):05d}.bin")
        self.sizes.append(0)
        self._f = open(self.files[-1], "wb")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def split(self, n_train: int, out: Path, sharded: bool) -> dict[str, list[list]]:
        """Move the stream into out/ as the train and val files, cut at token n_train: train.bin
        and val.bin (sharded=False), or train-00000.bin, ... and val-00000.bin, .... Returns
        {"train": [[file name, tokens], ...], "val": [...]} (JSON's form, for meta.json)."""
        self.close()
        itemsize = self.dtype.itemsize
        pieces: dict[str, list[tuple[Path, int]]] = {"train": [], "val": []}
        begin = 0
        for path, size in zip(self.files, self.sizes):
            if begin + size <= n_train:
                pieces["train"].append((path, size))
            elif begin >= n_train:
                pieces["val"].append((path, size))
            else:  # the cut falls inside this file: its tail becomes a file of its own
                head = n_train - begin
                tail = path.with_suffix(".tail")
                with open(path, "rb") as src, open(tail, "wb") as dst:
                    src.seek(head * itemsize)
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.truncate(path, head * itemsize)
                pieces["train"].append((path, head))
                pieces["val"].append((tail, size - head))
            begin += size
        out_files: dict[str, list[list]] = {}
        for split, parts in pieces.items():  # unsharded: one stream file, so one part per split
            names = [f"{split}.bin"] if not sharded else [f"{split}-{i:05d}.bin" for i in range(len(parts))]
            for name, (path, _) in zip(names, parts):
                os.replace(path, out / name)
            out_files[split] = [[name, size] for name, (_, size) in zip(names, parts)]
        return out_files
