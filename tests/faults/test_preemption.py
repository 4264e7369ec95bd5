"""Preemption: SIGTERM or SIGINT on any rank -> the step finishes, every rank saves the same step,
one line says how to resume, exit 128 + signal; the resumed run is bit-exact with a straight one."""

import signal

import pytest

from fault_launch import assert_same_tensors, fault_args, losses, run_one, start_world, torchrun
from nanotrain.runtime.preemption import Preemption

# One pytest-xdist worker runs this file (make test: --dist loadgroup): its module-scoped
# fixtures run once, not once per worker.
pytestmark = pytest.mark.xdist_group("preemption")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted 40 steps, one process."""
    tmp = tmp_path_factory.mktemp("straight")
    done = run_one(fault_args(tmp, "--losses", str(tmp / "losses.json")))
    assert done.returncode == 0, done.stderr
    return tmp


@pytest.fixture(scope="module")
def straight_dp2(tmp_path_factory):
    """The uninterrupted 40 steps at dp=2 (bit-exact means the same layout: dp=2 sums the gradients
    in another order than one process, equal to it within the parity suite's tolerance only)."""
    tmp = tmp_path_factory.mktemp("straight_dp2")
    done = torchrun(2, fault_args(tmp, "--parallel.dp=2", "--losses", str(tmp / "losses.json")))
    assert done.returncode == 0, done.stderr
    return tmp


def _check_stopped(done, code: int, name: str, run_dir, step: int = 13) -> None:
    out = done.stdout + done.stderr
    assert done.returncode == code, out
    assert "Traceback" not in out
    assert f"stopped by {name} after step {step}: saved checkpoint" in out
    assert (run_dir / "checkpoints" / f"step_{step:08d}" / "metadata.json").is_file()
    assert not (run_dir / ".lock").exists()


def _check_resumed(tmp_path, straight, *world) -> None:
    """The same command again (checkpoint.resume=auto) continues bit-exactly."""
    args = fault_args(tmp_path, "--losses", str(tmp_path / "losses.json"))
    done = world[0](args) if world else run_one(args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "continuing from" in done.stdout
    resumed, whole = losses(tmp_path / "losses.json"), losses(straight / "losses.json")
    assert min(resumed) == 14 and resumed == {s: v for s, v in whole.items() if s >= 14}
    assert_same_tensors(tmp_path / "run" / "checkpoints" / "step_00000040",
                        straight / "run" / "checkpoints" / "step_00000040")


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [("TERM", 143), ("INT", 130)])
def test_a_signal_saves_the_step_and_the_run_resumes_bit_exact(tmp_path, straight, sig, code):
    done = run_one(fault_args(tmp_path, "--fault", f"{sig}@13"))
    _check_stopped(done, code, f"SIG{sig}", tmp_path / "run")
    _check_resumed(tmp_path, straight)


@pytest.mark.slow
def test_a_signal_on_one_rank_saves_the_same_step_on_every_rank(tmp_path, straight_dp2):
    """SIGTERM reaches rank 1 only: both ranks agree at the end of the step and save step 13."""
    procs = start_world(2, fault_args(tmp_path, "--parallel.dp=2", "--fault", "TERM@13:rank1"))
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [143, 143], outs
    assert all("Traceback" not in o + e for o, e in outs)
    assert "stopped by SIGTERM after step 13" in outs[0][0]
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000013"
    assert sorted(f.name for f in ckpt.glob("rank_*.safetensors")) == ["rank_00000.safetensors",
                                                                       "rank_00001.safetensors"]
    _check_resumed(tmp_path, straight_dp2, lambda args: torchrun(2, [*args, "--parallel.dp=2"]))


@pytest.mark.slow
@pytest.mark.parametrize("ours", [False, True], ids=["torchrun", "nanotrain.torchrun"])
def test_sigterm_to_torchrun_reaches_every_worker_and_they_save(tmp_path, ours):
    """A scheduler's SIGTERM goes to the launcher: torchrun sends it on to its workers."""
    done = torchrun(2, fault_args(tmp_path, "--parallel.dp=2", "--fault", "TERM@13:parent"), ours=ours)
    out = done.stdout + done.stderr
    assert "stopped by SIGTERM after step" in out
    saved = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert saved and saved[-1].name >= "step_00000013"
    assert len(list(saved[-1].glob("rank_*.safetensors"))) == 2
    if ours:  # one line from the launcher too, and the shell's code for SIGTERM
        assert done.returncode == 143 and "Traceback" not in out, out
    else:  # torchrun ends with its SignalException's traceback (torch's, not ours); the workers print none
        assert done.returncode == 1 and out.count("Traceback") == out.count("SignalException: Process"), out


def test_a_second_signal_exits_at_once(monkeypatch):
    exits, released = [], []
    monkeypatch.setattr("os._exit", exits.append)
    clock = iter([100.0, 100.5, 103.0])
    monkeypatch.setattr("nanotrain.runtime.preemption.time.monotonic", lambda: next(clock))
    p = Preemption(None, rank=0, on_exit=lambda: released.append(True))
    p._handle(signal.SIGINT, None)
    assert p.agreed() == signal.SIGINT and not exits
    p._handle(signal.SIGTERM, None)  # torchrun's SIGTERM right after a terminal's Ctrl-C: the same event
    assert not exits
    p._handle(signal.SIGINT, None)  # the user presses Ctrl-C again
    assert exits == [128 + signal.SIGINT] and released == [True]


def test_a_signal_during_verify_ends_it_in_one_line(tmp_path, capsys, monkeypatch):
    """SIGTERM while one of verify's runs trains (here its bf16 rounding probe): that run finishes
    its step and stops, as any run does, and verify says that nothing was judged and exits 143,
    with no traceback (it used to judge the partial run and die in a KeyError)."""
    import os

    from conftest import tiny_overrides
    from nanotrain.cli import main
    from nanotrain.runtime import RuntimeEngine

    real_init, probes = RuntimeEngine.__init__, []

    def init(self, cfg, components=None, on_grads=None):
        def grads(step, model, ctx):
            if on_grads is not None:
                on_grads(step, model, ctx)
            if "probe" in str(cfg.train.out_dir) and step == 2:
                probes.append(step)
                os.kill(os.getpid(), signal.SIGTERM)  # the engine's handler takes it: the step finishes

        real_init(self, cfg, components, grads)

    monkeypatch.setattr(RuntimeEngine, "__init__", init)
    code = main(["verify", "--layout", "micro=2", "--precision", "bf16", "--steps", "4", *tiny_overrides(tmp_path)])
    err = capsys.readouterr().err
    assert probes == [2] and code == 143
    assert "verify was stopped by SIGTERM before its runs finished: nothing was judged" in err
    assert "Traceback" not in err
