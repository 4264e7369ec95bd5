"""ZeRO-3 (parallel/zero3.py): between uses a block holds no whole parameters; each block is
gathered once for its forward and once for its backward (recomputation included), at most the
current block and the next one at a time besides the root; and what a rank keeps is its 1/dp
slice of everything. The losses are one process's: tests/parity/test_zero.py."""

import dataclasses

import pytest

from conftest import CORPUS, runtime_parts
from nanotrain.config import load_config
from nanotrain.parallel.launch import run_world


def config(tmp_path, *extra):
    return load_config(None, [
        f"--data.path={CORPUS}", f"--data.prepared_dir={tmp_path / 'prep'}", f"--train.out_dir={tmp_path / 'run'}",
        "--model.d_model=32", "--model.n_layers=4", "--model.n_heads=4", "--model.vocab_size=68",
        "--train.seq_len=16", "--train.batch_size=8", "--precision.recipe=fp32", "--logging.progress=none",
        "--parallel.dp=2", "--optimizer.zero_stage=3", "--parallel.bucket_mb=0.001", *extra])


def _one_step(cfg_dict):
    with runtime_parts(cfg_dict) as (data, model, opt):
        sharding = opt.sharding
        seen = []  # when each block runs: which units are gathered

        def gathered():
            return [i for i, u in enumerate(sharding.units) if u.gathered]

        for i, block in enumerate(model.layers.values()):
            block.register_forward_pre_hook(lambda m, a, i=i: seen.append((i, gathered())))  # after the gather
        before = sharding.gathers
        x, y = data.micro_batches(0)[0]
        with opt.backward_context(last=True):
            loss = model(x, y)
            after_forward = gathered()
            loss.backward()
        after_backward = gathered()
        gathers = sharding.gathers - before
        opt.sync_grads()
        opt.step(1e-3)
        unit_bytes = [sum(b.numel * sharding.full[b].element_size() for b in u.buckets) for u in sharding.units]
        return {"seen": seen, "after_forward": after_forward, "after_backward": after_backward,
                "gathers": gathers, "buckets": len(opt.buckets), "peak": sharding.peak_bytes,
                "unit_bytes": unit_bytes, "state": opt.state_bytes(), "dp": opt.ps.dp,
                "params": sum(p.numel() for p in model.parameters()),
                "storage_after_step": sum(sharding.full[b].untyped_storage().nbytes() for b in opt.buckets)}


@pytest.mark.parametrize("recompute", ["none", "full", "selective"])
def test_blocks_are_gathered_for_their_use_only(tmp_path, recompute):
    out = run_world(_one_step, 2, dataclasses.asdict(config(tmp_path, f"--train.recompute={recompute}")))
    for r in out:
        units = len(r["unit_bytes"])  # the root and 4 blocks
        assert units == 5
        # Block i runs with the root, itself and the prefetched block i + 1 gathered, nothing else.
        forward, again = r["seen"][:units - 1], r["seen"][units - 1:]
        for i, now in forward:
            assert now == [0, i + 1] + ([i + 2] if i + 2 < units else []), (i, now)
        # Recomputed in backward (last block first): itself, the prefetched one before it, the root.
        assert [i for i, _ in again] == ([3, 2, 1, 0] if recompute != "none" else [])
        for i, now in again:
            assert i + 1 in now and len(now) <= 3, (i, now)
        assert r["after_forward"] == [] and r["after_backward"] == [] and r["storage_after_step"] == 0
        # Once for forward and once for backward, per bucket: recomputation gathers nothing more.
        assert r["gathers"] == 2 * r["buckets"]
        biggest = sorted(r["unit_bytes"][1:])[-2:]
        assert r["peak"] <= r["unit_bytes"][0] + sum(biggest)


def test_state_is_a_slice_of_everything(tmp_path):
    """Parameters, gradients and moments per rank: 1/dp of the whole, up to the padding of each
    bucket to a multiple of dp (fp32: the parameters' slices are the master weights)."""
    for dp in (2, 4):
        out = run_world(_one_step, dp, dataclasses.asdict(config(tmp_path, f"--parallel.dp={dp}")))
        for r in out:
            n, s, slack = r["params"], r["state"], r["buckets"] * (dp - 1) * 4
            assert 4 * n / dp <= s["params"] <= 4 * n / dp + slack
            assert 4 * n / dp <= s["grad_shards"] == s["grads"] <= 4 * n / dp + slack
            assert 8 * n / dp <= s["moments"] <= 8 * n / dp + 2 * slack
            assert s["master"] == 0


def test_bf16_parameters_keep_fp32_master_slices(tmp_path):
    """bf16 parameters (2 bytes, sliced) with fp32 master slices (4 bytes, sliced) at dp=2."""
    out = run_world(_one_step, 2, dataclasses.asdict(config(tmp_path, "--precision.recipe=bf16",
                                                             "--precision.param_dtype=bf16")))
    for r in out:
        n, s, slack = r["params"], r["state"], r["buckets"] * 4
        assert 2 * n / 2 <= s["params"] <= 2 * n / 2 + slack
        assert 4 * n / 2 <= s["master"] <= 4 * n / 2 + 2 * slack
