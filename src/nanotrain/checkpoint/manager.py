"""Saving: every rank writes its own boxes, once; the checkpoint appears only when complete.

    <checkpoint.dir>/
        step_00000500/            a complete checkpoint (storage.py describes its files)
        step_00001000/
        .tmp_step_00001500/       a save in progress: invisible to resume
        latest                    text file naming the newest complete checkpoint

A save, on every rank:
  1. (collective) all ranks exchange the list of boxes they hold. A box held by several
     ranks (a replicated weight on every dp rank, a tp-replicated norm) is assigned to one
     of them, spread round-robin, so each value is written once.
  2. each rank copies its assigned boxes to CPU (the snapshot: training may go on) and
     writes them to <tmp>/rank_<r>.safetensors, renamed into place when complete.
  3. rank 0 waits for every rank's file, writes metadata.json, renames the temporary folder
     to step_<n> (atomic within one file system), then replaces `latest` the same way and
     keeps only the newest checkpoint.keep_last.
A crash anywhere before the rename leaves the previous checkpoint and `latest` intact.
With checkpoint.async_save, steps 2 and 3 run on a background thread. As with
torch.distributed.checkpoint's FileSystemWriter, all ranks must see one shared folder.

The data position is the step: the sampler's batch at step s depends only on (seed, s),
so restoring the step restores the data stream.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist
from safetensors.torch import save_file

from ..parallel import collectives
from .pieces import Piece
from .storage import (FORMAT_VERSION, METADATA, TOKENIZER, CheckpointError, CheckpointReader, build_metadata,
                      chunk_key, dtype_name, rank_file)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def assign_owners(entries_per_rank: list[list[tuple]]) -> dict[tuple, int]:
    """(name, offsets, sizes) -> the one rank that writes it, round-robin over its holders."""
    holders: dict[tuple, list[int]] = {}
    for rank, entries in enumerate(entries_per_rank):
        for name, offsets, sizes, *_ in entries:
            holders.setdefault((name, tuple(offsets), tuple(sizes)), []).append(rank)
    return {key: ranks[i % len(ranks)] for i, (key, ranks) in enumerate(holders.items())}


class CheckpointManager:
    def __init__(self, directory: str | Path, keep_last: int = 3, commit_timeout_s: float = 600.0):
        self.dir = Path(directory)
        self.keep_last = keep_last
        self.commit_timeout_s = commit_timeout_s  # rank 0 waits this long for the other ranks' files
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- saving ----------------------------------------------------------------------

    def save(self, step: int, pieces: list[Piece], objects: dict[str, Any], tokenizer: str | None = None) -> Path:
        """Collective: every rank calls it with the pieces it holds. Returns the final folder."""
        self.wait()
        write = self._prepare(step, pieces, objects, tokenizer)
        write()
        return self.dir / f"step_{step:08d}"

    def save_async(self, step: int, pieces: list[Piece], objects: dict[str, Any], tokenizer: str | None = None) -> Path:
        """save(), with the writing on a background thread. The snapshot is taken now (the
        optimizer steps in place while the thread writes). One save at a time: a second one
        waits for the first. wait() before exit (the engine does)."""
        self.wait()
        write = self._prepare(step, pieces, objects, tokenizer)

        def run():
            try:
                write()
            except BaseException as e:  # re-raised by the next wait()
                self._error = e

        self._writer = threading.Thread(target=run, name=f"checkpoint-step-{step}", daemon=False)
        self._writer.start()
        return self.dir / f"step_{step:08d}"

    def wait(self) -> None:
        """Block until a background save has finished; raise its error, if any."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"saving a checkpoint in the background failed: {error}") from error

    def _prepare(self, step: int, pieces: list[Piece], objects: dict[str, Any], tokenizer: str | None):
        """Steps 1 and 2a (on the calling thread): agree on who writes what, snapshot it.
        Returns the function that writes (step 2b, and 3 on rank 0)."""
        rank, world = _rank_world()
        final, tmp = self.dir / f"step_{step:08d}", self.dir / f".tmp_step_{step:08d}"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a save that was killed half-way
            tmp.mkdir(parents=True)
        entries = [(p.name, p.offsets, p.sizes, p.shape, dtype_name(p.tensor.dtype)) for p in pieces]
        everyone = [entries]
        if world > 1:  # also a barrier: rank 0 has made the folder when this returns
            everyone = [None] * world
            collectives.all_gather_object(everyone, entries, None)  # the default group
        owners = assign_owners(everyone)
        mine = {chunk_key(p.name, p.offsets): p.tensor.detach().to("cpu", copy=True).contiguous()
                for p in pieces if owners[p.key] == rank}
        meta = None
        if rank == 0:
            meta = {"format_version": FORMAT_VERSION, "step": step, "world_size": world, "objects": objects,
                    "tensors": build_metadata([e for r in everyone for e in r], dict(owners))}
            meta = json.dumps(meta, indent=1)  # serialised now: objects may change while the thread runs

        def write():
            part = tmp / f".{rank_file(rank)}.part"
            save_file(mine, str(part))
            os.replace(part, tmp / rank_file(rank))
            if rank == 0:
                self._commit(step, tmp, final, world, meta, tokenizer)

        return write

    def _commit(self, step: int, tmp: Path, final: Path, world: int, meta: str, tokenizer: str | None) -> None:
        deadline = time.monotonic() + self.commit_timeout_s
        for r in range(world):
            while not (tmp / rank_file(r)).is_file():
                if time.monotonic() > deadline:
                    raise CheckpointError(f"rank {r} did not write its part of checkpoint step {step} within "
                                          f"{self.commit_timeout_s:.0f} s; the previous checkpoint stays `latest`.")
                time.sleep(0.02)
        if tokenizer is not None:
            (tmp / TOKENIZER).write_text(tokenizer)
        (tmp / METADATA).write_text(meta)  # last: a folder without it is never read
        if final.exists():  # re-saving the same step (e.g. a resumed run's final save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(self.dir / "latest", final.name + "\n")
        self._prune()

    def _prune(self) -> None:
        done = sorted(p for p in self.dir.glob("step_*") if (p / METADATA).is_file())
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    # -- loading ---------------------------------------------------------------------

    def complete(self) -> list[Path]:
        """The complete checkpoints in the folder, the one `latest` names first, then the others
        newest step first: what checkpoint.resume=auto tries, in order."""
        done = sorted((p for p in self.dir.glob("step_*") if (p / METADATA).is_file()), reverse=True)
        latest = self.dir / "latest"
        named = self.dir / latest.read_text().strip() if latest.is_file() else None
        if named in done:
            done.remove(named)
            done.insert(0, named)
        return done

    def resolve(self, spec: str) -> Path:
        """'latest', a checkpoint folder, its metadata.json, or a run/checkpoints folder holding `latest`."""
        return resolve_checkpoint(self.dir if spec == "latest" else Path(spec))

    def load(self, spec: str) -> CheckpointReader:
        return CheckpointReader(self.resolve(spec))


def resolve_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if path.name in (METADATA, "state.pt"):
        path = path.parent
    for candidate in (path, path / "checkpoints"):
        if (candidate / "latest").is_file():
            path = candidate / (candidate / "latest").read_text().strip()
            break
    if not ((path / METADATA).is_file() or (path / "state.pt").is_file()):
        raise CheckpointError(
            f"no checkpoint at {path}. Pass a checkpoint folder (…/checkpoints/step_00000500), "
            "a run's out_dir or checkpoints folder containing a 'latest' file, or 'latest' to "
            "continue the run in checkpoint.dir.")
    return path


def load_checkpoint(path: str | Path) -> CheckpointReader:
    """The checkpoint at a folder, its metadata.json, or a run folder (its `latest`)."""
    return CheckpointReader(resolve_checkpoint(path))
