"""Config: TOML + command-line overrides, and errors that name the key and the fix."""

import pytest

from nanotrain.config import Config, ConfigError, load_config, parse_overrides

CONFIG = "configs/shakespeare_char.toml"


def test_shipped_config_loads_and_overrides_apply():
    cfg = load_config(CONFIG, ["--train.max_steps=200", "--model.n_layers", "2", "--precision.recipe=fp32",
                               "--model.tie_embeddings=false", "--optimizer.lr=3e-4"])
    assert cfg.train.max_steps == 200 and cfg.model.n_layers == 2 and cfg.precision.recipe == "fp32"
    assert cfg.model.tie_embeddings is False and cfg.optimizer.lr == pytest.approx(3e-4)
    assert cfg.model.d_model == 128  # from the file


def test_round_trip_through_dict():
    cfg = load_config(CONFIG)
    assert Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override, words", [
    (["--train.max_step=5"], ["train.max_step", "max_steps"]),          # typo: suggestion
    (["--trian.max_steps=5"], ["trian", "train"]),                        # unknown section
    (["--train.max_steps=abc"], ["train.max_steps", "integer"]),          # wrong type
    (["--model.norm=batchnorm"], ["model.norm", "rmsnorm"]),              # not a choice
    (["--model.tie_embeddings=maybe"], ["model.tie_embeddings", "true or false"]),
    (["--model.n_heads=3"], ["d_model=128", "n_heads=3"]),                # impossible value
    (["--model.n_kv_heads=3"], ["n_kv_heads=3"]),
    (["--train.seq_len=128", "--model.max_seq_len=64"], ["max_seq_len"]),
    (["--optimizer.lr=-1"], ["optimizer.lr"]),
    (["--schedule.min_lr=1"], ["schedule.min_lr"]),
    (["--parallel.pp=2", "--parallel.pp_schedule=interleaved", "--parallel.pp_virtual_stages=2",
      "--train.micro_batch_size=4"], ["micro-batches per step (3", "multiple of parallel.pp=2"]),
    (["--parallel.pp=2", "--parallel.pp_virtual_stages=2"], ["pp_virtual_stages=2", "interleaved"]),
    (["--parallel.pp=8"], ["n_layers=4", "parallel.pp=8"]),               # a stage per layer at most
    (["--parallel.pp_schedule=zb"], ["parallel.pp_schedule", "1f1b"]),
    (["--parallel.pp=2", "--model.arch=deepseek", "--model.mtp_depth=1"], ["mtp_depth", "parallel.pp=1"]),
    (["--parallel.pp=2", "--model.arch=deepseek", "--model.aux_loss_coef=0.01"], ["aux_loss_coef", "pp > 1"]),
    (["--parallel.tp=3"], ["n_heads=4", "parallel.tp=3"]),                # heads split over tp
    (["--parallel.tp=4", "--model.n_kv_heads=2"], ["n_kv_heads=2", "parallel.tp=4"]),
    (["--parallel.tp=2", "--model.d_ff=101"], ["MLP width 101", "parallel.tp=2"]),
    (["--parallel.sequence_parallel=true"], ["sequence_parallel", "tp > 1"]),
    (["--parallel.tp=4", "--parallel.sequence_parallel=true", "--train.seq_len=66", "--model.max_seq_len=66"],
     ["seq_len=66", "parallel.tp=4"]),
    (["--parallel.dp=5"], ["batch_size=12", "parallel.dp=5"]),            # global batch over dp
    (["--parallel.dp=2", "--train.micro_batch_size=4"], ["batch_size=12", "micro_batch_size=4"]),
    (["--data.tokenizer=bpe", "--data.vocab_size=100"], ["data.vocab_size=100", "256"]),
    (["--model.dropout=1.5"], ["model.dropout"]),
    (["max_steps=5"], ["--section.key=value"]),                           # malformed override
    (["--train.max_steps"], ["no value"]),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG, override)
    for w in words:
        assert w in str(e.value)


def test_all_errors_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG, ["--train.max_steps=0", "--optimizer.eps=0"])
    assert "train.max_steps" in str(e.value) and "optimizer.eps" in str(e.value)


def test_bad_toml_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nmax_steps = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[model]\nn_layer = 4\n")
    with pytest.raises(ConfigError, match="model.n_layer.*n_layers"):
        load_config(unknown)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_parse_overrides_forms():
    assert parse_overrides(["--a.b=1", "--c.d", "x=y"]) == [("a.b", "1"), ("c.d", "x=y")]
