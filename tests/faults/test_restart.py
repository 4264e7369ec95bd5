"""torchrun --max-restarts plus checkpoint.resume=auto: a rank killed at step 25 (SIGKILL: no
handler runs) ends the attempt; torchrun restarts the workers, which continue from the newest
checkpoint (step 20), bit-exact with an uninterrupted run of the same layout."""

import pytest

from fault_launch import assert_same_tensors, fault_args, losses, torchrun


@pytest.mark.slow
def test_a_killed_rank_restarts_from_the_newest_checkpoint_bit_exact(tmp_path):
    straight = tmp_path / "straight"
    done = torchrun(2, fault_args(straight, "--parallel.dp=2", "--losses", str(straight / "losses.json")))
    assert done.returncode == 0, done.stderr
    restarted = tmp_path / "restarted"
    done = torchrun(2, fault_args(restarted, "--parallel.dp=2", "--losses", str(restarted / "losses.json"),
                                  "--fault", "KILL@25:rank1:first"), "--max-restarts=1")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "continuing from" in out and "step_00000020" in out  # the second attempt resumed
    assert "connectFullMesh" not in out
    assert "Traceback" not in out  # the survivor of the first attempt says in one line that its peer is gone
    after = losses(restarted / "losses.json")
    assert min(after) == 21
    assert after == {s: v for s, v in losses(straight / "losses.json").items() if s >= 21}
    assert_same_tensors(restarted / "run" / "checkpoints" / "step_00000040",
                        straight / "run" / "checkpoints" / "step_00000040")
