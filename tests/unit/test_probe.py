"""The probe batch (monitoring/probe.py): its figures against a float64 softmax of the model's
logits, its hash, that it changes nothing in training, and the resume check. The same figures
under tp (vocabulary-sharded), pp, ZeRO and ep: tests/parity/test_monitoring_layouts.py."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CORPUS, tiny_config
from nanotrain.checkpoint.storage import CheckpointError
from nanotrain.monitoring import health
from nanotrain.monitoring.probe import KEYS, Probe, check_resume, logit_sums, probe_hash
from nanotrain.runtime import RuntimeEngine


def longhand(logits: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """The probe's figures from logits [N, V] in float64, over the targets that are not -100."""
    keep = targets != -100
    z, t = logits[keep].astype(np.float64), targets[keep]
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = -np.sort(-p, axis=-1)
    figures = {"probe/loss": -np.log(p[np.arange(len(t)), t]), "probe/entropy": -(p * np.log(p)).sum(-1),
               "probe/top1_mass": top[:, 0], "probe/top5_mass": top[:, :5].sum(-1)}
    return {k: float(v.mean()) for k, v in figures.items()}


def test_logit_sums_against_float64_with_ignored_targets():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g) * 4
    targets = torch.randint(0, 11, (3, 7), generator=g)
    targets[0, :3] = -100  # ignored positions take no part
    sums = logit_sums(logits, targets)
    assert sums[-1].item() == 3 * 7 - 3
    got = dict(zip(KEYS, (sums[:-1] / sums[-1]).tolist()))
    assert got == pytest.approx(longhand(logits.numpy(), targets.numpy()), rel=1e-6)
    # and the health helpers agree on the unsharded logits
    keep = targets != -100
    assert got["probe/entropy"] == pytest.approx(health.entropy(logits[keep]).mean().item(), rel=1e-6)
    assert got["probe/top5_mass"] == pytest.approx(health.top_k_mass(logits[keep], 5).mean().item(), rel=1e-6)


def test_logged_figures_equal_a_float64_softmax_of_the_model_logits(tmp_path):
    engine = RuntimeEngine(tiny_config(tmp_path, "--precision.recipe=fp32", "--train.max_steps=10"))
    engine.run()
    probe, model = engine.probe, engine.model
    assert probe.x.shape == (4, 16) and torch.equal(probe.x[:, 1:], probe.y[:, :-1])
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = logged[0], logged[-1]
    assert first["step"] == 0 and first["probe/hash"] == probe.hash  # logged once, at the start
    assert last["step"] == 10 and "val_loss" in last  # with the evaluation
    model.eval()
    with torch.no_grad():
        logits = model(probe.x)  # the trained model's logits, from scratch
    want = longhand(logits.flatten(0, 1).numpy(), probe.y.flatten().numpy())
    assert {k: last[k] for k in KEYS} == pytest.approx(want, rel=1e-5)
    assert last["probe/loss"] < first["probe/loss"]  # it learned something in 10 steps


def test_hash_sees_one_token():
    x = torch.randint(0, 65, (4, 16), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, 1)
    x2 = x.clone()
    x2[2, 5] += 1
    assert probe_hash(x, y) == probe_hash(x.clone(), y.clone())
    assert len({probe_hash(x, y), probe_hash(x2, y), probe_hash(x, y.flip(0)), probe_hash(x[:2], y[:2])}) == 4


def test_probe_changes_nothing_in_training(tmp_path):
    """Probe on (at steps 0, 3, 6, ..., off the eval steps too) or off: the same losses, gradient
    norms, weights and RNG stream, bit for bit. Dropout is on, so a probe that drew from the
    RNG (or left the model in eval mode) would show."""
    common = ["--model.dropout=0.1", "--train.max_steps=12", "--logging.log_interval=4"]
    runs = {}
    for name, probe in (("on", ["--monitoring.probe_interval=3"]), ("off", ["--monitoring.probe_batch=0"])):
        engine = RuntimeEngine(tiny_config(tmp_path / name, *common, *probe))
        runs[name] = (engine.run(), engine, torch.get_rng_state())
    (on, e_on, rng_on), (off, e_off, rng_off) = runs["on"], runs["off"]
    assert e_on.probe is not None and e_off.probe is None
    assert on.losses == off.losses and on.val_losses == off.val_losses and on.grad_norms == off.grad_norms
    assert torch.equal(rng_on, rng_off)
    assert all(torch.equal(a, b) for a, b in zip(e_on.model.parameters(), e_off.model.parameters()))
    logged = [json.loads(line) for line in (tmp_path / "on" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [d["step"] for d in logged if "probe/loss" in d] == [0, 3, 6, 9, 12]


def test_resume_with_another_probe_batch_stops(tmp_path):
    """The data changed under the run: same path, same characters, other text. The resumed
    run's probe hash differs from the checkpoint's: a clear error naming both."""
    corpus = tmp_path / "corpus.txt"
    text = CORPUS.read_text()[:200_000]
    corpus.write_text(text)
    cfg = ["--checkpoint.interval=5", "--schedule.decay_steps=20", f"--data.path={corpus}"]
    engine = RuntimeEngine(tiny_config(tmp_path, *cfg, "--train.max_steps=5"))
    engine.run()
    saved = engine.probe.hash
    corpus.write_text(text[::-1])  # the same vocabulary, so only the probe can tell
    with pytest.raises(CheckpointError, match=f"probe batch differs.*sha256 {saved} in the checkpoint, "
                                              "[0-9a-f]{64} now.*data changed.*monitoring.probe_batch=0"):
        RuntimeEngine(tiny_config(tmp_path, *cfg, "--checkpoint.resume=latest")).run()


def test_a_smaller_probe_batch_on_resume_is_a_note(capsys):
    x = torch.zeros(2, 8, dtype=torch.long)
    check_resume({"hash": "0" * 64, "sequences": 4}, Probe(x, x, 0), Path("ckpt"))
    assert "probe batch has 2 sequences, the checkpoint's had 4" in capsys.readouterr().out
    check_resume(None, Probe(x, x, 0), Path("ckpt"))  # a checkpoint written with the probe off
