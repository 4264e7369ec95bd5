"""ZeRO stages 1, 2 and 3 vs one process (unsharded AdamW): fp32, 10 steps, 1e-5 relative on every
step's loss and gradient norm, and on every step-1 gradient (at stages 2 and 3 each rank holds only
its slices of them: verify puts them together from their boxes, checkpoint.assemble).

The update itself is what ZeRO changes (each rank steps its slices of the master weights and
moments, then all-gathers), so 10 equal losses in a row show the sharded update is the
unsharded one; the norms check clipping from slices."""

import dataclasses
import functools

import pytest
import torch

from conftest import CORPUS, runtime_parts
from nanotrain.config import load_config
from nanotrain.parallel.launch import run_world
from nanotrain.verify import compare, layout_config, reference_config, train_and_capture

from test_deepseek import TINY  # noqa: E402  (tests/unit is on sys.path through conftest)
from test_pipeline_layouts import config as dense_config  # noqa: E402
from test_tp_dp import check_layout  # noqa: E402

TOL = 1e-5


def deepseek_config(tmp_path, *extra):
    return load_config(None, [*TINY, f"--data.path={CORPUS}", f"--data.prepared_dir={tmp_path / 'prep'}",
                              f"--train.out_dir={tmp_path / 'run'}", "--model.n_layers=4", "--train.seq_len=16",
                              "--train.batch_size=8", "--schedule.warmup_steps=2", "--optimizer.lr=3e-3",
                              "--model.bias_update_rate=0.01", "--logging.progress=none", *extra])


