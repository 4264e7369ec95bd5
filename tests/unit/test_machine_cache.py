"""runtime/machine_cache.py: a CPU's matmul rates, measured once per machine until stable, kept, and
read back; a measurement far below what the hardware does is rejected with a warning."""

import json

import pytest
import torch

from nanotrain.cli import main
from nanotrain.monitoring.mfu import Throughput
from nanotrain.runtime import machine as machine_module
from nanotrain.runtime.machine import Machine, choose_recipe
from nanotrain.runtime.machine_cache import (ONE_THREAD, cache_file, floor, machine_key, measure_rates,
                                             stable_rate)

T = 1e12
KEY = machine_key("Test CPU", "AMX", 2)
IDLE = {("fp32", 1): 0.2 * T, ("fp32", 2): 0.4 * T, ("bf16", 1): 1.4 * T, ("bf16", 2): 1.5 * T}


class Timer:
    """A stand-in for torch.mm's timing: fixed rates per (dtype, threads), and a count of the calls."""

    def __init__(self, rates):
        self.rates, self.calls = rates, 0

    def __call__(self, dtype, threads):
        self.calls += 1
        return self.rates[dtype, threads]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOTRAIN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "machine.json"


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("NANOTRAIN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_file() == tmp_path / "xdg" / "nanotrain" / "machine.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_file() == tmp_path / "home" / ".cache" / "nanotrain" / "machine.json"


def test_measured_once_then_read_back(cache):
    timer = Timer(IDLE)
    rates, warnings, where = measure_rates(KEY, "AMX", 2, ("fp32", "bf16"), timer)
    assert rates == {"fp32": 0.4 * T, "bf16": 1.5 * T} and warnings == []
    assert where == "measured now, kept" and timer.calls == 8  # 2 tries x (1, 2 threads) x 2 dtypes
    entry = json.loads(cache.read_text())[KEY]
    assert entry["fp32"]["flops"] == 0.4 * T and entry["bf16"]["measured"].endswith("UTC")
    busy = Timer({k: v / 100 for k, v in IDLE.items()})  # the same machine under load: not timed at all
    again, warnings, where = measure_rates(KEY, "AMX", 2, ("fp32", "bf16"), busy)
    assert again == rates and busy.calls == 0 and warnings == []
    assert where == f"cached from {entry['fp32']['measured']}"


def test_another_key_is_measured_and_both_are_kept(cache):
    measure_rates(KEY, "AMX", 2, ("fp32",), Timer(IDLE))
    for other in (machine_key("Test CPU", "AMX", 4), machine_key("Other CPU", "AMX", 2)):
        timer = Timer({("fp32", 1): 0.1 * T, ("fp32", 2): 0.15 * T, ("fp32", 4): 0.3 * T})
        rates = measure_rates(other, "AMX", 4 if "4 cores" in other else 2, ("fp32",), timer)[0]
        assert timer.calls > 0 and rates["fp32"] in (0.15 * T, 0.3 * T)
    assert KEY.endswith(f"torch {torch.__version__}")  # a new torch (another oneDNN) is another key
    assert len(json.loads(cache.read_text())) == 3
    assert measure_rates(KEY, "AMX", 2, ("fp32",), Timer({}))[0] == {"fp32": 0.4 * T}


def test_a_missing_dtype_is_measured_and_added(cache):
    measure_rates(KEY, "AMX", 2, ("fp32",), Timer(IDLE))
    timer = Timer(IDLE)
    assert measure_rates(KEY, "AMX", 2, ("fp32", "bf16"), timer)[0] == {"fp32": 0.4 * T, "bf16": 1.5 * T}
    assert timer.calls == 4 and set(json.loads(cache.read_text())[KEY]) == {"fp32", "bf16"}


def test_measure_again_replaces_the_kept_rates(cache):
    measure_rates(KEY, "AMX", 2, ("fp32", "bf16"), Timer(IDLE))
    faster = Timer({k: v * 1.2 for k, v in IDLE.items()})
    rates, _, where = measure_rates(KEY, "AMX", 2, ("fp32", "bf16"), faster, fresh=True)
    assert faster.calls == 8 and rates["fp32"] == pytest.approx(0.48 * T) and where.startswith("measured now")
    assert json.loads(cache.read_text())[KEY]["fp32"]["flops"] == pytest.approx(0.48 * T)


def test_stable_rate_repeats_until_the_best_two_agree():
    tries = iter([0.05, 0.4, 0.2, 0.39, 0.9])
    assert stable_rate(lambda: next(tries)) == (0.4, 4)  # 0.4 and 0.39 agree within 5%
    assert stable_rate(lambda: 1.0) == (1.0, 2)
    grows = iter(range(1, 100))
    assert stable_rate(lambda: next(grows), most=5) == (5, 5)  # never stable: the best of `most`


def test_many_threads_far_below_one_thread_are_rejected_and_one_threads_rate_stands_in(cache):
    busy = Timer({**IDLE, ("fp32", 2): 0.004 * T})  # the busy machine: 2 threads wait on a busy core
    rates, warnings, where = measure_rates(KEY, "AMX", 2, ("fp32", "bf16"), busy)
    assert rates["fp32"] == 0.2 * T and len(warnings) == 1
    assert warnings[0].startswith("warning: torch.mm in fp32 measured 0.004 TFLOP/s with 2 threads")
    assert "kept as one thread's rate" in warnings[0] and "nanotrain machine --measure" in warnings[0]
    assert json.loads(cache.read_text())[KEY]["fp32"]["note"] == ONE_THREAD
    assert measure_rates(KEY, "AMX", 2, ("fp32", "bf16"), Timer({}))[2].endswith(f"fp32: {ONE_THREAD}")
    # an idle --measure replaces it; a busy one never replaces a full measurement
    measure_rates(KEY, "AMX", 2, ("fp32",), Timer(IDLE), fresh=True)
    measure_rates(KEY, "AMX", 2, ("fp32",), busy, fresh=True)
    kept = json.loads(cache.read_text())[KEY]["fp32"]
    assert kept["flops"] == 0.4 * T and "note" not in kept


def test_one_thread_below_the_floor_of_its_kind_is_rejected_and_not_kept(cache):
    assert floor("AMX", "fp32", 2) == 10e9 and floor("AMX", "bf16", 1) == 50e9
    assert floor("AVX2", "bf16", 2) == 0 and floor("AMX, limited to AVX2 by ONEDNN_MAX_CPU_ISA", "bf16", 2) == 0
    absurd = Timer({("fp32", 1): 0.0011 * T, ("fp32", 2): 0.0022 * T})  # the 0.0022 TFLOP/s
    rates, warnings, where = measure_rates(KEY, "AMX", 2, ("fp32",), absurd)
    assert rates == {"fp32": 10e9} and where == "measured now, not kept" and not cache.exists()
    assert "below the 0.005 that an idle core of this kind (AMX) reaches" in warnings[0]
    assert "the floor, not kept" in warnings[0]


def test_the_same_decision_and_peak_on_a_busy_machine(cache):
    """Acceptance of issue 44 in small: measured idle once, a busy machine reads the same back."""
    def decide(timer):
        rates, _, where = measure_rates(KEY, "AMX", 2, ("fp32", "bf16"), timer)
        m = Machine("cpu", "Test CPU", "AMX", 2, 2, 1, 1, rates, where)
        return choose_recipe("auto", m, torch.device("cpu"))[0], machine_module.job_peak(m, "bf16")[0]

    idle = decide(Timer(IDLE))
    assert idle == ("bf16", 1.5 * T)
    assert decide(Timer({k: v / 50 for k, v in IDLE.items()})) == idle


def test_machine_command_reads_and_measures_again(cache, monkeypatch, capsys):
    timer = Timer(IDLE)
    monkeypatch.setattr(machine_module, "cpu_matmul_rate", timer)
    monkeypatch.setattr(machine_module, "job_cores", lambda: 2)
    monkeypatch.setattr(machine_module, "cpu_name_and_kind", lambda: ("Test CPU", "AMX"))
    assert main(["machine"]) == 0
    out = capsys.readouterr().out
    assert "fp32 matmul: 0.4 TFLOP/s (torch.mm, 2 threads)" in out and f"rates measured now, kept (cache {cache})" in out
    assert "precision: auto -> bf16" in out
    assert main(["machine"]) == 0 and timer.calls == 8
    assert "rates cached from " in capsys.readouterr().out
    assert main(["machine", "--measure"]) == 0 and timer.calls == 16
    monkeypatch.setattr(machine_module, "cpu_matmul_rate", Timer({**IDLE, ("bf16", 2): 0.01 * T}))
    assert main(["machine", "--measure"]) == 1  # a rejected measurement: said, and the exit code says it
    assert "warning: torch.mm in bf16 measured 0.01 TFLOP/s with 2 threads" in capsys.readouterr().err


def test_mfu_never_above_100_percent(capsys):
    """A run faster than its peak even after the peak is timed again: the peak was low, and the
    run's own rate becomes the peak, said in a warning."""
    t = Throughput(1, 1e6, 1e9, "fp32 matmul", retime=lambda: 1.5e9)
    assert t.mfu(4e3) == 1.0 and t.peak == 4e9 and "raised to the run's own rate" in t.peak_source
    out = capsys.readouterr().out
    assert "timed on busy cores" in out and "above the measured peak of 0.0015" in out
    assert t.mfu(2e3) == 0.5
