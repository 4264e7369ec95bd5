"""Arithmetic intensity and roofline (inspection/roofline.py, hardware.py, `nanotrain inspect --out`)."""

import json
import math

import pytest

from conftest import ROOT
from nanotrain.cli import main
from nanotrain.config import ConfigError, load_config
from nanotrain.inspection.counts import flops_per_token, meta_model
from nanotrain.inspection.hardware import ACCELERATORS, get_accelerator, measure_cpu
from nanotrain.inspection.roofline import gemm_cost, roofline
from nanotrain.models.hf import model_config_from_hf
from test_deepseek import TINY
from test_inspection import DENSE, GPT2ISH, HF_LLAMA3_8B
from pictures import assert_picture

H100 = get_accelerator("h100")


def model_cfg(args, seq_len=32):
    m = load_config(None, ["--data.path=x.txt", f"--train.seq_len={seq_len}", *args]).model
    m.max_seq_len = m.max_seq_len or seq_len
    return m


def test_square_matmul_intensity_is_the_hand_formula():
    """[n, n] @ [n, n] in bf16: 2n^3 FLOPs over 3 n^2 x 2 bytes = n / 3 FLOP/byte."""
    n = 4096
    flops, nbytes = gemm_cost(n, n, n, dtype_bytes=2)
    assert flops == 2 * n ** 3 and nbytes == 3 * n * n * 2
    assert flops / nbytes == pytest.approx(n / 3)
    assert gemm_cost(n, n, n, dtype_bytes=1)[0] / gemm_cost(n, n, n, dtype_bytes=1)[1] == pytest.approx(2 * n / 3)


@pytest.mark.parametrize("args", [DENSE, GPT2ISH, TINY, TINY + ["--model.mtp_depth=1"]],
                         ids=["dense", "gpt2-style", "deepseek", "deepseek-mtp"])
def test_training_kinds_sum_to_flops_per_token(args):
    """The roofline's training FLOPs, kind by kind, are counts.flops_per_token's: one FLOP count."""
    T, B = 32, 3
    m = model_cfg(args, T)
    model = meta_model(m)
    rf = roofline(m, T, H100, micro_batch_size=B, model=model)
    counts = flops_per_token(model, m, T)
    kinds = rf["phases"]["train"]["kinds"]
    assert {k: p["flops"] / (B * T) for k, p in kinds.items()} == pytest.approx(
        {k: f for k, f in counts["train_per_kind"].items() if f}, rel=1e-9)
    assert rf["phases"]["train"]["flops"] / (B * T) == pytest.approx(counts["train"], rel=1e-9)
    assert rf["phases"]["prefill"]["flops"] / (B * T) == pytest.approx(counts["prefill"], rel=1e-9)
    if m.arch == "transformer":  # MLA decode counts the absorbed kernel instead (roofline.attention_core)
        assert rf["phases"]["decode"]["flops"] / B == pytest.approx(counts["decode"], rel=1e-9)


def test_dense_decode_is_memory_bound_and_big_batch_training_is_compute_bound():
    """Llama-3-8B on an H100: decoding one token per sequence reads every weight for ~1 FLOP/byte;
    a training step of 8 x 4096 = m tokens through the MLP's [m, 4096] @ [4096, 14336] (and back)
    has AI = 1 / (1/m + 1/k + 1/n) ≈ 2900 FLOP/byte in bf16, ten times the ridge (295)."""
    m = model_config_from_hf(HF_LLAMA3_8B)
    model = meta_model(m)
    decode = roofline(m, 4096, H100, micro_batch_size=1, model=model)["phases"]["decode"]
    assert all(p["bound"] == "memory" for p in decode["kinds"].values())
    assert decode["kinds"]["dense_mlp"]["intensity"] == pytest.approx(1.0, rel=0.01)
    # One token per step: the time is reading 16 GB of bf16 weights (and the cache) at 3.35 TB/s.
    assert decode["time_s"] == pytest.approx(decode["bytes"] / H100.hbm_bandwidth, rel=1e-9)
    train = roofline(m, 4096, H100, micro_batch_size=8, model=model)
    mlp = train["phases"]["train"]["kinds"]["dense_mlp"]
    assert mlp["intensity"] == pytest.approx(1 / (1 / (8 * 4096) + 1 / 4096 + 1 / 14336))
    assert mlp["bound"] == "compute" and mlp["intensity"] > 9 * train["ridge_point"]
    assert mlp["attainable_flops"] == H100.bf16_flops


