"""examples/slurm/train.sbatch, with srun and scontrol stood in for: the torchrun command each node
runs. (Under a real Slurm, against torchrun's losses: `make test-slurm`, examples/slurm/check.sh.)"""

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "examples" / "slurm" / "train.sbatch"


def _run(tmp_path, *args, **env):
    """train.sbatch ARGS in a job of two nodes (node-a, node-b); what srun was asked to run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames node-[a-b]" ] && '
                                      'printf "node-a\\nnode-b\\n"\n')
    (bin_dir / "srun").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path / "srun_args"}\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    job = {"SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_ID": "42"}
    done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30,
                          env={"PATH": f"{bin_dir}:{os.environ['PATH']}", **job, **env})
    srun = (tmp_path / "srun_args").read_text().splitlines() if (tmp_path / "srun_args").exists() else None
    return done, srun


def test_one_torchrun_per_node_meeting_on_the_first_node(tmp_path):
    done, srun = _run(tmp_path, "configs/shakespeare_char.toml", "--parallel.tp=2", "--parallel.dp=2",
                      NPROC_PER_NODE="2", MAX_RESTARTS="3", PYTHON="/venv/bin/python")
    assert done.returncode == 0, done.stderr
    assert "2 agent(s) x 2 worker(s), rendezvous at node-a:29500 (job 42)" in done.stdout
    assert srun == ["--kill-on-bad-exit=1", "--ntasks=2", "/venv/bin/python", "-m", "nanotrain.torchrun",
                    "--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node-a:29500",
                    "--rdzv-id=nanotrain-42", "--max-restarts=3", "-m", "nanotrain", "train",
                    "--config", "configs/shakespeare_char.toml", "--parallel.tp=2", "--parallel.dp=2"]


def test_workers_per_node_default_to_the_nodes_gpus(tmp_path):
    done, srun = _run(tmp_path, "c.toml", SLURM_GPUS_ON_NODE="8", RDZV_PORT="6000")
    assert done.returncode == 0, done.stderr
    assert "--nproc-per-node=8" in srun and "--rdzv-endpoint=node-a:6000" in srun and "--max-restarts=0" in srun


def test_no_config_is_one_line_and_exit_2(tmp_path):
    done, srun = _run(tmp_path)
    assert done.returncode == 2 and srun is None
    assert done.stderr.strip().startswith("usage: sbatch [--nodes=N]") and len(done.stderr.splitlines()) == 1
