"""A checkpoint records every tensor as boxes of the single-process tensor, so a run saved
under one layout continues under another with the losses of a run that was on one process
all along (and, at the same layout, with exactly the losses it would have had)."""

import dataclasses

import pytest

from conftest import CORPUS
from nanotrain.config import Config, load_config
from nanotrain.parallel.launch import run_world
from nanotrain.runtime import RuntimeEngine
from pictures import assert_picture


def _train(cfg_dict):
    return RuntimeEngine(Config.from_dict(cfg_dict)).run().losses


def run_config(tmp_path, out, *args):
    """A quiet fp32 run on the shipped corpus, writing under tmp_path/out; args: the model and the rest."""
    return load_config(None, [
        f"--data.path={CORPUS}", f"--data.prepared_dir={tmp_path / 'prep'}", f"--train.out_dir={tmp_path / out}",
        "--train.seq_len=16", "--train.batch_size=8", "--train.eval_interval=0", "--schedule.warmup_steps=2",
        "--precision.recipe=fp32", "--logging.progress=none", "--logging.tensorboard=false", "--logging.plot=false",
        "--logging.peak_tflops=1", *args])


SMALL = ["--model.d_model=32", "--model.n_layers=2", "--model.vocab_size=68", "--schedule.decay_steps=12"]


def check_resume_chain(cfg, *segments):
    """segments: (world size, last step, layout args...). The first trains from scratch, each
    next one resumes the previous one's latest checkpoint; every step's loss must be that of
    a run on one process all along (cfg(out, *args) builds the config)."""
    straight = RuntimeEngine(cfg("one", f"--train.max_steps={segments[-1][1]}")).run().losses
    done = 0
    for i, (world, last, *args) in enumerate(segments):
        c = cfg("par", f"--train.max_steps={last}", *args, *(["--checkpoint.resume=latest"] if i else []))
        losses = RuntimeEngine(c).run().losses if world == 1 else run_world(_train, world, dataclasses.asdict(c))[0]
        for step in range(done + 1, last + 1):
            assert losses[step] == pytest.approx(straight[step], rel=1e-5), (i, step)
        done = last


def test_tp2_dp2_checkpoint_resumes_on_one_process(tmp_path):
    check_resume_chain(lambda out, *extra: run_config(tmp_path, out, *SMALL, *extra),
                       (4, 6, "--parallel.tp=2", "--parallel.dp=2", "--parallel.sequence_parallel=true"), (1, 12))


def test_pipeline_checkpoint_resumes_under_another_pipeline(tmp_path):
    """Saved under tp=2 x pp=2 (each stage writes its shards of its layers' weights and moments),
    resumed under pp=4 with interleaving off: the losses of one process all along.
    Tied embeddings: the first and last stage each hold a copy; one of them writes it."""
    import json

    def cfg(out, *extra):
        return run_config(tmp_path, out, *SMALL, "--model.n_layers=4", "--model.tie_embeddings=true",
                          "--train.micro_batch_size=2", "--train.eval_interval=3", "--train.eval_steps=2", *extra)

    one = RuntimeEngine(cfg("one", "--train.max_steps=12")).run()
    first = run_world(_train_result, 4, dataclasses.asdict(
        cfg("par", "--train.max_steps=6", "--parallel.tp=2", "--parallel.pp=2", "--logging.timeline_step=2")))[0]
    resumed = run_world(_train_result, 4, dataclasses.asdict(
        cfg("par", "--train.max_steps=12", "--parallel.pp=4", "--checkpoint.resume=latest")))[0]
    for step in range(1, 7):
        assert first.losses[step] == pytest.approx(one.losses[step], rel=1e-5)
    for step in range(7, 13):
        assert resumed.losses[step] == pytest.approx(one.losses[step], rel=1e-5)
    for step in (3, 6, 9, 12):  # evaluation through the pipeline (forward only)
        other = first if step <= 6 else resumed
        assert other.val_losses[step] == pytest.approx(one.val_losses[step], rel=1e-5)
    # The recorded step's timeline: picture and measured vs textbook bubble.
    timeline = json.loads((tmp_path / "par" / "timeline.json").read_text())
    assert_picture(tmp_path / "par" / "timeline.png", min_size=(600, 150))
    assert timeline["bubble_textbook"] == pytest.approx(1 / 5)  # (pp - 1) / (m + pp - 1), m = 4
    assert 0 < timeline["bubble_measured"] < 1 and len(timeline["ranks"]) == 2


def _train_result(cfg_dict):
    return RuntimeEngine(Config.from_dict(cfg_dict)).run()


