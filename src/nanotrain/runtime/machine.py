"""The machine a run is on: the device, the cores and threads, and how fast it multiplies matrices in
each dtype. Two decisions are taken from it at start-up, before any model exists:

    precision.recipe = "auto"   bf16 where this device multiplies bf16 at least as fast as fp32, else fp32
    the MFU's peak              the machine's matmul peak in the dtype the run computes in

Where the rates come from:

    CUDA   the datasheet table (inspection/hardware.py), keyed by torch.cuda.get_device_name(); a GPU
           the table does not know is timed instead. Each rank has its own GPU: the job's peak is
           one GPU's times the world size.
    CPU    global rank 0 times torch.mm with every core the job may use (its affinity mask), then sends
           the rates to the other ranks. The job's peak is that node's times the number of nodes.
           Probing on every rank would be wrong twice over: 8 gloo ranks on 2 cores would each time
           a quarter of the machine at once, and multiplying by 8 would count the cores 8 times.
           The rates are timed once per machine and kept (runtime/machine_cache.py), so that a busy
           machine gives the same decision and the same peak as an idle one; the run's first lines
           say whether they were measured now or read back, and from when.

Why a CPU is measured rather than looked up: its bf16 speed depends on units that vary between
machines of one vendor. With AMX (Sapphire Rapids and newer) or AVX512-BF16 (Zen 4/5, Cooper Lake) a
bf16 product is 2-10x faster than fp32; with AVX2 only it is ~100x *slower*, because oneDNN converts
each element in software. A default that assumed either would be wrong on the other kind.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from ..inspection.hardware import accelerator_for_device_name, measure_matmul_flops
from ..parallel import collectives
from .machine_cache import cache_file, machine_key, measure_rates, node_rate

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_name_and_kind() -> tuple[str, str]:
    """("AMD EPYC 9B14", "AVX512-BF16"): the model name and its widest matmul units, from /proc/cpuinfo.
    The kind names what decides bf16's speed: AMX, AVX512-BF16, AVX-512 or AVX2 (no bf16 units)."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not name:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux
        pass
    name = name or platform.processor() or platform.machine()
    for flag, kind in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX-512"),
                       ("avx2", "AVX2")):
        if flag in flags:
            break
    else:
        kind = platform.machine()
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA")  # oneDNN told to use fewer units than the CPU has
    return name, kind + (f", limited to {limit} by ONEDNN_MAX_CPU_ISA" if limit else "")


def job_cores() -> int:
    """The cores this process may run on (its affinity mask: what taskset, cgroups' cpusets or a
    scheduler left it), not every core of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cpu_matmul_rate(dtype: str, threads: int) -> float:
    """torch.mm's best FLOP/s in `dtype` with `threads` threads, timed now (one try)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return measure_matmul_flops(DTYPES[dtype])
    finally:
        torch.set_num_threads(saved)


def cpu_rates(name: str, kind: str, cores: int, dtypes: tuple[str, ...],
              fresh: bool = False) -> tuple[dict[str, float], list[str], str]:
    """({dtype: FLOP/s}, warnings, where from) of this CPU with `cores` threads: kept from an earlier
    run of this machine, or measured until stable and kept (runtime/machine_cache.py)."""
    return measure_rates(machine_key(name, kind, cores), kind, cores, dtypes, cpu_matmul_rate, fresh)


@functools.cache
def _cpu_rates_once(name: str, kind: str, cores: int, dtypes: tuple[str, ...]):
    """cpu_rates, once per process (tests run many engines)."""
    return cpu_rates(name, kind, cores, dtypes)


def remeasure_cpu_rate(machine, dtype: str) -> float:
    """One node's matmul FLOP/s in `dtype`, timed again now as machine_cache.node_rate times it (not
    the kept figure): the MFU's peak when the run computes faster than the kept peak allows."""
    return node_rate(dtype, machine.kind, machine.cores, cpu_matmul_rate)[0]


@dataclass(frozen=True)
class Machine:
    """What the job runs on, the same on every rank (rank 0's view, broadcast)."""

    device_type: str  # "cpu" | "cuda"
    name: str  # CPU model or GPU name
    kind: str  # CPU: its matmul units (AMX, AVX512-BF16, AVX2); CUDA: "sm_90"
    cores: int  # CPU cores the job may use on one node
    threads: int  # intra-op threads of each rank
    ranks_per_node: int
    nodes: int
    rates: dict[str, float] = field(default_factory=dict)  # matmul FLOP/s of one GPU or one node, per dtype
    source: str = ""  # where the rates come from
    notes: tuple[str, ...] = ()  # rank 0's warnings about them (a measurement rejected as implausible)

    @property
    def oversubscribed(self) -> bool:
        return self.device_type == "cpu" and self.ranks_per_node * self.threads > self.cores

    def describe(self) -> str:
        where = f"{self.nodes} nodes x " if self.nodes > 1 else ""
        if self.device_type == "cuda":
            return f"device: cuda, {where}{self.ranks_per_node} x {self.name} ({self.kind})"
        return (f"device: cpu, {self.name} ({self.kind}), {where}{self.cores} cores; {self.ranks_per_node} "
                f"rank{'s' if self.ranks_per_node > 1 else ''} x {self.threads} thread{'s' if self.threads > 1 else ''}")

    def oversubscription_warning(self) -> str | None:
        if not self.oversubscribed:
            return None
        used = self.ranks_per_node * self.threads
        return (f"warning: {self.ranks_per_node} ranks x {self.threads} threads = {used} threads on {self.cores} "
                f"cores: the ranks take turns on the cores, so each step waits for the slowest and tokens/s "
                f"is lower than {self.cores} cores can give. Fine for learning a layout; for speed use at most "
                f"{self.cores} ranks x threads (train.threads, OMP_NUM_THREADS).")


