"""RuntimeEngine: bit-exact resume, checkpoints, outputs, and resume errors."""

import json

import pytest

from nanotrain.checkpoint import CheckpointError
from nanotrain.config import ConfigError
from nanotrain.runtime import RuntimeEngine
from nanotrain.runtime.checkpointer import saved_layout
from nanotrain.runtime.divergence import TrainingError
from nanotrain.sample import sample_text
from pictures import assert_picture


def run(cfg):
    return RuntimeEngine(cfg).run()


def test_resume_is_bit_exact(make_config):
    """20 steps straight == 10 steps, stop, resume, 10 more: identical losses, bit for bit.
    Dropout is on so the restored RNG state matters too."""
    # peak_tflops=0 runs the MFU probe at start-up, after the RNG state is restored:
    # it must not draw from the global RNG.
    common = ["--model.dropout=0.1", "--schedule.decay_steps=20", "--checkpoint.interval=10",
              "--logging.peak_tflops=0"]
    straight = run(make_config(*common, "--train.out_dir=" + str(make_config().train.out_dir) + "_a"))
    first = run(make_config(*common, "--train.max_steps=10"))
    resumed = run(make_config(*common, "--checkpoint.resume=latest"))
    assert sorted(first.losses) == list(range(1, 11)) and sorted(resumed.losses) == list(range(11, 21))
    both = {**first.losses, **resumed.losses}
    assert both == straight.losses  # exact float equality
    assert resumed.val_losses[20] == straight.val_losses[20]


def test_a_checkpoint_with_the_old_layout_dict_resumes_bit_exactly(make_config, capsys):
    """Checkpoints store the layout as str(Layout); those written before held a dict of its sizes.
    A checkpoint whose metadata has the dict resumes (bit-exactly), and the resume line names the
    layout that wrote it, translated to Layout's text."""
    common = ["--schedule.decay_steps=20", "--checkpoint.interval=5", "--train.micro_batch_size=2"]
    straight = run(make_config(*common, "--train.max_steps=10", "--train.out_dir=" + str(make_config().train.out_dir)
                               + "_straight"))
    first = run(make_config(*common, "--train.max_steps=5"))
    meta_file = first.out_dir / "checkpoints" / "step_00000005" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    assert meta["objects"]["layout"] == "micro=2"  # str(Layout): what differs from the defaults
    meta["objects"]["layout"] = {"world_size": 1, "tp": 1, "cp": 1, "pp": 1, "dp": 1, "ep": 1, "etp": 1,
                                 "sequence_parallel": False, "zero_stage": 0, "micro_batch_size": 2}  # the old form
    meta_file.write_text(json.dumps(meta, indent=1))
    capsys.readouterr()
    resumed = run(make_config(*common, "--train.max_steps=10", "--checkpoint.resume=auto"))
    assert "(step 5; written by 1 processes: micro=2)" in capsys.readouterr().out
    assert sorted(resumed.losses) == list(range(6, 11))
    assert {**first.losses, **resumed.losses} == straight.losses  # exact float equality
    old_4d = {"world_size": 8, "tp": 2, "cp": 1, "pp": 2, "dp": 2, "ep": 2, "etp": 1, "sequence_parallel": True,
              "zero_stage": 2, "micro_batch_size": 1}
    assert saved_layout({"layout": old_4d}) == "tp=2,pp=2,dp=2,ep=2,sp,zero=2,micro=1"
    assert saved_layout({"layout": "tp=2,pp=2,dp=2,ep=2,sp,zero=2,micro=1"}) == "tp=2,pp=2,dp=2,ep=2,sp,zero=2,micro=1"


