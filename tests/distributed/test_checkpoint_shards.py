"""What a sharded save writes: every rank its own file, every value once, every box named
by its place in the logical tensor; and what a damaged folder says."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from nanotrain.checkpoint import CheckpointError, CheckpointReader, load_checkpoint
from nanotrain.config import Config
from nanotrain.parallel.launch import run_world
from nanotrain.runtime import RuntimeEngine
from test_resume_across_layouts import SMALL, run_config

# One pytest-xdist worker runs this file (make test: --dist loadgroup): its module-scoped
# fixture runs once, not once per worker.
pytestmark = pytest.mark.xdist_group("checkpoint_shards")


def _train_and_shards(cfg_dict):
    """Train, then return this rank's tensor-parallel shards of two weights, and its moments."""
    cfg = Config.from_dict(cfg_dict)
    engine = RuntimeEngine(cfg)
    kept = {}
    original = engine.train_step

    def train_step(step, model, data, opt, lr, ctx, *rest):
        out = original(step, model, data, opt, lr, ctx, *rest)
        if step + 1 == cfg.train.max_steps:  # after the last update: what the final save writes
            params = dict(model.named_parameters())
            kept["wo"] = params["layers.0.attn.wo.weight"].detach().clone()
            kept["norm"] = params["layers.0.attn_norm.weight"].detach().clone()
            kept["tp_rank"] = ctx.parallel.tp_rank
        return out

    engine.train_step = train_step
    engine.run()
    return kept


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    cfg = run_config(tmp, "run", *SMALL, "--train.max_steps=3", "--parallel.tp=2", "--parallel.dp=2",
                     "--optimizer.zero_stage=2", "--parallel.bucket_mb=0.01")
    ranks = run_world(_train_and_shards, 4, dataclasses.asdict(cfg))
    return tmp / "run" / "checkpoints" / "step_00000003", ranks


def test_each_rank_writes_its_file_and_each_value_once(saved):
    folder, _ = saved
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["format_version"] == 2 and meta["step"] == 3 and meta["world_size"] == 4
    assert meta["objects"]["layout"] == "tp=2,dp=2,zero=2,micro=4"  # str(Layout), the micro-batch resolved
    assert meta["objects"]["data"] == {"step": 3, "samples_seen": 24, "tokens_seen": 384, "batch_offset": 0}
    assert sorted(p.name for p in folder.glob("rank_*.safetensors")) == [f"rank_0000{r}.safetensors" for r in range(4)]
    for name, t in meta["tensors"].items():
        # The boxes tile the tensor: no value is missing and none is written twice.
        assert sum(math.prod(c["sizes"]) for c in t["chunks"]) == math.prod(t["shape"]), name
    wo = meta["tensors"]["model/layers.0.attn.wo.weight"]  # row-parallel: split along its input dim
    assert sorted(c["offsets"] for c in wo["chunks"]) == [[0, 0], [0, 16]]
    assert all(c["sizes"] == [32, 16] for c in wo["chunks"])
    assert len(meta["tensors"]["model/layers.0.attn_norm.weight"]["chunks"]) == 1  # replicated: written once
    # ZeRO-2 over dp=2 on each tp rank: each moment's boxes come from more than one rank.
    files = {c["file"] for n, t in meta["tensors"].items() if n.startswith("optim/exp_avg/") for c in t["chunks"]}
    assert len(files) == 4
    assert {f"rng/torch/rank{r}" for r in range(4)} <= set(meta["tensors"])


def test_reading_whole_tensors_from_boxes(saved):
    folder, ranks = saved
    reader = load_checkpoint(folder)
    by_tp = {r["tp_rank"]: r for r in ranks}
    assert torch.equal(reader.full("model/layers.0.attn.wo.weight"), torch.cat([by_tp[0]["wo"], by_tp[1]["wo"]], 1))
    assert torch.equal(reader.full("model/layers.0.attn_norm.weight"), ranks[0]["norm"])
    assert reader.full("optim/step").item() == 3


def test_missing_shard_is_named(saved, tmp_path):
    import shutil

    folder, _ = saved
    copy = tmp_path / "step_00000003"
    shutil.copytree(folder, copy)
    (copy / "rank_00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing 1 shard file\(s\): rank_00002.safetensors"):
        CheckpointReader(copy)


def test_every_rank_file_has_its_checksum(saved):
    folder, _ = saved
    files = json.loads((folder / "metadata.json").read_text())["files"]
    assert sorted(files) == [f"rank_0000{r}.safetensors" for r in range(4)]
    assert all(files[f]["bytes"] == (folder / f).stat().st_size for f in files)
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # the ranks' checksum files are gone
    CheckpointReader(folder).verify_all()


