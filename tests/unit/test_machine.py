"""runtime/machine.py: the device's matmul rates, precision.recipe=auto, and the MFU's peak."""

import json

import pytest
import torch

from nanotrain.config import ConfigError
from nanotrain.inspection.hardware import ACCELERATORS, accelerator_for_device_name
from nanotrain.runtime import RuntimeEngine
from nanotrain.runtime.machine import Machine, choose_recipe, compute_dtype, job_peak, probe_machine

CPU = torch.device("cpu")
T = 1e12


def cpu(bf16: float, fp32: float, ranks: int = 1, threads: int = 2, cores: int = 2, nodes: int = 1) -> Machine:
    return Machine("cpu", "test CPU", "AVX2", cores, threads, ranks, nodes, {"bf16": bf16 * T, "fp32": fp32 * T},
                   "measured")


def test_auto_picks_bf16_only_where_it_is_at_least_as_fast_as_fp32():
    # AMX-like: bf16 6x fp32; AVX2-only: bf16 ~130x slower (the measurement: 0.0008 vs 0.105)
    recipe, line = choose_recipe("auto", cpu(2.0, 0.33), CPU)
    assert recipe == "bf16" and "2 TFLOP/s >= fp32's 0.33" in line
    recipe, line = choose_recipe("auto", cpu(0.0008, 0.105), CPU)
    assert recipe == "fp32" and "0.0008" in line and "0.105" in line and "AVX2" in line
    assert choose_recipe("auto", cpu(0.2, 0.2), CPU)[0] == "bf16"  # a tie: bf16 halves the activations


def test_explicit_recipe_is_obeyed_and_slow_bf16_warns_with_the_ratio_and_the_fix():
    recipe, line = choose_recipe("bf16", cpu(0.001, 0.1), CPU)
    assert recipe == "bf16" and line.startswith("warning:") and "100x slower" in line
    assert "--precision.recipe=auto" in line and "--precision.recipe=fp32" in line
    assert choose_recipe("fp8_deepseek", cpu(0.001, 0.1), CPU)[1].startswith("warning:")  # bf16 underneath
    assert choose_recipe("bf16", cpu(2.0, 0.33), CPU) == ("bf16", None)
    assert choose_recipe("fp32", cpu(0.001, 0.1), CPU) == ("fp32", None)


def test_cpu_peak_is_one_probe_per_node_in_the_fastest_dtype_the_run_uses():
    # 8 ranks on one 2-core node: the node's peak once, not 8 times
    m = cpu(0.9, 0.2, ranks=8, threads=1)
    assert job_peak(m, "bf16")[0] == pytest.approx(0.9 * T)
    assert job_peak(m, "fp32")[0] == pytest.approx(0.2 * T)
    # bf16 slower than fp32: the fp32 parts of a bf16 run (attention core, norms) are quoted at fp32's rate
    peak, how = job_peak(cpu(0.001, 0.1), "bf16")
    assert peak == pytest.approx(0.1 * T) and "fp32 matmul" in how
    assert job_peak(cpu(0.9, 0.2, nodes=3), "bf16")[0] == pytest.approx(2.7 * T)  # 3 nodes
    assert job_peak(m, "bf16", peak_tflops=5.0)[0] == pytest.approx(5 * T)  # per node, given


def test_cuda_peak_is_the_datasheet_per_gpu_times_the_gpus():
    h100 = ACCELERATORS["h100"]
    m = Machine("cuda", "NVIDIA H100 80GB HBM3", "sm_90", 16, 1, 4, 2,
                {d: h100.flops(d) for d in ("bf16", "fp16", "fp8", "tf32", "fp32")}, "datasheet")
    assert job_peak(m, "bf16")[0] == pytest.approx(8 * 989.4 * T)
    assert job_peak(m, "fp8")[0] == pytest.approx(8 * 1978.9 * T)
    assert job_peak(m, "tf32")[0] == pytest.approx(8 * 494.7 * T)


@pytest.mark.parametrize("name,key", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100_pcie"), ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA A100 80GB PCIe", "a100"), ("NVIDIA B200", "b200"),
    ("NVIDIA L4", "l4"), ("NVIDIA L40S", None), ("NVIDIA GeForce RTX 4090", None)])