def test_grad_accumulation_matches_one_big_batch(make_config):
    """Global batch of 4 as 1x4 or as 2 micro-batches of 2 (or 4 of 1): same losses (fp32).
    Holds because each micro-batch loss is divided by the global batch's token count."""
    big = run(make_config("--precision.recipe=fp32", "--train.max_steps=6"))
    for mb in (2, 1):
        acc = run(make_config("--precision.recipe=fp32", "--train.max_steps=6", f"--train.micro_batch_size={mb}",
                              f"--train.out_dir={big.out_dir}_{mb}"))
        for s in big.losses:
            assert acc.losses[s] == pytest.approx(big.losses[s], rel=1e-5)


def test_outputs_and_metrics(make_config):
    cfg = make_config("--logging.tensorboard=true", "--logging.plot=true", "--checkpoint.interval=5",
                      "--checkpoint.keep_last=2")
    result = run(cfg)
    out = result.out_dir
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        assert all(isinstance(r[key], float) for r in train), key
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20]
    elapsed = [r["elapsed_s"] for r in records if "elapsed_s" in r]  # every train and val row, in order
    assert len(elapsed) == 6 and 0 < elapsed[0] and elapsed == sorted(elapsed)
    assert_picture(out / "loss.png", size=(960, 600))  # figsize (8, 5) at 120 dpi
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((out / "config.json").read_text())["model"]["vocab_size"] == 65
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000015", "step_00000020"]  # keep_last=2
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000020"
    assert not list((out / "checkpoints").glob(".tmp*"))
    assert result.losses[20] < result.losses[1]


def test_sampling_from_checkpoint(make_config):
    result = run(make_config())
    texts = sample_text(result.out_dir, "ROMEO:", max_new_tokens=20, num_samples=2, seed=1)
    assert len(texts) == 2 and all(t.startswith("ROMEO:") and len(t) == 26 for t in texts)
    assert texts == sample_text(result.out_dir / "checkpoints", "ROMEO:", max_new_tokens=20, num_samples=2, seed=1)
    greedy = sample_text(result.out_dir, "ROMEO:", max_new_tokens=10, temperature=0)
    assert greedy == sample_text(result.out_dir, "ROMEO:", max_new_tokens=10, temperature=0, seed=99)


def test_resume_errors(make_config):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run(make_config("--checkpoint.resume=latest"))
    run(make_config("--train.max_steps=10", "--schedule.decay_steps=20"))
    with pytest.raises(CheckpointError, match=r"model.d_model: checkpoint has 32, config has 64"):
        run(make_config("--checkpoint.resume=latest", "--model.d_model=64"))
    with pytest.raises(ConfigError, match="already at train.max_steps"):
        run(make_config("--checkpoint.resume=latest", "--train.max_steps=10"))


def test_damaged_checkpoint_is_reported(make_config):
    import json

    result = run(make_config("--train.max_steps=5", "--schedule.decay_steps=20"))
    folder = result.out_dir / "checkpoints" / "step_00000005"
    shard, meta = folder / "rank_00000.safetensors", folder / "metadata.json"
    good = shard.read_bytes()
    shard.write_bytes(good[:100])
    with pytest.raises(CheckpointError, match="damaged"):
        run(make_config("--checkpoint.resume=latest"))
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"missing 1 shard file\(s\): rank_00000.safetensors"):
        run(make_config("--checkpoint.resume=latest"))
    shard.write_bytes(good)
    saved = json.loads(meta.read_text())
    meta.write_text(json.dumps({**saved, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99"):
        run(make_config("--checkpoint.resume=latest"))
    meta.write_text(json.dumps(saved))
    assert run(make_config("--checkpoint.resume=latest", "--train.max_steps=6")).final_step == 6


def test_non_finite_loss_stops_the_run(make_config):
    # The hint is this config's: clipping is off here, so enabling it is one of the ways out.
    with pytest.raises(TrainingError, match="at step .*enable optimizer.grad_clip"):
        run(make_config("--optimizer.lr=1e6", "--schedule.min_lr=0", "--optimizer.grad_clip=0",
                        "--precision.recipe=fp32", "--train.max_steps=40", "--schedule.warmup_steps=0"))
