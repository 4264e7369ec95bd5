"""Shared test helpers: a tiny config that trains in a second on the shipped corpus."""

import sys
from pathlib import Path

import pytest

from nanotrain.config import load_config

ROOT = Path(__file__).resolve().parents[1]
for _sub in ("unit", "parity"):  # shared tiny model configs between test files
    sys.path.insert(0, str(Path(__file__).resolve().parent / _sub))
CORPUS = ROOT / "data" / "tinyshakespeare.txt"


def tiny_config(tmp_path: Path, *overrides: str):
    """A 2-layer, 32-wide model on tiny Shakespeare; everything it writes goes under tmp_path."""
    base = [f"--data.path={CORPUS}", f"--data.prepared_dir={tmp_path / 'prepared'}",
            f"--train.out_dir={tmp_path / 'run'}", "--model.d_model=32", "--model.n_layers=2",
            "--model.n_heads=2", "--train.seq_len=16", "--train.batch_size=4",
            "--train.max_steps=20", "--train.eval_interval=10", "--train.eval_steps=2",
            "--schedule.warmup_steps=5", "--logging.log_interval=5", "--logging.progress=none",
            "--logging.peak_tflops=1", "--logging.tensorboard=false", "--logging.plot=false",
            "--train.threads=1"]
    return load_config(None, base + list(overrides))


@pytest.fixture
def make_config(tmp_path):
    return lambda *overrides: tiny_config(tmp_path, *overrides)