def probe_machine(device: torch.device, dtypes: tuple[str, ...] = ("fp32", "bf16")) -> Machine:
    """Rank 0 looks up or times the rates; every rank returns the same Machine. Collective when a
    process group exists: every rank must call it."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = max(1, world // max(per_node, 1))
    threads, cores = torch.get_num_threads(), job_cores()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        kind, table, notes = f"sm_{major}{minor}", accelerator_for_device_name(name), []
        wanted = ("fp32", "tf32", "bf16", "fp16", "fp8")
        if table is not None:
            rates = {d: table.flops(d) for d in wanted if table.flops(d)}
            source = f"datasheet: {table.source}, dense"
        else:  # a GPU the table does not know: what torch.mm reaches on it (a lower bound on its peak)
            rates = {d: measure_matmul_flops(DTYPES[d], sizes=(4096,), device=device) for d in dtypes}
            source = f"measured: torch.mm 4096^3 on {name} (not in the datasheet table)"
    else:
        name, kind = cpu_name_and_kind()
        rates, notes, where = {d: 0.0 for d in dtypes}, [], "sent by rank 0"
        if dtypes and (not dist.is_initialized() or dist.get_rank() == 0):
            rates, notes, where = _cpu_rates_once(name, kind, cores, dtypes)
        source = f"torch.mm with {cores} threads on rank 0, {where}"
    if dist.is_initialized() and world > 1:  # rank 0's figures everywhere: one decision, one peak
        keys = sorted(rates)
        values = torch.tensor([rates[k] for k in keys], dtype=torch.float64,
                              device=device if device.type == "cuda" else "cpu")
        collectives.broadcast(values, 0, None)  # the default group
        rates = dict(zip(keys, values.tolist()))
    return Machine(device.type, name, kind, cores, threads, per_node, nodes, rates, source, tuple(notes))


# -- precision.recipe = "auto" --------------------------------------------------------------------


def choose_recipe(requested: str, machine: Machine | None, device: torch.device) -> tuple[str, str | None]:
    """(the recipe to run, a line for the log); "auto" becomes bf16 or fp32. An explicit recipe is
    always obeyed; an explicit bf16 on a CPU whose bf16 matmuls are slower than fp32 gets a warning."""
    if requested == "auto":
        if device.type == "cuda":
            ok = torch.cuda.is_bf16_supported()
            major, minor = torch.cuda.get_device_capability(device)
            why = (f"this GPU (sm_{major}{minor}) computes in bf16" if ok else
                   f"this GPU (sm_{major}{minor}) has no bf16 matmuls; fp16 would need loss scaling "
                   "(precision.recipe=fp16)")
            return ("bf16" if ok else "fp32"), f"precision: auto -> {'bf16' if ok else 'fp32'}: {why}"
        bf16, fp32 = machine.rates["bf16"], machine.rates["fp32"]
        recipe = "bf16" if bf16 >= fp32 else "fp32"
        cmp = ">=" if bf16 >= fp32 else "<"
        return recipe, (f"precision: auto -> {recipe}: a bf16 matmul runs at {bf16 / 1e12:.4g} TFLOP/s {cmp} fp32's "
                        f"{fp32 / 1e12:.4g} on this CPU ({machine.kind}, {machine.cores} threads)")
    computes_bf16 = requested not in ("fp32", "fp16")  # the low-bit recipes run the rest under bf16 autocast
    if device.type == "cpu" and computes_bf16 and machine is not None and "bf16" in machine.rates:
        bf16, fp32 = machine.rates["bf16"], machine.rates["fp32"]
        if bf16 < fp32:
            return requested, (f"warning: precision.recipe={requested} computes in bf16, and a bf16 matmul on this "
                               f"CPU ({machine.kind}) runs at {bf16 / 1e12:.3g} TFLOP/s, {fp32 / max(bf16, 1.0):.0f}x "
                               f"slower than fp32's {fp32 / 1e12:.3g}: this run will be slow. Use "
                               "--precision.recipe=auto (fp32 here) or --precision.recipe=fp32.")
    return requested, None


def needs_probe(recipe: str, peak_tflops: float, device: torch.device) -> bool:
    """Whether start-up must look up or time the rates: for auto, for the MFU's peak, or to warn about
    bf16 on a CPU without bf16 units."""
    return recipe == "auto" or peak_tflops == 0 or (device.type == "cpu" and recipe not in ("fp32", "fp16"))


# -- the MFU's peak -------------------------------------------------------------------------------


def compute_dtype(recipe: str, device: torch.device, fp8_gemm: str = "auto") -> str:
    """The dtype of the run's matmuls, which the peak must be quoted in."""
    if recipe == "fp32":
        if device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
            return "tf32"  # torch.set_float32_matmul_precision("high") puts fp32 matmuls on tensor cores
        return "fp32"
    if recipe == "fp16":
        return "fp16"
    if recipe == "fp8_tensorwise" and device.type == "cuda" and fp8_gemm != "emulated":
        from ..precision.recipes import scaled_mm_available

        if scaled_mm_available(device):
            return "fp8"
    return "bf16"  # bf16, and the emulated low-bit recipes (their products and the rest run in bf16)


