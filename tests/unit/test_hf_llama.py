"""Hugging Face Llama interop: tiny random transformers models -> ours -> back, logits equal in fp32.

Everything is built locally from a LlamaConfig; nothing is downloaded."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nanotrain.models import TransformerModel  # noqa: E402
from nanotrain.models.hf import load_hf_model, model_config_from_hf, save_hf_model  # noqa: E402

TOL = 1e-4
VOCAB, SEQ = 100, 24


def tiny_llama_config(n_kv_heads: int, tied: bool, **extra) -> "transformers.LlamaConfig":
    # Non-default rope_theta and rms_norm_eps, so that a field mapped wrong shows in the logits.
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=n_kv_heads, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=tied, **extra,
    )


def random_hf_model(cfg, seed: int):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    # HF initialises RMSNorm weights to 1: randomise them too, so a swapped norm shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def our_logits(model, ids):
    with torch.no_grad():
        return model(ids)


CASES = [  # (num_key_value_heads, tied embeddings)
    pytest.param(4, False, id="mha-untied"),
    pytest.param(2, False, id="gqa-untied"),
    pytest.param(4, True, id="mha-tied"),
    pytest.param(2, True, id="gqa-tied"),
]


@pytest.mark.parametrize("n_kv_heads,tied", CASES)
def test_roundtrip_matches_transformers(tmp_path, n_kv_heads, tied):
    hf = random_hf_model(tiny_llama_config(n_kv_heads, tied), seed=n_kv_heads + 10 * tied)
    hf.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    want = hf_logits(hf, ids)

    ours = load_hf_model(tmp_path / "hf")
    assert not ours.training
    assert ours.cfg.n_kv_heads == n_kv_heads and ours.cfg.tie_embeddings == tied
    assert ours.cfg.rope_theta == 500000.0 and ours.cfg.norm_eps == 1e-5
    got = our_logits(ours, ids)
    assert got.shape == want.shape == (2, SEQ, VOCAB)
    assert (got - want).abs().max().item() <= TOL

    save_hf_model(ours, tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert type(back).__name__ == "LlamaForCausalLM"
    assert back.config.tie_word_embeddings == tied
    assert (hf_logits(back, ids) - want).abs().max().item() <= TOL


def test_yarn_roundtrip_matches_transformers(tmp_path):
    """rope_type "yarn" (factor 4 from 16 positions; SEQ=24 runs past the original window)."""
    yarn = {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0, "original_max_position_embeddings": 16}
    # initializer_range 0.1: sharp attention, so that positions matter (at 0.02 it is near uniform).
    hf = random_hf_model(tiny_llama_config(2, False, rope_parameters=dict(yarn), initializer_range=0.1), seed=7)
    hf.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    want = hf_logits(hf, ids)

    ours = load_hf_model(tmp_path / "hf")
    c = ours.cfg
    assert (c.rope_scaling, c.rope_factor, c.rope_original_max_seq_len, c.rope_theta) == ("yarn", 4.0, 16, 500000.0)
    diff = (our_logits(ours, ids) - want).abs().max().item()
    print(f"max |logit diff| llama yarn import: {diff:.2e}")
    assert diff <= TOL
    # The case is sensitive: the same weights with plain RoPE are far off.
    c.rope_scaling = "none"
    plain = TransformerModel(c)
    plain.load_state_dict(ours.state_dict())
    assert (our_logits(plain.eval(), ids) - want).abs().max().item() > 100 * TOL
    c.rope_scaling = "yarn"

    save_hf_model(ours, tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert back.config.rope_parameters["rope_type"] == "yarn"
    diff = (hf_logits(back, ids) - want).abs().max().item()
    print(f"max |logit diff| llama yarn export: {diff:.2e}")
    assert diff <= TOL


def test_convert_cli_round_trip(tmp_path, capsys):
    """nanotrain convert --from-hf (HF -> model.safetensors + nanotrain_config.json), then
    --to-hf from that folder: transformers loads the same model; errors exit 2."""
    from nanotrain.cli import main
    from nanotrain.config import Config
    from nanotrain.models.hf import load_converted

    hf = random_hf_model(tiny_llama_config(2, True), seed=8)
    hf.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))
    want = hf_logits(hf, ids)

    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "nt")]) == 0
    assert sorted(p.name for p in (tmp_path / "nt").iterdir()) == ["model.safetensors", "nanotrain_config.json"]
    saved = Config.from_dict(json.loads((tmp_path / "nt" / "nanotrain_config.json").read_text())).model
    assert saved.n_kv_heads == 2 and saved.tie_embeddings and saved.rope_theta == 500000.0
    assert (our_logits(load_converted(tmp_path / "nt"), ids) - want).abs().max().item() <= TOL

    assert main(["convert", "--to-hf", "--checkpoint", str(tmp_path / "nt"), "--out", str(tmp_path / "back")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    assert (hf_logits(back, ids) - want).abs().max().item() <= TOL
    assert "wrote" in capsys.readouterr().out

    assert main(["convert", "--to-hf", "--out", str(tmp_path / "x")]) == 2
    assert main(["convert", "--to-hf", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_sharded_checkpoint(tmp_path):
    hf = random_hf_model(tiny_llama_config(2, False), seed=3)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(1))
    got = our_logits(load_hf_model(tmp_path), ids)
    assert (got - hf_logits(hf, ids)).abs().max().item() <= TOL


def test_missing_and_unexpected_tensors_are_listed(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = random_hf_model(tiny_llama_config(2, False), seed=4)
    hf.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        load_hf_model(tmp_path)
    assert "missing tensors: model.layers.1.mlp.up_proj.weight" in str(e.value)
    assert "unexpected tensors: model.layers.0.self_attn.q_proj.bias" in str(e.value)


def _hf_dict(**extra) -> dict:
    """config.json as transformers writes it, plus `extra` written in on top."""
    d = tiny_llama_config(2, False).to_dict()
    d.update(extra)
    return json.loads(json.dumps(d))


def test_config_mapping():
    cfg = model_config_from_hf(_hf_dict())
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff,
            cfg.max_seq_len) == (VOCAB, 64, 2, 4, 2, 128, 64)
    assert (cfg.norm, cfg.mlp, cfg.pos_emb, cfg.bias) == ("rmsnorm", "swiglu", "rope", False)
    assert cfg.rope_theta == 500000.0 and cfg.norm_eps == 1e-5 and not cfg.tie_embeddings
    # transformers 4 spelling: rope_theta at the top level, no rope_parameters.
    old = _hf_dict(rope_theta=1234.0, rope_scaling=None)
    old.pop("rope_parameters", None)
    assert model_config_from_hf(old).rope_theta == 1234.0


def test_yarn_config_mapping():
    # transformers 4 spelling ("type", top-level rope_theta). Absent factor: max_position_embeddings / original.
    old = _hf_dict(rope_theta=500000.0, rope_scaling={"type": "yarn", "original_max_position_embeddings": 16,
                                                      "beta_fast": 16, "mscale_all_dim": 1.0})
    old.pop("rope_parameters")
    cfg = model_config_from_hf(old)
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_max_seq_len) == ("yarn", 4.0, 16)
    assert (cfg.rope_beta_fast, cfg.rope_beta_slow, cfg.rope_mscale, cfg.rope_mscale_all_dim) == (16, 1, 0, 1)
    assert cfg.rope_theta == 500000.0
    # Both spellings: rope_scaling wins, as in transformers 5.
    both = model_config_from_hf(_hf_dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}))
    assert (both.rope_scaling, both.rope_factor, both.rope_original_max_seq_len) == ("yarn", 2.0, 64)


@pytest.mark.parametrize("field,value", [
    ("rope_scaling", {"rope_type": "linear", "factor": 4.0}),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}),
    ("rope_parameters", {"rope_type": "dynamic", "rope_theta": 500000.0, "factor": 2.0}),
    ("attention_factor", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "attention_factor": 1.5}),
    ("attention_bias", True),
    ("mlp_bias", True),
    ("hidden_act", "gelu"),
    ("head_dim", 32),
])
def test_unsupported_config_raises_with_field_name(field, value):
    with pytest.raises(ValueError, match=field):
        if field == "attention_factor":
            model_config_from_hf(_hf_dict(rope_parameters=value))
        else:
            model_config_from_hf(_hf_dict(**{field: value}))


def test_unsupported_model_type_raises():
    with pytest.raises(ValueError, match="model_type='qwen2'"):
        model_config_from_hf(_hf_dict(model_type="qwen2"))
    with pytest.raises(ValueError, match="sliding_window"):
        model_config_from_hf(_hf_dict(model_type="mistral", sliding_window=16))
    assert model_config_from_hf(_hf_dict(model_type="mistral", sliding_window=None)).d_model == 64


def test_save_refuses_a_non_llama(tmp_path):
    from nanotrain.config import ModelConfig
    from nanotrain.models import TransformerModel

    gpt = TransformerModel(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, max_seq_len=16,
                                       norm="layernorm", mlp="gelu", pos_emb="learned"))
    with pytest.raises(ValueError, match="model.norm='layernorm'"):
        save_hf_model(gpt, tmp_path)


def test_the_shipped_llama_config_trains_and_exports(tmp_path, capsys):
    """configs/shakespeare_llama.toml, the config the README exports (shakespeare_char's LayerNorm
    + GELU block with RoPE has no transformers class): a few steps, convert --to-hf, and
    transformers computes the logits the trained model computes."""
    from conftest import CORPUS, ROOT

    from nanotrain.cli import main
    from nanotrain.models.hf import load_any

    run = tmp_path / "run"
    assert main(["train", "--config", str(ROOT / "configs" / "shakespeare_llama.toml"), "--train.max_steps=3",
                 "--train.eval_steps=1", f"--data.path={CORPUS}", f"--data.prepared_dir={tmp_path / 'prep'}",
                 f"--train.out_dir={run}", "--logging.progress=none", "--logging.plot=false",
                 "--logging.tensorboard=false", "--logging.peak_tflops=1"]) == 0
    assert main(["convert", "--to-hf", "--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert "(transformer, " in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.vocab_size == 65
    ids = torch.randint(0, 65, (2, 64), generator=torch.Generator().manual_seed(3))
    ours = load_any(run / "checkpoints").float().eval()  # run/config.json is the run's, not an HF one
    assert (hf_logits(hf, ids) - our_logits(ours, ids)).abs().max().item() <= TOL
