"""A cluster as the step-time model sees it: nodes of GPUs, two kinds of link, and what a kernel achieves.

    node        gpus_per_node accelerators joined by the scale-up fabric (NVLink, Infinity Fabric)
    scale-up    bandwidth per GPU per direction inside a node (the Accelerator's interconnect)
    scale-out   bandwidth per GPU per direction between nodes (InfiniBand / RoCE NICs), shared by
                gpus_per_nic GPUs
    latency     seconds per step of a collective algorithm, inside a node and across nodes

Where a parallel group's ranks sit follows the runtime's rank order (parallel/state.py, as
Megatron orders them): tp varies fastest, then cp, then dp (ep carved out of dp), then pp. A
group is the ranks r, r + stride, ..., r + (size - 1) stride, so tp (stride 1) stays inside a
node up to 8, and pp (stride tp x cp x dp) crosses nodes as soon as a stage fills one.

Collective cost (Hockney's alpha-beta model, with NCCL's algorithms; Thakur, Rabenseifner &
Gropp 2005 give the ring and tree costs):

    ring all-reduce          2 (n-1) alpha + 2 (n-1)/n x S / B
    all-gather, reduce-scatter  (n-1) alpha +   (n-1)/n x S / B
    all-to-all               (n-1) alpha +   (n-1)/n x S / B, the bytes leaving the node over the NICs
    send (p2p)               alpha + S / B

S is the message (nccl-tests' size: the all-reduce's tensor, the all-gather's output), B the
bandwidth of the slowest hop: the scale-up link when the whole group is inside a node, else the
NIC. NCCL splits a cross-node collective into one ring per NIC, so every GPU's own NIC carries
traffic at once and the per-GPU NIC bandwidth is what a rank gets (nccl-tests' "bus bandwidth").
For large groups the all-reduce latency is a double binary tree's, 2 log2(n) steps, where that
is less than the ring's.

What a kernel achieves (`gemm_efficiency`, `memory_efficiency`, `kernel_overhead_s`) is the one
efficiency curve per kind of hardware that the step-time model uses for every model:

    t_gemm = max(FLOPs / (peak x gemm_efficiency), bytes / (HBM x memory_efficiency)) + kernel_overhead_s

A large GEMM reaches gemm_efficiency of the dense peak; a small or skinny one is held back by
its fixed cost (launch, pipeline fill, the last partial wave of tiles) or by memory. Where each
figure comes from is written beside it.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from ..config import ConfigError
from .hardware import ACCELERATORS, Accelerator

GB = 1e9


@dataclass(frozen=True)
class Cluster:
    accelerator: Accelerator
    gpus_per_node: int = 8
    scale_out_bandwidth: float = 50 * GB  # B/s per GPU per direction (NIC)
    gpus_per_nic: int = 1
    scale_up_latency_s: float = 1e-6  # per algorithm step inside a node
    scale_out_latency_s: float = 5e-6  # per algorithm step across nodes
    scale_up_efficiency: float = 0.8  # share of the link's bandwidth NCCL's collectives reach
    scale_out_efficiency: float = 0.9
    gemm_efficiency: float = 0.75  # share of the dense matmul peak a large GEMM sustains
    attention_efficiency: float = 0.55  # share of the peak a fused (flash) attention kernel sustains, fwd + bwd
    memory_efficiency: float = 0.85  # share of the HBM bandwidth a streaming kernel reaches
    kernel_overhead_s: float = 5e-6  # fixed cost of one kernel: launch, pipeline fill, tail
    overlap: bool = True  # communication on its own engines (GPU copy engines, NCCL): it can hide behind compute
    source: str = ""
    measured: dict = field(default_factory=dict, compare=False)  # --hardware cpu: the measured tables

    @property
    def name(self) -> str:
        return self.accelerator.name

    def peak(self, dtype: str) -> float:
        peak = self.accelerator.flops(dtype)
        if not peak:
            raise ConfigError(f"{self.name} has no {dtype} matmul peak in the hardware table "
                              "(fp8 needs Hopper or newer, or MI300X): use --dtype bf16.")
        return peak

    def placement(self, stride: int, size: int) -> tuple[int, int]:
        """(nodes, ranks per node) of a group of `size` ranks `stride` apart in the rank order."""
        node = self.gpus_per_node
        if size <= 1:
            return 1, 1
        if stride >= node:
            return size, 1
        per_node = min(size, max(1, node // stride))
        return math.ceil(size / per_node), per_node

    def link(self, stride: int, size: int) -> tuple[float, float]:
        """(bandwidth B/s per rank, latency s per step) of a group's slowest hop."""
        nodes, _ = self.placement(stride, size)
        if nodes == 1:
            return self.accelerator.interconnect_bandwidth * self.scale_up_efficiency, self.scale_up_latency_s
        return (self.scale_out_bandwidth / self.gpus_per_nic * self.scale_out_efficiency, self.scale_out_latency_s)

    def collective_s(self, op: str, nbytes: float, stride: int, size: int, count: int = 1) -> float:
        """Seconds for `count` collectives `op` of `nbytes` in all (nccl-tests sizes) over a group."""
        if size <= 1 or nbytes <= 0:
            return 0.0
        if self.measured.get("gloo"):  # --hardware cpu: gloo's own fitted line per operation
            return self._gloo_s(op, nbytes, size, count)
        bw, alpha = self.link(stride, size)
        n = size
        if op == "all_reduce":
            steps = min(2 * (n - 1), 2 * math.ceil(math.log2(n)))
            return count * steps * alpha + 2 * (n - 1) / n * nbytes / bw
        if op == "all_to_all":
            nodes, per_node = self.placement(stride, size)
            leaving = (n - per_node) / n  # share of each rank's data bound for another node
            inside = (per_node - 1) / n
            up = self.accelerator.interconnect_bandwidth * self.scale_up_efficiency
            t = max(leaving * nbytes / bw, inside * nbytes / up) if nodes > 1 else (n - 1) / n * nbytes / bw
            return count * (n - 1) * alpha + t
        if op in ("all_gather", "reduce_scatter"):
            return count * (n - 1) * alpha + (n - 1) / n * nbytes / bw
        if op == "send":
            return count * alpha + nbytes / bw
        raise ValueError(f"unknown collective {op!r}")

    def _gloo_s(self, op: str, nbytes: float, size: int, count: int) -> float:
        """A measured world (cpu_measure.measure_gloo): alpha + bytes / beta of the fitted line,
        per message, for the nearest measured world size; the line of the calls' mean where it was
        measured (what a step pays per call, the slow ones included), else of their median."""
        tables = self.measured["gloo"]
        world = min(tables, key=lambda w: abs(int(w) - size))
        name = {"send": "send_recv", "all_gather": "all_gather_into"}.get(op, op)  # cpu_measure.OPS
        fit = tables[world].get(name) or tables[world].get(op) or tables[world]["all_reduce"]
        fit = fit.get("mean", fit)
        per = nbytes / count
        return count * (fit["alpha_s"] + per / fit["bytes_per_s"])

    def gemm_s(self, m: float, k: float, n: float, dtype: str, count: float = 1.0, layout: str = "nn") -> float:
        """Seconds for `count` GEMMs [m, k] @ [k, n] in dtype (operands of 1, 2 or 4 bytes). layout:
        which operand a training step hands over transposed (cpu_measure.LAYOUTS), which a measured
        cluster times; the formula does not distinguish."""
        if m <= 0 or count <= 0:
            return 0.0
        if self.measured.get("gemm"):
            return count * (self.measured["gemm"](max(1, round(m)), int(k), int(n), dtype, layout)
                            + self.kernel_overhead_s)
        peak = self.peak(dtype) * self.gemm_efficiency
        b = {"fp8": 1, "bf16": 2, "fp16": 2, "fp32": 4, "tf32": 4}[dtype]
        nbytes = b * (m * k + k * n) + 2 * m * n  # operands in, a 16-bit output
        bw = self.accelerator.hbm_bandwidth * self.memory_efficiency
        return count * (max(2 * m * k * n / peak, nbytes / bw) + self.kernel_overhead_s)

    def attention_s(self, flops: float, dtype: str) -> float:
        """Seconds for a fused attention kernel doing `flops` (the causal part it really computes)."""
        if flops <= 0:
            return 0.0
        peak = self.peak("bf16" if dtype == "fp8" else dtype)  # attention stays 16-bit under fp8 recipes
        return flops / (peak * self.attention_efficiency) + self.kernel_overhead_s

    def memory_s(self, nbytes: float, kernels: int = 1) -> float:
        """Seconds for memory-bound kernels moving nbytes in all."""
        return nbytes / (self.accelerator.hbm_bandwidth * self.memory_efficiency) + kernels * self.kernel_overhead_s

    def describe(self) -> str:
        a = self.accelerator
        if self.measured:  # --hardware cpu: processes on one machine, gloo over loopback, nothing to scale up to
            gloo = self.measured.get("gloo") or {}
            line = f"{a.name}: {self.source}; copy {a.hbm_bandwidth / GB:.0f} GB/s"
            for world, table in sorted(gloo.items()):
                fit = table["all_reduce"].get("mean", table["all_reduce"])
                line += (f"; gloo all-reduce ({world} ranks) {fit['alpha_s'] * 1e6:.0f} us + "
                         f"{fit['bytes_per_s'] / GB:.2f} GB/s")
            return line
        up = a.interconnect_bandwidth / GB if a.interconnect_bandwidth else 0
        return (f"{a.name}, {self.gpus_per_node} per node, scale-up {up:.0f} GB/s, scale-out "
                f"{self.scale_out_bandwidth / GB:.0f} GB/s per GPU" + (f" (a NIC per {self.gpus_per_nic} GPUs)"
                                                                        if self.gpus_per_nic > 1 else ""))