def job_peak(machine: Machine, dtype: str, peak_tflops: float = 0.0) -> tuple[float, str]:
    """(the whole job's peak FLOP/s, how it was found). logging.peak_tflops, when set, is one GPU's or
    one CPU node's peak.

    On a CPU the peak is the fastest of the dtypes the run computes in: its matmuls in `dtype` and
    everything autocast leaves in fp32 (the attention core, norms, the loss). Quoting only the bf16
    rate on a CPU where bf16 is 100x slower than fp32 would put MFU far above 100% as soon as fp32
    work is counted."""
    units = machine.ranks_per_node * machine.nodes if machine.device_type == "cuda" else machine.nodes
    unit = "GPU" if machine.device_type == "cuda" else "node"
    if peak_tflops:
        return peak_tflops * 1e12 * units, f"{peak_tflops:g} TFLOP/s per {unit} (logging.peak_tflops) x {units}"
    if dtype not in machine.rates and machine.device_type == "cuda":
        raise RuntimeError(f"no {dtype} peak for {machine.name}: set logging.peak_tflops to its dense {dtype} peak")
    used = {dtype, "fp32"} if machine.device_type == "cpu" else {dtype}
    best = max((d for d in used if d in machine.rates), key=lambda d: machine.rates[d])
    note = f"{best} matmul, {machine.source}"
    if best != dtype:
        note += f"; above this CPU's {dtype} rate of {machine.rates.get(dtype, 0) / 1e12:.3g} TFLOP/s"
    return machine.rates[best] * units, note + (f", x {units} {unit}s" if units > 1 else "")


def retimed_peak(machine: Machine, dtype: str) -> float:
    """A CPU job's peak timed again, as job_peak measures it (the fastest of dtype and fp32, per node)."""
    return machine.nodes * max(remeasure_cpu_rate(machine, d) for d in {dtype, "fp32"})


def mfu_peak(cfg, device: torch.device, machine: Machine | None) -> tuple[float, str, Callable[[], float] | None]:
    """The MFU's peak (monitoring/mfu.Throughput): the whole job's FLOP/s, how it was found, and on a
    CPU that timed it at start-up, how to time it again (None: a datasheet or logging.peak_tflops)."""
    if machine is None or not (machine.rates or cfg.logging.peak_tflops):  # a bootstrap of one's own
        machine = probe_machine(device)
    dtype = compute_dtype(cfg.precision.recipe, device, cfg.precision.fp8.gemm)
    peak, source = job_peak(machine, dtype, cfg.logging.peak_tflops)
    probed = machine.device_type == "cpu" and not cfg.logging.peak_tflops
    return peak, source, functools.partial(retimed_peak, machine, dtype) if probed else None


def resolve_precision(cfg, device: torch.device) -> tuple[Machine, list[str]]:
    """Probe the machine (as much as this config needs), turn precision.recipe=auto into bf16 or fp32
    in cfg (so config.json and checkpoints name what ran), and return the start-up lines to log:
    the device, the precision choice and any warning. Collective: every rank calls it."""
    p = cfg.precision
    dtypes = ("fp32", "bf16") + (("fp16",) if p.recipe == "fp16" else ())
    machine = probe_machine(device, dtypes if needs_probe(p.recipe, cfg.logging.peak_tflops, device) else ())
    lines = [machine.describe()] + list(machine.notes)
    if machine.device_type == "cpu" and machine.rates:  # where auto's rates and the MFU's peak come from
        rates = ", ".join(f"{d} {r / 1e12:.3g}" for d, r in sorted(machine.rates.items()))
        lines.append(f"matmul rates: {rates} TFLOP/s ({machine.source}; cache {cache_file()}: "
                     "`nanotrain machine --measure` times them again)")
    p.recipe, note = choose_recipe(p.recipe, machine, device)
    lines += [line for line in (note, machine.oversubscription_warning()) if line]
    return machine, lines


def logical_size(model, seq_len: int) -> tuple[int, float]:
    """(parameters, training FLOPs per token) of the logical model, the MFU's numerator terms
    (monitoring/mfu.Throughput): counted on a copy on the meta device (inspection/counts.py, what
    `nanotrain inspect` prints: every matmul a token runs, attention's included), so the layout
    does not enter."""
    from ..inspection.counts import flops_per_token, meta_model

    logical = meta_model(model)
    return sum(p.numel() for p in logical.parameters()), flops_per_token(logical, model, seq_len)["train"]
