"""Hugging Face DeepSeek-V3 interop: tiny random transformers models -> ours -> back, logits equal in fp32.

Everything is built locally from a DeepseekV3Config; nothing is downloaded. The HF weights
are initialised with std 0.1 (not 0.02) so that attention is far from uniform: a wrong rope
row order, softmax scale or routing then moves the logits by ~1, not by ~1e-4."""

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from nanotrain.checkpoint import CheckpointManager, model_pieces  # noqa: E402
from nanotrain.cli import main  # noqa: E402
from nanotrain.config import Config, ModelConfig, load_config  # noqa: E402
from nanotrain.models import build_model  # noqa: E402
from nanotrain.models.hf import load_converted, load_hf_model, model_config_from_hf, save_hf_model  # noqa: E402

TOL = 1e-4
VOCAB, SEQ = 100, 24
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def tiny_config(q_lora_rank, n_group, topk_group, yarn, interleave, tied=False, eps=1e-6):
    rope = YARN if yarn else {"rope_type": "default", "rope_theta": 5000.0}
    return transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
        intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=n_group, topk_group=topk_group, first_k_dense_replace=1,
        routed_scaling_factor=2.5, max_position_embeddings=64, rope_parameters=dict(rope),
        rope_interleave=interleave, rms_norm_eps=eps, tie_word_embeddings=tied, initializer_range=0.1,
    )


def random_hf_model(cfg, seed):
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # HF initialises RMSNorm weights to 1: a swapped norm would not show
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # zero by default: the bias must count
                b.uniform_(-0.2, 0.2)
    return model


def ids_batch(seed=0):
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def our_logits(model, ids):
    with torch.no_grad():
        return model(ids)


CASES = [  # q_lora_rank, n_group, topk_group, YaRN, rope_interleave, tied, rms_norm_eps
    pytest.param(32, 2, 1, True, True, False, 1e-6, id="qlora-groups-yarn-interleaved"),
    pytest.param(None, 1, 1, False, False, False, 1e-6, id="noq-nogroups-plain-rotatehalf"),
    pytest.param(32, 1, 1, True, False, False, 1e-6, id="qlora-nogroups-yarn-rotatehalf"),
    # rms_norm_eps 1e-2: the MLA norms must still use HF's fixed 1e-6, or the logits move.
    pytest.param(None, 2, 1, False, True, True, 1e-2, id="noq-groups-plain-interleaved-tied-eps"),
]


