"""A full disk while saving: the save raises a CheckpointError that says so, the previous
checkpoint and `latest` stay as they were and no temporary folder is left, whether the save
runs on the training thread or in the background."""

import errno
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import nanotrain
from nanotrain.checkpoint import CheckpointError, CheckpointManager, load_checkpoint, manager, whole
from nanotrain.runtime import RuntimeEngine

from fault_launch import fault_args, start_world

# What safetensors' writer (Rust) raises on a full disk: text, not an OSError with an errno.
RUST_ENOSPC = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
INJECT = {"writing the rank file": (manager, "save_file", RUST_ENOSPC),  # where the disk fills up
          "renaming it": (manager.os, "replace", OSError(errno.ENOSPC, "No space left on device"))}


def _raise(exc):
    def fail(*args, **kwargs):
        raise exc
    return fail


def _message(folder, step, previous="step_00000001"):
    return (rf"^no space left on device writing checkpoint step {step} to {re.escape(str(folder))}; the previous "
            rf"checkpoint \({previous}\) is intact and `latest` still names it: free space or set checkpoint.dir "
            r"to another disk\.$")


def _as_before(folder, previous="step_00000001"):
    assert (folder / "latest").read_text().strip() == previous
    assert sorted(p.name for p in folder.iterdir()) == ["latest", previous]  # no .tmp_step_*
    load_checkpoint(folder).verify_all()


def _saved_once(folder):
    mgr = CheckpointManager(folder)
    mgr.save(1, [whole("model/w", torch.ones(4))], {})
    return mgr


@pytest.mark.parametrize("where", INJECT)
def test_full_disk_during_a_save(tmp_path, monkeypatch, where):
    mgr = _saved_once(tmp_path)
    target, name, error = INJECT[where]
    monkeypatch.setattr(target, name, _raise(error))
    with pytest.raises(CheckpointError, match=_message(tmp_path, 2)):
        mgr.save(2, [whole("model/w", torch.zeros(4))], {})
    monkeypatch.undo()
    _as_before(tmp_path)


def test_full_disk_during_a_background_save(tmp_path, monkeypatch):
    mgr = _saved_once(tmp_path)
    monkeypatch.setattr(manager, "save_file", _raise(RUST_ENOSPC))
    mgr.save_async(2, [whole("model/w", torch.zeros(4))], {})
    with pytest.raises(CheckpointError, match=_message(tmp_path, 2)):
        mgr.wait()
    monkeypatch.undo()
    _as_before(tmp_path)
    mgr.save_async(3, [whole("model/w", torch.zeros(4))], {})  # space freed: saving works again
    mgr.wait()
    assert load_checkpoint(tmp_path).step == 3


def test_full_disk_at_the_first_save(tmp_path, monkeypatch):
    monkeypatch.setattr(manager, "save_file", _raise(OSError(errno.EDQUOT, "Disk quota exceeded")))
    with pytest.raises(CheckpointError, match="^no space left on device writing checkpoint step 1 to .*; no earlier "
                                              "checkpoint exists: free space or set checkpoint.dir to another disk"):
        CheckpointManager(tmp_path).save(1, [whole("model/w", torch.ones(4))], {})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("async_save", [False, True])
def test_training_run_stops_with_the_error(make_config, monkeypatch, async_save):
    real, calls = manager.save_file, []

    def save_file(tensors, path):  # the disk is full by the second save (step 10)
        calls.append(path)
        return real(tensors, path) if len(calls) == 1 else _raise(RUST_ENOSPC)()

    monkeypatch.setattr(manager, "save_file", save_file)
    cfg = make_config("--checkpoint.interval=5", "--train.max_steps=10", "--train.eval_interval=0",
                      f"--checkpoint.async_save={str(async_save).lower()}")
    folder = Path(cfg.train.out_dir) / "checkpoints"
    with pytest.raises(CheckpointError, match=_message(folder, 10, "step_00000005")):
        RuntimeEngine(cfg).run()
    _as_before(folder, "step_00000005")


# A real full disk: a 256 KiB tmpfs, mounted in a user and mount namespace of our own.
REAL = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from nanotrain.checkpoint import CheckpointError, CheckpointManager, load_checkpoint, whole
    folder = Path(sys.argv[1])
    mgr = CheckpointManager(folder)
    mgr.save(1, [whole("model/w", torch.ones(1024))], {})  # 4 KiB: fits
    try:
        mgr.save(2, [whole("model/w", torch.ones(1 << 17))], {})  # 512 KiB: does not
    except CheckpointError as e:
        print(e)
    print(sorted(p.name for p in folder.iterdir()), load_checkpoint(folder).step)
""")


def test_real_full_disk(tmp_path):
    probe = ["unshare", "--user", "--map-root-user", "--mount"]
    if shutil.which("unshare") is None or subprocess.run(probe + ["true"], capture_output=True).returncode:
        pytest.skip("unshare --user --mount is not allowed here (needed to mount a small tmpfs)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(nanotrain.__file__).parents[1])}
    out = subprocess.run(probe + ["sh", "-c", 'mount -t tmpfs -o size=256k tmpfs "$1" && exec "$2" -c "$3" "$1"',
                                  "sh", str(mnt), sys.executable, REAL], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    message, state = out.stdout.strip().splitlines()
    assert re.match(_message(mnt, 2), message), message
    assert state == "['latest', 'step_00000001'] 1"


@pytest.mark.slow
def test_rank_0s_full_disk_ends_every_rank_at_once(tmp_path):
    """Rank 0's write of the step-20 checkpoint fails: rank 1, which wrote its part, is told by rank
    0's marker (checkpoint/manager.py) instead of waiting at the next collective for
    parallel.timeout_s; both exit with code 2 within 10 s of the failure, rank 0 saying what to do in
    one line, and step 10 stays `latest`."""
    procs = start_world(2, fault_args(tmp_path, "--parallel.dp=2", "--train.max_steps=30", "--parallel.timeout_s=40",
                                            "--fault", "ENOSPC@20"))
    exited = [None, None]
    while None in exited:
        for i, p in enumerate(procs):
            if exited[i] is None and p.poll() is not None:
                exited[i] = time.time()
        time.sleep(0.05)
    outs = [p.communicate() for p in procs]
    folder = tmp_path / "run" / "checkpoints"
    assert [p.returncode for p in procs] == [2, 2], outs
    errors = [line for o, e in outs for line in (o + e).splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and re.match(r"^error: " + _message(folder, 20, "step_00000010")[1:], errors[0]), outs
    assert max(exited) - float((tmp_path / "run" / ".enospc_at").read_text()) < 10
    _as_before(folder, "step_00000010")
