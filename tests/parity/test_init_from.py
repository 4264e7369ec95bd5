"""checkpoint.init_from: a new run starts from exported weights, under any layout.

A run trains 5 steps and is exported to a Hugging Face folder (`nanotrain convert --to-hf`);
a new run with init_from=<that folder> must start from exactly those weights: its first
loss (computed before any update) equals the exported model's loss on the same batch."""

import dataclasses

import pytest
import torch

from conftest import CORPUS
from nanotrain.config import Config, ConfigError, load_config
from nanotrain.models.hf import convert_to_hf, load_hf_model
from nanotrain.parallel.launch import run_world
from nanotrain.runtime import RuntimeEngine

# One pytest-xdist worker runs this file (make test: --dist loadgroup): its module-scoped
# fixture runs once, not once per worker.
pytestmark = pytest.mark.xdist_group("init_from")


def config(tmp_path, out, *extra):
    return load_config(None, [
        f"--data.path={CORPUS}", f"--data.prepared_dir={tmp_path / 'prep'}", f"--train.out_dir={tmp_path / out}",
        "--model.d_model=32", "--model.n_layers=4", "--model.n_heads=4", "--model.vocab_size=68",
        "--model.norm=rmsnorm", "--model.mlp=swiglu", "--model.pos_emb=rope", "--model.tie_embeddings=false",
        "--train.seq_len=16", "--train.batch_size=8", "--train.eval_interval=0", "--schedule.warmup_steps=1",
        "--schedule.decay_steps=10",
        "--precision.recipe=fp32", "--logging.progress=none", "--logging.tensorboard=false", "--logging.plot=false",
        "--logging.peak_tflops=1", "--logging.log_interval=1", *extra])


def _first_loss(cfg_dict):
    return RuntimeEngine(Config.from_dict(cfg_dict)).run().losses[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("init_from")
    RuntimeEngine(config(tmp, "src", "--train.max_steps=5")).run()
    convert_to_hf(tmp / "src" / "checkpoints", tmp / "hf")
    # The exported model's loss on the first batch a new run sees (batch = f(seed, step 0)).
    cfg = config(tmp, "probe", "--train.max_steps=1")
    from nanotrain.data import BatchSampler, prepare_data

    prepared = prepare_data(cfg.data, cfg.train.seq_len, log=lambda *a, **k: None)
    x, y = BatchSampler(prepared.tokens("train"), cfg.train.seq_len, cfg.train.batch_size, cfg.train.seed).batch(0)
    with torch.no_grad():
        loss = load_hf_model(tmp / "hf")(x, y).item()
    return tmp, loss


@pytest.mark.parametrize("layout", ["", "tp=2,pp=2"])
def test_new_run_starts_from_exported_weights(exported, layout):
    tmp, expected = exported
    extra = ["--train.max_steps=1", f"--checkpoint.init_from={tmp / 'hf'}"]
    if layout:
        extra += ["--parallel.tp=2", "--parallel.pp=2", "--train.micro_batch_size=2"]
    cfg = config(tmp, f"new_{layout or 'one'}", *extra)
    world = cfg.parallel.tp * cfg.parallel.pp
    loss = _first_loss(dataclasses.asdict(cfg)) if world == 1 else run_world(_first_loss, world,
                                                                             dataclasses.asdict(cfg))[0]
    assert loss == pytest.approx(expected, rel=1e-5)


def test_init_from_a_different_model_names_the_difference(exported):
    tmp, _ = exported
    with pytest.raises(ConfigError, match="model.n_layers: weights have 4, config has 2"):
        RuntimeEngine(config(tmp, "bad", "--model.n_layers=2", "--train.max_steps=1",
                             f"--checkpoint.init_from={tmp / 'hf'}")).run()
