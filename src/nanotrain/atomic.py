"""One way to replace a file: a temporary file in the same folder, synced, then os.replace (atomic
within a file system). A reader, or a run killed half-way, sees the old file or the new one, never
half of one. Token files, metrics.jsonl's repair and checkpoints' `latest` are written this way."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: Path, data: bytes | str | Callable[[BinaryIO], None]) -> None:
    """Replace `path` with `data` (bytes, text, or a function that writes to the open binary file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only be
    read by setting it, which another thread writing a file at that instant would see)."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def as_umask_allows(path: Path) -> None:
    """Give a file the mode a plain open() would have: 0666 less the umask. safetensors' save_file
    creates its files 0600 whatever the umask, so a user's group could not read their own weights."""
    os.chmod(path, 0o666 & ~_umask())
