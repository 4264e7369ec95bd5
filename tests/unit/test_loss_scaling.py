"""fp16 dynamic loss scaling: the scaler's rules, recovery from an injected inf, and the
scaler's state across a checkpoint."""

import json

import pytest
import torch

from conftest import straight_and_resumed
from nanotrain.precision.loss_scaling import LossScaler
from nanotrain.runtime import RuntimeEngine


def test_scaler_rules():
    s = LossScaler(init_scale=1024, growth_interval=3, hysteresis=2)
    s.update(True, 1)  # first overflow: skipped, but the scale holds (hysteresis 2)
    assert (s.scale, s.skipped) == (1024, 1)
    s.update(True, 2)  # second in a row: backoff
    assert (s.scale, s.skipped) == (512, 2)
    for step in range(3, 6):
        s.update(False, step)
    assert s.scale == 1024  # 3 clean steps: growth
    restored = LossScaler()
    restored.load_state_dict(s.state_dict())
    assert restored.state_dict() == s.state_dict()
    low = LossScaler(init_scale=1, hysteresis=1)
    with pytest.raises(FloatingPointError, match="minimum loss scale"):
        low.update(True, 7)


def fp16(make_config, *extra):
    return make_config("--precision.recipe=fp16", "--precision.loss_scale.init=1024",
                       "--precision.loss_scale.hysteresis=1", "--logging.log_interval=1",
                       "--schedule.decay_steps=20", *extra)


def test_injected_inf_skips_the_step_and_lowers_the_scale(make_config):
    seen = {}

    def on_grads(step, model, ctx):
        seen[step] = [p.detach().clone() for p in model.parameters()]  # the weights before this step
        if step == 3:
            next(model.parameters()).grad[0] = float("inf")

    result = RuntimeEngine(fp16(make_config, "--train.max_steps=8"), on_grads=on_grads).run()
    metrics = {m["step"]: m for m in map(json.loads, (result.out_dir / "metrics.jsonl").read_text().splitlines())
               if "loss" in m}
    assert [metrics[s]["skipped_steps"] for s in (2, 3, 4)] == [0, 1, 1]
    assert [metrics[s]["loss_scale"] for s in (2, 3, 4)] == [1024, 512, 512]
    assert all(torch.equal(a, b) for a, b in zip(seen[3], seen[4]))  # step 3 changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(seen[4], seen[5]))  # step 4 trained again
    assert result.losses[8] < result.losses[1]


def test_fp16_resume_restores_the_scaler(make_config):
    common = ["--checkpoint.interval=5", "--precision.loss_scale.growth_interval=3"]
    straight, resumed = straight_and_resumed(lambda *a: fp16(make_config, *a), *common)
    assert {s: resumed.losses[s] for s in range(6, 11)} == {s: straight.losses[s] for s in range(6, 11)}
    last = json.loads((resumed.out_dir / "metrics.jsonl").read_text().splitlines()[-2])
    assert last["loss_scale"] == 1024 * 2 ** 3  # grew at steps 3, 6 and 9, across the resume
