"""One run per folder: checkpoint.resume=auto, the refusal to mix a fresh run into another run's
folder, train.overwrite's archive, and the out_dir lock."""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import tiny_config
from fault_launch import fault_args, run_one
from nanotrain.checkpoint import CheckpointError
from nanotrain.config import ConfigError
from nanotrain.runtime import RuntimeEngine
from nanotrain.runtime.run_dir import LOCK, RunLock

FP32 = ("--precision.recipe=fp32", "--checkpoint.interval=10")


def _run(tmp_path, *overrides):
    return RuntimeEngine(tiny_config(tmp_path, *FP32, *overrides)).run()


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_issue_sequence_keeps_every_checkpoint(tmp_path, capsys):
    """30 steps, then the same command at max_steps=10, then at 40: nothing is deleted, `latest`
    always names a checkpoint, and the last run continues the first."""
    _run(tmp_path, "--train.max_steps=30")
    ckpts = tmp_path / "run" / "checkpoints"
    saved = sorted(p.name for p in ckpts.iterdir())
    assert _run(tmp_path, "--train.max_steps=10").final_step == 30  # resume=auto: the run is complete
    assert "is complete: its newest checkpoint is at step 30, train.max_steps=10" in capsys.readouterr().out
    assert sorted(p.name for p in ckpts.iterdir()) == saved
    assert (ckpts / "latest").read_text().strip() == "step_00000030"
    with pytest.raises(ConfigError, match="step 30, already at train.max_steps=10"):  # named explicitly: an error
        _run(tmp_path, "--train.max_steps=10", "--checkpoint.resume=latest")
    result = _run(tmp_path, "--train.max_steps=40")
    assert min(result.losses) == 31 and result.final_step == 40


def test_resume_auto_starts_fresh_then_continues(tmp_path, capsys):
    assert min(_run(tmp_path, "--train.max_steps=10").losses) == 1
    assert "checkpoint.resume=auto: no checkpoint in" in capsys.readouterr().out
    assert min(_run(tmp_path, "--train.max_steps=20").losses) == 11
    assert "checkpoint.resume=auto: continuing from" in capsys.readouterr().out


def test_a_fresh_run_in_a_used_folder_is_refused_before_writing_anything(tmp_path):
    _run(tmp_path, "--train.max_steps=10")
    before = _files(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"holds another run's checkpoints.*--checkpoint.resume=auto.*"
                                          r"--train.out_dir.*--train.overwrite=true"):
        _run(tmp_path, "--train.max_steps=10", "--checkpoint.resume=")
    assert _files(tmp_path / "run") == before


def test_overwrite_archives_the_old_run_and_starts_fresh(tmp_path, capsys):
    _run(tmp_path, "--train.max_steps=10")
    old = _files(tmp_path / "run")
    result = _run(tmp_path, "--train.max_steps=10", "--train.overwrite=true")
    assert min(result.losses) == 1
    archived = [p for p in tmp_path.iterdir() if p.name.startswith("run.archived-")]
    assert len(archived) == 1 and _files(archived[0]) == old
    assert "moved the previous run" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="keep one of them"):
        _run(tmp_path, "--train.overwrite=true", "--checkpoint.resume=latest")


def test_a_live_lock_stops_the_run_and_a_dead_one_is_reclaimed(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / LOCK).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename, "started": "x"}))
        with pytest.raises(ConfigError, match=f"in use by another run \\(pid {holder.pid}.*delete .*{LOCK}"):
            _run(tmp_path, "--train.max_steps=10")
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    result = _run(tmp_path, "--train.max_steps=10")  # the holder is gone: its lock is stale
    assert result.final_step == 10
    assert f"reclaimed the lock on {run_dir} left by pid {holder.pid}" in capsys.readouterr().out
    assert not (run_dir / LOCK).exists()  # released at the end


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        _run(tmp_path, "--checkpoint.resume=latest")  # no checkpoint: fails after taking the lock
    assert not (tmp_path / "run" / LOCK).exists()
    lock = RunLock(tmp_path / "run")
    assert lock.acquire() is None and lock.held
    with pytest.raises(ConfigError, match="in use"):
        RunLock(tmp_path / "run").acquire()
    lock.release()
    assert not (tmp_path / "run" / LOCK).exists()


@pytest.mark.slow
def test_two_runs_started_on_one_folder(tmp_path):
    """The second stops with the named error before writing; the first's metrics stay in order."""
    first = subprocess.Popen([sys.executable, "-m", "nanotrain", "train", *fault_args(tmp_path, "--train.max_steps=300")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "run" / LOCK
    for _ in range(300):
        if lock.exists():
            break
        time.sleep(0.1)
    second = run_one(fault_args(tmp_path))
    out, err = first.communicate(timeout=120)
    assert second.returncode == 2 and "is in use by another run" in second.stderr
    assert first.returncode == 0, err
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)


def test_init_from_starts_the_run_and_a_restart_resumes_it(tmp_path, capsys):
    """checkpoint.init_from with resume=auto: the weights start a fresh run; once that run has a
    checkpoint, running the same command again continues it (a preempted fine-tune is not restarted)."""
    source = _run(tmp_path / "source", "--train.max_steps=10")
    weights = source.out_dir / "checkpoints" / "step_00000010"
    common = (f"--checkpoint.init_from={weights}", "--schedule.decay=constant")
    first = _run(tmp_path, *common, "--train.max_steps=10")
    assert min(first.losses) == 1 and first.losses[1] < source.losses[1]  # started from trained weights
    again = _run(tmp_path, *common, "--train.max_steps=20")
    assert min(again.losses) == 11
    assert "checkpoint.resume=auto: continuing from" in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"", b'{"pid": "abc", "host": "%s"}' % os.uname().nodename.encode(),
                                     b'{"pid": -1, "host": "%s"}' % os.uname().nodename.encode(), b"\xff\xfe[", b"[1, 2]"])
