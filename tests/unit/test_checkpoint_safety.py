"""Checkpoint safety: a training run killed in the middle of a save leaves the previous
checkpoint and `latest` usable, and the run resumes from it bit for bit; asynchronous
saves resume bit for bit too."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

from conftest import tiny_config
from nanotrain.checkpoint import CheckpointManager, load_checkpoint, whole
from nanotrain.runtime import RuntimeEngine

# A training run that saves at step 5, then at step 10 writes half of its shard file and
# hangs there: the parent kills it (SIGKILL: no cleanup runs).
CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from conftest import tiny_config
    from pathlib import Path
    from nanotrain.checkpoint import manager
    from nanotrain.runtime import RuntimeEngine

    real_save, calls = manager.save_file, []
    def save_file(tensors, path):
        calls.append(path)
        if len(calls) == 1:
            return real_save(tensors, path)
        with open(path, "wb") as f:
            f.write(b"half a safetensors file")
            f.flush()
        print("writing", flush=True)
        time.sleep(120)
    manager.save_file = save_file
    RuntimeEngine(tiny_config(Path(sys.argv[2]), *sys.argv[3:])).run()
""")

ARGS = ["--train.max_steps=10", "--checkpoint.interval=5", "--train.eval_interval=0", "--schedule.decay_steps=20"]


def test_kill_during_save_then_resume(tmp_path):
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.Popen([sys.executable, "-c", CHILD, tests_dir, str(tmp_path), *ARGS],
                             stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline().strip()
        while line and line != "writing":  # the run's own output before the save
            line = child.stdout.readline().strip()
        assert line == "writing"  # step 10 is half written now
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000005"
    assert not (ckpts / "step_00000010").exists()  # the half-written one never became visible
    assert (ckpts / ".tmp_step_00000010").exists()
    assert load_checkpoint(ckpts).step == 5

    # Resuming continues from step 5 exactly as a run that was never killed.
    straight = RuntimeEngine(tiny_config(tmp_path / "straight", *ARGS)).run().losses
    resumed = RuntimeEngine(tiny_config(tmp_path, *ARGS, "--checkpoint.resume=latest")).run()
    assert resumed.losses == {s: straight[s] for s in range(6, 11)}  # exact float equality
    assert (ckpts / "latest").read_text().strip() == "step_00000010"
    assert not (ckpts / ".tmp_step_00000010").exists()  # the leftover was replaced


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
    mgr = CheckpointManager(tmp_path)
    step, w = torch.tensor(1.0), torch.ones(3)
    mgr.save_async(1, [whole("optim/step", step), whole("model/w", w)], {})
    step += 1
    w.mul_(5)
    mgr.wait()
    saved = load_checkpoint(tmp_path)
    assert float(saved.full("optim/step")) == 1.0 and saved.full("model/w").tolist() == [1.0, 1.0, 1.0]


def test_keep_last(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        mgr.save(step, [whole("model/w", torch.full((2,), float(step)))], {})
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]
    assert load_checkpoint(tmp_path).full("model/w").tolist() == [3.0, 3.0]
