"""data.shard_tokens and data.prepare_workers (data/shards.py, data/prepare.py): token files cut
into shards hold the same stream and give the same batches; any number of worker processes writes
the same bytes as tokenizing in this process."""

import numpy as np
import pytest

from conftest import tiny_config
from nanotrain.config import ConfigError, DataConfig, load_config
from nanotrain.data import BatchSampler, prepare_data
from nanotrain.data.shards import TokenShards

from test_sources import DOCS, bpe_tokenizer_json, write_jsonl  # noqa: E402


def test_shards_read_as_their_concatenation():
    rng = np.random.default_rng(0)
    whole = rng.integers(0, 1000, 500).astype(np.uint16)
    shards = TokenShards([whole[:100], whole[100:101], whole[101:350], whole[350:]])
    assert len(shards) == 500 and len(shards.parts) == 4
    starts = rng.integers(0, 500 - 64, 200)
    assert (shards.windows(starts, 64) == whole[starts[:, None] + np.arange(64)]).all()
    assert (shards.read(99, 102) == whole[99:102]).all()  # across three parts


def _prepare(tmp_path, name, **kw):
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "c.jsonl", DOCS)), prepared_dir=str(tmp_path / name), **kw)
    return prepare_data(cfg, 32, log=lambda s: None)


@pytest.mark.parametrize("tokenizer", ["char", "pretrained"])
def test_sharded_preparation_holds_the_same_stream_and_batches(tmp_path, tokenizer):
    kw = {"tokenizer": str(bpe_tokenizer_json(tmp_path / "tok.json"))} if tokenizer == "pretrained" else {}
    one = _prepare(tmp_path, "one", **kw)
    sharded = _prepare(tmp_path, "sharded", shard_tokens=1000, **kw)
    files = sorted(p.name for p in sharded.dir.glob("*.bin"))
    assert files[0] == "train-00000.bin" and files[-1].startswith("val-") and "train.bin" not in files
    sizes = [n for split in ("train", "val") for _, n in sharded.meta["token_files"][split]]
    assert max(sizes) <= 1000 and sum(sizes) == one.n_train_tokens + one.n_val_tokens
    for split in ("train", "val"):
        a, b = one.tokens(split), sharded.tokens(split)
        assert len(a) == len(b) and (np.asarray(a) == b.read(0, len(b))).all()
        # The batches are a function of (seed, step) and the stream, not of the files.
        x, y = BatchSampler(a, 32, 16, seed=5), BatchSampler(b, 32, 16, seed=5)
        for step in range(5):
            for u, v in zip(x.batch(step), y.batch(step)):
                assert (u == v).all()


def test_resharding_replaces_the_old_files(tmp_path):
    _prepare(tmp_path, "p", shard_tokens=1000)
    again = _prepare(tmp_path, "p")  # the setting is part of the fingerprint: prepared again
    assert sorted(p.name for p in again.dir.glob("*.bin")) == ["train.bin", "val.bin"]
    assert _prepare(tmp_path, "p").meta == again.meta  # and then up to date


@pytest.mark.parametrize("tokenizer", ["char", "pretrained"])
def test_worker_processes_write_the_same_bytes(tmp_path, tokenizer, monkeypatch):
    import nanotrain.data.prepare as prepare

    monkeypatch.setattr(prepare, "BATCH_CHARS", 2000)  # ~20 batches, several in flight per worker
    kw = {"tokenizer": str(bpe_tokenizer_json(tmp_path / "tok.json"))} if tokenizer == "pretrained" else {}
    here = _prepare(tmp_path, "here", **kw)
    pool = _prepare(tmp_path, "pool", prepare_workers=2, **kw)
    for split in ("train", "val"):
        assert (np.asarray(here.tokens(split)) == np.asarray(pool.tokens(split))).all()
    assert here.meta["documents"] == pool.meta["documents"]


def test_training_reads_the_shards(tmp_path):
    from nanotrain.runtime import RuntimeEngine

    losses = {}
    for shards in (0, 100_000):
        cfg = tiny_config(tmp_path / str(shards), f"--data.shard_tokens={shards}", "--train.max_steps=3", "--schedule.warmup_steps=1",
                          "--precision.recipe=fp32")
        losses[shards] = RuntimeEngine(cfg).run().losses
    assert losses[0] == losses[100_000]


@pytest.mark.parametrize("key", ["shard_tokens", "prepare_workers"])
def test_negative_settings_are_named(key):
    with pytest.raises(ConfigError, match=f"data.{key}=-1 must be >= 0"):
        load_config(None, [f"--data.{key}=-1"])
