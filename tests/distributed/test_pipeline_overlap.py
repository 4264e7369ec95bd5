"""DualPipeV's paired forward and backward run side by side where experts are spread over ranks.

A gloo world of 4 (pp=2 x dp=2, ep=2) trains the tiny DeepSeek model under DualPipeV. The
recorded timeline must show, on every rank, a forward and a backward computing at the same time,
and the communication meter must count all-to-all time hidden behind the other thread's compute
(comm/ep_hidden_ms); the parity with one process is tests/parity/test_zero_bubble_layouts.py's.
With tp=2 the pairs run in turn (tensor parallelism's collectives have one group)."""

import dataclasses
import json
from pathlib import Path

import pytest

from conftest import CORPUS
from nanotrain.config import Config, load_config
from nanotrain.parallel.launch import run_world
from nanotrain.runtime import RuntimeEngine
from test_deepseek import TINY  # noqa: E402


def _train(cfg_dict) -> None:
    RuntimeEngine(Config.from_dict(cfg_dict)).run()


def _config(tmp_path, *extra):
    return load_config(None, [*TINY, f"--data.path={CORPUS}", f"--data.prepared_dir={tmp_path / 'prep'}",
                              f"--train.out_dir={tmp_path / 'run'}", "--model.n_layers=4", "--train.seq_len=32",
                              "--train.batch_size=8", "--train.micro_batch_size=1", "--train.max_steps=3",
                              "--train.eval_interval=0", "--train.eval_steps=1", "--checkpoint.save_final=false",
                              "--logging.progress=none", "--logging.tensorboard=false", "--logging.plot=false",
                              "--logging.log_interval=1", "--logging.timeline_step=2", "--logging.peak_tflops=1",
                              "--precision.recipe=fp32", "--parallel.pp_schedule=dualpipev", "--schedule.warmup_steps=1", *extra])


def _overlapping(events) -> bool:
    fwd = [(s, e) for k, _, _, s, e in events if k == "F"]
    bwd = [(s, e) for k, _, _, s, e in events if k == "B"]
    return any(min(e1, e2) > max(s1, s2) for s1, e1 in fwd for s2, e2 in bwd)


@pytest.mark.world
def test_pairs_overlap_and_hide_all_to_all_time(tmp_path):
    # 8 micro-batches per rank: 8 paired forward/backward per recorded step. With 4 (batch 8) the
    # pairs overlapped 2 to 4 times per rank on 2 cores, and once none did on one rank: whether
    # two threads of one of 4 processes share a moment on 2 cores is up to the OS scheduler.
    # With 8: 10 to 12 overlapping pairs per rank (Intel Xeon, 2 cores).
    cfg = _config(tmp_path, "--parallel.pp=2", "--parallel.dp=2", "--parallel.ep=2", "--train.batch_size=16")
    run_world(_train, 4, dataclasses.asdict(cfg))
    timeline = json.loads((Path(cfg.train.out_dir) / "timeline.json").read_text())
    assert timeline["schedule"] == "dualpipev"
    assert all(_overlapping(r["events"]) for r in timeline["ranks"])
    rows = [json.loads(line) for line in (Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()]
    hidden = [r["comm/ep_hidden_ms"] for r in rows if "comm/ep_hidden_ms" in r]
    assert hidden and max(hidden) > 0


@pytest.mark.world
def test_with_tensor_parallelism_the_pairs_run_in_turn(tmp_path):
    cfg = _config(tmp_path, "--parallel.pp=2", "--parallel.tp=2", "--parallel.dp=2", "--parallel.ep=2")
    run_world(_train, 8, dataclasses.asdict(cfg))
    timeline = json.loads((Path(cfg.train.out_dir) / "timeline.json").read_text())
    assert not any(_overlapping(r["events"]) for r in timeline["ranks"])
