"""Divergence: monitoring.nonfinite=rollback reloads the newest checkpoint and skips the batches
since it; skip and rollback stop after monitoring.max_skipped_steps in a row with a named error
whose hint is true for the run's config."""

import json

import pytest

from conftest import tiny_config, tiny_overrides
from nanotrain.checkpoint import load_checkpoint
from nanotrain.cli import main
from nanotrain.runtime import RuntimeEngine
from nanotrain.runtime.divergence import TrainingError

FP32 = ("--precision.recipe=fp32", "--checkpoint.interval=5", "--logging.log_interval=1")


def _poisoned(cfg, *bad_steps):
    """The engine, with a NaN gradient at the given steps (the first time each is reached)."""
    todo = set(bad_steps)

    def on_grads(done, model, ctx):
        if done in todo:
            todo.discard(done)
            next(model.parameters()).grad.fill_(float("nan"))
    return RuntimeEngine(cfg, on_grads=on_grads)


def test_rollback_reloads_the_checkpoint_and_skips_the_batches_since(tmp_path, capsys):
    cfg = tiny_config(tmp_path, *FP32, "--monitoring.nonfinite=rollback")
    result = _poisoned(cfg, 13).run()
    assert result.final_step == 20
    out = capsys.readouterr().out
    assert "rollback: the gradient norm was not finite at step 13; reloaded the checkpoint of step 10" in out
    assert "data positions 11-13" in out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 13, "rollback_to": 10, "skipped_batches": 3} in rows
    # Steps 11-20 after the roll-back trained on the batches of positions 14-23: the offset is saved.
    assert load_checkpoint(tmp_path / "run").objects["data"]["batch_offset"] == 3
    # Up to the checkpoint it rolled back to, the run is the clean one; after it, it trains on other batches.
    clean = RuntimeEngine(tiny_config(tmp_path / "clean", *FP32)).run()
    assert clean.losses[10] == result.losses[10] and clean.losses[11] != result.losses[11]


def test_a_resume_after_a_rollback_keeps_skipping_the_same_batches(tmp_path):
    # A constant lr: the schedule does not depend on max_steps, so a 15-step run is the start of a 20-step one.
    common = (*FP32, "--monitoring.nonfinite=rollback", "--schedule.decay=constant")
    straight = _poisoned(tiny_config(tmp_path, *common, "--train.max_steps=20"), 13).run()
    _poisoned(tiny_config(tmp_path / "second", *common, "--train.max_steps=15"), 13).run()
    resumed = RuntimeEngine(tiny_config(tmp_path / "second", *common, "--train.max_steps=20")).run()
    assert {s: resumed.losses[s] for s in range(16, 21)} == {s: straight.losses[s] for s in range(16, 21)}


def test_rollback_without_a_checkpoint_is_a_named_error(tmp_path):
    cfg = tiny_config(tmp_path, *FP32, "--monitoring.nonfinite=rollback", "--checkpoint.interval=0")
    with pytest.raises(TrainingError, match="no checkpoint to roll back to.*checkpoint.interval"):
        _poisoned(cfg, 3).run()


def test_skip_stops_after_max_skipped_steps_in_a_row(tmp_path, capsys):
    """lr 1e6 breaks the model in one step; every later step is skipped: the run stops, exit 1, and
    no checkpoint of the broken model is written after the limit."""
    cfg_args = [*FP32, "--monitoring.nonfinite=skip", "--monitoring.max_skipped_steps=4", "--optimizer.lr=1e6",
                "--schedule.warmup_steps=0", "--schedule.min_lr=0", "--train.max_steps=60"]
    code = main(["train", *tiny_overrides(tmp_path), *cfg_args])
    err = capsys.readouterr().err
    assert code == 1
    assert "steps in a row" in err and "monitoring.max_skipped_steps=4" in err
    assert "lower optimizer.lr (now 1e+06)" in err
    assert "enable optimizer.grad_clip" not in err  # clipping is on (1.0) in this config: not a way out
    assert "done:" not in capsys.readouterr().out


def test_rollback_stops_after_rolling_back_to_the_same_checkpoint_too_often(tmp_path):
    cfg = tiny_config(tmp_path, *FP32, "--monitoring.nonfinite=rollback", "--monitoring.max_skipped_steps=2")
    with pytest.raises(TrainingError, match="rolled back to the checkpoint of step 10 2 times in a row"):
        _poisoned(cfg, 12, 11).run()
