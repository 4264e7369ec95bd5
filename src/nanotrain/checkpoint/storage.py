"""The on-disk format (version 2): one safetensors file per rank plus one index.

    step_00000500/
        metadata.json            format version, step, the layout that wrote it, the LR
                                 schedule, loss scaler, data position, config; and for every
                                 logical tensor: its shape, dtype and the boxes that hold it
        tokenizer.json
        rank_00000.safetensors   the boxes rank 0 wrote (each box written by one rank only)
        rank_00001.safetensors
        ...

Integrity: every chunk records the xxh3_128 of its bytes ("xxh3_128" beside "key"), and every
rank file its size ("files": {"rank_00000.safetensors": {"bytes": n}}). A reader checks a file's
size when it first opens it, and each chunk's bytes right after reading them, while they are still
in the CPU's cache: a hash of what is loaded. bench/checkpoint_load.py on an AMD EPYC (AVX512-BF16,
2 cores): +14-16% to a load from the page cache, +1% from disk; a pass over each file before
reading it cost +36%.

metadata.json, tensors section:

    "model/layers.0.attn.wo.weight": {"shape": [64, 64], "dtype": "float32", "chunks": [
        {"file": "rank_00000.safetensors", "key": "model/layers.0.attn.wo.weight@0,0",
         "offsets": [0, 0], "sizes": [64, 32]},
        {"file": "rank_00001.safetensors", "key": "model/layers.0.attn.wo.weight@0,32",
         "offsets": [0, 32], "sizes": [64, 32]}]}

Reading a box copies in the overlap of every chunk that intersects it (safetensors reads
slices of a file without loading the rest). This is what torch.distributed.checkpoint
does with DTensor/ShardedTensor metadata; nano-train spells it out because ZeRO's flat
slices are not DTensor placements, and because a learner can open the JSON and see where
every slice of every tensor went.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import xxhash
from safetensors import safe_open

from .pieces import Piece

FORMAT_VERSION = 2
METADATA = "metadata.json"
TOKENIZER = "tokenizer.json"
# xxh3_128, not sha256: it hashes faster than memory is read (18 GB/s from memory here; sha256 with sha_ni 1.8 GB/s,
# bench/checkpoint_load.py), and the checksum guards against damage, not against an attacker.
HASH = "xxh3_128"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message says what is wrong and what to do."""


class CorruptCheckpointError(CheckpointError):
    """A shard file whose size or checksum differs from what metadata.json recorded."""


def tensor_digest(t: torch.Tensor) -> str:
    """The xxh3_128 of a tensor's bytes (its dtype's storage, in order)."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
    return xxhash.xxh3_128_hexdigest(memoryview(raw.numpy()))


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.safetensors"


def chunk_key(name: str, offsets) -> str:
    """A box's key in its rank file (a rank may hold several boxes of one tensor under ZeRO)."""
    return f"{name}@{','.join(map(str, offsets))}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def build_metadata(entries: list[tuple], owners: dict[tuple, int]) -> dict[str, dict]:
    """The tensors section from every rank's (name, offsets, sizes, shape, dtype) entries and
    the rank that writes each box."""
    tensors: dict[str, dict] = {}
    for name, offsets, sizes, shape, dtype in entries:
        key = (name, offsets, sizes)
        t = tensors.setdefault(name, {"shape": list(shape), "dtype": dtype, "chunks": []})
        if list(shape) != t["shape"]:
            raise CheckpointError(f"ranks disagree on the shape of {name}: {t['shape']} and {list(shape)}")
        if key in owners:
            rank = owners.pop(key)
            t["chunks"].append({"file": rank_file(rank), "key": chunk_key(name, offsets),
                                "offsets": list(offsets), "sizes": list(sizes)})
    return tensors


def read_metadata(folder: Path) -> dict[str, Any]:
    path = folder / METADATA
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}. The checkpoint is incomplete or damaged; resume from "
                              "an earlier one.") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {folder} has format version {version}, this nano-train reads version "
                              f"{FORMAT_VERSION}. Resume it with the nano-train version that wrote it.")
    return meta


