"""Launchers for the fault tests: training processes (tests/faults/worker.py, `nanotrain train`
with a fault injected at a step), alone, as a hand-made gloo world, or under torchrun."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import tiny_overrides

WORKER = Path(__file__).with_name("worker.py")
BIN = Path(sys.executable).parent


def fault_args(tmp_path: Path, *overrides: str) -> list[str]:
    """The tiny model in fp32 (fast on every CPU kind), saving every 10 steps, 40 steps."""
    return [*tiny_overrides(tmp_path), "--precision.recipe=fp32", "--checkpoint.interval=10",
            "--train.max_steps=40", "--logging.log_interval=1", "--monitoring.mode=minimal", *overrides]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def run_one(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """One training process (no process group)."""
    return subprocess.run([sys.executable, str(WORKER), *args], env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    """A port free now. Rank 0 binds it later, as under torchrun with MASTER_PORT; another process
    may take it in between (run_world avoids this by hosting its store itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_world(n: int, args: list[str]) -> list[subprocess.Popen]:
    """n processes joined by the environment torchrun would give them (rank 0 hosts the store)."""
    port = free_port()
    return [subprocess.Popen([sys.executable, str(WORKER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=_env(RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r),
                                                 LOCAL_WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1",
                                                 MASTER_PORT=str(port)))
            for r in range(n)]


def torchrun(n: int, args: list[str], *launcher: str, timeout: float = 300,
             ours: bool = False) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node n [launcher options] worker.py args` (ours: through
    `python -m nanotrain.torchrun`, which ends on a signal without torchrun's traceback)."""
    command = [sys.executable, "-m", "nanotrain.torchrun"] if ours else [str(BIN / "torchrun")]
    return subprocess.run([*command, "--standalone", f"--nproc-per-node={n}", *launcher, str(WORKER), *args],
                          env=_env(), capture_output=True, text=True, timeout=timeout)


def losses(path: Path) -> dict[int, float]:
    return {int(k): v for k, v in json.loads(path.read_text()).items()}


def model_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every model/ and optim/ box a checkpoint holds, by key (for bit-exact comparisons)."""
    out = {}
    for f in sorted(checkpoint.glob("rank_*.safetensors")):
        out.update({k: v for k, v in load_file(str(f)).items() if k.startswith(("model/", "optim/"))})
    return out


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = model_tensors(a), model_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def agent_command(nproc: int, port: int, *launcher: str, ours: bool = False) -> list[str]:
    """One node's torchrun of a two-node job: c10d rendezvous on 127.0.0.1:port, here standing in
    for the first node's address (docs/multinode.md)."""
    command = [sys.executable, "-m", "nanotrain.torchrun"] if ours else [str(BIN / "torchrun")]
    return [*command, "--nnodes=2", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-agents", *launcher]


def two_agents(nproc: int, args: list[str], *launcher: str, timeout: float = 300, ours: bool = False,
               program: tuple[str, ...] = (str(WORKER),), during=None) -> list[subprocess.CompletedProcess]:
    """Two torchrun agents of nproc workers each (--nnodes=2), as two machines would start them,
    running `program args` (default: worker.py). The first hosts the rendezvous store, as node 0
    does on a cluster: the second starts once the first listens. during(agents): called while
    they run (to signal one)."""
    port = free_port()
    command = agent_command(nproc, port, *launcher, ours=ours) + [*program, *args]
    agents = []
    try:
        for i in range(2):
            agents.append(subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True, start_new_session=True))
            if i == 0:
                _await_listening(port, agents[0])
        if during is not None:
            during(agents)
        outs = [a.communicate(timeout=timeout) for a in agents]
    finally:  # a test that failed or timed out: no agent or worker outlives it
        for a in agents:
            try:
                os.killpg(a.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            a.wait()
    return [subprocess.CompletedProcess(command, a.returncode, o, e) for a, (o, e) in zip(agents, outs)]


def _await_listening(port: int, agent: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and agent.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"the first agent did not listen on port {port} within {timeout:.0f} s")


def await_step(metrics: Path, step: int, timeout: float = 120) -> None:
    """Until rank 0 has logged `step` in metrics.jsonl."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and any(json.loads(line).get("step", 0) >= step
                                     for line in metrics.read_text().splitlines() if line.endswith("}")):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{metrics} did not reach step {step} within {timeout:.0f} s")