@pytest.mark.parametrize("q_lora,n_group,topk_group,yarn,interleave,tied,eps", CASES)
def test_roundtrip_matches_transformers(tmp_path, q_lora, n_group, topk_group, yarn, interleave, tied, eps):
    hf = random_hf_model(tiny_config(q_lora, n_group, topk_group, yarn, interleave, tied, eps), seed=n_group)
    hf.save_pretrained(tmp_path / "hf")
    ids = ids_batch()
    want = hf_logits(hf, ids)

    ours = load_hf_model(tmp_path / "hf")
    assert type(ours).__name__ == "DeepSeekModel" and not ours.training
    c = ours.cfg
    assert (c.q_lora_rank, c.n_group, c.topk_group, c.tie_embeddings, c.norm_eps) == (q_lora or 0, n_group,
                                                                                      topk_group, tied, eps)
    assert (c.moe_top_k, c.moe_d_ff, c.d_ff, c.routed_scaling_factor, c.score_func) == (2, 16, 64, 2.5, "sigmoid")
    assert c.rope_scaling == ("yarn" if yarn else "none")
    assert all(b.attn.kv_norm.eps == 1e-6 for b in ours.layers.values())
    bias = ours.layers["1"].mlp.router.expert_bias
    assert torch.equal(bias, hf.model.layers[1].mlp.gate.e_score_correction_bias) and bias.abs().sum() > 0
    got = our_logits(ours, ids)
    assert got.shape == want.shape == (2, SEQ, VOCAB)
    diff = (got - want).abs().max().item()
    print(f"max |logit diff| import: {diff:.2e}")
    assert diff <= TOL

    save_hf_model(ours, tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert type(back).__name__ == "DeepseekV3ForCausalLM"
    assert back.config.rope_interleave and back.config.tie_word_embeddings == tied
    diff = (hf_logits(back, ids) - want).abs().max().item()
    print(f"max |logit diff| export: {diff:.2e}")
    assert diff <= TOL


def test_fused_experts_and_mtp_layers(tmp_path):
    """transformers' in-memory layout (experts.gate_up_proj / experts.down_proj) loads too, and the
    tensors of a multi-token-prediction layer (num_nextn_predict_layers) are skipped."""
    hf = random_hf_model(tiny_config(32, 2, 1, True, True), seed=5)
    hf.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    for i in (1, 2):
        pre = f"model.layers.{i}.mlp.experts"
        gate = torch.stack([tensors.pop(f"{pre}.{j}.gate_proj.weight") for j in range(8)])
        up = torch.stack([tensors.pop(f"{pre}.{j}.up_proj.weight") for j in range(8)])
        tensors[f"{pre}.gate_up_proj"] = torch.cat([gate, up], dim=1)
        tensors[f"{pre}.down_proj"] = torch.stack([tensors.pop(f"{pre}.{j}.down_proj.weight") for j in range(8)])
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)  # V3's MTP module is "layer 61"
    save_file(tensors, path, metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1
    ids = ids_batch(1)
    assert (our_logits(load_hf_model(tmp_path), ids) - hf_logits(hf, ids)).abs().max().item() <= TOL


def test_missing_and_unexpected_tensors_are_listed(tmp_path):
    hf = random_hf_model(tiny_config(None, 1, 1, False, True), seed=6)
    hf.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.2.mlp.experts.3.up_proj.weight"]
    del tensors["model.layers.0.self_attn.kv_a_layernorm.weight"]
    tensors["model.layers.0.mlp.gate.weight"] = torch.zeros(8, 64)  # layer 0 is dense: no router
    tensors["model.layers.1.mlp.experts.8.up_proj.weight"] = torch.zeros(16, 64)  # only 8 experts
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        load_hf_model(tmp_path)
    msg = str(e.value)
    assert "model.layers.2.mlp.experts.3.up_proj.weight" in msg.split("unexpected tensors:")[0]
    assert "model.layers.0.self_attn.kv_a_layernorm.weight" in msg.split("unexpected tensors:")[0]
    assert "model.layers.0.mlp.gate.weight" in msg.split("unexpected tensors:")[1]
    assert "model.layers.1.mlp.experts.8.up_proj.weight" in msg.split("unexpected tensors:")[1]


# The published DeepSeek-V3 config.json (deepseek-ai/DeepSeek-V3), weights-relevant fields.
PUBLISHED = {
    "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
    "rope_theta": 10000, "tie_word_embeddings": False, "attention_bias": False, "num_nextn_predict_layers": 1,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
}


def test_published_config_matches_configs_deepseek_v3_toml():
    ours = model_config_from_hf(PUBLISHED)
    toml = load_config("configs/deepseek_v3.toml").model  # validated, never built (671B parameters)
    for field in ModelConfig.__dataclass_fields__:
        if field not in ("bias_update_rate", "aux_loss_coef", "init_std"):  # not in config.json
            assert getattr(ours, field) == getattr(toml, field), field
    # transformers' own defaults are the same model.
    hf_default = transformers.DeepseekV3Config(max_position_embeddings=163840, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}).to_dict()
    assert model_config_from_hf(json.loads(json.dumps(hf_default))) == ours


@pytest.mark.parametrize("field,value", [
    ("scoring_func", "softmax"),
    ("topk_method", "greedy"),
    ("quantization_config", {"quant_method": "fp8", "weight_block_size": [128, 128]}),
    ("rope_scaling", {"type": "llama3", "factor": 8.0}),
    ("attention_bias", True),
])
def test_unsupported_config_raises_with_field_name(field, value):
    with pytest.raises(ValueError, match=field):
        model_config_from_hf({**PUBLISHED, field: value})


def test_training_checkpoint_to_hf_and_convert_round_trip(tmp_path, capsys):
    """A DeepSeek model built by nano-train (rotate-half rope, a trained expert bias) -> training
    checkpoint -> `nanotrain convert --to-hf` -> transformers: same logits. Then back with
    --from-hf, and out again from that folder."""
    cfg = Config()
    cfg.model = ModelConfig(arch="deepseek", vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, max_seq_len=32,
                            norm_eps=1e-6, d_ff=96, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                            qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, moe_top_k=2, moe_d_ff=16,
                            n_group=2, topk_group=1, routed_scaling_factor=2.0, tie_embeddings=False,
                            rope_scaling="yarn", rope_factor=2.0, rope_original_max_seq_len=16,
                            rope_mscale_all_dim=1.0, init_std=0.1)
    model = build_model(cfg.model)
    model.init_weights(seed=3)
    with torch.no_grad():
        model.layers["1"].mlp.router.expert_bias.copy_(torch.tensor([0.1, -0.2, 0.05, 0.0]))
    model.eval()
    CheckpointManager(tmp_path / "ckpt").save(7, model_pieces(model), {"config": cfg.to_dict()})
    ids = ids_batch(2)
    want = our_logits(model, ids)

    assert main(["convert", "--to-hf", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert (hf_logits(hf, ids) - want).abs().max().item() <= TOL

    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "nt")]) == 0
    assert (our_logits(load_converted(tmp_path / "nt"), ids) - want).abs().max().item() <= TOL
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MLA eps restored from the metadata: no eps warning
        assert main(["convert", "--to-hf", "--checkpoint", str(tmp_path / "nt"), "--out", str(tmp_path / "hf2")]) == 0
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2", dtype=torch.float32).eval()
    assert (hf_logits(hf2, ids) - want).abs().max().item() <= TOL
    assert "deepseek" in capsys.readouterr().out