def test_zero_checkpoint_resumes_under_another_stage_and_dp(tmp_path):
    """Saved under dp=4 with ZeRO-2 (each rank writes its slices of the moments, cut into
    boxes of the parameters), resumed under dp=2 with ZeRO-1 (other slices), then on one
    process without ZeRO: the losses of one process all along."""
    check_resume_chain(lambda out, *extra: run_config(tmp_path, out, *SMALL, "--parallel.bucket_mb=0.02", *extra),
                       (4, 4, "--parallel.dp=4", "--optimizer.zero_stage=2"),
                       (2, 8, "--parallel.dp=2", "--optimizer.zero_stage=1"), (1, 12))


def test_pipeline_checkpoint_resumes_without_pipeline(tmp_path):
    """Saved under pp=2 x dp=2 (each stage writes its layers), resumed under dp=2 alone."""
    check_resume_chain(lambda out, *extra: run_config(tmp_path, out, *SMALL, "--train.micro_batch_size=2", *extra),
                       (4, 6, "--parallel.pp=2", "--parallel.dp=2"), (2, 12, "--parallel.dp=2"))


def test_same_layout_resume_is_bit_exact(tmp_path):
    """tp=2 x dp=2 with sequence parallelism and ZeRO-2, saved in the background at steps 2
    and 4 (each rank's writer thread; rank 0 commits once all files are there) and resumed
    at the same layout: every loss equals the uninterrupted run's exactly."""
    def cfg(out, *extra):
        return dataclasses.asdict(run_config(tmp_path, out, *SMALL, "--parallel.tp=2", "--parallel.dp=2",
                                             "--parallel.sequence_parallel=true", "--optimizer.zero_stage=2",
                                             "--parallel.bucket_mb=0.02", *extra))

    straight = run_world(_train, 4, cfg("straight", "--train.max_steps=8"))[0]
    first = run_world(_train, 4, cfg("par", "--train.max_steps=4", "--checkpoint.async_save=true",
                                     "--checkpoint.interval=2"))[0]
    resumed = run_world(_train, 4, cfg("par", "--train.max_steps=8", "--checkpoint.resume=latest"))[0]
    assert {**first, **resumed} == straight


def test_expert_parallel_checkpoint_resumes_without_it(tmp_path):
    """Saved under dp=2 x ep=2 (each rank holds half the experts; the file holds them whole,
    with the router biases), resumed on one process: the losses of one process all along."""
    from test_deepseek import TINY  # noqa: E402  (tests/unit is on sys.path through conftest)

    check_resume_chain(lambda out, *extra: run_config(tmp_path, out, *TINY, "--schedule.decay_steps=10",
                                                      "--model.bias_update_rate=0.01", *extra),
                       (2, 5, "--parallel.dp=2", "--parallel.ep=2"), (1, 10))


def test_4d_zero2_checkpoint_resumes_on_one_process(tmp_path):
    """Saved by 8 processes at tp=2 x pp=2 x dp=2 x ep=2 with sequence parallelism and ZeRO-2
    (every tensor cut four ways at once), resumed on one process without ZeRO."""
    from test_deepseek import TINY  # noqa: E402

    check_resume_chain(lambda out, *extra: run_config(tmp_path, out, *TINY, "--schedule.decay_steps=8",
                                                      "--model.bias_update_rate=0.01", "--parallel.bucket_mb=0.02",
                                                      *extra),
                       (8, 4, "--parallel.tp=2", "--parallel.pp=2", "--parallel.dp=2", "--parallel.ep=2",
                        "--parallel.sequence_parallel=true", "--optimizer.zero_stage=2", "--train.micro_batch_size=2"),
                       (1, 8))


def test_zero3_checkpoint_resumes_under_zero1_at_another_dp_and_on_one_process(tmp_path):
    """ZeRO-3 ranks hold slices of the weights themselves: each writes its slices as boxes of the
    logical tensors, which ZeRO-1 at dp=4 and then one process read back."""
    check_resume_chain(lambda out, *extra: run_config(tmp_path, out, *SMALL, *extra),
                       (2, 4, "--parallel.dp=2", "--optimizer.zero_stage=3"),
                       (4, 8, "--parallel.dp=4", "--optimizer.zero_stage=1"), (1, 12))


def test_checkpoints_resume_under_zero3(tmp_path):
    """And back: one process, then ZeRO-1 at dp=2, then ZeRO-3 at dp=4."""
    check_resume_chain(lambda out, *extra: run_config(tmp_path, out, *SMALL, *extra),
                       (1, 4), (2, 8, "--parallel.dp=2", "--optimizer.zero_stage=1"),
                       (4, 12, "--parallel.dp=4", "--optimizer.zero_stage=3"))
