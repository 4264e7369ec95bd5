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
import re
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
    fp32_flops: float | None = None  # plain fp32 (CUDA cores on a GPU; what torch.mm reaches on a CPU)
    fp16_flops: float | None = None  # None: as bf16 (equal on every tensor-core GPU listed)
    tf32_flops: float | None = None  # fp32 inputs on tensor cores (torch's float32_matmul_precision "high")
    cuda_names: tuple[str, ...] = ()  # substrings of torch.cuda.get_device_name() that mean this device

    def peak_flops(self, dtype_bytes: int) -> float:
        """The matmul peak for operands of dtype_bytes (2: bf16, 1: fp8, 4: fp32)."""
        peak = {2: self.bf16_flops, 1: self.fp8_flops, 4: self.fp32_flops}.get(dtype_bytes)
        if peak is None:
            raise ConfigError(f"{self.name} has no {dtype_bytes * 8}-bit matmul peak in the hardware table "
                              f"(fp8 needs Hopper or newer, or MI300X): use --dtype bf16.")
        return peak

    def flops(self, dtype: str) -> float | None:
        """The dense matmul peak in dtype "bf16", "fp16", "fp8", "tf32" or "fp32"; None where unknown."""
        return {"bf16": self.bf16_flops, "fp16": self.fp16_flops or self.bf16_flops, "fp8": self.fp8_flops,
                "tf32": self.tf32_flops, "fp32": self.fp32_flops}[dtype]

    def ridge_point(self, dtype_bytes: int) -> float:
        """FLOPs per byte where the roof turns flat: below it a kernel waits for memory."""
        return self.peak_flops(dtype_bytes) / self.hbm_bandwidth

    def to_dict(self) -> dict:
        return asdict(self)


ACCELERATORS: dict[str, Accelerator] = {
    # NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB): BF16/FP16 312 TFLOPS dense (624 sparse), TF32 156
    # (312 sparse), FP32 19.5; HBM2e 2,039 GB/s, NVLink 3 600 GB/s bidirectional. No fp8 on Ampere.
    # The PCIe card has the same tensor peaks (at a lower power limit).
    "a100": Accelerator("A100-80GB SXM", 312 * TFLOPS, None, 80 * GB, 2.039 * TB, 300 * GB,
                        "NVIDIA A100 datasheet (SXM4 80GB)", fp32_flops=19.5 * TFLOPS, tf32_flops=156 * TFLOPS,
                        cuda_names=("A100",)),
    # NVIDIA H100 datasheet (SXM5): BF16/FP16 989 TFLOPS dense (1,979 sparse), FP8 1,979 dense (3,958
    # sparse), TF32 495 (989 sparse), FP32 67; 80 GB HBM3 at 3.35 TB/s, NVLink 4 900 GB/s bidirectional.
    "h100": Accelerator("H100 SXM", 989.4 * TFLOPS, 1978.9 * TFLOPS, 80 * GB, 3.35 * TB, 450 * GB,
                        "NVIDIA H100 datasheet (SXM5)", fp32_flops=66.9 * TFLOPS, tf32_flops=494.7 * TFLOPS,
                        cuda_names=("H100 80GB HBM3", "H100 SXM", "H100")),
    # The same datasheet, PCIe card: BF16/FP16 756 dense, FP8 1,513, TF32 378, FP32 51; 2 TB/s, NVLink bridge
    # 600 GB/s bidirectional. Matched before the SXM part: its device name says "PCIe".
    "h100_pcie": Accelerator("H100 PCIe", 756.5 * TFLOPS, 1513 * TFLOPS, 80 * GB, 2.0 * TB, 300 * GB,
                             "NVIDIA H100 datasheet (PCIe)", fp32_flops=51.2 * TFLOPS, tf32_flops=378 * TFLOPS,
                             cuda_names=("H100 PCIe",)),
    # NVIDIA H200 datasheet (SXM): the H100's compute, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s.
    "h200": Accelerator("H200 SXM", 989.4 * TFLOPS, 1978.9 * TFLOPS, 141 * GB, 4.8 * TB, 450 * GB,
                        "NVIDIA H200 datasheet (SXM)", fp32_flops=66.9 * TFLOPS, tf32_flops=494.7 * TFLOPS,
                        cuda_names=("H200",)),
    # NVIDIA HGX B200 datasheet, per GPU at 1,000 W: BF16 4.5 PFLOPS and FP8 9 PFLOPS *sparse*,
    # so 2.25 and 4.5 dense; TF32 2.2 sparse (1.1 dense), FP32 75; 180 GB HBM3e at 7.7 TB/s;
    # NVLink 5 1.8 TB/s bidirectional.
    "b200": Accelerator("B200 (HGX)", 2250 * TFLOPS, 4500 * TFLOPS, 180 * GB, 7.7 * TB, 900 * GB,
                        "NVIDIA HGX B200 datasheet (per GPU)", fp32_flops=75 * TFLOPS, tf32_flops=1100 * TFLOPS,
                        cuda_names=("B200",)),
    # NVIDIA L4 datasheet: BF16/FP16 242 TFLOPS and FP8 485 *sparse*, so 121 and 242.5 dense; TF32 60 dense
    # (120 sparse), FP32 30.3; 24 GB GDDR6 at 300 GB/s; PCIe only (64 GB/s each way, Gen4 x16).
    "l4": Accelerator("L4", 121 * TFLOPS, 242.5 * TFLOPS, 24 * GB, 0.3 * TB, 32 * GB,
                      "NVIDIA L4 datasheet", fp32_flops=30.3 * TFLOPS, tf32_flops=60 * TFLOPS, cuda_names=("L4",)),
    # AMD Instinct MI300X datasheet: BF16 1,307.4 TFLOPS dense (2,614.9 sparse), FP8 2,614.9 dense,
    # TF32 653.7, FP32 163.4; 192 GB HBM3 at 5.3 TB/s; 7 Infinity Fabric links of 128 GB/s
    # bidirectional (64 each way).
    "mi300x": Accelerator("MI300X", 1307.4 * TFLOPS, 2614.9 * TFLOPS, 192 * GB, 5.3 * TB, 448 * GB,
                          "AMD Instinct MI300X datasheet", fp32_flops=163.4 * TFLOPS, tf32_flops=653.7 * TFLOPS,
                          cuda_names=("MI300X",)),
}