def test_datasheet_table_by_cuda_device_name(name, key):
    found = accelerator_for_device_name(name)
    assert found is (ACCELERATORS[key] if key else None)


def test_datasheet_dense_peaks():
    """Dense (not 2:4 sparse) figures of the vendors' datasheets, TFLOP/s: bf16, fp16, fp8, tf32."""
    expected = {"h100": (989.4, 989.4, 1978.9, 494.7), "h200": (989.4, 989.4, 1978.9, 494.7),
                "a100": (312, 312, None, 156), "b200": (2250, 2250, 4500, 1100), "l4": (121, 121, 242.5, 60)}
    for key, peaks in expected.items():
        got = tuple(ACCELERATORS[key].flops(d) for d in ("bf16", "fp16", "fp8", "tf32"))
        assert got == tuple(p * T if p else None for p in peaks), key


def test_compute_dtype_of_each_recipe_on_cpu():
    assert compute_dtype("fp32", CPU) == "fp32" and compute_dtype("bf16", CPU) == "bf16"
    assert compute_dtype("fp16", CPU) == "fp16" and compute_dtype("fp8_tensorwise", CPU) == "bf16"


def test_probe_on_this_cpu():
    m = probe_machine(CPU)
    assert m.rates["fp32"] > 0 and m.rates["bf16"] > 0 and m.cores >= 1 and m.threads >= 1
    assert f"{m.cores} core" in m.describe() and m.kind in m.describe()
    assert probe_machine(CPU).rates == m.rates  # measured once per process


def test_oversubscription_warning():
    assert cpu(1, 1, ranks=2, threads=1).oversubscription_warning() is None
    line = cpu(1, 1, ranks=8, threads=1).oversubscription_warning()
    assert line.startswith("warning: 8 ranks x 1 threads = 8 threads on 2 cores")


def test_auto_needs_fp32_parameters(make_config):
    with pytest.raises(ConfigError, match="precision.recipe=auto with bf16 parameters"):
        make_config("--precision.recipe=auto", "--precision.param_dtype=bf16")


def test_auto_run_logs_its_choice_and_records_the_resolved_recipe(make_config, capsys):
    cfg = make_config("--precision.recipe=auto", "--train.max_steps=10", "--logging.peak_tflops=0",
                      "--logging.progress=plain")
    result = RuntimeEngine(cfg).run()
    out = capsys.readouterr().out
    machine = probe_machine(CPU)
    expected = "bf16" if machine.rates["bf16"] >= machine.rates["fp32"] else "fp32"
    assert f"precision: auto -> {expected}:" in out and "device: cpu" in out
    assert json.loads((result.out_dir / "config.json").read_text())["precision"]["recipe"] == expected
    mfu = [r["mfu"] for r in map(json.loads, (result.out_dir / "metrics.jsonl").read_text().splitlines())
           if "mfu" in r]
    assert mfu and all(0 < x <= 1 for x in mfu)


def test_a_peak_probed_on_busy_cores_is_measured_again(capsys):
    """The start-up probe is short: run while another job holds the cores, it reads low, and a run
    computing faster than it would print an MFU above 100%. The first such figure makes the peak
    be timed again (once), and the MFU is a fraction again."""
    from functools import partial

    from nanotrain.monitoring.mfu import Throughput
    from nanotrain.runtime.machine import Machine, retimed_peak

    busy = 1e9  # FLOP/s: far below any CPU's fp32 matmul rate
    machine = Machine("cpu", "test", "avx2", 2, 1, 1, 1, {"fp32": busy}, "measured: torch.mm with 2 threads on rank 0")
    t = Throughput(1, 1e6, busy, "fp32 matmul, measured: torch.mm with 2 threads on rank 0",
                   retime=partial(retimed_peak, machine, "fp32"))
    tokens_per_s = 2 * busy / 1e6  # twice the probed peak
    assert 0 < t.mfu(tokens_per_s) <= 1
    assert t.peak > busy and t.remeasured and "measured again" in t.peak_source
    assert "timed on busy cores" in capsys.readouterr().out
    fixed = Throughput(1, 1e6, busy, "1 TFLOP/s per node (logging.peak_tflops) x 1")  # retime=None
    assert fixed.mfu(tokens_per_s) == 2.0  # a peak the user set is theirs: not measured over
