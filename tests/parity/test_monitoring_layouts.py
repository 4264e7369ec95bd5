"""The monitor's global figures are the one-process figures under every layout: gradient,
weight and update norms (global, per block, per-tensor update-ratio quantiles) are summed
across tp shards, pipeline stages, ZeRO gradient slices and expert shards
(monitoring/monitor.py); the probe batch's loss, entropy and top-k mass come from the
vocabulary-sharded logits under tp and from the last stage under pp (monitoring/probe.py).
fp32, so that only summation order differs."""

import dataclasses
import json
from pathlib import Path

import pytest

from nanotrain.config import Config
from nanotrain.parallel.launch import run_world
from nanotrain.runtime import RuntimeEngine
from test_pipeline_layouts import config as dense_config  # noqa: E402
from test_zero import deepseek_config  # noqa: E402

TOL = 1e-4  # relative; measured differences are below 1e-5
STEPS = 4
COMMON = ["--precision.recipe=fp32", f"--train.max_steps={STEPS}", f"--logging.log_interval={STEPS}",
          "--train.eval_interval=0", "--checkpoint.save_final=false", "--logging.tensorboard=false",
          "--logging.plot=false", "--logging.peak_tflops=1", "--monitoring.mode=debug"]
GLOBAL = ["loss", "grad_norm", "param_norm", "update_ratio", "update_ratio_p50", "update_ratio_p95",
          "update_ratio_max", "clip_coef", "grad_depth_ratio", "ignored_targets", "val_loss",
          "probe/loss", "probe/entropy", "probe/top1_mass", "probe/top5_mass"]


def _metrics(cfg_dict) -> dict | None:
    """Train; rank 0 returns the metrics logged at the last step, its records merged (the others None)."""
    import torch.distributed as dist

    cfg = Config.from_dict(cfg_dict)
    RuntimeEngine(cfg).run()
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    lines = [json.loads(line) for line in (Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {k: v for d in lines if d["step"] == STEPS for k, v in d.items()} | {"probe/hash": lines[0]["probe/hash"]}


def padded_config(tmp_path, *extra):
    """The tokenizer's 65 characters: 66 rows at tp=2, the padding's logits -inf in the probe."""
    return dense_config(tmp_path, "--model.vocab_size=0", *extra)


LAYOUTS = {  # name: (config, world size, layout)
    "tp2_sp": (dense_config, 2, ["--parallel.tp=2", "--parallel.sequence_parallel=true"]),
    "tp2_padded_vocab": (padded_config, 2, ["--parallel.tp=2"]),
    "pp2": (dense_config, 2, ["--parallel.pp=2"]),
    "dp2_zero2": (dense_config, 2, ["--parallel.dp=2", "--optimizer.zero_stage=2"]),
    "dp2_ep2": (deepseek_config, 2, ["--parallel.dp=2", "--parallel.ep=2"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_global_figures_equal_one_process(tmp_path, name):
    build, world, layout = LAYOUTS[name]
    one = _metrics(dataclasses.asdict(build(tmp_path / "one", *COMMON)))
    par = run_world(_metrics, world, dataclasses.asdict(build(tmp_path / "par", *COMMON, *layout)))[0]
    keys = GLOBAL + [k for k in one if k.startswith(("blocks/", "update_ratio/", "internals/", "moe/"))
                     and isinstance(one[k], float)]
    assert len(keys) > len(GLOBAL) + 8  # per-block and per-tensor figures are there
    assert sum(k.startswith("internals/") for k in keys) == 6 * 4  # debug mode: every one of the 4 blocks
    assert set(keys) <= set(par), sorted(set(keys) - set(par))
    assert par["probe/hash"] == one["probe/hash"]  # the same probe tokens under every layout

    def rel(k):
        return abs(par[k] - one[k]) / max(abs(one[k]), 1e-12)
    worst = max(keys, key=rel)
    probe = max((k for k in keys if k.startswith("probe/")), key=rel)
    print(f"{name}: {len(keys)} figures, worst {worst}: {par[worst]} vs {one[worst]}; "
          f"worst probe figure {probe}: {par[probe]} vs {one[probe]} ({rel(probe):.1e} relative)")
    for k in keys:
        assert par[k] == pytest.approx(one[k], rel=TOL, abs=1e-9), k
