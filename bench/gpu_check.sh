#!/usr/bin/env bash
# The GPU checks, one script of at most 8 minutes on one CUDA device (an H100 or H200 is lent to
# this project for minutes at a time; CI and the developers' machines have no GPU):
#
#   1. the unit and parity tests that run on one GPU, with --train.device=cuda   (~2 min)
#   2. fp8 tensorwise through torch._scaled_mm against its exact CPU emulation   (seconds)
#   3. a 1B-parameter Llama-shaped model in bf16, torch.compile off and on: MFU against the datasheet
#      peak, tokens/s, peak memory (bench/gpu_llama.py)                           (~4 min)
#
#   OUT=figures/ bash bench/gpu_check.sh        from the repository root, with the machine's python3
#
# Figures and logs go to $OUT (default bench/out/gpu_check/, git-ignored): summary.txt, tests.log, fp8.log, llama1b.log,
# llama1b.json. Each part has its own time limit, so one that hangs cannot eat the others' minutes,
# and a failing part does not stop the next; the exit status is 1 if any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
# nano-train from this checkout (no install: the GPU machine has no network), unbuffered output.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-8}
status=0

part() {  # part NAME SECONDS LOG COMMAND...: run one part under its limit, record its outcome
    local name=$1 limit=$2 log=$3; shift 3
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$log"
    local rc=${PIPESTATUS[0]}
    echo "$name: rc=$rc ($((SECONDS - t0)) s, limit $limit s)" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || status=1
}

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} | tee "$OUT/summary.txt"

# 1. One GPU, one process (the parity tests of several ranks need a GPU each): the engine's bit-exact
#    resume, gradient accumulation, checkpoints and sampling; the low-bit recipes and storage dtypes; fp16
#    loss scaling; and CUDA against the CPU, step by step (tests/parity/test_device.py).
part tests 150 tests.log $PY -m pytest -q -p no:cacheprovider --train-device=cuda \
    tests/unit/test_engine.py tests/unit/test_precision_training.py tests/unit/test_loss_scaling.py \
    tests/parity/test_device.py

# 2. fp8: cuBLAS's fp8 GEMM (torch._scaled_mm) against the CPU emulation of the same codes and scales.
part fp8 60 fp8.log $PY -m pytest -q -s -p no:cacheprovider tests/unit/test_precision_recipes.py -k scaled_mm

# 3. The 1B model, eager then compiled; MFU against the datasheet's dense bf16 peak (runtime/machine.py).
part llama1b 270 llama1b.log $PY bench/gpu_llama.py --steps 30 --batch 8 --out "$OUT/llama1b.json"

echo "done: $(date -u +%H:%M:%S), status $status" | tee -a "$OUT/summary.txt"
exit $status
