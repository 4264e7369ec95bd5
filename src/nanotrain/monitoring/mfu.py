"""Model FLOPs utilization (MFU): how much of the hardware's matmul throughput we use.

    MFU = achieved model FLOP/s / peak FLOP/s
        = tokens_per_s * flops_per_token / peak_flops

"Model" FLOPs count only what the math of the model needs (PaLM, appendix B):
recomputation (activation checkpointing) and padding don't count, so MFU is
comparable across implementations. The peak is the datasheet number when we
know it (logging.peak_tflops); otherwise we measure what a plain GEMM
achieves on this machine, which makes MFU read as "fraction of the best
matmul speed this device shows us".
"""

from __future__ import annotations

import functools
import time

import torch


def _sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously: without a sync we would time the launch, not the work.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.cache
def _probe(device_type: str, device_index: int | None, dtype: torch.dtype, threads: int, seconds: float) -> float:
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    # Big enough to be compute-bound, small enough that one matmul is a few ms:
    # 1024 saturates a CPU core's GEMM kernels; a GPU needs 4096 to fill its SMs.
    n = 4096 if device.type == "cuda" else 1024
    # A private generator: drawing from the global RNG would shift the dropout masks
    # of a run that probes after restoring its RNG state, breaking bit-exact resume.
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    c = torch.empty(n, n, device=device, dtype=dtype)
    # Warm-up: first calls pay for library init, kernel selection, clock ramp-up.
    for _ in range(2 if device.type == "cpu" else 10):
        torch.mm(a, b, out=c)
    _sync(device)
    # Timed loop: launch in small batches so a GPU's queue stays full between syncs.
    batch = 1 if device.type == "cpu" else 10
    iters, t0 = 0, time.perf_counter()
    while True:
        for _ in range(batch):
            torch.mm(a, b, out=c)
        _sync(device)
        iters += batch
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
    return 2.0 * n**3 * iters / elapsed  # a matmul of n x n by n x n is n^3 multiply-adds


def measure_peak_flops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
                       seconds: float = 0.3) -> float:
    """Achieved FLOP/s of a square GEMM on `device` in `dtype`: the default MFU denominator.

    Cached per (device, dtype, thread count) for the life of the process, so
    calling it again (tests, a second run in one process) costs nothing.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    # The thread count is part of the key: a CPU's GEMM speed scales with it.
    return _probe(device.type, device.index, dtype, torch.get_num_threads(), seconds)


def transformer_flops_per_token(n_matmul_params: int, n_layers: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token of a decoder-only transformer (PaLM's convention).

        6 * N            the weight matmuls. Each parameter in a matmul does one
                         multiply-add (2 FLOPs) per token in the forward pass, and
                         twice that in the backward pass (gradient w.r.t. the
                         input and w.r.t. the weight): 2 + 4 = 6.
                         N counts the parameters that take part in matmuls,
                         the output head included; embedding lookups, norms and
                         biases are not matmuls and are left out.
        12 * L * d * T   attention's own matmuls, which have no parameters:
                         scores Q K^T and the weighted sum P V each cost
                         2 * d * T FLOPs per token per layer forward (a d-wide
                         dot product with each of T positions), 4 * d * T for
                         both, times 3 for forward + backward.
                         It counts the full T x T score matrix, as PaLM does,
                         although a causal mask makes half of it unnecessary.
    """
    return 6.0 * n_matmul_params + 12.0 * n_layers * d_model * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilization as a fraction (0.42 = 42%)."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops}")
    return tokens_per_s * flops_per_token / peak_flops
