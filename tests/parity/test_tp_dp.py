"""Layout invariance for tensor and data parallelism: each layout vs one process, fp32, 10 steps.

Tolerance: losses and gradients (after step 1, gathered to full tensors) within 1e-5 relative
(max |a - b| / max |b| per tensor). Measured differences are ~1e-7: the only change between
layouts is the order of floating-point sums (row-parallel partial sums, dp all-reduce)."""

import pytest

from conftest import CORPUS
from nanotrain.config import load_config
from nanotrain.verify import verify

TOL = 1e-5


def config(tmp_path, *extra):
    return load_config(None, [
        f"--data.path={CORPUS}", f"--data.prepared_dir={tmp_path / 'prep'}", f"--train.out_dir={tmp_path / 'run'}",
        "--model.d_model=32", "--model.n_layers=2", "--model.n_heads=4", "--model.vocab_size=68",
        "--model.norm=rmsnorm", "--model.mlp=swiglu", "--model.pos_emb=rope", "--precision.recipe=bf16",
        "--train.seq_len=16", "--train.batch_size=8", "--schedule.warmup_steps=2", "--optimizer.lr=3e-3",
        "--logging.progress=none", *extra])


LAYOUTS = {
    "tp2": ("tp=2", []),
    "tp4": ("tp=4", []),
    "tp2_sp": ("tp=2,sp", []),
    "tp2_gqa": ("tp=2", ["--model.n_kv_heads=2"]),
    "dp2": ("dp=2", []),
    "dp4": ("dp=4", []),
    "tp2_dp2": ("tp=2,dp=2", []),
    "dp2_accum2": ("dp=2,micro=2", []),  # 2 micro-batches per rank
    "tp2_dp2_accum4_sp": ("tp=2,dp=2,micro=1,sp", []),
    # nanoGPT's block: learned positions and biases exercise the sequence-parallel partial gradients
    "tp2_sp_gpt2": ("tp=2,sp", ["--model.norm=layernorm", "--model.mlp=gelu", "--model.pos_emb=learned",
                                "--model.bias=true"]),
    "dp2_small_buckets": ("dp=2", ["--parallel.bucket_mb=0.005"]),  # many buckets, all overlapped
}


def check_layout(cfg, layout: str, tolerance: float = TOL):
    """10 steps of `layout` against one process (nanotrain verify); fails with the side-by-side table."""
    report = verify(cfg, layout, steps=10, tolerance=tolerance)
    print(report.table(layout))
    assert len(report.rows) == 10
    assert report.ok, report.table(layout)
    return report


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_one_process(tmp_path, name):
    layout, extra = LAYOUTS[name]
    check_layout(config(tmp_path, *extra), layout)


def test_accumulation_alone_matches(tmp_path):
    """One process, 4 micro-batches of 2 vs one batch of 8."""
    check_layout(config(tmp_path), "micro=2")
