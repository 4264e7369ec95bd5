"""Bad input gets a named error: the subcommands' numeric arguments, non-finite config values and a
Hugging Face config.json that lacks a size. Each is one `error: ...` line on stderr and exit 2."""

import dataclasses
import json

import pytest

from nanotrain.cli import NUMBER_RANGES, build_parser, check_numbers, main
from nanotrain.config import Config, ConfigError, load_config, set_value, validate

# A subcommand's required arguments, so that only the number under test is wrong.
BASE = {"sample": ["sample", "--checkpoint", "nowhere"], "verify": ["verify", "--layout", "dp=2"],
        "inspect": ["inspect", "--hf-config", "nowhere.json"]}


def _error(capsys, argv: list[str]) -> str:
    """The one error line main prints for argv (it must exit 2)."""
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("command,flag,value", [
    ("sample", "--temperature", "-1"), ("sample", "--temperature", "nan"), ("sample", "--temperature", "inf"),
    ("sample", "--max-new-tokens", "-5"), ("sample", "--max-new-tokens", "0"), ("sample", "--top-k", "-1"),
    ("sample", "--num-samples", "0"), ("sample", "--seed", "-1"), ("sample", "--seed", str(2**64)),
    ("verify", "--steps", "0"), ("verify", "--tolerance", "-1e-3"), ("verify", "--tolerance", "nan"),
    ("inspect", "--seq-len", "-5"), ("inspect", "--seq-len", "0"), ("inspect", "--micro-batch-size", "-1"),
    ("inspect", "--micro-batches", "-2"), ("inspect", "--gpu-memory", "0"), ("inspect", "--gpu-memory", "-8"),
])
def test_numeric_arguments_out_of_range_are_named(capsys, command, flag, value):
    err = _error(capsys, BASE[command] + [f"{flag}={value}"])  # -1e-3 alone would read as an option
    least, most = NUMBER_RANGES[flag]
    shown = type(least)(value)  # as parsed: -1 for --temperature is -1.0
    assert f"{flag} {shown} is out of range" in err and f"{least:g}" in err, err


def test_numeric_arguments_at_their_bounds_pass():
    """0 means something for these (greedy, no top-k, the config's): check_numbers lets it through."""
    parser = build_parser()
    for argv in (BASE["sample"] + ["--temperature", "0", "--top-k", "0", "--seed", "0", "--max-new-tokens", "1"],
                 BASE["verify"] + ["--tolerance", "0", "--steps", "1"],
                 BASE["inspect"] + ["--micro-batch-size", "0", "--micro-batches", "0", "--seq-len", "1"]):
        check_numbers(parser.parse_known_args(argv)[0])


def test_every_numeric_argument_has_a_range():
    """A numeric argument added later without a range in NUMBER_RANGES fails here."""
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.choices and isinstance(a.choices, dict)]
    numeric = {flag for s in sub.choices.values() for a in s._actions if a.type in (int, float)
               for flag in a.option_strings if flag.startswith("--")}
    assert numeric == set(NUMBER_RANGES)


@pytest.mark.parametrize("override", ["--optimizer.lr=inf", "--optimizer.lr=nan", "--optimizer.lr=-inf",
                                      "--precision.loss_scale.init=inf", "--train.step_timeout_s=nan"])
def test_nonfinite_config_values_are_refused(override):
    key = override[2:].split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}=.* is not a finite number"):
        load_config(None, [override])


def test_every_float_field_refuses_inf():
    """Every float of every section and table, nested precision ones included (config.nonfinite_errors)."""
    def floats(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from floats(value, f"{prefix}{f.name}.")
            elif isinstance(value, float):
                yield f"{prefix}{f.name}"

    keys = [k for f in dataclasses.fields(Config) for k in floats(getattr(Config(), f.name), f"{f.name}.")]
    assert "optimizer.lr" in keys and "precision.loss_scale.min" in keys
    for key in keys:
        cfg = Config()
        set_value(cfg, key, "inf")
        with pytest.raises(ConfigError, match=rf"{key}=inf is not a finite number"):
            validate(cfg)


def test_nonfinite_in_toml_through_the_cli(tmp_path, capsys):
    """A config's problems come as one `error: invalid config:` message, a line per problem."""
    toml = tmp_path / "c.toml"
    toml.write_text("[optimizer]\nlr = inf\n[precision.loss_scale]\nbackoff = nan\n")
    capsys.readouterr()
    assert main(["prepare", "--config", str(toml)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid config:") and "Traceback" not in err
    assert "optimizer.lr=inf" in err and "precision.loss_scale.backoff=nan" in err
    with pytest.raises(ConfigError, match="optimizer.lr=0.0 must be positive"):
        load_config(None, ["--optimizer.lr=0"])


def _hf_folder(tmp_path, **drop_or_set) -> str:
    """A Llama config.json as transformers writes its keys (no weights: the config fails first)."""
    hf = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    for key, value in drop_or_set.items():
        hf.pop(key) if value is None else hf.update({key: value})
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    return str(tmp_path / "hf")


def test_hf_config_missing_a_size_is_named(tmp_path, capsys):
    folder = _hf_folder(tmp_path, hidden_size=None)
    path = f"{folder}/config.json"
    for argv in (["convert", "--from-hf", folder, "--out", str(tmp_path / "out")], ["inspect", "--hf-config", path]):
        err = _error(capsys, argv)
        assert path in err and "hidden_size" in err, err
    assert not (tmp_path / "out").exists()


def test_hf_config_with_a_size_of_the_wrong_type(tmp_path, capsys):
    folder = _hf_folder(tmp_path, num_hidden_layers="2")
    err = _error(capsys, ["convert", "--from-hf", folder, "--out", str(tmp_path / "out")])
    assert "num_hidden_layers='2'" in err and "integers" in err, err
    (tmp_path / "hf" / "config.json").write_text("[1, 2]")
    err = _error(capsys, ["inspect", "--hf-config", f"{folder}/config.json"])
    assert "JSON object" in err and "list" in err, err


def test_a_config_error_under_the_launcher_is_one_line(tmp_path):
    """`make train ARGS=...` with a bad value: every worker exits 2 on the same named error;
    nanotrain.torchrun ends with one line and code 2, not torchrun's traceback and failure table."""
    from fault_launch import fault_args, torchrun

    done = torchrun(2, fault_args(tmp_path, "--parallel.dp=2", "--schedule.warmup_steps=400"), ours=True)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "schedule.warmup_steps=400 must be below" in out and "Traceback" not in out, out
    assert "ChildFailedError" not in out and "the workers stopped on the input error above" in out, out
