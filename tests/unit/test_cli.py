"""The nanotrain command as a user runs it: train, prepare, sample, and clean errors."""

import subprocess
import sys

import torch

from conftest import CORPUS

from nanotrain.cli import main


def nanotrain(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "nanotrain", *args], capture_output=True, text=True, cwd=cwd)


def test_train_then_sample(tmp_path, capsys):
    common = [f"--data.path={CORPUS}", f"--data.prepared_dir={tmp_path / 'prep'}", f"--train.out_dir={tmp_path / 'run'}",
              "--model.d_model=32", "--model.n_layers=1", "--model.n_heads=2", "--train.seq_len=16",
              "--train.max_steps=6", "--train.eval_interval=3", "--train.eval_steps=1", "--logging.progress=plain",
              "--logging.log_interval=3", "--logging.peak_tflops=1", "--schedule.warmup_steps=1"]
    assert main(["prepare", "--config", "configs/shakespeare_char.toml", *common]) == 0
    assert main(["train", "--config", "configs/shakespeare_char.toml", *common]) == 0
    out = capsys.readouterr().out
    assert "step 6/6" in out and "val" in out and "done: step 6" in out
    assert main(["sample", "--config", "configs/shakespeare_char.toml", *common, "--prompt", "KING:",
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("KING:")


def test_errors_exit_2_with_a_message(tmp_path):
    r = nanotrain("train", "--config", "configs/shakespeare_char.toml", "--train.max_step=5")
    assert r.returncode == 2 and "train.max_step" in r.stderr and "max_steps" in r.stderr
    assert "Traceback" not in r.stderr
    r = nanotrain("prepare", f"--data.path={tmp_path / 'nope.txt'}")
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = nanotrain("sample", "--checkpoint", str(tmp_path))
    assert r.returncode == 2 and "no checkpoint" in r.stderr


def _tiny_args(tmp_path):
    return [f"--data.path={CORPUS}", f"--data.prepared_dir={tmp_path / 'prep'}", f"--train.out_dir={tmp_path / 'run'}",
            "--model.d_model=32", "--model.n_layers=1", "--model.n_heads=2", "--train.seq_len=16",
            "--train.batch_size=4", "--train.max_steps=1", "--schedule.warmup_steps=0", "--logging.progress=none",
            "--logging.peak_tflops=1", "--logging.tensorboard=false", "--logging.plot=false"]


def test_bad_inputs_give_one_error_line_and_no_traceback(tmp_path, capsys):
    """Every subcommand, given a missing file, a bad key, an impossible layout or a damaged
    checkpoint, prints `error: ...` (one message, no traceback) and exits 2."""
    import shutil

    args = _tiny_args(tmp_path)
    assert main(["train", *args]) == 0
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    damaged, missing = tmp_path / "damaged", tmp_path / "missing"
    shutil.copytree(step, damaged)
    (damaged / "rank_00000.safetensors").write_bytes(b"not safetensors")
    shutil.copytree(step, missing)
    (missing / "rank_00000.safetensors").unlink()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "llama"}')
    nowhere = "/proc/no/such/folder"  # cannot be created
    cases = [
        ["train", "--config", "missing.toml"],
        ["train", *args, "--model.nope=1"],
        ["train", *args, "--parallel.tp=3"],
        None if torch.cuda.is_available() else ["train", *args, "--train.device=cuda"],
        ["train", *args, "--train.max_steps=2", f"--checkpoint.resume={damaged}"],
        ["train", *args, "--train.max_steps=2", f"--checkpoint.resume={missing}"],
        ["train", *args, "--train.max_steps=2", "--checkpoint.resume=latest", "--model.d_model=64"],
        ["train", *args, f"--train.out_dir={nowhere}"],
        ["prepare", *args, f"--data.path={tmp_path / 'nope.txt'}"],
        ["sample", "--checkpoint", str(damaged)],
        ["sample", "--checkpoint", str(tmp_path / "run"), "--prompt", "\u20ac"],
        ["verify", *args, "--layout", "xp=2"],
        ["verify", *args, "--layout", "tp=3"],
        ["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "out")],
        ["convert", "--from-hf", str(tmp_path / "nope"), "--out", str(tmp_path / "out")],
        ["convert", "--to-hf", "--checkpoint", str(missing), "--out", str(tmp_path / "out")],
        ["inspect", "--config", "configs/shakespeare_char.toml"],
        ["inspect", "--hf-config", str(tmp_path / "hf" / "config.json")],
        ["inspect", "--config", "configs/shakespeare_char.toml", "--model.vocab_size=65", "--layout", "tp=3"],
        ["inspect", "--config", "configs/shakespeare_char.toml", "--model.vocab_size=65", "--out", nowhere],
        ["report", str(tmp_path / "nope")],
        ["weights", str(damaged)],
        ["weights", str(step), "--out", nowhere],
    ]
    capsys.readouterr()
    for argv in filter(None, cases):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err, (argv, err)


def test_verify_pads_the_vocabulary_and_reports_errors_from_inside_the_world(tmp_path):
    """`nanotrain verify --layout tp=2` on the tokenizer's 65 characters pads them to 66 rows and
    says so once; an explicit model.vocab_size=65 fails inside the world (the tp=2 ranks), and
    that ConfigError still comes out as one line, exit 2."""
    args = [*_tiny_args(tmp_path), "--model.n_heads=4", "--model.vocab_size=0"]
    r = nanotrain("verify", *args, "--layout", "tp=2", "--steps", "2")
    assert r.returncode == 0 and "tolerance 1e-05: PASS" in r.stdout, r.stdout + r.stderr
    assert r.stdout.count("vocabulary: the tokenizer's 65 tokens padded to 66 rows for parallel.tp=2") == 1
    r = nanotrain("verify", *args, "--model.vocab_size=65", "--layout", "tp=2", "--steps", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == ("error: model.vocab_size=65 is not divisible by parallel.tp=2: set model.vocab_size=66, "
                                "or 0 to take the tokenizer's vocabulary and pad it automatically.")


def test_torchrun_on_one_machine_takes_a_free_port_unless_told_a_rendezvous():
    """nanotrain.torchrun adds --standalone where the launch names no rendezvous: torchrun's fixed
    default port (29500) would join two jobs started side by side into one world."""
    from nanotrain.torchrun import with_standalone

    one = ["--nproc-per-node", "2", "-m", "nanotrain", "train", "--config", "c.toml", "--master-port=1"]
    assert with_standalone(one) == ["--standalone", *one]  # a --master... after -m is the script's
    assert with_standalone(["--nproc-per-node=2", "train.py"]) == ["--standalone", "--nproc-per-node=2", "train.py"]
    for named in (["--nnodes=2", "--rdzv-endpoint=h:1"], ["--master-addr=h", "--master-port=1"],
                  ["--standalone"], ["--rdzv_backend", "c10d"]):
        assert with_standalone([*named, "-m", "nanotrain", "train"]) == [*named, "-m", "nanotrain", "train"]
