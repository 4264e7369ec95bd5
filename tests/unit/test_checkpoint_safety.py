"""Checkpoint safety: a save killed half-way leaves the previous checkpoint and `latest` usable;
asynchronous saves resume bit for bit."""

import os
import signal
import subprocess
import sys
import textwrap
import time

from nanotrain.checkpoint import CheckpointManager, load_checkpoint
from nanotrain.runtime import RuntimeEngine

# A child that saves step 1, then starts saving step 2 with a torch.save that writes half of
# the file and hangs: the parent kills it there (SIGKILL: no cleanup runs).
CHILD = textwrap.dedent("""
    import sys, time, torch
    from nanotrain import checkpoint
    mgr = checkpoint.CheckpointManager(sys.argv[1], keep_last=3)
    mgr.save(1, {"model": {"w": torch.ones(1000)}})
    real_save = torch.save
    def half_save(obj, path):
        with open(path, "wb") as f:
            f.write(b"PK\\x03\\x04 half a file")
            f.flush()
        print("writing", flush=True)
        time.sleep(60)
    checkpoint.torch.save = half_save
    mgr.save(2, {"model": {"w": torch.zeros(1000)}})
""")


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"  # step 2 is half written now
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert (tmp_path / "latest").read_text().strip() == "step_00000001"
    assert not (tmp_path / "step_00000002").exists()  # the half-written one never became visible
    mgr = CheckpointManager(tmp_path)
    state = mgr.load("latest")
    assert state["step"] == 1 and float(state["model"]["w"].sum()) == 1000
    # The run can save again; the leftover temporary folder is replaced.
    mgr.save(2, {"model": {"w": 2 * state["model"]["w"]}})
    assert load_checkpoint(mgr.resolve("latest"))["step"] == 2


def test_async_save_resumes_bit_exact(make_config):
    common = ["--schedule.decay_steps=20", "--checkpoint.interval=5", "--checkpoint.async_save=true"]
    straight = RuntimeEngine(make_config(*common, "--train.out_dir=" + str(make_config().train.out_dir) + "_a")).run()
    first = RuntimeEngine(make_config(*common, "--train.max_steps=10")).run()
    t = time.perf_counter()
    resumed = RuntimeEngine(make_config(*common, "--checkpoint.resume=latest")).run()
    assert time.perf_counter() - t < 60
    assert {**first.losses, **resumed.losses} == straight.losses  # exact float equality
    assert (first.out_dir / "checkpoints" / "latest").read_text().strip() == "step_00000020"


def test_async_snapshot_is_not_the_live_state(tmp_path):
    """The optimizer steps in place while the thread writes: the file holds the values at save time."""
    import torch

    mgr = CheckpointManager(tmp_path)
    live = {"step": torch.tensor(1.0), "w": torch.ones(3)}
    mgr.save_async(1, {"optimizer": live})
    live["step"] += 1
    live["w"].mul_(5)
    mgr.wait()
    saved = load_checkpoint(mgr.resolve("latest"))["optimizer"]
    assert float(saved["step"]) == 1.0 and saved["w"].tolist() == [1.0, 1.0, 1.0]
