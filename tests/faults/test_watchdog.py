"""A stalled rank (SIGSTOP: a hung file system, a swapping node) ends the job within the step
timeout, with a message that names it, instead of gloo's silent 30-minute wait."""

import time

import pytest

from fault_launch import fault_args, start_world
from nanotrain.runtime.watchdog import EXIT_STALLED, Watchdog


@pytest.mark.slow
def test_a_stalled_rank_ends_the_job_within_the_timeout_naming_it(tmp_path):
    procs = start_world(2, fault_args(tmp_path, "--parallel.dp=2", "--train.step_timeout_s=4",
                                      "--train.max_steps=400", "--fault", "STOP@15:rank1"))
    began = time.monotonic()
    try:
        out, err = procs[0].communicate(timeout=60)
        waited = time.monotonic() - began
    finally:
        for p in procs:
            p.kill()  # rank 1 is stopped: SIGKILL still ends it
            p.communicate()
    assert procs[0].returncode == EXIT_STALLED, out + err
    assert "watchdog: rank 0's train of step 15 has run" in err  # rank 1 stopped inside step 15
    # Rank 1 stopped after its backward; rank 0's next collective is the end-of-step agreement on
    # signals over the world (preemption.py): the step's loss was summed over dp before the fault.
    assert "blocked in all_reduce(world)" in err
    assert "-> rank 1 stalled" in err
    assert "Traceback" not in err
    assert waited < 40  # start-up, 15 steps and the 4 s limit; gloo's own timeout would be 300 s
    assert not (tmp_path / "run" / ".lock").exists()  # released on the way out


def test_the_limit_follows_the_median_step_and_the_message_names_the_silent_rank():
    w = Watchdog(rank=0, world_size=3, step_timeout_s=0, startup_limit_s=300)
    assert w.limit == 300  # until three steps are timed
    for s in (0.1, 0.2, 0.1):
        w.step_took(s)
    assert w.limit == 60  # 10 x the median, at least 60 s
    for s in (10.0,) * 5:
        w.step_took(s)
    assert w.limit == 100
    now = time.time()
    mine = {"step": 7, "phase": "train", "waiting": "all_reduce(dp) for 100 s", "time": now, "pid": 1}
    others = {1: {**mine, "pid": 2}, 2: {**mine, "waiting": None, "time": now - 90, "pid": 3}}
    text = w.report(101, mine, others)
    assert "rank 2 (pid 3): train of step 7, not in a collective; last heartbeat 90 s ago" in text
    assert "-> rank 2 stalled" in text
    assert "store does not answer" in w.report(101, mine, None)
