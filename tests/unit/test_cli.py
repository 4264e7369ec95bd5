"""The nanotrain command as a user runs it: train, prepare, sample, and clean errors."""

import subprocess
import sys

from conftest import CORPUS

from nanotrain.cli import main


def nanotrain(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "nanotrain", *args], capture_output=True, text=True, cwd=cwd)


def test_train_then_sample(tmp_path, capsys):
    common = [f"--data.path={CORPUS}", f"--data.prepared_dir={tmp_path / 'prep'}", f"--train.out_dir={tmp_path / 'run'}",
              "--model.d_model=32", "--model.n_layers=1", "--model.n_heads=2", "--train.seq_len=16",
              "--train.max_steps=6", "--train.eval_interval=3", "--train.eval_steps=1", "--logging.progress=plain",
              "--logging.log_interval=3", "--logging.peak_tflops=1", "--schedule.warmup_steps=1"]
    assert main(["prepare", "--config", "configs/shakespeare_char.toml", *common]) == 0
    assert main(["train", "--config", "configs/shakespeare_char.toml", *common]) == 0
    out = capsys.readouterr().out
    assert "step 6/6" in out and "val" in out and "done: step 6" in out
    assert main(["sample", "--config", "configs/shakespeare_char.toml", *common, "--prompt", "KING:",
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("KING:")


def test_errors_exit_2_with_a_message(tmp_path):
    r = nanotrain("train", "--config", "configs/shakespeare_char.toml", "--train.max_step=5")
    assert r.returncode == 2 and "train.max_step" in r.stderr and "max_steps" in r.stderr
    assert "Traceback" not in r.stderr
    r = nanotrain("prepare", f"--data.path={tmp_path / 'nope.txt'}")
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = nanotrain("sample", "--checkpoint", str(tmp_path))
    assert r.returncode == 2 and "no checkpoint" in r.stderr
