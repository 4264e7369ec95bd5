"""Two machines, stood in for by two torchrun agents on this one (--nnodes=2, c10d rendezvous on
127.0.0.1, docs/multinode.md): a layout split over them trains what one agent trains; a worker
killed on one node restarts both from the newest checkpoint, bit-exact, with no environment
variable set (the store prefix every round agrees on: parallel/rounds.py); SIGTERM to one node's
torchrun saves the same step on every rank of both; `nanotrain verify` checks a layout on them."""

import os
import re
import signal

import pytest

from conftest import tiny_overrides
from fault_launch import assert_same_tensors, await_step, fault_args, losses, torchrun, two_agents

# One pytest-xdist worker runs this file (make test: --dist loadgroup): the one-agent reference
# runs once, and two agents of two workers each are enough for 2 cores.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("two_agents")]

STEPS = ["--train.max_steps=20"]  # checkpoints at 10 and 20 (fault_args: checkpoint.interval=10)


def _args(tmp, *layout):
    return fault_args(tmp, *layout, *STEPS, "--losses", str(tmp / "losses.json"))


def _ok(done):
    for d in done if isinstance(done, list) else [done]:
        out = d.stdout + d.stderr
        assert d.returncode == 0, out
        assert "Traceback" not in without_exit_barrier_log(out) and "connectFullMesh" not in out, out


def without_exit_barrier_log(out: str) -> str:
    """`out` less torch elastic's "Error waiting on exit barrier" record (its traceback included, each
    line carrying the record's `api.py:N]` prefix). After every worker has succeeded, the agent that
    hosts the store (node 0's) may leave before the other agent's barrier wait returns; that agent
    logs the closed connection and still exits 0. It is torch's shutdown, after the run; every other
    traceback still fails the test (seen once in ~10 CI runs, AMX Xeon)."""
    found = re.search(r"(elastic/agent/server/api\.py:\d+\]) Error waiting on exit barrier", out)
    if found is None:
        return out
    return "\n".join(line for line in out.splitlines() if found.group(1) not in line)


@pytest.fixture(scope="module")
def one_agent_dp2(tmp_path_factory):
    """The reference: dp=2 under one agent of two workers, 20 steps."""
    tmp = tmp_path_factory.mktemp("one_agent_dp2")
    _ok(torchrun(2, _args(tmp, "--parallel.dp=2")))
    return tmp


def test_dp2_over_two_agents_trains_what_one_agent_trains(tmp_path, one_agent_dp2):
    _ok(two_agents(1, _args(tmp_path, "--parallel.dp=2")))
    assert losses(tmp_path / "losses.json") == losses(one_agent_dp2 / "losses.json")
    assert_same_tensors(tmp_path / "run" / "checkpoints" / "step_00000020",
                        one_agent_dp2 / "run" / "checkpoints" / "step_00000020")


def test_tp2_dp2_over_two_agents_trains_what_one_agent_trains(tmp_path):
    """Two workers per agent: tp is innermost, so each node holds one tp pair (ranks 0,1 and 2,3) and
    dp crosses the nodes, as on a cluster."""
    layout, short = ("--parallel.tp=2", "--parallel.dp=2"), ["--train.max_steps=6"]
    one, two = tmp_path / "one", tmp_path / "two"
    _ok(torchrun(4, [*_args(one, *layout), *short]))
    _ok(two_agents(2, [*_args(two, *layout), *short]))
    assert len(losses(two / "losses.json")) == 6
    assert losses(two / "losses.json") == losses(one / "losses.json")


def test_a_worker_killed_on_one_node_restarts_both_bit_exact(tmp_path, one_agent_dp2):
    """SIGKILL to rank 1 (the second agent's worker) at step 15: both agents restart their workers
    (--max-restarts=1), which agree on a fresh store prefix and resume from step 10."""
    done = two_agents(1, [*_args(tmp_path, "--parallel.dp=2"), "--fault", "KILL@15:rank1:first"],
                      "--max-restarts=1")
    _ok(done)
    out = "".join(d.stdout + d.stderr for d in done)
    assert "continuing from" in out and "step_00000010" in out
    after = losses(tmp_path / "losses.json")
    assert min(after) == 11
    assert after == {s: v for s, v in losses(one_agent_dp2 / "losses.json").items() if s >= 11}
    assert_same_tensors(tmp_path / "run" / "checkpoints" / "step_00000020",
                        one_agent_dp2 / "run" / "checkpoints" / "step_00000020")


def test_sigterm_to_one_agent_saves_the_same_step_on_both(tmp_path, one_agent_dp2):
    """A scheduler's SIGTERM reaches the second node's torchrun only (not the first's, which hosts
    the rendezvous the other agent still talks to): it forwards it to its worker, both ranks agree at
    the end of a step and save it; both agents end with one line and 143; the same command again
    continues bit-exact."""
    def sigterm_second(agents):
        await_step(tmp_path / "run" / "metrics.jsonl", 5)
        os.kill(agents[1].pid, signal.SIGTERM)

    done = two_agents(1, _args(tmp_path, "--parallel.dp=2"), ours=True, during=sigterm_second)
    for d in done:
        out = d.stdout + d.stderr
        assert d.returncode == 143 and "Traceback" not in out, out
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1]
    step = int(ckpt.name[5:])
    assert 5 <= step < 20
    assert f"stopped by SIGTERM after step {step}: saved checkpoint" in "".join(d.stdout for d in done)
    assert sorted(f.name for f in ckpt.glob("rank_*.safetensors")) == ["rank_00000.safetensors",
                                                                       "rank_00001.safetensors"]
    _ok(torchrun(2, _args(tmp_path, "--parallel.dp=2")))
    resumed = losses(tmp_path / "losses.json")
    assert min(resumed) == step + 1
    assert resumed == {s: v for s, v in losses(one_agent_dp2 / "losses.json").items() if s > step}
    assert_same_tensors(tmp_path / "run" / "checkpoints" / "step_00000020",
                        one_agent_dp2 / "run" / "checkpoints" / "step_00000020")


def test_verify_under_two_agents_checks_the_layout_on_them(tmp_path):
    """docs/multinode.md's cluster check: the layout trains on the two agents' world, then rank 0
    trains one process and prints the comparison, once; the other ranks print nothing of it."""
    tiny = [a for a in tiny_overrides(tmp_path) if not a.startswith("--precision.recipe")]  # verify's: fp32
    done = two_agents(1, ["verify", *tiny, "--layout", "dp=2", "--steps", "3"], ours=True, program=("-m", "nanotrain"))
    _ok(done)
    out = "".join(d.stdout for d in done)
    assert out.count("tolerance 1e-05: PASS") == 1, out
    assert "step     1 process          dp=2" in out and "\n   3 " in out, out