def test_a_damaged_lock_is_reclaimed_not_a_traceback(tmp_path, content):
    """A lock left empty (a crash between create and write), with a pid that is no process (-1:
    os.kill(-1, 0) succeeds; "abc"), or not JSON at all, names no live run (issue 40)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK).write_bytes(content)
    lock = RunLock(tmp_path / "run")
    assert lock.acquire().startswith(f"reclaimed the lock on {tmp_path / 'run'}")
    lock.release()


def test_latest_that_names_nothing_and_a_checkpoint_without_metadata(tmp_path, capsys):
    """`latest` garbled (not UTF-8): sampling names the file and the fix; resume=auto continues from
    the newest complete checkpoint. The newest checkpoint's metadata.json deleted: resume continues
    from the one before, and says which it passed over (issue 40)."""
    from nanotrain.cli import main

    _run(tmp_path, "--train.max_steps=20")
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "latest").write_bytes(b"\xff\xfe\x00step")
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {ckpts / 'latest'} does not name a checkpoint") and err.count("\n") == 1, err
    (ckpts / "step_00000020" / "metadata.json").unlink()
    result = _run(tmp_path, "--train.max_steps=25", "--checkpoint.resume=auto", "--schedule.decay_steps=30")
    out = capsys.readouterr().out
    assert f"warning: {ckpts / 'step_00000020'} has no metadata.json" in out
    assert f"continuing from {ckpts / 'step_00000010'}" in out and result.final_step == 25


def test_checkpoint_files_respect_the_umask(tmp_path):
    mask = os.umask(0o002)
    try:
        _run(tmp_path, "--train.max_steps=10")
    finally:
        os.umask(mask)
    files = [p for p in (tmp_path / "run" / "checkpoints" / "step_00000010").iterdir()]
    assert files and {p.stat().st_mode & 0o777 for p in files} == {0o664}, {p.name: oct(p.stat().st_mode) for p in files}


def test_a_folder_that_cannot_take_a_checkpoint_stops_the_run_before_any_step(tmp_path):
    """Found at the first save, an unwritable checkpoint folder would lose every step before it
    (1000 by default): preflight.py writes a file there first (issue 40)."""
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(ConfigError, match=r"checkpoint.dir=.*a_file/ckpt cannot be written .*give another "
                                          r"--checkpoint.dir"):
        _run(tmp_path, "--train.max_steps=10", f"--checkpoint.dir={tmp_path / 'a_file' / 'ckpt'}")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step ran


def test_a_batch_the_machine_cannot_hold_is_refused_before_it_is_allocated(tmp_path, monkeypatch):
    """inspect's memory count of the run's ranks against the memory the machine has free: an
    absurd batch is one line naming the keys to lower, not numpy's allocation traceback."""
    import nanotrain.runtime.preflight as preflight

    with pytest.raises(ConfigError, match=r"this run needs about .* GiB .* lower train.batch_size=100000000"):
        _run(tmp_path, "--train.max_steps=10", "--train.batch_size=100000000", "--train.micro_batch_size=4")
    monkeypatch.setattr(preflight, "available_memory", lambda: 1 << 20)  # a machine with 1 MiB free
    with pytest.raises(ConfigError, match=r"this run needs about .* and this machine has 0.0 GiB free"):
        _run(tmp_path, "--train.max_steps=10", "--train.out_dir=" + str(tmp_path / "small"))


@pytest.mark.parametrize("recipe", [(), ("--precision.recipe=bf16", "--precision.param_dtype=bf16",
                                         "--precision.master_dtype=bf16", "--precision.grad_dtype=bf16",
                                         "--precision.exp_avg_dtype=bf16", "--precision.exp_avg_sq_dtype=bf16")],
                         ids=["fp32", "bf16-master-and-moments"])
@pytest.mark.parametrize("layout", [(), ("--optimizer.zero_stage=2",)], ids=["zero0", "zero2"])
def test_the_room_a_checkpoint_needs_is_what_it_takes(tmp_path, recipe, layout):
    """preflight's disk check (issue 40) against a checkpoint written for real: the master and the
    two moments at their dtypes (6 bytes a parameter in bf16, not fp32's 12), the same total under
    ZeRO. The rank files hold that and, per file, a header and the random generators' state
    (~12 KB); metadata.json (tens of KB) is not counted."""
    from nanotrain.runtime.preflight import rank_bytes

    cfg = tiny_config(tmp_path, "--checkpoint.interval=10", "--train.max_steps=10", *recipe, *layout)
    engine = RuntimeEngine(cfg)
    engine.run()
    _, estimate = rank_bytes(engine.cfg)  # the config as the run resolved it (the vocabulary's size)
    folder = tmp_path / "run" / "checkpoints" / "step_00000010"
    files = list(folder.glob("rank_*.safetensors"))
    written = sum(p.stat().st_size for p in files)
    assert estimate <= written <= estimate + 16384 * len(files), (written, estimate)
