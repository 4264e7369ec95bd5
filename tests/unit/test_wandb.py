"""Weights & Biases logging (monitoring/wandb_sink.py), offline: the run file wandb writes, read
back (tests/unit/wandb_log.py), holds the values of metrics.jsonl under TensorBoard's tags, the
config, and the loss curve as an image; a resume continues the same W&B run."""

import json
import sys
import time

import pytest

from nanotrain.config import ConfigError
from nanotrain.runtime import RuntimeEngine

from wandb_log import history, records

pytest.importorskip("wandb")  # the test extra installs it (pyproject: test)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def _logged(path, step: int, timeout_s: float = 30.0) -> dict:
    """history(path) once it holds `step`: wandb's own process writes the file, and may still be
    flushing it for a moment after run.finish() has returned."""
    deadline = time.monotonic() + timeout_s
    while step not in (rows := history(path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return rows


def _run_file(out_dir, run_id):
    (path,) = sorted(out_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))[-1:]
    return path


def test_an_offline_run_reads_back_equal_to_metrics_jsonl(make_config, offline):
    common = ["--logging.wandb=true", "--logging.wandb_project=test", "--logging.plot=true",
              "--checkpoint.interval=10", "--train.max_steps=10"]
    result = RuntimeEngine(make_config(*common)).run()
    out = result.out_dir
    run_id = (out / "wandb_run_id").read_text().strip()
    logged = _logged(_run_file(out, run_id), 10)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [5, 10]
    for r in train:
        for key, tag in (("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm")):
            assert logged[r["step"]][tag] == pytest.approx(r[key], rel=1e-12), (r["step"], key)
    val = [r for r in rows if "val_loss" in r]
    assert val and all(logged[r["step"]]["val/loss"] == pytest.approx(r["val_loss"]) for r in val)
    values = {}  # the config goes out with the run record (and any later config record)
    for r in records(_run_file(out, run_id)):
        kind = r.WhichOneof("record_type")
        if kind in ("run", "config"):
            update = r.run.config.update if kind == "run" else r.config.update
            values.update({i.key: json.loads(i.value_json) for i in update})
    assert values["model"]["d_model"] == 32 and values["train"]["max_steps"] == 10
    pictures = [row for row in logged.values() if row.get("loss_curve/_type") == "image-file"]
    assert len(pictures) == 1 and pictures[0]["_step"] == 10  # the loss curve, drawn at the end
    assert (pictures[0]["loss_curve/width"], pictures[0]["loss_curve/height"]) == (960, 600)

    # A resume continues the same W&B run, from the checkpoint's step.
    resumed = RuntimeEngine(make_config(*common[:-1], "--train.max_steps=15", "--schedule.decay_steps=20")).run()
    assert (out / "wandb_run_id").read_text().strip() == run_id
    assert resumed.final_step == 15 and 15 in _logged(_run_file(out, run_id), 15)


def test_without_the_package_it_is_one_line_naming_the_install(make_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ConfigError, match=r"logging.wandb=true needs the wandb package: pip install 'nanotrain\[wandb\]'"):
        RuntimeEngine(make_config("--logging.wandb=true", "--train.max_steps=2", "--schedule.warmup_steps=1")).run()
