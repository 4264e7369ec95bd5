"""A config's run shortened with --train.max_steps (issue 44): its schedule shortens alike, and the
examples take the shortened run, or bad input, without a traceback."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import CORPUS, ROOT

from nanotrain.config import load_config

CONFIG = ROOT / "configs" / "shakespeare_char.toml"  # warm-up 100, decay 1500, max_steps 1500


def test_a_shortened_run_shortens_the_config_schedule(capsys):
    cfg = load_config(CONFIG, ["--train.max_steps=30"])
    assert (cfg.schedule.warmup_steps, cfg.schedule.decay_steps) == (2, 30)
    out = capsys.readouterr().out
    assert "train.max_steps=30 shortens the config's run of 1500 steps" in out
    assert "schedule.warmup_steps=100 -> 2, schedule.decay_steps=1500 -> 30" in out
    deepseek = load_config(ROOT / "configs" / "deepseek_tiny.toml", ["--train.max_steps=30"]).schedule
    assert (deepseek.warmup_steps, deepseek.decay_steps) == (6, 0)  # 50 of 250; decay follows max_steps already
    assert load_config(CONFIG, ["--train.max_steps=1"]).schedule.warmup_steps == 0  # below the decay, always


def test_a_schedule_set_on_the_command_line_or_a_longer_run_is_kept(capsys):
    cfg = load_config(CONFIG, ["--train.max_steps=300", "--schedule.warmup_steps=10"])
    assert (cfg.schedule.warmup_steps, cfg.schedule.decay_steps) == (10, 1500)
    cfg = load_config(CONFIG, ["--train.max_steps=3000"])
    assert (cfg.schedule.warmup_steps, cfg.schedule.decay_steps) == (100, 1500)
    cfg = load_config(None, ["--train.max_steps=500"])  # the defaults are no run of the user's: kept
    assert (cfg.schedule.warmup_steps, cfg.schedule.decay_steps) == (100, 0)
    assert capsys.readouterr().out == ""


def example(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)


def test_train_mvp_runs_a_shortened_run(tmp_path):
    run = example(tmp_path, "train_mvp.py", "--config", str(CONFIG), "--train.max_steps=4", "--train.eval_steps=1",
                  f"--data.path={CORPUS}", f"--data.prepared_dir={tmp_path / 'prep'}",
                  f"--train.out_dir={tmp_path / 'run'}", "--logging.progress=none", "--logging.plot=false",
                  "--logging.tensorboard=false")
    assert run.returncode == 0, run.stderr
    assert "schedule.warmup_steps=100 -> 0" in run.stdout and "final val loss" in run.stdout


def test_examples_name_bad_input_in_one_line(tmp_path):
    run = example(tmp_path, "train_mvp.py", "--config", str(CONFIG), "--train.max_steps=0")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == ["error: invalid config:", "  - train.max_steps=0 must be positive."]
    run = example(tmp_path, "train_4d.py", "--train.max_steps=3")  # one process where 8 are needed
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip() == ("error: examples/train_4d.py runs tp=2 x pp=2 x dp=2 = 8 processes, got 1: launch "
                                  "with python -m nanotrain.torchrun --nproc-per-node 8.")
