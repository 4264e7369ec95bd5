"""The run's folder: who may write in it, which checkpoint a run starts from, and the files that
describe the run (rank 0 writes them).

    <train.out_dir>/
        .lock             {"pid": ..., "host": ..., "started": ...}: the run that writes here
        config.json  metrics.jsonl  loss.png  tensorboard/ ...
        precision_policy.json   the recipe of every GEMM module (write_precision_policy)
        checkpoints/      (checkpoint.dir, unless set elsewhere)

The lock. Rank 0 creates .lock with O_CREAT | O_EXCL, which the file system grants to one
process only, and removes it when the run ends (also on errors and preemption). A second run
on the same folder finds it and stops before writing anything. A lock left by a process that
is gone (killed with SIGKILL, a node that rebooted under torchrun --max-restarts) is reclaimed
when its pid no longer runs on this host; a lock from another host cannot be checked from
here, so the error names it and the file to delete. (fcntl.flock would be released by the
kernel at death, but is unreliable on the network file systems clusters share folders on.)

Where a run starts (checkpoint.resume), decided by rank 0 and told to every rank:

    resume     the folder holds complete checkpoints      it holds none
    "auto"     newest valid one (older ones if damaged)   a fresh run
    ""         error: resume, or a new out_dir, or        a fresh run
               train.overwrite=true (archives the old run)
    "latest"   the one `latest` names                     error
    a path     that checkpoint                            (the path's)
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..checkpoint import CheckpointError, CheckpointManager, merge_over_pipeline
from ..config import Config, ConfigError
from ..parallel import collectives
from ..module_spec import module_spec
from ..precision.policy import describe_policy
from .contracts import RuntimeContext

LOCK = ".lock"


def _alive(pid) -> bool:
    """Whether process `pid` of this machine still runs. Anything but a positive integer (a lock
    left empty or garbled by a crash) is no process: os.kill(-1, 0) would ask about every process
    we may signal, and succeed."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunLock:
    """One run per folder (see the module docstring)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK
        self.held = False

    def acquire(self) -> str | None:
        """Take the lock, or raise ConfigError naming its holder. Returns a line to print when a
        stale lock was reclaimed."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        reclaimed = None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:  # being written by its taker this instant, or left empty by a crash
                    time.sleep(0.2)
                    owner = self._owner() or {"pid": -1, "host": socket.gethostname(), "started": "?"}
                if owner.get("host") != socket.gethostname() or _alive(owner.get("pid")):
                    raise ConfigError(
                        f"train.out_dir={self.path.parent} is in use by another run (pid {owner.get('pid')} on "
                        f"{owner.get('host')}, since {owner.get('started')}): wait for it to finish, or give this "
                        f"run another --train.out_dir. If that run is gone, delete {self.path}.")
                # Gone: move its lock aside (a rename: of two runs reclaiming at once, one wins).
                try:
                    os.rename(self.path, self.path.with_name(f"{LOCK}.stale-{os.getpid()}"))
                    os.unlink(self.path.with_name(f"{LOCK}.stale-{os.getpid()}"))
                except FileNotFoundError:
                    pass
                reclaimed = (f"reclaimed the lock on {self.path.parent} left by pid {owner.get('pid')} "
                             f"(started {owner.get('started')}), which no longer runs")
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
            self.held = True
            atexit.register(self.release)  # also when the run ends by an exception
            return reclaimed
        raise ConfigError(f"could not take the lock {self.path}: other runs keep taking it; give this run "
                          "another --train.out_dir.")

    def _owner(self) -> dict | None:
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
            return None
        return owner if isinstance(owner, dict) else None

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        owner = self._owner()
        if owner is not None and owner.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)


@dataclass
class StartPlan:
    """Where the run starts: the checkpoints to try, in order (none: a fresh run)."""

    candidates: list[Path] = field(default_factory=list)
    explicit: bool = False  # the user named it: a damaged one is an error, not a fallback
    lines: list[str] = field(default_factory=list)  # what rank 0 says about it


