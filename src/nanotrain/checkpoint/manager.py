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
     writes them to <tmp>/rank_<r>.safetensors, renamed into place when complete. It hashes
     each box first and leaves the checksums and the file's size beside it
     (<tmp>/.rank_<r>.safetensors.json).
  3. rank 0 waits for every rank's file, writes metadata.json (with every box's checksum),
     renames the temporary folder to step_<n> (atomic within one file system), then replaces
     `latest` the same way and keeps only the newest checkpoint.keep_last (and always the one
     `latest` names).
  4. every other rank waits for rank 0's verdict before its save returns: the folder renamed
     (saved), or rank 0's own marker (below).
A crash anywhere before the rename leaves the previous checkpoint and `latest` intact. A write
that fails (a full disk) raises a CheckpointError on the rank it failed on; that rank leaves a
<tmp>/.rank_<r>.failed marker, so rank 0 stops waiting and raises too. The same marker goes the
other way: rank 0, whose own write or commit failed (or which saw another rank's marker), leaves
<tmp>/.rank_00000.failed holding its error's text, and every rank waiting for the verdict raises
that same error at once, instead of waiting at the next collective until parallel.timeout_s.
Each rank that has read it leaves a .seen marker; the last to finish removes the folder.
With checkpoint.async_save, steps 2 and 3 run on a background thread. As with
torch.distributed.checkpoint's FileSystemWriter, all ranks must see one shared folder.

The data position is the step: the sampler's batch at step s depends only on (seed, s),
so restoring the step restores the data stream.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..atomic import as_umask_allows, atomic_write
from ..parallel import collectives
from .pieces import Piece
from .storage import (FORMAT_VERSION, METADATA, TOKENIZER, CheckpointError, CheckpointReader, build_metadata,
                      HASH, chunk_key, dtype_name, rank_file, tensor_digest)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _reason(e: BaseException) -> str:
    """Why a write failed, in words. safetensors' writer (Rust) reports an I/O error as
    SafetensorError text ending in '(os error 28)', not as an OSError with an errno."""
    code = e.errno if isinstance(e, OSError) else None
    found = re.search(r"os error (\d+)", str(e))
    code = int(found.group(1)) if code is None and found else code
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on device"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _sidecar(rank: int, kind: str) -> str:
    """The hidden file a rank leaves for rank 0's commit: 'json' (its boxes' checksums and its file's
    size) or 'failed' (why its write failed); rank 0's 'failed' is for the others (its whole error),
    and 'seen' says a rank has read it."""
    return f".{rank_file(rank)}.{kind}"


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
            if isinstance(error, CheckpointError):  # already says what failed and what to do
                raise error
            raise CheckpointError(f"saving a checkpoint in the background failed: {error}") from error

    def _prepare(self, step: int, pieces: list[Piece], objects: dict[str, Any], tokenizer: str | None):
        """Steps 1 and 2a (on the calling thread): agree on who writes what, snapshot it.
        Returns the function that writes (step 2b; then 3 on rank 0, 4 on the others)."""
        rank, world = _rank_world()
        final, tmp = self.dir / f"step_{step:08d}", self.dir / f".tmp_step_{step:08d}"
        entries = [(p.name, p.offsets, p.sizes, p.shape, dtype_name(p.tensor.dtype)) for p in pieces]
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a save that was killed half-way
            try:
                tmp.mkdir(parents=True)
            except OSError as e:  # told to the other ranks in the exchange, in place of rank 0's entries
                entries = str(self._failed(step, 0, tmp, e, world=1))  # (world=1: no marker to leave)
        everyone = [entries]
        if world > 1:  # also a barrier: rank 0 has made the folder when this returns
            everyone = [None] * world
            collectives.all_gather_object(everyone, entries, None)  # the default group
        if isinstance(everyone[0], str):
            raise CheckpointError(everyone[0])
        owners = assign_owners(everyone)
        mine = {chunk_key(p.name, p.offsets): p.tensor.detach().to("cpu", copy=True).contiguous()
                for p in pieces if owners[p.key] == rank}
        meta = None
        if rank == 0:
            meta = {"format_version": FORMAT_VERSION, "step": step, "world_size": world, "files": {},
                    "objects": objects, "tensors": build_metadata([e for r in everyone for e in r], dict(owners))}
            meta = json.loads(json.dumps(meta))  # a copy: objects may change while the thread runs

        def write():
            try:
                self._write_rank(tmp, rank, mine)
                if rank == 0:
                    self._commit(step, tmp, final, world, meta, tokenizer)
            except (OSError, SafetensorError, CheckpointError) as e:
                raise self._failed(step, rank, tmp, e, world) from e
            if rank:
                self._verdict(step, tmp, final, rank, world)

        return write

    def _write_rank(self, tmp: Path, rank: int, tensors: dict) -> None:
        """This rank's file and, beside it, its boxes' checksums and its size for rank 0's commit
        (the file appears last)."""
        part = tmp / f".{rank_file(rank)}.part"
        digests = {key: tensor_digest(t) for key, t in tensors.items()}  # the snapshot, as written
        save_file(tensors, str(part))
        as_umask_allows(part)  # safetensors writes 0600 whatever the umask
        record = {"bytes": part.stat().st_size, "chunks": digests}
        (tmp / _sidecar(rank, "json")).write_text(json.dumps(record))
        os.replace(part, tmp / rank_file(rank))

    def _failed(self, step: int, rank: int, tmp: Path, e: BaseException, world: int = 1) -> CheckpointError:
        """The error for a write that failed on this rank, after leaving the marker (rank > 0: its
        reason, for rank 0's commit; rank 0: the whole error, for the others' verdict) or removing
        the temporary folder (rank 0 alone), all best effort: the disk may be full."""
        if rank and not tmp.is_dir():  # rank 0 gave the save up after another rank's write failed
            return CheckpointError(f"checkpoint step {step} was abandoned while rank {rank} wrote it: another "
                                   "rank's write failed, and its error says why.")
        # rank 0's commit saw another rank fail, or time out: that error, as it is
        error = e if isinstance(e, CheckpointError) else self._write_error(step, _reason(e), rank)
        try:
            (tmp / f".{rank_file(rank)}.part").unlink(missing_ok=True)
            if rank == 0 and world == 1:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                # atomic: the other ranks poll for it and must never read it empty
                atomic_write(tmp / _sidecar(rank, "failed"), _reason(e) if rank else str(error))
                self._last_out(tmp, world)
        except OSError:  # no marker: rank 0 removes the folder, and the others say the save was abandoned
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
        return error

    def _verdict(self, step: int, tmp: Path, final: Path, rank: int, world: int) -> None:
        """A rank other than 0, its file written: wait until rank 0 has renamed the folder (saved) or
        left its marker (raise its error, the same on every rank)."""
        deadline, failed = time.monotonic() + self.commit_timeout_s, tmp / _sidecar(0, "failed")
        while tmp.is_dir():
            if failed.is_file():
                error = CheckpointError(failed.read_text())
                try:
                    (tmp / rank_file(rank)).unlink(missing_ok=True)  # (space, on a full disk)
                    (tmp / _sidecar(rank, "seen")).touch()
                    self._last_out(tmp, world)
                except OSError:
                    pass
                raise error
            if time.monotonic() > deadline:
                raise CheckpointError(f"rank 0 did not commit checkpoint step {step} within "
                                      f"{self.commit_timeout_s:.0f} s; the previous checkpoint stays `latest`.")
            time.sleep(0.02)
        if not (final / METADATA).is_file():  # rank 0 could not leave its marker, and gave the save up
            raise CheckpointError(f"checkpoint step {step} was abandoned by rank 0 after rank {rank} wrote its part: "
                                  "rank 0's error says why.")

    @staticmethod
    def _last_out(tmp: Path, world: int) -> None:
        """Remove the temporary folder of a failed save once every rank is done with it: each rank > 0
        has left its marker (failed) or read rank 0's (seen), and rank 0 has left its own. Each rank
        calls this after leaving its marker, so the last one does it."""
        done = [(tmp / _sidecar(0, "failed")).is_file()]
        done += [(tmp / _sidecar(r, "failed")).is_file() or (tmp / _sidecar(r, "seen")).is_file()
                 for r in range(1, world)]
        if all(done):
            shutil.rmtree(tmp, ignore_errors=True)

    def _write_error(self, step: int, reason: str, rank: int) -> CheckpointError:
        name = read_latest(self.dir)
        kept = (f"the previous checkpoint ({name}) is intact and `latest` still names it" if name
                else "no earlier checkpoint exists")
        fix = "free space" if reason == "no space left on device" else "fix that"
        who = f" (rank {rank})" if rank else ""
        return CheckpointError(f"{reason} writing checkpoint step {step} to {self.dir}{who}; {kept}: {fix} or set "
                               "checkpoint.dir to another disk.")

    def _commit(self, step: int, tmp: Path, final: Path, world: int, meta: dict, tokenizer: str | None) -> None:
        deadline = time.monotonic() + self.commit_timeout_s
        digests: dict[str, dict[str, str]] = {}
        for r in range(world):
            while not (tmp / rank_file(r)).is_file():
                if (tmp / _sidecar(r, "failed")).is_file():  # its own error names the cause; stop waiting
                    raise self._write_error(step, (tmp / _sidecar(r, "failed")).read_text(), r)
                if time.monotonic() > deadline:
                    raise CheckpointError(f"rank {r} did not write its part of checkpoint step {step} within "
                                          f"{self.commit_timeout_s:.0f} s; the previous checkpoint stays `latest`.")
                time.sleep(0.02)
            sidecar = tmp / _sidecar(r, "json")
            record = json.loads(sidecar.read_text())
            meta["files"][rank_file(r)] = {"bytes": record["bytes"]}
            digests[rank_file(r)] = record["chunks"]
            sidecar.unlink()
        for t in meta["tensors"].values():
            for chunk in t["chunks"]:
                chunk[HASH] = digests[chunk["file"]][chunk["key"]]
        if tokenizer is not None:
            (tmp / TOKENIZER).write_text(tokenizer)
        (tmp / METADATA).write_text(json.dumps(meta, indent=1))  # last: a folder without it is never read
        if final.exists():  # re-saving the same step (e.g. a resumed run's final save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write(self.dir / "latest", final.name + "\n")
        try:
            self._prune(final)
        except OSError:  # the checkpoint is saved and named: an old one left behind does no harm
            pass

    def _prune(self, written: Path) -> None:
        """Keep the newest keep_last checkpoints by step, and always the one just written and the
        one `latest` names. Steps alone are not enough: a folder reused by a new run still holds
        the old run's checkpoints, whose higher steps would otherwise push out the new run's only
        checkpoint, the one it would resume from."""
        done = self._done()
        keep = set(done[-self.keep_last:]) | {written, self._latest()}
        for old in done:
            if old not in keep:
                shutil.rmtree(old, ignore_errors=True)

    # -- loading ---------------------------------------------------------------------

    def _done(self) -> list[Path]:
        """The complete checkpoints (metadata.json written last), oldest step first."""
        return sorted(p for p in self.dir.glob("step_*") if (p / METADATA).is_file())

    def _latest(self) -> Path | None:
        name = read_latest(self.dir)
        return self.dir / name if name else None

    def unfinished_newer(self) -> list[Path]:
        """step_* folders newer than the newest complete checkpoint that lack their metadata.json
        (deleted by hand, or a save that never finished): what resume=auto passes over, to be said."""
        done = self._done()
        newest = done[-1].name if done else ""
        return sorted(p for p in self.dir.glob("step_*") if p.is_dir() and p.name > newest
                      and not (p / METADATA).is_file() and not p.name.endswith(".tmp"))

    def complete(self) -> list[Path]:
        """The complete checkpoints in the folder, the one `latest` names first, then the others
        newest step first: what checkpoint.resume=auto tries, in order."""
        done, named = self._done()[::-1], self._latest()
        return [named] + [p for p in done if p != named] if named in done else done

    def resolve(self, spec: str) -> Path:
        """'latest', a checkpoint folder, its metadata.json, or a run/checkpoints folder holding `latest`."""
        return resolve_checkpoint(self.dir if spec == "latest" else Path(spec))

    def load(self, spec: str) -> CheckpointReader:
        return CheckpointReader(self.resolve(spec))


def read_latest(folder: Path) -> str | None:
    """The checkpoint folder name `latest` holds, or None: no file, or not one name (not UTF-8
    text, empty, or a path: a damaged file names nothing, it does not raise)."""
    try:
        name = (folder / "latest").read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if name and "/" not in name and name not in (".", "..") else None


def resolve_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if path.name in (METADATA, "state.pt"):
        path = path.parent
    for candidate in (path, path / "checkpoints"):
        if (candidate / "latest").is_file():
            name = read_latest(candidate)
            if name is None:
                raise CheckpointError(f"{candidate / 'latest'} does not name a checkpoint (it should hold a folder "
                                      "name such as step_00000500): pass that checkpoint folder instead, or delete "
                                      "the file to resume from the newest complete checkpoint.")
            path = candidate / name
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
