"""A vocabulary from the tokenizer that tp does not divide (tiny Shakespeare's 65 characters,
model.vocab_size=0) is padded to a multiple of tp. The padded model is the unpadded one-process
model: the same losses and step-1 gradients (real rows only: verify gathers the logical
tensors), checkpoints that resume across padded and unpadded layouts, and a Hugging Face export
with the real vocabulary. Same tolerance as test_tp_dp.py."""

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from nanotrain.config import Config
from nanotrain.data import BatchSampler, prepare_data
from nanotrain.models.hf import convert_to_hf, load_hf_model
from nanotrain.parallel.launch import run_world
from nanotrain.runtime import RuntimeEngine
from test_deepseek_layouts import config as deepseek_config  # noqa: E402
from test_resume_across_layouts import SMALL, check_resume_chain, run_config  # noqa: E402
from test_tp_dp import check_layout, config as tp_dp_config  # noqa: E402


def config(tmp_path, *extra):
    return tp_dp_config(tmp_path, "--model.vocab_size=0", *extra)  # 65, from the tokenizer


@pytest.mark.parametrize("layout, extra", [
    ("tp=2", []),  # 66 rows: rank 1 holds 32 real rows and one of padding
    ("tp=4", []),  # 68 rows: rank 3 holds 14 real rows and three of padding
    ("tp=2,dp=2", []),
    ("tp=2,sp", ["--model.tie_embeddings=false"]),  # the head's own padded rows, sequence parallel
])
def test_padded_vocabulary_trains_the_unpadded_model(tmp_path, layout, extra):
    check_layout(config(tmp_path, *extra), layout)


def test_deepseek_multi_token_prediction_with_a_padded_vocabulary(tmp_path):
    """The MTP module's loss goes through the same padded head (shared with the main loss)."""
    check_layout(deepseek_config(tmp_path, "--model.vocab_size=0", "--model.mtp_depth=1"), "tp=2")


def test_resume_across_padded_and_unpadded_layouts(tmp_path):
    """Saved at tp=2 (66 rows), resumed on one process (65), then at tp=4 (68) with dp=2 and
    ZeRO-1 (moments in flat buckets, their padding rows left out of the checkpoint): the losses of
    one process all along."""
    small = [a for a in SMALL if not a.startswith("--model.vocab_size")] + ["--model.vocab_size=0"]
    check_resume_chain(lambda out, *extra: run_config(tmp_path, out, *small, "--parallel.bucket_mb=0.002", *extra),
                       (2, 4, "--parallel.tp=2"), (1, 8),
                       (8, 12, "--parallel.tp=4", "--parallel.dp=2", "--optimizer.zero_stage=1"))


def _logits_and_samples(tp_size):
    """Logits without targets (what sampling reads) and greedy and sampled continuations, from a
    model of 65 tokens built on this world's tp=tp_size (rank 0 returns them)."""
    import torch.distributed as dist

    from nanotrain.config import ModelConfig
    from nanotrain.models import build_model
    from nanotrain.parallel.tensor_parallel import TensorParallel
    from nanotrain.sample import generate

    cfg = ModelConfig(vocab_size=65, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)
    tp = TensorParallel(dist.group.WORLD, dist.get_rank(), tp_size) if tp_size > 1 else None
    model = build_model(cfg, tp)
    model.init_weights(seed=5)
    model.eval()
    ids = torch.arange(12).view(2, 6) * 5
    with torch.no_grad():
        logits = model(ids)
    greedy = generate(model, ids, 4, temperature=0)
    sampled = generate(model, ids, 4, temperature=1.0, top_k=70, generator=torch.Generator().manual_seed(0))
    return logits, greedy, sampled


def test_sampling_sees_the_unpadded_logits():
    """Without targets the model returns the 65 real logits (the padding cut off after the
    gather), so sampling and greedy decoding are one process's."""
    one = run_world(_logits_and_samples, 1, 1)[0]
    par = run_world(_logits_and_samples, 4, 4)[0]  # 68 rows, 3 of padding on rank 3
    assert par[0].shape == one[0].shape == (2, 6, 65)
    torch.testing.assert_close(par[0], one[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(par[1], one[1]) and torch.equal(par[2], one[2])


def _train(cfg_dict):
    return RuntimeEngine(Config.from_dict(cfg_dict)).run().losses


def test_hf_export_of_a_padded_run_has_the_real_vocabulary_and_loads_back_padded(tmp_path):
    """Exported from tp=2 (66 rows): 65 rows in the HF folder. A new tp=2 run that starts from
    it (checkpoint.init_from: each rank's padded shard from the 65 rows) has, before any update,
    the exported model's loss on its first batch."""
    def cfg(out, *extra):
        return config(tmp_path, f"--train.out_dir={tmp_path / out}", "--schedule.warmup_steps=1",
                      "--schedule.decay_steps=10", "--model.tie_embeddings=false", "--parallel.tp=2",
                      "--logging.log_interval=1", *extra)

    run_world(_train, 2, dataclasses.asdict(cfg("run", "--train.max_steps=2", "--checkpoint.save_final=true")))
    convert_to_hf(tmp_path / "run", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 65
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [65, 32]
        assert f.get_slice("lm_head.weight").get_shape() == [65, 32]
    new = cfg("new", "--train.max_steps=1", f"--checkpoint.init_from={tmp_path / 'hf'}")
    first = run_world(_train, 2, dataclasses.asdict(new))[0][1]
    prepared = prepare_data(new.data, new.train.seq_len, log=lambda *a, **k: None)
    x, y = BatchSampler(prepared.tokens("train"), new.train.seq_len, new.train.batch_size, new.train.seed).batch(0)
    with torch.no_grad():
        assert first == pytest.approx(load_hf_model(tmp_path / "hf")(x, y).item(), rel=1e-5)