def _save_with_rank1_disk_full(folder):
    """Both ranks save; rank 1's write fails. Returns (error, seconds until it was raised)."""
    import errno
    import time

    import torch.distributed as dist

    from nanotrain.checkpoint import CheckpointManager, manager, whole

    def full(tensors, path):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    rank = dist.get_rank()
    mgr = CheckpointManager(folder, commit_timeout_s=120)
    if rank == 1:
        manager.save_file = full
    t0 = time.monotonic()
    try:
        mgr.save(1, [whole(f"rng/torch/rank{rank}", torch.ones(4))], {})
    except CheckpointError as e:
        return str(e), time.monotonic() - t0
    return None, time.monotonic() - t0


def test_a_rank_whose_write_fails_stops_rank_0_waiting(tmp_path):
    (error0, seconds0), (error1, _) = run_world(_save_with_rank1_disk_full, 2, str(tmp_path))
    expected = (f"no space left on device writing checkpoint step 1 to {tmp_path} (rank 1); no earlier checkpoint "
                "exists: free space or set checkpoint.dir to another disk.")
    assert error0 == expected and error1 == expected
    assert seconds0 < 60  # not the 120 s commit timeout
    assert list(tmp_path.iterdir()) == []  # rank 0 removed the temporary folder


def _save_with_rank0_failing(folder, where, background):
    """Both ranks save step 1, then step 2, whose write fails on rank 0 (`where`). Returns (error,
    the monotonic time it was raised, the time rank 0's write failed), per rank."""
    import errno
    import time

    import torch.distributed as dist

    from nanotrain.checkpoint import CheckpointManager, manager, whole

    rank, failed_at = dist.get_rank(), []

    def full(*args, **kwargs):
        failed_at.append(time.monotonic())
        raise OSError(errno.ENOSPC, "No space left on device")

    mgr = CheckpointManager(folder, commit_timeout_s=120)
    pieces = [whole(f"rng/torch/rank{rank}", torch.ones(4))]
    mgr.save(1, pieces, {})
    if rank == 0 and where == "writing its file":
        manager.save_file = full
    elif rank == 0:  # the rename of the finished folder into place, and no other os.replace
        replace = manager.os.replace

        def commit_fails(src, dst, *args, **kwargs):
            if Path(dst).name.startswith("step_"):
                full()
            return replace(src, dst, *args, **kwargs)

        manager.os.replace = commit_fails
    try:
        if background:
            mgr.save_async(2, pieces, {})
            mgr.wait()
        else:
            mgr.save(2, pieces, {})
    except CheckpointError as e:
        return str(e), time.monotonic(), failed_at[0] if failed_at else None
    return None, time.monotonic(), None


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("where", ["writing its file", "committing"])
def test_rank_0s_failed_write_is_told_to_every_rank(tmp_path, where, background):
    """Rank 1 does not wait for a commit that will not come (commit_timeout_s, parallel.timeout_s):
    it raises rank 0's error, word for word, within 10 s of the failure, and the checkpoint before
    stays `latest`, whole."""
    (error0, _, failed), (error1, raised1, _) = run_world(_save_with_rank0_failing, 2, str(tmp_path), where,
                                                         background)
    expected = (f"no space left on device writing checkpoint step 2 to {tmp_path}; the previous checkpoint "
                "(step_00000001) is intact and `latest` still names it: free space or set checkpoint.dir to "
                "another disk.")
    assert error0 == expected and error1 == expected
    assert raised1 - failed < 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]  # no .tmp_step_00000002
    load_checkpoint(tmp_path).verify_all()


def _save_with_no_folder_on_rank0(folder):
    """Rank 0 cannot make the temporary folder (before the exchange of boxes)."""
    import errno

    import torch.distributed as dist

    from nanotrain.checkpoint import CheckpointManager, manager, whole

    rank = dist.get_rank()
    if rank == 0:
        real = manager.Path.mkdir

        def mkdir(self, *args, **kwargs):
            if self.name.startswith(".tmp_step_"):
                raise OSError(errno.EROFS, "Read-only file system")
            return real(self, *args, **kwargs)

        manager.Path.mkdir = mkdir
    try:
        CheckpointManager(folder).save(1, [whole(f"rng/torch/rank{rank}", torch.ones(4))], {})
    except CheckpointError as e:
        return str(e)


def test_rank_0_that_cannot_make_the_folder_tells_every_rank(tmp_path):
    errors = run_world(_save_with_no_folder_on_rank0, 2, str(tmp_path))
    assert errors[0] == errors[1] == (f"[Errno 30] Read-only file system writing checkpoint step 1 to {tmp_path}; no earlier "
                                      "checkpoint exists: fix that or set checkpoint.dir to another disk.")
