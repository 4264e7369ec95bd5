#!/bin/bash
# make test-slurm: examples/slurm/train.sbatch under a real Slurm on this machine, against torchrun.
#
#   1. Slurm, if it is not running: Debian's slurm-wlm (installed if missing; needs root), munge,
#      and slurmctld + slurmd for one node, this machine, with its CPUs (enough for two tasks).
#   2. The same run twice: under torchrun on one agent, and submitted with `sbatch --wait` as two
#      tasks on this one node, so train.sbatch starts two torchrun agents that meet at a c10d
#      rendezvous as two nodes would.
#   3. Their losses, step by step: equal, or the script fails.
#
# usage: examples/slurm/check.sh [--section.key=value ...]   (default: tp=2 x dp=2, 2 workers per agent)
# It takes a few minutes on 2 cores (most of it the two 4-process runs).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-$PWD/.venv/bin/python}
CONFIG=${CONFIG:-configs/shakespeare_char.toml}
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
OUT=${OUT:-$PWD/runs/slurm-check}
layout=("$@")
[ ${#layout[@]} -gt 0 ] || layout=(--parallel.tp=2 --parallel.dp=2)
common=(--train.max_steps=30 --train.eval_interval=0 --logging.log_interval=1 --logging.progress=plain
        --logging.plot=false --logging.tensorboard=false --checkpoint.interval=0 --train.overwrite=true
        "${layout[@]}")

start_slurm() {
    if scontrol ping >/dev/null 2>&1; then return; fi
    echo "== Slurm is not running: starting munged, slurmctld and slurmd for this one node"
    [ "$(id -u)" = 0 ] || { echo "error: Slurm is not running here and setting it up needs root: run as root, or start slurmctld and slurmd yourself" >&2; exit 2; }
    command -v slurmctld >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm >/dev/null
    [ -s /etc/munge/munge.key ] || mungekey --create --force
    if ! pgrep -x munged >/dev/null; then
        mkdir -p /run/munge && chown munge:munge /run/munge
        runuser -u munge -- munged
    fi
    local host cpus
    host=$(hostname -s)
    cpus=$(nproc)
    mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
    # One node, this machine; no cgroups (a container may have none to give): processes are
    # tracked by their parent, and tasks share the CPUs.
    cat > /etc/slurm/slurm.conf <<EOF
ClusterName=nanotrain
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
EOF
    slurmctld -c
    slurmd
    for _ in $(seq 60); do
        sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed)' && return
        sleep 1
    done
    echo "error: slurmd did not come up within 60 s: see /var/log/slurm/slurmd.log and slurmctld.log" >&2
    exit 1
}

start_slurm
rm -rf "$OUT"
mkdir -p "$OUT"
echo "== torchrun: one agent of $((2 * NPROC_PER_NODE)) workers"
"$PYTHON" -m nanotrain.torchrun --standalone --nproc-per-node=$((2 * NPROC_PER_NODE)) -m nanotrain train \
    --config "$CONFIG" "${common[@]}" --train.out_dir="$OUT/torchrun" > "$OUT/torchrun.log" 2>&1 \
    || { tail -20 "$OUT/torchrun.log"; exit 1; }
echo "== sbatch --wait: two agents of $NPROC_PER_NODE workers (two tasks on this node)"
NPROC_PER_NODE=$NPROC_PER_NODE PYTHON=$PYTHON sbatch --wait --nodes=1 --ntasks=2 --ntasks-per-node=2 \
    --cpus-per-task=1 --output="$OUT/slurm-%j.out" examples/slurm/train.sbatch \
    "$CONFIG" "${common[@]}" --train.out_dir="$OUT/slurm" || { tail -20 "$OUT"/slurm-*.out; exit 1; }
"$PYTHON" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
def losses(run):
    rows = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}
slurm, torchrun = losses("slurm"), losses("torchrun")
diff = max(abs(slurm[s] - torchrun[s]) for s in torchrun) if slurm.keys() == torchrun.keys() else None
print(f"steps {min(torchrun)}-{max(torchrun)}: loss at the last step {slurm.get(max(torchrun))} (Slurm) "
      f"{torchrun[max(torchrun)]} (torchrun); largest difference {diff}")
if diff != 0:
    sys.exit("FAIL: the Slurm run's losses differ from torchrun's")
print("PASS: train.sbatch under Slurm trains what torchrun trains, loss for loss")
EOF
