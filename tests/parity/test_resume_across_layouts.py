"""A checkpoint stores whole tensors, so a run saved under tp=2 x dp=2 (sequence parallel)
continues on one process with the losses of a run that was on one process all along."""

import dataclasses

import pytest

from conftest import CORPUS
from nanotrain.config import Config, load_config
from nanotrain.parallel.launch import run_world
from nanotrain.runtime import RuntimeEngine


def _train(cfg_dict):
    return RuntimeEngine(Config.from_dict(cfg_dict)).run().losses


def test_tp2_dp2_checkpoint_resumes_on_one_process(tmp_path):
    def cfg(out, *extra):
        return load_config(None, [
            f"--data.path={CORPUS}", f"--data.prepared_dir={tmp_path / 'prep'}", f"--train.out_dir={tmp_path / out}",
            "--model.d_model=32", "--model.n_layers=2", "--model.vocab_size=68", "--train.seq_len=16",
            "--train.batch_size=8", "--train.eval_interval=0", "--schedule.warmup_steps=2", "--schedule.decay_steps=12",
            "--precision.recipe=fp32", "--logging.progress=none", "--logging.tensorboard=false",
            "--logging.plot=false", "--logging.peak_tflops=1", *extra])

    straight = RuntimeEngine(cfg("one", "--train.max_steps=12")).run().losses
    parallel = cfg("par", "--train.max_steps=6", "--parallel.tp=2", "--parallel.dp=2",
                   "--parallel.sequence_parallel=true")
    first = run_world(_train, 4, dataclasses.asdict(parallel))[0]
    resumed = RuntimeEngine(cfg("par", "--train.max_steps=12", "--checkpoint.resume=latest")).run().losses
    for step in range(1, 7):
        assert first[step] == pytest.approx(straight[step], rel=1e-5)
    for step in range(7, 13):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5)
