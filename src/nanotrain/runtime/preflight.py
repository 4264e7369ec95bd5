"""Before any work: what a run will need that the machine may not have. A problem found at the
first save (an unwritable folder, a full disk) loses every step since the start; one found at the
first step (a batch that does not fit in memory) ends in an allocator's traceback. Both are cheap to
find first, each as one line naming the key and the fix (issue 40).

- folders: train.out_dir and checkpoint.dir can be created and written, and their file system has
  room for one checkpoint (the weights and the optimizer's state: checkpoint/ writes each once);
- memory (CPU runs): what one rank will hold at its peak, as `nanotrain inspect` counts it
  (inspection/memory.py: weights, gradients, optimizer state, activations in flight) plus the batch
  the data loader gathers, times the ranks on this machine, fits the memory the machine has free.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from ..config import Config, ConfigError

# What an estimate may be off by before a run that fits is refused: inspect's counts are within a
# few percent of measured peaks (docs/inspection.md), the allocator and PyTorch's own buffers add more.
MEMORY_MARGIN = 1.25


def check_folders(cfg: Config, checkpoint_bytes: int) -> None:
    """Each folder the run writes to exists or can be made, takes a file, and has room for one
    checkpoint of checkpoint_bytes."""
    out = Path(cfg.train.out_dir)
    folders = {"train.out_dir": out, "checkpoint.dir": Path(cfg.checkpoint.dir) if cfg.checkpoint.dir
               else out / "checkpoints"}
    for key, folder in folders.items():
        probe = folder / f".nanotrain-write-test-{uuid.uuid4().hex[:8]}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"x")
        except OSError as e:
            raise ConfigError(f"{key}={folder} cannot be written ({e.strerror or e}): every checkpoint would "
                              f"fail, and the steps before it be lost. Fix its permissions or give another "
                              f"--{key}.") from None
        finally:
            try:
                probe.unlink(missing_ok=True)
            except OSError:  # the folder itself is not there (the error above says why)
                pass
        free = shutil.disk_usage(folder).free
        if free < checkpoint_bytes:
            raise ConfigError(f"{key}={folder} has {free / 2**30:.2f} GiB free, and one checkpoint of this run "
                              f"takes {checkpoint_bytes / 2**30:.2f} GiB: free space there or give another --{key}.")


def available_memory() -> int | None:
    """Bytes of memory this machine can give a new process (MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def check_memory(cfg: Config, rank_bytes: int, local_ranks: int) -> None:
    """Refuse a run whose ranks on this machine would need more than it has free (CPU runs)."""
    free = available_memory()
    need = rank_bytes * local_ranks
    if free is None or need * MEMORY_MARGIN <= free:
        return
    t = cfg.train
    raise ConfigError(
        f"this run needs about {need / 2**30:.1f} GiB ({local_ranks} process(es) x {rank_bytes / 2**30:.1f} GiB: "
        f"weights, optimizer state, activations and the data batch, as `nanotrain inspect` counts them) and this "
        f"machine has {free / 2**30:.1f} GiB free: lower train.batch_size={t.batch_size} or train.micro_batch_size="
        f"{t.micro_batch_size}, or recompute activations (train.recompute=full).")


def rank_bytes(cfg: Config) -> tuple[int, int]:
    """(the largest rank's peak bytes, one checkpoint's bytes): inspect's memory model for the
    run's config, and the rows of tokens the data loader gathers for one step's batch."""
    from ..inspection.memory import Plan, memory_per_rank

    plan = Plan.from_config(cfg)
    peak = max(s["total"] for s in memory_per_rank(cfg.model, plan, cfg.precision, device="cpu"))
    rows = cfg.train.batch_size // cfg.parallel.dp
    batch = rows * (cfg.train.seq_len + 1) * 8 * 2  # int64 inputs and targets
    return peak + batch, checkpoint_bytes(cfg)


def checkpoint_bytes(cfg: Config) -> int:
    """What a checkpoint holds, whatever the layout: the model's weights at the master's dtype and
    AdamW's two moments at theirs, each written once (ZeRO splits them over the ranks' files, it does
    not add to them). fp32 throughout: 12 bytes a parameter; an all-bf16 recipe: 6. A tied embedding
    is saved under both its names (the model's state dict) but has one pair of moments. The GEMMs'
    low-bit copies (fp8, nvfp4) are made from the master at each step and never saved."""
    from ..inspection.counts import meta_model
    from ..inspection.memory import BYTES

    model, p = meta_model(cfg.model), cfg.precision
    named = sum(t.numel() for _, t in model.named_parameters(remove_duplicate=False))
    distinct = sum(t.numel() for t in model.parameters())
    return named * BYTES[p.master_dtype] + distinct * (BYTES[p.exp_avg_dtype] + BYTES[p.exp_avg_sq_dtype])


def preflight(cfg: Config, device_type: str) -> None:
    """Rank 0's checks, before any work."""
    peak, checkpoint = rank_bytes(cfg)
    check_folders(cfg, checkpoint)
    if device_type == "cpu":
        check_memory(cfg, peak, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