# Nodes as vendors sell them. Every figure per GPU, per direction; 1 Gb/s = 1/8 GB/s.
# Efficiencies: scale-up, nccl-tests all_reduce bus bandwidth on DGX systems (A100 ~230 of 300 GB/s,
# H100 ~360 of 450 without NVLS); scale-out, InfiniBand's ~90% of line rate after headers. HBM:
# a STREAM-like copy reaches ~85% of the datasheet bandwidth (A100 ~1.7 of 2.0 TB/s, H100 ~2.9 of 3.35).
# GEMM: the share of the dense peak cuBLAS sustains on the large bf16 GEMMs of a training step under a
# 400-700 W power cap. The A100 and H100 figures are the one calibrated constant of each curve: the
# development sets of docs/planning.md (Korthikanti et al. 2022 for A100, the Megatron-LM README for
# H100) fix them, and the same value serves every other model and layout. H200 shares the H100's
# tensor cores (its curve too); B200 and MI300X take the H100's share of their own peaks until a
# published run of theirs is in the validation set. Attention: FlashAttention-2 reaches 50-73% of the
# A100's peak forward and backward (Dao 2023, Fig. 4-6); FlashAttention-3 and cuDNN 50-75% of the H100's
# (Shah et al. 2024). Kernel overhead: a CUDA launch and its pipeline fill, a few microseconds.
PRESETS: dict[str, Cluster] = {
    # DGX A100: 8 x A100-80GB, NVLink 3 (600 GB/s bidirectional), 8 x HDR 200 Gb/s InfiniBand (25 GB/s).
    "a100": Cluster(ACCELERATORS["a100"], 8, 25 * GB, 1, 1e-6, 5e-6, 0.77, 0.9, gemm_efficiency=0.74,
                    attention_efficiency=0.55, source="NVIDIA DGX A100 datasheet (8 x 200 Gb/s HDR)"),
    # DGX H100: 8 x H100 SXM, NVLink 4 (900 GB/s bidirectional), 8 x NDR 400 Gb/s ConnectX-7 (50 GB/s).
    "h100": Cluster(ACCELERATORS["h100"], 8, 50 * GB, 1, 1e-6, 5e-6, 0.8, 0.9, gemm_efficiency=0.63,
                    attention_efficiency=0.55, source="NVIDIA DGX H100 datasheet (8 x 400 Gb/s NDR)"),
    # HGX H200: the H100 board's NVLink and NICs, 141 GB HBM3e at 4.8 TB/s.
    "h200": Cluster(ACCELERATORS["h200"], 8, 50 * GB, 1, 1e-6, 5e-6, 0.8, 0.9, gemm_efficiency=0.63,
                    attention_efficiency=0.55, source="NVIDIA HGX H200 datasheet (8 x 400 Gb/s NDR)"),
    # DGX B200: NVLink 5 (1.8 TB/s bidirectional), 8 x 400 Gb/s ConnectX-7 (50 GB/s).
    "b200": Cluster(ACCELERATORS["b200"], 8, 50 * GB, 1, 1e-6, 5e-6, 0.8, 0.9, gemm_efficiency=0.63,
                    attention_efficiency=0.55, source="NVIDIA DGX B200 datasheet (8 x 400 Gb/s)"),
    # AMD Instinct MI300X platform: 8 OAMs on Infinity Fabric (7 x 64 GB/s each way per GPU), a 400 Gb/s
    # NIC per GPU.
    "mi300x": Cluster(ACCELERATORS["mi300x"], 8, 50 * GB, 1, 1e-6, 5e-6, 0.7, 0.9, gemm_efficiency=0.63,
                      attention_efficiency=0.55, source="AMD Instinct MI300X platform datasheet"),
}


