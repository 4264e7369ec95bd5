"""Checkpoint integrity: a damaged shard file is caught by its checksums when read and named;
checkpoint.resume=auto falls back to the previous checkpoint; checkpoints from before checksums
still load; pruning never deletes the checkpoint to resume from."""

import json
from pathlib import Path

import pytest
import torch
import xxhash

from nanotrain.checkpoint import (CheckpointError, CheckpointManager, CheckpointReader, CorruptCheckpointError,
                                  load_checkpoint, whole)
from nanotrain.runtime import RuntimeEngine


def _save(folder, step=1, n=1 << 16):
    """A checkpoint of two tensors, 512 KiB of floats: the middle of its file is tensor data."""
    pieces = [whole("model/w", torch.linspace(-1, 1, n)), whole("optim/exp_avg/w", torch.full((n,), 0.25))]
    CheckpointManager(folder).save(step, pieces, {})
    return folder / f"step_{step:08d}"


def _damage(path, size=4096):
    """Overwrite 4 KiB in the middle with finite floats: safetensors reads them without complaint."""
    garbage = torch.full((size // 4,), 1.5).numpy().tobytes()
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(garbage)


def test_checksums_are_recorded_per_chunk_and_sizes_per_file(tmp_path):
    folder = _save(tmp_path)
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["files"]["rank_00000.safetensors"] == {"bytes": (folder / "rank_00000.safetensors").stat().st_size}
    chunk = meta["tensors"]["model/w"]["chunks"][0]
    assert chunk["xxh3_128"] == xxhash.xxh3_128_hexdigest(torch.linspace(-1, 1, 1 << 16).numpy().tobytes())
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.json", "rank_00000.safetensors"]  # no sidecars


def test_damaged_file_is_named_when_filled(tmp_path):
    folder = _save(tmp_path)
    _damage(folder / "rank_00000.safetensors")
    unchecked = CheckpointReader(folder, verify=False)  # what a reader without checksums would load
    assert not torch.equal(torch.cat([unchecked.full("model/w"), unchecked.full("optim/exp_avg/w")]),
                           torch.cat([torch.linspace(-1, 1, 1 << 16), torch.full((1 << 16,), 0.25)]))
    reader = load_checkpoint(tmp_path)  # opening reads metadata.json only
    with pytest.raises(CorruptCheckpointError, match=r"rank_00000.safetensors is damaged: \S+@0 has xxh3_128 "
                                                     r"[0-9a-f]{12}…, metadata.json recorded [0-9a-f]{12}…; "
                                                     r"resume from an earlier checkpoint") as err:
        reader.full("model/w"), reader.full("optim/exp_avg/w")
    assert "\n" not in str(err.value) and isinstance(err.value, CheckpointError)
    with pytest.raises(CorruptCheckpointError, match="is damaged"):
        CheckpointReader(folder).verify_all()


def test_truncated_file_is_named_before_hashing(tmp_path):
    folder = _save(tmp_path)
    path = folder / "rank_00000.safetensors"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(CorruptCheckpointError, match=r"rank_00000.safetensors is damaged: it has \d+ bytes, "
                                                     r"metadata.json recorded \d+ \(truncated or replaced\)"):
        load_checkpoint(tmp_path).full("model/w")


def test_checkpoint_without_checksums_loads_unverified(tmp_path):
    """Written before checksums existed: no "files" in metadata.json."""
    folder = _save(tmp_path)
    meta_path = folder / "metadata.json"
    meta = json.loads(meta_path.read_text())
    del meta["files"]
    meta_path.write_text(json.dumps(meta))
    reader = load_checkpoint(tmp_path)
    reader.verify_all()  # nothing to check against: no error
    assert torch.equal(reader.full("model/w"), torch.linspace(-1, 1, 1 << 16))


def test_resume_from_a_damaged_checkpoint_names_the_file(make_config):
    common = ["--checkpoint.interval=5", "--train.eval_interval=0", "--schedule.decay_steps=20"]
    RuntimeEngine(make_config(*common, "--train.max_steps=5")).run()
    folder = Path(make_config().train.out_dir) / "checkpoints" / "step_00000005"
    _damage(folder / "rank_00000.safetensors", size=256)  # a tiny model: its file is ~40 KB
    with pytest.raises(CheckpointError, match=f"{folder / 'rank_00000.safetensors'} is damaged"):
        RuntimeEngine(make_config(*common, "--train.max_steps=10", "--checkpoint.resume=latest")).run()


def test_resume_auto_falls_back_to_the_previous_checkpoint(make_config, capsys):
    """4 KiB of finite garbage in the newest checkpoint: resume=auto warns, naming the file, and
    continues from the one before, as the run that saved it would have."""
    common = ["--checkpoint.interval=5", "--train.eval_interval=0", "--schedule.decay_steps=20",
              "--precision.recipe=fp32", "--checkpoint.keep_last=3"]
    straight = RuntimeEngine(make_config(*common, "--train.max_steps=15",
                                         f"--train.out_dir={make_config().train.out_dir}_straight")).run()
    RuntimeEngine(make_config(*common, "--train.max_steps=10")).run()
    damaged = Path(make_config().train.out_dir) / "checkpoints" / "step_00000010" / "rank_00000.safetensors"
    _damage(damaged, size=256)
    resumed = RuntimeEngine(make_config(*common, "--train.max_steps=15")).run()
    out = capsys.readouterr().out
    assert f"warning: checkpoint {damaged.parent} is damaged: checkpoint file {damaged} is damaged" in out
    assert "Falling back to" in out and "step_00000005" in out
    assert min(resumed.losses) == 6
    assert resumed.losses == {s: v for s, v in straight.losses.items() if s >= 6}


def test_prune_keeps_the_new_runs_checkpoint_among_an_old_runs_higher_steps(tmp_path):
    for step in (100, 200, 300):  # an earlier run in the same folder
        CheckpointManager(tmp_path, keep_last=2).save(step, [whole("model/w", torch.zeros(2))], {})
    mgr = CheckpointManager(tmp_path, keep_last=2)
    mgr.save(5, [whole("model/w", torch.ones(2))], {})  # a new run's first checkpoint
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000005", "step_00000200", "step_00000300"]
    assert load_checkpoint(tmp_path).full("model/w").tolist() == [1.0, 1.0]
    mgr.save(10, [whole("model/w", torch.full((2,), 2.0))], {})
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000010", "step_00000200", "step_00000300"]
    assert load_checkpoint(tmp_path).step == 10


def test_prune_keeps_the_checkpoint_latest_names(tmp_path):
    """`latest` names the newest save after every commit; should its update have failed, the
    checkpoint it still names is the one a resume reads, and stays."""
    for step in (1, 2, 3):
        CheckpointManager(tmp_path).save(step, [whole("model/w", torch.zeros(2))], {})
    (tmp_path / "latest").write_text("step_00000001\n")
    CheckpointManager(tmp_path, keep_last=1)._prune(tmp_path / "step_00000003")
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000001", "step_00000003"]
