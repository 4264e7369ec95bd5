"""`nanotrain inspect` (inspection/): parameter counts and FLOPs per token, before a run."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import ROOT
from nanotrain.cli import main
from nanotrain.config import load_config
from nanotrain.inspection.counts import flops_per_token, meta_model, param_counts, register_cpu_sdpa_flops
from nanotrain.models import build_model
from nanotrain.models.hf import model_config_from_hf
from test_deepseek import TINY

DENSE = ["--model.d_model=64", "--model.n_layers=2", "--model.n_heads=4", "--model.n_kv_heads=2",
         "--model.vocab_size=68"]
GPT2ISH = ["--model.d_model=48", "--model.n_layers=3", "--model.n_heads=4", "--model.vocab_size=68",
           "--model.norm=layernorm", "--model.mlp=gelu", "--model.pos_emb=learned", "--model.bias=true",
           "--model.tie_embeddings=false"]
MODELS = {"dense-gqa-swiglu": DENSE, "gpt2-style": GPT2ISH, "deepseek-mla-moe": TINY,
          "deepseek-mtp": TINY + ["--model.mtp_depth=1"]}


def model_cfg(args, seq_len=32):
    m = load_config(None, ["--data.path=x.txt", f"--train.seq_len={seq_len}", *args]).model
    m.max_seq_len = m.max_seq_len or seq_len
    return m


@pytest.mark.parametrize("name", list(MODELS))
def test_counts_are_the_instantiated_models_tensors(name):
    m = model_cfg(MODELS[name])
    real = build_model(m)
    counts = param_counts(meta_model(m), m)
    assert counts["all"]["total"] == sum(p.numel() for p in real.parameters())
    assert sum(c["total"] for k, c in counts.items() if k != "all") == counts["all"]["total"]
    if name == "dense-gqa-swiglu":  # longhand: 2 layers of q, k, v (2 kv heads of 16), o; SwiGLU 192 wide
        d, hd, ff = 64, 16, 192
        assert counts["attention"]["total"] == 2 * (d * 4 * hd + 2 * d * 2 * hd + 4 * hd * d)
        assert counts["dense_mlp"]["total"] == 2 * 3 * d * ff
        assert counts["norms"]["total"] == (2 * 2 + 1) * d
        assert counts["embedding"]["total"] == 68 * d and counts["head"]["total"] == 0  # tied
    if name.startswith("deepseek"):  # 4 experts, top 2: half the routed experts are active
        assert counts["routed_experts"]["active"] * 2 == counts["routed_experts"]["total"]


HF_LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
                "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu"}
HF_LLAMA3_8B = dict(HF_LLAMA2_7B, intermediate_size=14336, num_key_value_heads=8, vocab_size=128256,
                    max_position_embeddings=8192, rope_theta=500000.0)


@pytest.mark.parametrize("hf,published", [(HF_LLAMA2_7B, 6_738_415_616), (HF_LLAMA3_8B, 8_030_261_248)],
                         ids=["llama-2-7b", "llama-3-8b"])
def test_llama_sizes_are_the_published_ones(hf, published):
    """The exact counts of the released checkpoints (their safetensors index sizes / 2 bytes)."""
    m = model_config_from_hf(hf)
    assert param_counts(meta_model(m), m)["all"]["total"] == published


def test_deepseek_v3_is_671b_with_37b_active():
    """DeepSeek-V3 (configs/deepseek_v3.toml, the released config): 671B total, as published, to
    0.01%. The published 37B activated is rounded to the billion; ours, without the embedding
    lookup (which multiplies nothing), is 36.63B, inside that rounding; with it 37.55B."""
    cfg = load_config(ROOT / "configs" / "deepseek_v3.toml", [])
    m = cfg.model
    m.max_seq_len = m.max_seq_len or 4096
    counts = param_counts(meta_model(m), m)
    assert counts["all"]["total"] == pytest.approx(671e9, rel=5e-3)
    assert abs(counts["all"]["total"] - 671e9) < 0.1e9
    assert abs(counts["all"]["active_matmul"] - 37e9) <= 0.5e9


@pytest.mark.parametrize("name", list(MODELS))
def test_training_flops_agree_with_flop_counter(name):
    """FlopCounterMode over a real forward + backward (the CPU attention kernel's formula
    registered) against the count from the meta model: within 2% (dense and MoE: exact; MTP
    runs its block on one token fewer per sequence)."""
    register_cpu_sdpa_flops()
    B, T = 2, 32
    m = model_cfg(MODELS[name], T)
    model = build_model(m)
    model.init_weights(0)
    x, y = torch.randint(0, m.vocab_size, (B, T)), torch.randint(0, m.vocab_size, (B, T))
    with FlopCounterMode(display=False) as counter:
        model(x, y).backward()
    measured = counter.get_total_flops() / (B * T)
    ours = flops_per_token(meta_model(m), m, T)["train"]
    print(f"{name}: FlopCounterMode {measured:,.0f}, ours {ours:,.0f} FLOPs/token ({measured / ours:.4f})")
    assert measured == pytest.approx(ours, rel=0.02)


def test_inspect_cli(tmp_path, capsys):
    assert main(["inspect", "--config", str(ROOT / "configs" / "shakespeare_char.toml"), "--model.vocab_size=65",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("params_total", "params_active", "flops_per_token"):
        assert out[key] > 0
    hf = tmp_path / "config.json"
    hf.write_text(json.dumps(HF_LLAMA3_8B))
    assert main(["inspect", "--hf-config", str(hf), "--seq-len", "8192"]) == 0
    text = capsys.readouterr().out
    assert "8.03B" in text and "| attention |" in text
    assert main(["inspect", "--config", str(ROOT / "configs" / "shakespeare_char.toml")]) == 2  # no vocab size
    assert "model.vocab_size" in capsys.readouterr().err


def test_inspect_counts_deepseek_v3_under_its_published_pipeline(capsys):
    """The runtime refuses DeepSeek-V3's balance loss with pp > 1; inspect (as plan) counts the layout
    without it, says so, and leaves a layout that does not split it as it is."""
    v3 = str(ROOT / "configs" / "deepseek_v3.toml")
    assert main(["inspect", "--config", v3, "--seq-len", "4096", "--layout", "pp=16,dp=128,ep=64,zero=1,micro=1",
                 "--micro-batches", "120", "--json"]) == 0
    out = capsys.readouterr()
    plan = json.loads(out.out)["plan"]
    assert "model.aux_loss_coef=0" in out.err and len(plan["stages"]) == 16 and plan["memory_per_rank_bytes"] > 80e9
    assert main(["inspect", "--config", v3, "--seq-len", "4096", "--layout", "dp=4,ep=4", "--json"]) == 0
    assert "aux_loss_coef" not in capsys.readouterr().err
