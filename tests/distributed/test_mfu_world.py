"""The MFU in metrics.jsonl is a fraction, with 1 and with 4 ranks on this (2-core) machine: the peak is
the machine's, probed once by rank 0 with every core, not each rank's probe times the world size."""

import dataclasses
import json

import pytest

from conftest import CORPUS, ROOT
from nanotrain.config import Config, load_config
from nanotrain.parallel.launch import run_world
from nanotrain.runtime import RuntimeEngine


def _config(tmp_path, *extra) -> Config:
    # the shape of configs/shakespeare_char.toml (MFU ~25% on one process), 30 steps
    return load_config(ROOT / "configs" / "shakespeare_char.toml", [
        f"--data.path={CORPUS}", f"--data.prepared_dir={tmp_path / 'prep'}", f"--train.out_dir={tmp_path / 'run'}",
        "--train.max_steps=30", "--train.eval_interval=0", "--train.eval_steps=1", "--logging.log_interval=10",
        "--checkpoint.save_final=false", "--logging.progress=none", "--logging.tensorboard=false",
        "--logging.plot=false", "--logging.peak_tflops=0", "--schedule.warmup_steps=5", *extra])


def _train(cfg_dict: dict) -> list[float]:
    result = RuntimeEngine(Config.from_dict(cfg_dict)).run()
    if result.rank:
        return []
    records = map(json.loads, (result.out_dir / "metrics.jsonl").read_text().splitlines())
    return [r["mfu"] for r in records if "mfu" in r]


@pytest.mark.parametrize("ranks", [1, 4])
def test_mfu_is_a_fraction(tmp_path, ranks):
    cfg = dataclasses.asdict(_config(tmp_path, f"--parallel.dp={ranks}"))
    mfu = _train(cfg) if ranks == 1 else run_world(_train, ranks, cfg)[0]
    print(f"{ranks} rank(s): MFU {', '.join(f'{x:.1%}' for x in mfu)}")
    assert len(mfu) == 3 and all(0 < x <= 1 for x in mfu)
