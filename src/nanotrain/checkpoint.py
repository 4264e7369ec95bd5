"""Checkpoints: everything a run needs to continue bit for bit, written atomically.

Layout on disk:

    <checkpoint.dir>/
        step_00000500/state.pt   model, optimizer, RNG states, step (= data position), config, tokenizer
        step_00001000/state.pt
        latest                   text file naming the newest complete checkpoint

A checkpoint is first written under a temporary name and renamed into place
only when complete (a rename within one file system is atomic), then `latest`
is replaced the same way. A crash mid-save leaves the previous checkpoint and
`latest` intact. Only the newest `keep_last` are kept. With
checkpoint.async_save the write happens on a background thread (save_async).

The data position is the step: the sampler's batch at step s depends only on
(seed, s), so restoring the step restores the data stream.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
STATE_FILE = "state.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message says what is wrong and what to do."""


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, directory: str | Path, keep_last: int = 3):
        self.dir = Path(directory)
        self.keep_last = keep_last
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

    def save_async(self, step: int, state: dict[str, Any]) -> Path:
        """save() on a background thread, so training goes on while the file is written.

        The state is snapshotted first (every tensor copied to the CPU): the optimizer
        steps in place while the thread writes. One write at a time: a second save
        waits for the first. wait() before exit (the engine does)."""
        self.wait()
        snapshot = _snapshot(state)

        def write():
            try:
                self.save(step, snapshot)
            except BaseException as e:  # re-raised by the next wait()
                self._error = e

        self._writer = threading.Thread(target=write, name=f"checkpoint-step-{step}", daemon=False)
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

    def save(self, step: int, state: dict[str, Any]) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"step_{step:08d}"
        tmp = self.dir / f".tmp_step_{step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        torch.save({"format_version": FORMAT_VERSION, "step": step, **state}, tmp / STATE_FILE)
        if final.exists():  # re-saving the same step (e.g. a resumed run's final save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(self.dir / "latest", final.name + "\n")
        self._prune()
        return final

    def _prune(self) -> None:
        done = sorted(p for p in self.dir.glob("step_*") if (p / STATE_FILE).exists())
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def resolve(self, spec: str) -> Path:
        """'latest', a checkpoint folder, its state.pt, or a run/checkpoints folder holding `latest`."""
        path = self.dir if spec == "latest" else Path(spec)
        return resolve_checkpoint(path)

    def load(self, spec: str) -> dict[str, Any]:
        return load_checkpoint(self.resolve(spec))


def _snapshot(obj):
    """A deep copy whose tensors are CPU clones (nothing shared with the live run)."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    return obj


def resolve_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / "latest").is_file():
            name = (candidate / "latest").read_text().strip()
            path = candidate / name
            break
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}. Pass a checkpoint folder (…/checkpoints/step_00000500), "
            "a run's out_dir or checkpoints folder containing a 'latest' file, or 'latest' to "
            "continue the run in checkpoint.dir.")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {e}. The file is damaged or not a "
                              "nano-train checkpoint; resume from an earlier one.") from None
    version = state.get("format_version") if isinstance(state, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version}, this nano-train reads "
                              f"version {FORMAT_VERSION}. Resume with the nano-train version that wrote it.")
    return state


def check_compatible(saved_cfg: dict[str, Any], cfg_dict: dict[str, Any], path: Path) -> None:
    """The model and the data stream must match to continue a run; everything else may change."""
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


# ---------------------------------------------------------------------------
# Layout-independent tensors: a checkpoint stores every tensor whole (as one
# process would hold it); a tensor-parallel rank gathers its shards on save and
# keeps its slice on load. The same file therefore resumes under any tp or dp.
# ---------------------------------------------------------------------------

def gather_full(t: torch.Tensor, shard, groups) -> torch.Tensor:
    """The full tensor from every rank's shard (`shard`: layers.Shard or None; `groups`: the
    process group of each Shard.axis, e.g. ParallelState.groups(), or one group for all)."""
    if shard is None or shard.world == 1:
        return t.detach().clone()
    import torch.distributed as dist

    group = groups[shard.axis] if isinstance(groups, dict) else groups
    parts = [torch.empty_like(t) for _ in range(shard.world)]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    return torch.cat(parts, dim=shard.dim)


def local_slice(full: torch.Tensor, shard) -> torch.Tensor:
    if shard is None or shard.world == 1:
        return full
    size = full.shape[shard.dim] // shard.world
    return full.narrow(shard.dim, shard.rank * size, size).contiguous()


def full_model_state(model: torch.nn.Module, groups) -> dict[str, torch.Tensor]:
    state = model.state_dict(keep_vars=True)
    return {name: gather_full(t, getattr(t, "shard", None), groups) for name, t in state.items()}


def load_full_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict(keep_vars=True)
    model.load_state_dict({name: local_slice(state[name], getattr(own[name], "shard", None))
                           for name in own if name in state}, strict=True)


def _optimizer_params(opt: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in opt.param_groups for p in group["params"]]


def full_optimizer_state(opt: torch.optim.Optimizer, names: dict, groups) -> dict:
    """Whole moments keyed by parameter name (`names`: parameter -> name), so that the
    same file loads whatever the layout: a pipeline stage holds only some parameters,
    and torch's own state_dict numbers them by position in this process's optimizer."""
    sd = opt.state_dict()
    params = _optimizer_params(opt)
    state = {names[params[i]]: {k: gather_full(v, getattr(params[i], "shard", None), groups)
                                if torch.is_tensor(v) and v.shape == params[i].shape else v
                                for k, v in s.items()} for i, s in sd["state"].items()}
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return {"state": state, "param_groups": hyper}


def load_full_optimizer_state(opt: torch.optim.Optimizer, names: dict, sd: dict) -> None:
    params = _optimizer_params(opt)
    if any(not isinstance(k, str) for k in sd["state"]):
        raise CheckpointError("this checkpoint keys optimizer state by position (an older nano-train): resume "
                              "it with the version that wrote it, or start a fresh run.")
    state = {}
    for i, p in enumerate(params):
        s = sd["state"].get(names[p])
        if s is None:
            continue
        shard = getattr(p, "shard", None)
        state[i] = {k: local_slice(v, shard) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in s.items()}
    groups = opt.state_dict()["param_groups"]
    if len(groups) != len(sd["param_groups"]):
        raise CheckpointError(f"the checkpoint has {len(sd['param_groups'])} optimizer parameter groups, this "
                              f"run {len(groups)}: resume with the same optimizer settings.")
    opt.load_state_dict({"state": state, "param_groups": [{**h, "params": g["params"]}
                                                          for h, g in zip(sd["param_groups"], groups)]})


def merge_over_pipeline(part: dict, pp_group) -> dict:
    """Every pipeline stage's part of a state, merged by name on every rank of the pp group
    (each stage holds different parameters; a tied embedding's copies are equal)."""
    import torch.distributed as dist

    if pp_group is None or dist.get_world_size(pp_group) == 1:
        return part
    parts = [None] * dist.get_world_size(pp_group)
    dist.all_gather_object(parts, part, group=pp_group)
    merged: dict = {}
    for p in parts:
        merged.update(p)
    return merged
