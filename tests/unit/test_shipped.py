"""What nano-train ships (nanotrain/shipped.py) is found by name from any folder: `--config NAME`,
and the default corpus where data.path is relative and not in the working folder (issue 41).
`make test-wheel` checks the same from an installed wheel in a fresh environment."""

from pathlib import Path

import pytest

from nanotrain.cli import main
from nanotrain.config import ConfigError, load_config
from nanotrain.shipped import shipped_configs

ROOT = Path(__file__).resolve().parents[2]


def test_a_shipped_config_is_found_by_its_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {"shakespeare_char", "deepseek_tiny"} <= set(shipped_configs())
    by_name = load_config("shakespeare_char", ["--model.vocab_size=65"])
    by_path = load_config(str(ROOT / "configs" / "shakespeare_char.toml"), ["--model.vocab_size=65"])
    assert by_name == by_path
    with pytest.raises(ConfigError, match="the name of a shipped config: deepseek_tiny, deepseek_v3"):
        load_config("shakespeare")


def test_the_shipped_corpus_stands_in_for_a_relative_path_that_is_not_here(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["prepare", "--config", "shakespeare_char"]) == 0
    out = capsys.readouterr().out
    assert f"data.path=data/tinyshakespeare.txt is not in {tmp_path}: using the copy shipped with nano-train" in out
    prepared = tmp_path / "data" / "tinyshakespeare.nanotrain" / "char"
    assert (prepared / "train.bin").stat().st_size == 2 * 1_003_854  # uint16 tokens, where the path would put them
    # A path that is neither here nor shipped is still an error naming it.
    assert main(["prepare", "--data.path=data/other.txt"]) == 2
    assert "data.path='data/other.txt' does not exist" in capsys.readouterr().err