def accelerator_for_device_name(device_name: str) -> Accelerator | None:
    """The table's entry for a torch.cuda.get_device_name() ("NVIDIA H100 80GB HBM3", "NVIDIA L4"), or None
    for a device the table does not know. The longest matching name wins ("H100 PCIe" over "H100")."""
    best, length = None, 0
    for acc in ACCELERATORS.values():
        for part in acc.cuda_names:  # whole words: "L4" is not the L40S
            if re.search(rf"(?<![\w]){re.escape(part)}(?![\w])", device_name, re.IGNORECASE) and len(part) > length:
                best, length = acc, len(part)
    return best


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


def measure_matmul_flops(dtype, sizes: tuple[int, ...] = (256, 512, 1024), repeats: int = 3,
                         device="cpu", budget_s: float = 0.05) -> float:
    """The best FLOP/s of torch.mm on square matrices (2 n^3 FLOPs each): a peak as software sees it.

    Sizes grow until one product takes longer than budget_s: on a CPU without bf16 units a 1024^3
    bf16 product takes seconds (AVX2: ~0.001 TFLOP/s), and the small sizes already show the rate.
    On CUDA each timing runs 10 products between synchronisations (kernels are asynchronous)."""
    import torch

    device = torch.device(device)
    cuda = device.type == "cuda"
    # A private generator: drawing from the global RNG would shift the dropout masks of a run that
    # probes after restoring its RNG state, breaking bit-exact resume.
    g = torch.Generator(device=device).manual_seed(0)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, generator=g).to(dtype)
        b = torch.randn(n, n, device=device, generator=g).to(dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        calls = 10 if cuda else 1

        def run():
            for _ in range(calls):
                torch.mm(a, b, out=c)
            if cuda:
                torch.cuda.synchronize(device)

        run()  # warm up: the first call picks and may JIT a kernel
        seconds = _best_seconds(run, repeats)
        best = max(best, 2 * n ** 3 * calls / seconds)
        if seconds * 8 > budget_s:  # the next size (twice as wide) takes 8x as long
            break
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
