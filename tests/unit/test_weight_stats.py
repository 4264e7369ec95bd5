"""`nanotrain weights`: the statistics of a real checkpoint equal numpy's on the trained model's
own tensors; comparing a checkpoint with itself changes nothing, two steps differ; the plot,
the CLI, and the errors for a folder that is not a checkpoint."""

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch

from conftest import tiny_config
from nanotrain.checkpoint import CheckpointManager, Piece, load_checkpoint
from nanotrain.cli import main
from nanotrain.config import Config, ConfigError
from nanotrain.inspection.counts import kind_of
from nanotrain.inspection.weights import (checkpoint_stats, compare_checkpoints, find_checkpoint, markdown,
                                          plot_weights, to_json)
from nanotrain.runtime import RuntimeEngine
from nanotrain.params import spec
from pictures import assert_picture

ARGS = ["--train.max_steps=4", "--checkpoint.interval=2", "--train.eval_interval=0", "--schedule.warmup_steps=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-layer model trained 4 steps, saved at steps 2 and 4; its final state dict."""
    tmp = tmp_path_factory.mktemp("weights")
    engine = RuntimeEngine(tiny_config(tmp, *ARGS))
    engine.run()
    state = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
    return tmp / "run", state


def close(x, y):
    return x == pytest.approx(y, rel=1e-6, abs=1e-12)


def numpy_stats(t: torch.Tensor) -> dict:
    x = t.double().numpy().reshape(-1)
    return {"mean": x.mean(), "std": x.std(), "min": x.min(), "max": x.max(), "rms": np.sqrt((x * x).mean()),
            "zeros": (x == 0).mean()}


def test_stats_equal_numpy_on_the_state_dict(run):
    folder, state = run
    r = checkpoint_stats(folder)  # a run folder: its `latest`, step 4
    assert r["step"] == 4 and r["checkpoint"].endswith("step_00000004")
    assert r["tied"] == ["head.weight"]  # tied embeddings: the state dict holds the table twice
    assert [t["name"] for t in r["tensors"]] == [k for k in state if k != "head.weight"]
    for t in r["tensors"]:
        x = state[t["name"]]
        assert t["shape"] == list(x.shape) and t["numel"] == x.numel() and t["kind"] == kind_of(t["name"])
        for key, want in numpy_stats(x).items():
            assert close(t[key], want), (t["name"], key, t[key], want)
        qs = np.quantile(x.double().numpy(), [0.001, 0.01, 0.5, 0.99, 0.999])
        assert all(close(t["quantiles"][k], q) for k, q in zip(("p0.1", "p1", "p50", "p99", "p99.9"), qs))
    # Per kind: the statistics of all the kind's values at once, not an average of the tensors'.
    for kind, s in r["kinds"].items():
        x = torch.cat([state[t["name"]].reshape(-1) for t in r["tensors"] if t["kind"] == kind])
        assert s["numel"] == x.numel()
        for key, want in numpy_stats(x).items():
            assert close(s[key], want), (kind, key, s[key], want)
    assert set(r["kinds"]) == {"embedding", "attention", "dense_mlp", "norms"}
    assert "| attention | 8 | 8,192 |" in markdown(r)


def test_optimizer_moments_with_the_flag(run):
    folder, state = run
    r = checkpoint_stats(folder, optimizer=True)
    names = {t["name"] for t in r["tensors"]}
    params = [k for k in state if k != "head.weight"]
    assert names == set(params) | {f"optim/{m}/{p}" for m in ("exp_avg", "exp_avg_sq") for p in params}
    assert r["kinds"]["optim/exp_avg_sq"]["min"] >= 0  # a mean of squares
    assert r["kinds"]["optim/exp_avg"]["numel"] == r["kinds"]["optim/exp_avg_sq"]["numel"] == \
        sum(state[p].numel() for p in params)


def test_a_checkpoint_against_itself_changes_nothing(run):
    folder, _ = run
    c = compare_checkpoints(folder, folder / "checkpoints" / "step_00000004")
    assert c["tensors"] and not (c["only_in_a"] or c["only_in_b"] or c["shape_mismatch"])
    for t in c["tensors"]:
        assert t["rel_change"] == 0 and t["max_abs_diff"] == 0 and t["std_ratio"] == 1
        assert t["cosine"] == pytest.approx(1, abs=1e-12)
    assert all(k["rel_change"] == 0 and k["cosine"] == pytest.approx(1, abs=1e-12) for k in c["kinds"].values())


def test_two_steps_differ(run):
    folder, state = run
    ckpts = folder / "checkpoints"
    c = compare_checkpoints(ckpts / "step_00000002", ckpts / "step_00000004")
    assert c["a"]["step"] == 2 and c["b"]["step"] == 4
    early = load_checkpoint(ckpts / "step_00000002").full_state("model/")
    for t in c["tensors"]:
        a, b = early[t["name"]].double().numpy().ravel(), state[t["name"]].double().numpy().ravel()
        assert t["rel_change"] > 0 and close(t["rel_change"], np.linalg.norm(b - a) / np.linalg.norm(a))
        assert 0.9 < t["cosine"] < 1 and close(t["cosine"], a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        assert close(t["std_ratio"], b.std() / a.std())
    # Two steps of Adam at lr ~1e-3 move every weight by about 1e-3: a large relative change for
    # the 0.02-sized matrices, a small one for the norm gains near 1.
    assert c["kinds"]["norms"]["rel_change"] < 0.01 < c["kinds"]["attention"]["rel_change"] < 0.5
    assert "| norms | 5 | 160 |" in markdown(c)


def test_tensors_in_one_side_only_shape_changes_and_zeros(tmp_path):
    """Hand-made checkpoints (the manager's own format): what cannot be compared is named."""
    def save(folder, tensors):
        CheckpointManager(folder).save(1, [Piece(f"model/{n}", t, (0,) * t.dim(), tuple(t.shape))
                                           for n, t in tensors.items()], {})
        return folder

    a = save(tmp_path / "a", {"w": torch.ones(2, 3), "x": torch.ones(4), "z": torch.zeros(3), "g": torch.zeros(2)})
    b = save(tmp_path / "b", {"w": torch.ones(3, 3), "y": torch.ones(4), "z": torch.zeros(3), "g": torch.ones(2)})
    c = compare_checkpoints(a, b)
    assert c["only_in_a"] == ["x"] and c["only_in_b"] == ["y"]
    assert c["shape_mismatch"] == [{"name": "w", "shape_a": [2, 3], "shape_b": [3, 3]}]
    z, g = (next(t for t in c["tensors"] if t["name"] == n) for n in ("z", "g"))
    assert z["rel_change"] == 0 and z["cosine"] == 1  # both zero: unchanged
    assert g["rel_change"] == math.inf and g["cosine"] == 0  # grew from zero: no relative size
    assert json.loads(to_json(c))["tensors"][1]["rel_change"] is None  # JSON has no inf
    text = markdown(c)
    assert "Only in a: x" in text and "Only in b: y" in text and "w [2, 3] vs [3, 3]" in text
    assert checkpoint_stats(a)["tensors"][2]["zeros"] == 1.0


def test_plot_and_cli(run, tmp_path, capsys):
    folder, _ = run
    ckpts = folder / "checkpoints"
    png = plot_weights(checkpoint_stats(folder), tmp_path / "one.png")
    assert_picture(png, min_size=(450, 300))

    assert main(["weights", str(folder), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("# Weights of") and "weights.png" in out.err
    saved = json.loads((tmp_path / "out" / "weights.json").read_text())
    assert (tmp_path / "out" / "weights.md").read_text() == out.out  # the page printed is the page saved
    assert saved["step"] == 4 and saved["tensors"] and {"name", "key", "kind"} <= saved["tensors"][0].keys()
    assert_picture(tmp_path / "out" / "weights.png", min_size=(450, 300))

    assert main(["weights", str(ckpts / "step_00000002"), str(ckpts / "step_00000004"), "--json", "--optimizer",
                 "--out", str(tmp_path / "cmp")]) == 0
    c = json.loads(capsys.readouterr().out)  # stdout is one JSON document
    assert c["a"]["step"] == 2 and c["b"]["step"] == 4 and "optim/exp_avg_sq" in c["kinds"]
    assert_picture(tmp_path / "cmp" / "weights.png", min_size=(450, 300))


def test_not_a_checkpoint_is_a_clear_error(run, tmp_path, capsys):
    folder, _ = run
    with pytest.raises(ConfigError, match="does not exist"):
        checkpoint_stats(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert main(["weights", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at" in err and "step_00000500" in err and "Traceback" not in err
    # Without `latest` (a copied run): the newest complete step folder.
    copy = tmp_path / "copy"
    shutil.copytree(folder / "checkpoints", copy)
    (copy / "latest").unlink()
    assert find_checkpoint(copy).name == "step_00000004"
    # A damaged shard names the file and what to do.
    shard = copy / "step_00000004" / "rank_00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ConfigError, match="damaged"):
        checkpoint_stats(copy / "step_00000004")
    (copy / "step_00000002" / "metadata.json").write_text("{")
    with pytest.raises(ConfigError, match="cannot read"):
        checkpoint_stats(copy / "step_00000002")


def _trained_shards(cfg_dict):
    """One rank of a tp=2 run: its model tensors, and how each is split (None: replicated)."""
    engine = RuntimeEngine(Config.from_dict(cfg_dict))
    engine.run()
    out = {}
    for name, t in engine.model.state_dict(keep_vars=True).items():
        shard = spec(t).shard
        out[name] = (t.detach().clone(), shard.dim if shard is not None and shard.world > 1 else None)
    return out


def test_a_tp2_checkpoint_reads_as_the_whole_tensors(tmp_path):
    """Saved by two tensor-parallel ranks (each weight in two files): the statistics are those
    of the whole tensors, put together here from what each rank held."""
    from nanotrain.parallel.launch import run_world

    cfg = tiny_config(tmp_path, *ARGS, "--train.max_steps=2", "--parallel.tp=2", "--model.vocab_size=66",
                      "--precision.recipe=fp32")
    ranks = run_world(_trained_shards, 2, dataclasses.asdict(cfg))
    folder = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert len(list(folder.glob("rank_*.safetensors"))) == 2
    r = checkpoint_stats(folder)
    split = [t["name"] for t in r["tensors"] if ranks[0][t["name"]][1] is not None]
    assert "layers.0.attn.wo.weight" in split and "layers.0.mlp.w1.weight" in split
    for t in r["tensors"]:
        x, dim = ranks[0][t["name"]]
        if dim is not None:
            x = torch.cat([ranks[0][t["name"]][0], ranks[1][t["name"]][0]], dim)
        assert t["shape"] == list(x.shape)
        for key, want in numpy_stats(x).items():
            assert close(t[key], want), (t["name"], key)