def preset(name: str) -> Cluster:
    key = name.strip().lower()
    if key not in PRESETS:
        raise ConfigError(f"--hardware {name!r} is not a preset: use one of {', '.join(PRESETS)}, cpu (this machine, "
                          "measured), or --cluster FILE.toml for your own.")
    return PRESETS[key]


# The keys of a --cluster file: [accelerator] holds Accelerator's (units: FLOP/s, bytes, B/s; or
# `base = "h100"` to start from a preset's), [cluster] holds Cluster's.
CLUSTER_EXAMPLE = """[cluster]
base = "h100"              # start from a preset; every key below overrides it
gpus_per_node = 8
scale_out_bandwidth = 25e9 # B/s per GPU per direction: 200 Gb/s
gpus_per_nic = 2

[accelerator]
hbm_bytes = 80e9"""


def load_cluster(path: str) -> Cluster:
    """A cluster from a TOML file (CLUSTER_EXAMPLE): a preset with the keys it changes."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--cluster {path} does not exist: write a TOML file such as\n{CLUSTER_EXAMPLE}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--cluster {path} is not valid TOML ({e}).") from None
    section = dict(data.get("cluster", {}))
    unknown = set(data) - {"cluster", "accelerator"}
    if unknown:
        raise ConfigError(f"--cluster {path}: unknown section(s) {sorted(unknown)}: use [cluster] and [accelerator].")
    base = preset(str(section.pop("base", "h100")))
    acc = base.accelerator
    if data.get("accelerator"):
        acc = _replace_checked(acc, data["accelerator"], f"--cluster {path} [accelerator]")
    cluster = _replace_checked(base, section, f"--cluster {path} [cluster]")
    return replace(cluster, accelerator=acc, source=f"{path} (from {base.name})")


def _replace_checked(obj, values: dict, where: str):
    """dataclasses.replace with each key checked: known, and a positive number where the field is one."""
    known = {f.name: f for f in fields(obj) if f.name not in ("accelerator", "measured")}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r}. Valid keys: {', '.join(known)}.")
        current = getattr(obj, key)
        if isinstance(current, (int, float)) and not isinstance(current, bool) or current is None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or \
                    not math.isfinite(value):
                raise ConfigError(f"{where}: {key} = {value!r} must be a positive number.")
            if isinstance(current, int) and not isinstance(value, int):
                raise ConfigError(f"{where}: {key} = {value!r} must be a whole number.")
    return replace(obj, **values)


@dataclass(frozen=True)
class CpuPieces:
    """cpu_measure's timings of a tiny model's pieces (a block, the model's ends, the optimizer step,
    a GEMM at a new shape, drawing a batch) for one of this machine's processes: `threads` threads
    each, slowed by `share` where the processes outnumber the cores. steptime.py uses them in place
    of its GPU formulas where a cluster has them (cpu_cluster); None from block or ends: too large to
    time, the formulas stand in."""
    threads: int
    share: float

    def block(self, m, kind: str, micro_batch: int, seq: int, tp: int, sp: bool, etp: int, ep: int, dtype: str,
              chain: int):
        from . import cpu_measure as cm

        t = cm.block_seconds(m, kind, micro_batch, seq, tp, sp, etp, ep, dtype, self.threads, chain)
        return None if t is None else tuple(x / self.share for x in t)

    def ends(self, m, micro_batch: int, seq: int, vocab: int, dtype: str):
        from . import cpu_measure as cm

        t = cm.ends_seconds(m, micro_batch, seq, vocab, dtype, self.threads)
        return None if t is None else tuple(x / self.share for x in t)

    def optimizer(self, numels: tuple[int, ...], units: tuple[int, ...]) -> float:
        from . import cpu_measure as cm

        return cm.optimizer_seconds(numels, units, self.threads) / self.share

    def new_shape(self, dtype: str, layout: str, width: int) -> float:
        from . import cpu_measure as cm

        return cm.new_shape_seconds(dtype, self.threads, layout, width) / self.share

    def data(self, micro_batch: int, seq: int, micro_batches: int) -> float:
        from . import cpu_measure as cm

        return cm.data_seconds(micro_batch, seq, micro_batches) / self.share


def cpu_cluster(procs: int, threads: int = 0) -> Cluster:
    """This machine with `procs` processes, measured (cpu_measure.py): each GEMM timed at its shape and
    operand layout with the threads a process gets, slowed by the time-sharing of more processes than
    cores; a tiny model's blocks, ends and optimizer step timed whole at each rank's shapes (CpuPieces;
    steptime.py says where); gloo's collectives as lines fitted to what a call costs between two
    computations; elementwise ops at the measured copy bandwidth. Nothing overlaps: gloo runs on the
    cores that compute. threads: a process's threads (a run's train.threads); 0: as launch.py gives."""
    import torch

    from . import cpu_measure as cm
    from .hardware import measure_cpu

    ncores = cm.cores()
    threads = threads or cm.threads_per_process(procs, ncores)
    share = min(1.0, ncores / (procs * threads))  # a rank's share of a core when ranks outnumber cores
    acc = replace(measure_cpu(), interconnect_bandwidth=None, name=f"cpu (measured, {procs} processes)")
    gloo = {procs: cm.measure_gloo(procs, gap_s=cm.GAP_S)} if procs > 1 else {}

    def gemm(m: int, k: int, n: int, dtype: str = "fp32", layout: str = "nn") -> float:
        dt = torch.float32 if dtype == "fp32" else torch.bfloat16
        return cm.gemm_seconds(m, k, n, dt, threads, layout=layout) / share

    return Cluster(acc, gpus_per_node=procs, scale_out_bandwidth=1.0, memory_efficiency=share,
                   kernel_overhead_s=op_overhead_s() / share, overlap=False,
                   source=f"measured here: {ncores} cores, {threads} thread(s) per process",
                   measured={"gloo": gloo, "gemm": gemm, "pieces": CpuPieces(threads, share)})


def op_overhead_s(calls: int = 200) -> float:
    """Seconds PyTorch spends on one small CPU operation beyond its arithmetic (dispatch, allocation):
    the fixed cost of every kernel of a tiny model's step, timed on a 64-element add."""
    import torch

    from .hardware import _best_seconds

    x = torch.ones(64)

    def run():
        for _ in range(calls):
            torch.add(x, x)

    run()
    return _best_seconds(run, 3) / calls
