"""Commands given hostile arguments (issue 40): nothing of the user's is overwritten, and each
problem is one line naming the argument or file and the fix, exit 2, no traceback."""

import json
import os

import pytest
import torch

from nanotrain.cli import main
from nanotrain.runtime import RuntimeEngine

from test_bad_input import _error


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained tiny Llama-shaped model (2 steps): its run folder."""
    from conftest import tiny_config

    tmp = tmp_path_factory.mktemp("hostile")
    RuntimeEngine(tiny_config(tmp, "--train.max_steps=2", "--train.eval_interval=0", "--schedule.warmup_steps=1")).run()
    return tmp / "run"


def test_convert_never_writes_into_a_run_folder(run, capsys):
    before = (run / "config.json").read_bytes()
    for out in (run, run / "checkpoints" / ".."):
        err = _error(capsys, ["convert", "--to-hf", "--checkpoint", str(run), "--out", str(out), "--overwrite"])
        assert "is a training run's folder (it holds metrics.jsonl, checkpoints" in err
    assert (run / "config.json").read_bytes() == before


def test_convert_writes_into_a_non_empty_folder_only_with_overwrite(run, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = _error(capsys, ["convert", "--to-hf", "--checkpoint", str(run), "--out", str(out)])
    assert f"--out {out} is not empty (it holds notes.txt)" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    mask = os.umask(0o002)  # a group-shared setting: files come out rw-rw-r--
    try:
        assert main(["convert", "--to-hf", "--checkpoint", str(run), "--out", str(out), "--overwrite"]) == 0
    finally:
        os.umask(mask)
    assert (out / "notes.txt").read_text() == "mine"
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == \
        {"notes.txt": (out / "notes.txt").stat().st_mode & 0o777, "config.json": 0o664, "model.safetensors": 0o664}


def test_a_truncated_safetensors_file_is_named(run, tmp_path, capsys):
    hf = tmp_path / "hf"
    assert main(["convert", "--to-hf", "--checkpoint", str(run), "--out", str(hf)]) == 0
    weights = hf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted download
    err = _error(capsys, ["convert", "--from-hf", str(hf), "--out", str(tmp_path / "back")])
    assert f"{weights} is not a readable safetensors file" in err and "truncated" in err


@pytest.mark.parametrize("device,words", [("foo", "--device 'foo' is not a device"),
                                          ("cuda", "--device cuda, but no CUDA device is visible")])
def test_sample_on_a_device_that_is_not_there(run, capsys, device, words):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    assert words in _error(capsys, ["sample", "--checkpoint", str(run), "--device", device])


def test_report_of_a_file_that_is_not_metrics(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_bytes(bytes(range(256)) * 20)
    err = _error(capsys, ["report", str(tmp_path)])
    assert "has no readable rows" in err and "is not a run's metrics file" in err
    assert not (tmp_path / "report.html").exists()


@pytest.mark.parametrize("change,words", [
    ({"num_attention_heads": 5}, "hidden_size=64 is not divisible by num_attention_heads=5"),
    ({"num_hidden_layers": -2}, "num_hidden_layers=-2 must be positive"),
])
def test_a_hugging_face_config_our_model_cannot_be_is_named_by_its_keys(tmp_path, capsys, change, words):
    hf = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "intermediate_size": 128} | change
    (tmp_path / "config.json").write_text(json.dumps(hf))
    for command in ("inspect", "plan"):
        argv = [command, "--hf-config", str(tmp_path / "config.json")]
        if command == "plan":
            argv += ["--hardware", "h100", "--gpus", "8", "--global-batch", "8", "--seq-len", "64"]
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err


def test_verify_says_which_of_its_settings_wins(capsys):
    """verify trains both sides in its own --precision: a disagreeing --precision.recipe is refused (say
    it with the flag); a dropout, which verify turns off, is named as not used (issue 43)."""
    import argparse

    from nanotrain.cli import _verify_overrides

    err = _error(capsys, ["verify", "--layout", "dp=2", "--precision.recipe=bf16"])
    assert "--precision.recipe=bf16 disagrees with verify's --precision fp32" in err and "pass --precision" in err
    args = argparse.Namespace(precision="bf16", steps=10)
    _verify_overrides(args, ["--precision.recipe=bf16", "--model.dropout=0.1", "--train.max_steps=50"])
    notes = capsys.readouterr().err.splitlines()
    assert notes == ["note: verify sets model.dropout=0.0 for both sides (dropout masks come from per-process "
                     "random streams: they differ by layout by design): --model.dropout=0.1 is not used"]


def test_a_config_is_checked_once_after_the_layout(capsys):
    """`verify --layout tp=2,ep=2,dp=2 --parallel.etp=2`: etp=2 is valid under the layout's tp=2, not
    under the config's tp=1, so the config is checked after the layout applies (issue 40)."""
    from nanotrain.config import load_config
    from nanotrain.parallel.layout import Layout

    over = ["--model.vocab_size=64", "--parallel.etp=2"]
    with pytest.raises(Exception, match="parallel.etp=2"):
        load_config("configs/deepseek_tiny.toml", over)  # alone, tp=1: refused, as train refuses it
    cfg = load_config("configs/deepseek_tiny.toml", over, check=False)
    run = Layout.parse("tp=2,ep=2,dp=2", Layout.from_config(cfg)).apply(cfg)
    assert (run.parallel.tp, run.parallel.ep, run.parallel.etp) == (2, 2, 2)