def _has_run(out_dir: Path, ckpt: CheckpointManager) -> bool:
    return bool(ckpt.complete()) or (out_dir / "metrics.jsonl").is_file() or (out_dir / "config.json").is_file()


def archive(out_dir: Path, ckpt: CheckpointManager) -> Path:
    """Move a previous run's files (all but the lock) to <out_dir>.archived-<time>, its checkpoints
    too where checkpoint.dir lies outside out_dir."""
    dest = out_dir.with_name(f"{out_dir.name}.archived-{time.strftime('%Y%m%d-%H%M%S')}")
    dest.mkdir(parents=True)
    for child in out_dir.iterdir():
        if child.name != LOCK:
            os.rename(child, dest / child.name)
    if ckpt.dir.exists() and out_dir.resolve() not in ckpt.dir.resolve().parents:
        os.rename(ckpt.dir, dest / "checkpoints")
    return dest


def plan_start(cfg: Config, ckpt: CheckpointManager) -> StartPlan:
    """Rank 0's decision (the table in the module docstring); raises ConfigError with the ways out."""
    resume, out_dir = cfg.checkpoint.resume, Path(cfg.train.out_dir)
    if cfg.train.overwrite:
        if resume not in ("", "auto"):
            raise ConfigError(f"train.overwrite=true starts a fresh run, checkpoint.resume={resume!r} continues "
                              "one: keep one of them.")
        if not _has_run(out_dir, ckpt):
            return StartPlan(lines=[f"train.overwrite: {out_dir} holds no previous run; starting a fresh run"])
        dest = archive(out_dir, ckpt)
        return StartPlan(lines=[f"train.overwrite: moved the previous run in {out_dir} to {dest}; starting a "
                                "fresh run"])
    if resume == "auto":
        found = ckpt.complete()
        if not found:
            return StartPlan(lines=[f"checkpoint.resume=auto: no checkpoint in {ckpt.dir}; starting a fresh run"])
        skipped = [f"warning: {p} has no metadata.json (deleted, or its save never finished): it is not a "
                   "checkpoint, so the run continues from an older one" for p in ckpt.unfinished_newer()]
        return StartPlan(found, lines=skipped + [f"checkpoint.resume=auto: continuing from {found[0]}"])
    if resume == "":
        done = ckpt.complete()
        if done:
            raise ConfigError(
                f"train.out_dir={out_dir} holds another run's checkpoints (newest: {done[0].name}) and "
                "checkpoint.resume=\"\" starts a fresh run, which would mix the two: continue that run with "
                "--checkpoint.resume=auto, or start fresh with another --train.out_dir or with "
                f"--train.overwrite=true (moves the old run to {out_dir.name}.archived-<time>).")
        return StartPlan()
    return StartPlan([ckpt.resolve(resume)], explicit=True)


def on_rank0(fn, world) -> object:
    """fn() on rank 0, its result (or its named error, re-raised) on every rank: ranks that wait
    for rank 0's decision must not hang when it fails."""
    outcome = None
    if collectives.rank(world) == 0:
        try:
            outcome = ("ok", fn())
        except (ConfigError, CheckpointError, OSError) as e:
            outcome = ("error", e)
    if collectives.size(world) > 1:
        everyone = [None] * collectives.size(world)
        collectives.all_gather_object(everyone, outcome, world)
        outcome = everyone[0]
    if outcome[0] == "error":
        raise outcome[1]
    return outcome[1]


def write_precision_policy(model: nn.Module, ctx: RuntimeContext) -> str | None:
    """precision_policy.json: the recipe every GEMM module runs in, each pipeline stage's merged
    (rank 0 writes); returns the line for the log. None (no file) for plain fp32 and bf16."""
    p = ctx.cfg.precision
    if p.recipe in ("fp32", "bf16") and not p.overrides:
        return None
    policy = merge_over_pipeline(module_spec(model).gemm_policy, ctx.parallel.pp_group)  # each stage: its modules
    path = ctx.out_dir / "precision_policy.json"
    if ctx.is_main:
        path.write_text(json.dumps(policy, indent=1) + "\n")
    return f"precision policy: {describe_policy(policy)}; every module in {path}"