def test_routed_experts_decode_has_less_intensity_than_a_dense_mlp_of_the_same_width():
    """64 experts, top 2, a batch of 16 decoded tokens: a dense MLP reuses each weight 16 times,
    an expert only for the ~1.3 tokens routed to it; both the same width (d_ff = moe_d_ff)."""
    m = model_cfg(TINY + ["--model.n_routed_experts=64", "--model.d_ff=16", "--model.moe_d_ff=16"])
    decode = roofline(m, 32, H100, micro_batch_size=16)["phases"]["decode"]["kinds"]
    dense, routed = decode["dense_mlp"]["intensity"], decode["routed_experts"]["intensity"]
    assert routed < dense / 3
    assert decode["routed_experts"]["bound"] == "memory"


def test_deepseek_v3_mla_decode_reads_the_compressed_cache():
    """V3's decode: MLA's absorbed attention over a 576-number cache is near the ridge, while
    its routed experts (8 of 256 per token) sit at ~1 FLOP/byte."""
    m = load_config(ROOT / "configs" / "deepseek_v3.toml", []).model
    m.max_seq_len = 4096
    rf = roofline(m, 4096, H100, micro_batch_size=1)
    decode = rf["phases"]["decode"]["kinds"]
    # bytes: 61 layers x (4097 cache rows of 576 + q of 128 x 576 + o of 128 x 512) x 2 bytes
    assert decode["attention_scores"]["bytes"] == 2 * 61 * (4097 * 576 + 128 * 576 + 128 * 512)
    assert 100 < decode["attention_scores"]["intensity"] < rf["ridge_point"]
    assert decode["routed_experts"]["intensity"] == pytest.approx(1.0, rel=0.01)


def test_hardware_lookup():
    assert get_accelerator("H100 sxm") is ACCELERATORS["h100"] and get_accelerator("MI300X").fp8_flops
    assert ACCELERATORS["h100"].ridge_point(2) == pytest.approx(295, abs=1)
    with pytest.raises(ConfigError) as e:
        get_accelerator("tpu-v5")
    for name in ("a100", "h100", "h200", "b200", "mi300x", "cpu"):
        assert name in str(e.value)
    with pytest.raises(ConfigError, match="fp8"):
        ACCELERATORS["a100"].peak_flops(1)


def test_measure_cpu_returns_positive_finite_numbers():
    cpu = measure_cpu()
    print(f"cpu: bf16 {cpu.bf16_flops / 1e12:.3f} TFLOP/s, fp32 {cpu.fp32_flops / 1e12:.3f} TFLOP/s, "
          f"{cpu.hbm_bandwidth / 1e9:.1f} GB/s, {cpu.hbm_bytes / 1e9:.1f} GB RAM")
    for x in (cpu.bf16_flops, cpu.fp32_flops, cpu.hbm_bandwidth, cpu.hbm_bytes):
        assert x > 0 and math.isfinite(x)
    assert cpu.name == "cpu (measured)" and cpu.fp8_flops is None


def test_inspect_out_writes_the_report_and_plots(tmp_path, capsys):
    out = tmp_path / "report"
    cfg = str(ROOT / "configs" / "shakespeare_char.toml")
    assert main(["inspect", "--config", cfg, "--model.vocab_size=65", "--hardware", "b200", "--dtype", "fp8",
                 "--micro-batch-size", "4", "--out", str(out), "--json"]) == 0
    rf = json.loads(capsys.readouterr().out)["roofline"]
    assert rf["hardware"]["name"] == "B200 (HGX)" and rf["dtype_bytes"] == 1 and rf["micro_batch_size"] == 4
    for name in ("roofline.png", "intensity.png"):
        assert_picture(out / name, min_size=(600, 400))
    text = (out / "report.md").read_text()
    assert "## Roofline: B200 (HGX), fp8" in text and "![roofline](roofline.png)" in text
    assert "| decode | dense_mlp |" in text and "# transformer model" in text
    assert main(["inspect", "--config", cfg, "--model.vocab_size=65", "--hardware", "tpu"]) == 2
    assert "h100" in capsys.readouterr().err
