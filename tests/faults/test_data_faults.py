"""Hostile corpora and concurrent use of one corpus (issue 40): two preparations at once give one
correct result, a damaged token file is prepared again instead of trained on, a corpus of one
document is accepted, and what cannot be a corpus is named in one line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from nanotrain.cli import main

from test_bad_input import _error

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def _corpus(path, copies: int = 4):
    """A jsonl of tiny Shakespeare's paragraphs, `copies` times over (~4 MB: a preparation takes
    long enough for a second process to start beside it)."""
    paragraphs = (ROOT / "data" / "tinyshakespeare.txt").read_text().split("\n\n")
    with open(path, "w") as f:
        for _ in range(copies):
            f.writelines(json.dumps({"text": p}) + "\n" for p in paragraphs)
    return path


def _prepare(path, *extra):
    return subprocess.Popen([sys.executable, "-m", "nanotrain", "prepare", f"--data.path={path}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def _tokens(folder):
    return {name: (folder / name).read_bytes() for name in ("train.bin", "val.bin")}


def test_two_prepares_of_one_new_corpus_give_one_preparation(tmp_path):
    """The second waits for the first (a lock on the corpus) and then finds its result: the token
    files are those a single preparation writes, byte for byte."""
    alone, shared = _corpus(tmp_path / "alone.jsonl"), _corpus(tmp_path / "shared.jsonl")
    assert _prepare(alone).wait() == 0
    first = _prepare(shared)
    while not (tmp_path / "shared.nanotrain").exists() and first.poll() is None:  # it has started writing
        pass
    second = _prepare(shared)
    out = [p.communicate()[0] for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], out
    assert sum("prepared " in o for o in out) == 1 and sum("data up to date" in o for o in out) == 1, out
    assert _tokens(tmp_path / "shared.nanotrain" / "char") == _tokens(tmp_path / "alone.nanotrain" / "char")


def _train(path, out, *extra):
    """`nanotrain train` of a small model for a few steps on `path` (it prepares the corpus first)."""
    args = [f"--data.path={path}", f"--train.out_dir={out}", "--model.d_model=32", "--model.n_layers=1",
            "--model.n_heads=2", "--train.seq_len=16", "--train.batch_size=4", "--train.max_steps=5",
            "--train.eval_interval=5", "--train.eval_steps=1", "--logging.progress=none",
            "--logging.tensorboard=false", "--logging.plot=false", "--precision.recipe=fp32",
            "--logging.peak_tflops=1", "--train.threads=1", "--schedule.warmup_steps=2", *extra]
    return subprocess.Popen([sys.executable, "-m", "nanotrain", "train", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def test_two_trains_on_one_new_corpus_prepare_it_once_and_both_train(tmp_path):
    """Two runs (their own out_dirs) started at once on a corpus neither has prepared: one prepares
    it while the other waits on the corpus lock, both train on the same tokens to the same losses,
    and the token files are a single preparation's, byte for byte."""
    alone, shared = _corpus(tmp_path / "alone.jsonl"), _corpus(tmp_path / "shared.jsonl")
    assert _prepare(alone).wait() == 0
    runs = [_train(shared, tmp_path / f"run{i}") for i in (0, 1)]
    out = [p.communicate()[0] for p in runs]
    assert [p.returncode for p in runs] == [0, 0], out
    assert sum("prepared " in o for o in out) == 1, out
    assert _tokens(tmp_path / "shared.nanotrain" / "char") == _tokens(tmp_path / "alone.nanotrain" / "char")
    losses = [[json.loads(line)["loss"] for line in (tmp_path / f"run{i}" / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line] for i in (0, 1)]
    assert losses[0] and losses[0] == losses[1]


def test_a_token_file_damaged_after_preparation_is_prepared_again(tmp_path, capsys):
    """0xFF over train.bin, same size (ids beyond the vocabulary, which would fail mid-step): its
    checksum no longer matches meta.json's, so it is prepared again, with a warning."""
    corpus = _corpus(tmp_path / "c.jsonl", copies=1)
    assert main(["prepare", f"--data.path={corpus}"]) == 0
    folder = tmp_path / "c.nanotrain" / "char"
    good = _tokens(folder)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["max_id"] == np.frombuffer(good["train.bin"] + good["val.bin"], np.uint16).max() < meta["vocab_size"]
    (folder / "train.bin").write_bytes(b"\xff" * len(good["train.bin"]))
    capsys.readouterr()
    assert main(["prepare", f"--data.path={corpus}"]) == 0
    out = capsys.readouterr().out
    assert f"warning: {folder / 'train.bin'} changed since it was prepared (its checksum differs)" in out
    assert _tokens(folder) == good
    os.utime(folder / "train.bin")  # touched, not changed: the checksum still matches
    assert main(["prepare", f"--data.path={corpus}"]) == 0 and "data up to date" in capsys.readouterr().out


def test_a_corpus_of_one_document_is_accepted(tmp_path, capsys):
    """No document follows it, so no joiner is needed (nor in its character vocabulary)."""
    corpus = tmp_path / "one.jsonl"
    corpus.write_text(json.dumps({"text": "one document, with no newline in it, long enough for a tiny run"}) + "\n")
    assert main(["prepare", f"--data.path={corpus}", "--train.seq_len=4"]) == 0
    assert "prepared " in capsys.readouterr().out


@pytest.mark.parametrize("text,words", [
    ("", "holds no text"),
    (json.dumps({"text": "hi"}) + "\n", "corpus too short for train.seq_len=16"),
])
def test_an_empty_or_short_corpus_is_named_for_what_it_is(tmp_path, capsys, text, words):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(text)
    assert words in _error(capsys, ["prepare", f"--data.path={corpus}", "--train.seq_len=16"])
    assert not (tmp_path / "c.nanotrain").exists()  # nothing left behind


def test_a_pipe_as_the_corpus_is_named(tmp_path, capsys):
    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)
    err = _error(capsys, ["prepare", f"--data.path={fifo}"])
    assert "is not a regular file or a folder (a pipe, socket or device)" in err


def test_shards_so_small_they_would_make_a_file_per_token_are_refused(capsys):
    err = _error(capsys, ["prepare", "--data.shard_tokens=1"])
    assert "data.shard_tokens=1 would cut" in err and "into up to 1,115,394 token files" in err


@pytest.mark.parametrize("value", [",", "a.jsonl:0.5,,b.jsonl:0.5"])
def test_a_sources_list_with_an_empty_entry_is_refused(capsys, value):
    """--data.sources=, is not "no sources" (the run would silently train on data.path)."""
    err = _error(capsys, ["prepare", f"--data.sources={value}"])
    assert f"data.sources={value!r} has an empty entry" in err
