"""Accelerators as a roofline sees them: peak matmul FLOP/s, memory capacity and bandwidth, interconnect.

The table holds the vendors' published figures for one GPU, *dense* (the datasheets print the
2:4-sparse figure, twice as large, first; nothing in a transformer's training step is 2:4 sparse).
Units are the vendors': 1 GB = 1e9 bytes, 1 TB/s = 1e12 B/s. HBM capacity as printed (80 GB is
what an H100 holds; torch.cuda.mem_get_info reports a little less, the driver keeps some).
Interconnect is the scale-up link (NVLink, Infinity Fabric) per GPU *per direction*: the
datasheets print the bidirectional sum, twice that (H100: "900 GB/s" = 450 GB/s each way).

`measure_cpu()` fills the same record for the machine this runs on, by timing it.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass

from ..config import ConfigError

GB, TB, TFLOPS = 1e9, 1e12, 1e12


@dataclass(frozen=True)
class Accelerator:
    name: str
    bf16_flops: float  # dense matmul peak, FLOP/s
    fp8_flops: float | None  # None: no fp8 matmul units
    hbm_bytes: float  # memory capacity
    hbm_bandwidth: float  # B/s
    interconnect_bandwidth: float | None  # scale-up link, B/s per GPU per direction; None: none
    source: str = ""
    fp32_flops: float | None = None  # measured CPU only: a GPU trains its matmuls in bf16 or fp8

    def peak_flops(self, dtype_bytes: int) -> float:
        """The matmul peak for operands of dtype_bytes (2: bf16, 1: fp8, 4: fp32)."""
        peak = {2: self.bf16_flops, 1: self.fp8_flops, 4: self.fp32_flops}.get(dtype_bytes)
        if peak is None:
            raise ConfigError(f"{self.name} has no {dtype_bytes * 8}-bit matmul peak in the hardware table "
                              f"(fp8 needs Hopper or newer, or MI300X): use --dtype bf16.")
        return peak

    def ridge_point(self, dtype_bytes: int) -> float:
        """FLOPs per byte where the roof turns flat: below it a kernel waits for memory."""
        return self.peak_flops(dtype_bytes) / self.hbm_bandwidth

    def to_dict(self) -> dict:
        return asdict(self)


ACCELERATORS: dict[str, Accelerator] = {
    # NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB): BF16 312 TFLOPS dense (624 sparse),
    # HBM2e 2,039 GB/s, NVLink 3 600 GB/s bidirectional. No fp8 on Ampere.
    "a100": Accelerator("A100-80GB SXM", 312 * TFLOPS, None, 80 * GB, 2.039 * TB, 300 * GB,
                        "NVIDIA A100 datasheet (SXM4 80GB)"),
    # NVIDIA H100 datasheet (SXM5): BF16 989 TFLOPS dense (1,979 sparse), FP8 1,979 dense
    # (3,958 sparse), 80 GB HBM3 at 3.35 TB/s, NVLink 4 900 GB/s bidirectional.
    "h100": Accelerator("H100 SXM", 989.4 * TFLOPS, 1978.9 * TFLOPS, 80 * GB, 3.35 * TB, 450 * GB,
                        "NVIDIA H100 datasheet (SXM5)"),
    # NVIDIA H200 datasheet (SXM): the H100's compute, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s.
    "h200": Accelerator("H200 SXM", 989.4 * TFLOPS, 1978.9 * TFLOPS, 141 * GB, 4.8 * TB, 450 * GB,
                        "NVIDIA H200 datasheet (SXM)"),
    # NVIDIA HGX B200 datasheet, per GPU at 1,000 W: BF16 4.5 PFLOPS and FP8 9 PFLOPS *sparse*,
    # so 2.25 and 4.5 dense; 180 GB HBM3e at 7.7 TB/s; NVLink 5 1.8 TB/s bidirectional.
    "b200": Accelerator("B200 (HGX)", 2250 * TFLOPS, 4500 * TFLOPS, 180 * GB, 7.7 * TB, 900 * GB,
                        "NVIDIA HGX B200 datasheet (per GPU)"),
    # AMD Instinct MI300X datasheet: BF16 1,307.4 TFLOPS dense (2,614.9 sparse), FP8 2,614.9 dense,
    # 192 GB HBM3 at 5.3 TB/s; 7 Infinity Fabric links of 128 GB/s bidirectional (64 each way).
    "mi300x": Accelerator("MI300X", 1307.4 * TFLOPS, 2614.9 * TFLOPS, 192 * GB, 5.3 * TB, 448 * GB,
                          "AMD Instinct MI300X datasheet"),
}


def known_names() -> list[str]:
    return [*ACCELERATORS, "cpu"]


def get_accelerator(name: str) -> Accelerator:
    """By short name (h100) or full name (H100 SXM), any case; "cpu" measures this machine."""
    key = name.strip().lower()
    if key in ("cpu", "cpu (measured)"):
        return measure_cpu()
    for short, acc in ACCELERATORS.items():
        if key in (short, acc.name.lower()):
            return acc
    listed = ", ".join(f"{k} ({a.name})" for k, a in ACCELERATORS.items())
    raise ConfigError(f"unknown hardware {name!r}: known are {listed}, and cpu (this machine, measured).")


def _best_seconds(fn, repeats: int) -> float:
    """The fastest of a few runs: the others lost time to something else (other processes, page faults)."""
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_matmul_flops(dtype, sizes: tuple[int, ...] = (256, 512, 1024), repeats: int = 3) -> float:
    """The best FLOP/s of torch.mm on square matrices (2 n^3 FLOPs each): a peak as software sees it."""
    import torch

    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.mm(a, b)  # warm up: the first call picks and may JIT a kernel
        best = max(best, 2 * n ** 3 / _best_seconds(lambda: torch.mm(a, b), repeats))
    return best


def measure_memory_bandwidth(nbytes: int = 256 * 2 ** 20, repeats: int = 3) -> float:
    """B/s of a large copy, counting both the read and the write (STREAM's Copy convention).
    256 MiB is far beyond any cache, so this is DRAM, not L3."""
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm up: touch every page once
    return 2 * nbytes / _best_seconds(lambda: dst.copy_(src), repeats)


def total_ram_bytes() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return float(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def measure_cpu() -> Accelerator:
    """This machine, measured in a second or two. The numbers are what PyTorch reaches with the
    threads it has, on a machine that may be busy: a lower bound on the hardware's peak."""
    import torch

    fp32, bf16 = measure_matmul_flops(torch.float32), measure_matmul_flops(torch.bfloat16)
    return Accelerator("cpu (measured)", bf16, None, total_ram_bytes(), measure_memory_bandwidth(), None,
                       f"measured here: torch.mm and a 256 MiB copy, {torch.get_num_threads()} threads",
                       fp32_flops=fp32)