class CheckpointReader:
    """A complete checkpoint folder: its objects, and any box of any logical tensor.

    With verify (the default), a file's size is checked when it is first opened and each chunk's
    checksum when it is first read (the whole chunk, even for a slice of it), so a rank checks only
    what it loads. Checkpoints written before checksums existed are read unchecked."""

    def __init__(self, folder: str | Path, verify: bool = True):
        self.folder = Path(folder)
        self.verify = verify
        if (self.folder / "state.pt").is_file() and not (self.folder / METADATA).is_file():
            raise CheckpointError(f"checkpoint {self.folder} is in format version 1 (one state.pt), this "
                                  f"nano-train reads version {FORMAT_VERSION}. Resume it with the nano-train version "
                                  "that wrote it, or start from its weights with an older `nanotrain convert --to-hf`.")
        self.meta = read_metadata(self.folder)
        self.tensors: dict[str, dict] = self.meta["tensors"]
        files = sorted({c["file"] for t in self.tensors.values() for c in t["chunks"]})
        missing = [f for f in files if not (self.folder / f).is_file()]
        if missing:
            held = {f: sorted(n for n, t in self.tensors.items() if any(c["file"] == f for c in t["chunks"]))
                    for f in missing}
            raise CheckpointError(
                f"checkpoint {self.folder} is missing {len(missing)} shard file(s): "
                + "; ".join(f"{f} (holds parts of {len(h)} tensors, e.g. {h[0]})" for f, h in held.items())
                + ". Copy the whole checkpoint folder, or resume from an earlier checkpoint.")
        self._open: dict[str, Any] = {}
        self._sized: set[str] = set()  # files whose size matched the record
        self._hashed: set[str] = set()  # chunk keys whose checksum matched

    @property
    def step(self) -> int:
        return self.meta["step"]

    @property
    def objects(self) -> dict[str, Any]:
        return self.meta["objects"]

    def tokenizer_json(self) -> str:
        return (self.folder / TOKENIZER).read_text()

    def has(self, name: str) -> bool:
        return name in self.tensors

    def verify_all(self) -> None:
        """Check every file and chunk now (whatever verify says): to validate a checkpoint up front."""
        for t in self.tensors.values():
            for chunk in t["chunks"]:
                self._verified(chunk)

    def _check_size(self, name: str) -> None:
        record = self.meta.get("files", {}).get(name)
        if name in self._sized or record is None:
            return
        path = self.folder / name
        size = path.stat().st_size
        if size != record["bytes"]:
            raise CorruptCheckpointError(f"checkpoint file {path} is damaged: it has {size} bytes, metadata.json "
                                         f"recorded {record['bytes']} (truncated or replaced); resume from an "
                                         "earlier checkpoint.")
        self._sized.add(name)

    def _verified(self, chunk: dict) -> torch.Tensor:
        """The whole chunk, its checksum checked (CorruptCheckpointError names the file and tensor)."""
        self._check_size(chunk["file"])
        t = self._get(chunk, ())
        if HASH in chunk and chunk["key"] not in self._hashed:
            self._compare(chunk, tensor_digest(t))
        return t

    def _compare(self, chunk: dict, found: str) -> None:
        if found != chunk[HASH]:
            raise CorruptCheckpointError(
                f"checkpoint file {self.folder / chunk['file']} is damaged: {chunk['key']} has {HASH} "
                f"{found[:12]}…, metadata.json recorded {chunk[HASH][:12]}…; resume from an earlier checkpoint.")
        self._hashed.add(chunk["key"])

    def _check_after_copy(self, chunk: dict, dst: torch.Tensor, whole_chunk: bool, dtype: str) -> bool:
        """A box that is the whole chunk, into a contiguous tensor of its dtype (the common resume, in
        the layout that saved): checked from the copy, whose bytes are then still in the cache,
        instead of from the file's pages before it (a third less time for the check, measured)."""
        return (self.verify and HASH in chunk and chunk["key"] not in self._hashed and whole_chunk
                and dst.is_contiguous() and dtype_name(dst.dtype) == dtype)

    def _file(self, name: str):
        if name not in self._open:
            self._open[name] = safe_open(str(self.folder / name), framework="pt", device="cpu")
        return self._open[name]

    @torch.no_grad()
    def fill(self, piece: Piece) -> None:
        """Copy the saved values of piece's box into piece.tensor (any layout wrote them)."""
        meta = self.tensors.get(piece.name)
        if meta is None:
            raise CheckpointError(f"checkpoint {self.folder} has no tensor {piece.name}: it was saved from a "
                                  "different model or optimizer. Resume with the config it was written with.")
        if tuple(meta["shape"]) != piece.shape:
            raise CheckpointError(f"{piece.name} has shape {meta['shape']} in checkpoint {self.folder}, this "
                                  f"run's model has {list(piece.shape)}: resume with the config it was written with.")
        covered = 0
        for chunk in meta["chunks"]:
            lo = [max(a, b) for a, b in zip(piece.offsets, chunk["offsets"])]
            hi = [min(a + s, b + t) for a, s, b, t in zip(piece.offsets, piece.sizes, chunk["offsets"], chunk["sizes"])]
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            dst = piece.tensor
            for d, (a, b, o) in enumerate(zip(lo, hi, piece.offsets)):
                dst = dst.narrow(d, a - o, b - a)
            box = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, chunk["offsets"]))
            whole_chunk = list(lo) == chunk["offsets"] and list(dst.shape) == chunk["sizes"]
            if self._check_after_copy(chunk, dst, whole_chunk, meta["dtype"]):
                self._check_size(chunk["file"])
                dst.copy_(self._get(chunk, ()))
                self._compare(chunk, tensor_digest(dst))  # hashed while the copy is still in the CPU's cache
            else:
                dst.copy_(self._read(chunk, box))
            covered += dst.numel()
        if covered != piece.tensor.numel():
            raise CheckpointError(f"checkpoint {self.folder} holds {covered} of the {piece.tensor.numel()} values "
                                  f"of {piece.name} at {list(piece.offsets)}+{list(piece.sizes)}: a shard is "
                                  "missing or damaged. Resume from an earlier checkpoint.")

    def _read(self, chunk: dict, box: tuple[slice, ...]) -> torch.Tensor:
        if self.verify and HASH in chunk and chunk["key"] not in self._hashed:
            t = self._verified(chunk)
            return t[box] if box else t
        if self.verify:
            self._check_size(chunk["file"])
        return self._get(chunk, box)

    def _get(self, chunk: dict, box: tuple[slice, ...]) -> torch.Tensor:
        try:
            f = self._file(chunk["file"])
            return f.get_slice(chunk["key"])[box] if box else f.get_tensor(chunk["key"])
        except Exception as e:  # a truncated or overwritten file (safetensors' own error types)
            raise CheckpointError(f"cannot read {chunk['key']} from {self.folder / chunk['file']}: {e}. The file is "
                                  "damaged; resume from an earlier checkpoint.") from None

    def full(self, name: str) -> torch.Tensor:
        """A whole logical tensor, assembled from its boxes."""
        meta = self.tensors[name]
        t = torch.empty(meta["shape"], dtype=getattr(torch, meta["dtype"]))
        self.fill(Piece(name, t, (0,) * t.dim(), tuple(t.shape)))
        return t

    def full_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor under `prefix` ("model/"), whole, keyed by the rest of its name."""
        return {n[len(prefix):]: self.full(n) for n in self.tensors if n.startswith(prefix)}


def check_compatible(saved_cfg: dict[str, Any], cfg_dict: dict[str, Any], path: Path) -> None:
    """The model and the data stream must match to continue a run; the layout, zero stage,
    micro-batches and the rest may change."""
    diffs = []
    for section, keys in (("model", None), ("data", ("path", "tokenizer", "vocab_size", "val_fraction")),
                          ("train", ("seed", "seq_len", "batch_size"))):
        old, new = saved_cfg.get(section, {}), cfg_dict[section]
        for key in keys or new.keys():
            if old.get(key) != new.get(key):
                diffs.append(f"{section}.{key}: checkpoint has {old.get(key)!r}, config has {new.get(key)!r}")
    if diffs:
        raise CheckpointError(f"checkpoint {path} does not match this config:\n  - " + "\n  - ".join(diffs)
                              + "\nUse the config the run was started with (saved in the checkpoint), "
                              "or start a fresh run without checkpoint.resume.")
