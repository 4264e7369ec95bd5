"""Pipeline parallelism, alone and combined, vs one process: fp32, 10 steps through the engine.

Same tolerance as test_tp_dp.py: 1e-5 relative on every step's loss, the step-1 gradients of
every parameter (merged over the stages by name) and the gradient norms. A pipeline changes
only where the layers run; the arithmetic of each micro-batch is the single-process one,
so the differences measured are ~1e-7 (the order of the gradient sums over micro-batches)."""

import pytest

from conftest import CORPUS
from nanotrain.config import load_config

from test_deepseek import TINY  # noqa: E402  (tests/unit is on sys.path through conftest)
from test_tp_dp import check_layout, config as tp_dp_config  # noqa: E402

TOL = 1e-5


def config(tmp_path, *extra):
    # test_tp_dp's model with 4 layers (up to 4 stages, or 2 stages x 2 chunks) and
    # micro-batches of 2 sequences (4 per step on one rank).
    return tp_dp_config(tmp_path, "--model.n_layers=4", "--train.micro_batch_size=2", *extra)


LAYOUTS = {
    "pp2_gpipe": ("pp=2", ["--parallel.pp_schedule=gpipe"]),
    "pp2_1f1b": ("pp=2", ["--parallel.pp_schedule=1f1b"]),
    "pp4_gpipe": ("pp=4", ["--parallel.pp_schedule=gpipe"]),
    "pp4_1f1b": ("pp=4", ["--parallel.pp_schedule=1f1b"]),
    "pp2_interleaved_v2": ("pp=2", ["--parallel.pp_schedule=interleaved", "--parallel.pp_virtual_stages=2"]),
    "pp4_interleaved_v2": ("pp=4", ["--parallel.pp_schedule=interleaved", "--parallel.pp_virtual_stages=2",
                                    "--model.n_layers=8"]),
    "pp2_tied_embeddings": ("pp=2", ["--model.tie_embeddings=true"]),
    "pp2_by_params_gpt2": ("pp=2", ["--parallel.pp_partition=params", "--model.norm=layernorm",
                                    "--model.mlp=gelu", "--model.pos_emb=learned", "--model.bias=true"]),
    "tp2_pp2": ("tp=2,pp=2", []),
    "tp2_pp2_sp": ("tp=2,pp=2,sp", []),
    "pp2_dp2": ("pp=2,dp=2,micro=1", []),
    "pp2_v2_dp2": ("pp=2,dp=2", ["--parallel.pp_schedule=interleaved", "--parallel.pp_virtual_stages=2"]),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_pipeline_layout_matches_one_process(tmp_path, name):
    layout, extra = LAYOUTS[name]
    check_layout(config(tmp_path, *extra), layout, TOL)


def test_4d_deepseek_matches_one_process(tmp_path):
    """tp=2 x pp=2 x dp=2 with ep=2: 8 processes, MLA + MoE with bias balancing."""
    cfg = load_config(None, [*TINY, f"--data.path={CORPUS}", f"--data.prepared_dir={tmp_path / 'prep'}",
                             f"--train.out_dir={tmp_path / 'run'}", "--model.n_layers=4", "--train.seq_len=16",
                             "--train.batch_size=8", "--train.micro_batch_size=2", "--schedule.warmup_steps=2",
                             "--optimizer.lr=3e-3", "--model.bias_update_rate=0.01", "--logging.progress=none"])
    check_layout(cfg, "tp=2,pp=2,dp=2,ep=2", TOL)