LAYOUTS = {
    "dp2_zero1": ("dp=2,zero=1", dense_config, []),
    "tp2_dp2_zero1_sp": ("tp=2,dp=2,zero=1,sp", dense_config, []),  # whole .grad tp-summed too
    "dp2_zero2": ("dp=2,zero=2", dense_config, []),
    "dp1_zero2": ("zero=2", dense_config, []),  # one process: its slice is the whole bucket
    "dp4_zero1": ("dp=4,zero=1,micro=2", dense_config, []),
    "dp4_zero2_accum": ("dp=4,zero=2,micro=1", dense_config, []),  # 2 micro-batches: slices accumulate
    "dp2_zero2_small_buckets": ("dp=2,zero=2", dense_config, ["--parallel.bucket_mb=0.01"]),
    "tp2_dp2_zero2_sp": ("tp=2,dp=2,zero=2,sp", dense_config, []),
    "pp2_dp2_zero2_tied": ("pp=2,dp=2,zero=2", dense_config, ["--model.tie_embeddings=true"]),
    "ep2_dp2_zero2": ("dp=2,ep=2,zero=2", deepseek_config, []),
    # Interleaved: a chunk's gradients are complete after its own last backward, not the step's.
    "pp2_v2_dp2_zero1": ("pp=2,dp=2,zero=1", dense_config, ["--parallel.pp_schedule=interleaved",
                                                            "--parallel.pp_virtual_stages=2"]),
    "pp2_v2_dp2_zero2": ("pp=2,dp=2,zero=2", dense_config, ["--parallel.pp_schedule=interleaved",
                                                            "--parallel.pp_virtual_stages=2"]),
    "4d_zero1": ("tp=2,pp=2,dp=2,ep=2,zero=1,micro=2", deepseek_config, []),
    "4d_zero2_sp": ("tp=2,pp=2,dp=2,ep=2,zero=2,sp,micro=2", deepseek_config, []),
    # Stage 3: the parameters sharded too, gathered block by block (parallel/zero3.py).
    "dp2_zero3": ("dp=2,zero=3", dense_config, []),
    "dp4_zero3_accum": ("dp=4,zero=3,micro=1", dense_config, []),  # each block gathered per micro-batch
    "dp2_zero3_small_buckets": ("dp=2,zero=3", dense_config, ["--parallel.bucket_mb=0.01"]),
    "tp2_dp2_zero3_sp": ("tp=2,dp=2,zero=3,sp", dense_config, []),
    "pp2_dp2_zero3_tied": ("pp=2,dp=2,zero=3", dense_config, ["--model.tie_embeddings=true"]),
    "pp2_v2_dp2_zero3": ("pp=2,dp=2,zero=3", dense_config, ["--parallel.pp_schedule=interleaved",
                                                            "--parallel.pp_virtual_stages=2"]),
    "ep2_dp2_zero3": ("dp=2,ep=2,zero=3", deepseek_config, []),
    "4d_zero3_sp": ("tp=2,pp=2,dp=2,ep=2,zero=3,sp,micro=2", deepseek_config, []),
    # A block recomputed inside its backward, while that backward holds its gathered parameters.
    "dp2_zero3_recompute_full": ("dp=2,zero=3", dense_config, ["--train.recompute=full"]),
    "dp2_zero3_recompute_selective": ("dp=2,zero=3", deepseek_config, ["--train.recompute=selective"]),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_zero_matches_one_process(tmp_path, name):
    layout, make, extra = LAYOUTS[name]
    report = check_layout(make(tmp_path, *extra), layout, TOL)
    table = report.table(layout)
    assert report.worst_grad[0] and "largest gradient difference after step 1" in table, table
    assert "not compared" not in table, table


def _double_a_slice(cfg_dict, name: str):
    """A bug: dp rank 1's slice of `name`'s summed gradient is doubled before the step (as a
    reduce-scatter's sum added twice), rank 0's part of it left alone."""
    from nanotrain.runtime import RuntimeEngine
    from nanotrain.verify import train_and_capture

    init = RuntimeEngine.__init__

    def buggy(self, cfg, components=None, on_grads=None):
        def double_then_capture(step, model, ctx):
            for n, g in self.optimizer.grad_parts() if ctx.parallel.dp_rank == 1 else ():
                if n == name:
                    g.mul_(2)
            on_grads(step, model, ctx)
        init(self, cfg, components, double_then_capture)

    RuntimeEngine.__init__ = buggy
    return train_and_capture(cfg_dict)


def test_verify_fails_on_a_bug_in_one_zero2_slice(tmp_path):
    """Under ZeRO-2 no rank holds a whole gradient, and verify still compares them tensor by tensor:
    a bug in one rank's slice of one tensor is named, and the tensor put together from both ranks'
    slices is right where rank 0 holds it and doubled where rank 1 does. In this layout
    layers.1.mlp.w2.weight (4096 elements) straddles the two slices of its bucket: rank 0 holds its
    first 1088 elements."""
    name = "layers.1.mlp.w2.weight"
    cfg = dense_config(tmp_path)
    ref = train_and_capture(dataclasses.asdict(reference_config(cfg, 2, str(tmp_path / "reference"))))
    par_cfg = layout_config(reference_config(cfg, 2, str(tmp_path / "layout")), "dp=2,zero=2")
    other = run_world(functools.partial(_double_a_slice, name=name), 2, dataclasses.asdict(par_cfg))[0]
    report = compare(ref, other, TOL)
    print(report.table("dp=2,zero=2"))
    assert not report.ok and report.worst_grad[0] == name and report.worst_grad[1] > 100 * TOL
    a, b = other["grads"][name].reshape(-1), ref["grads"][name].reshape(-1)
    torch.testing.assert_close(a[:1088], b[:1088], rtol=1e-5, atol=1e-7)  # rank 0's part
    torch.testing.assert_close(a[1088:], 2 * b[1088:], rtol=1e-5, atol=1e-7)  # rank 1's, doubled


def _state_bytes(cfg_dict):
    with runtime_parts(cfg_dict) as (data, model, opt):
        x, y = data.micro_batches(0)[0]
        with opt.backward_context(last=True):
            model(x, y).backward()
        opt.sync_grads()
        opt.step(1e-3)
        n = sum(p.numel() for p in model.parameters())
        out = {"params": n, "bytes": opt.state_bytes() if hasattr(opt, "state_bytes") else None,
               "adamw": sum(t.numel() * t.element_size() for s in getattr(opt, "opt").state.values()
                            for t in s.values() if torch.is_tensor(t) and t.dim() > 0)}
        out["buckets"] = len(opt.buckets) if hasattr(opt, "buckets") else 0
        return out


# Two of the combinations: the bytes of every stage and dtype, exactly, for three layouts in a
# world of 8, are in tests/distributed/test_inspection_world.py (against inspection/memory.py).
@pytest.mark.parametrize("dp,stage,params", [(2, 1, "fp32"), (4, 2, "bf16")])
def test_state_is_divided_by_dp(tmp_path, dp, stage, params):
    """Per rank: moments (8 bytes per parameter unsharded) and gradient slices (4) are the
    replicated amount / dp, up to one bucket's padding. fp32 parameters are their own master
    (the master slices are views of them: no copy); bf16 parameters (2 bytes, whole on every
    rank) get fp32 master slices, 4 bytes / dp."""
    extra = ["--precision.param_dtype=bf16", "--precision.recipe=bf16"] if params == "bf16" else []
    cfg = dense_config(tmp_path, f"--parallel.dp={dp}", f"--optimizer.zero_stage={stage}",
                       "--train.micro_batch_size=0", "--parallel.bucket_mb=0.05", *extra)
    out = run_world(_state_bytes, dp, dataclasses.asdict(cfg))
    for rank_out in out:
        n, b = rank_out["params"], rank_out["bytes"]
        slack = rank_out["buckets"] * (dp - 1) * 4  # padding: < dp elements per bucket
        assert 8 * n / dp <= b["moments"] <= 8 * n / dp + 2 * slack
        assert 4 * n / dp <= b["grad_shards"] <= 4 * n / dp + slack
        if params == "fp32":
            assert b["master"] == 0 and b["params"] == 4 * n
        else:
            assert 4 * n / dp <= b["master"] <= 4 * n / dp + slack and b["params"] == 2 * n
    if dp != 2:
        return
    # Unsharded, for scale: AdamW's two moments alone are 8 bytes per parameter on every rank.
    plain = run_world(_state_bytes, 2, dataclasses.asdict(dense_config(tmp_path, "--parallel.dp=2",
                                                                        "--train.micro_batch_size=0")))[0]
    assert plain["adamw"] == 8 * plain["params"]
