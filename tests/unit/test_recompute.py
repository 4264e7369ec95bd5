"""Activation recomputation (nanotrain/recompute.py): train.recompute=selective and full train the
same model as none, bit for bit in fp32 (dropout on: the RNG state is replayed), and what runs twice
counts once: MoE loads and router biases, the monitor's internals, fp8 delayed-scaling histories."""

import json

import pytest
import torch

from conftest import tiny_config
from nanotrain.config import Config
from nanotrain.models import build_model
from nanotrain.module_spec import mark, module_spec
from nanotrain.recompute import Recompute
from nanotrain.runtime import RuntimeEngine
from nanotrain.verify import train_and_capture
from test_deepseek import TINY

FP32 = ("--precision.recipe=fp32", "--train.max_steps=6", "--logging.log_interval=2", "--model.dropout=0.1")
MODES = ("selective", "full")


def _capture(tmp_path, mode, *extra):
    cfg = tiny_config(tmp_path / mode, *FP32, f"--train.recompute={mode}", *extra)
    return train_and_capture(Config.to_dict(cfg), grad_step=3)


def _same(a, b):
    assert a["losses"] == b["losses"] and a["grad_norms"] == b["grad_norms"]
    assert a["grads"].keys() == b["grads"].keys()
    for name in a["grads"]:
        assert torch.equal(a["grads"][name], b["grads"][name]), name


@pytest.mark.parametrize("mode", MODES)
def test_recompute_trains_the_same_model_bit_for_bit(tmp_path, mode):
    _same(_capture(tmp_path, "none"), _capture(tmp_path, mode))


@pytest.mark.parametrize("mode", MODES)
def test_recompute_deepseek_with_mtp_bit_for_bit(tmp_path, mode):
    """MLA (selective recomputes its up-projections), routed experts with bias balancing, and the
    multi-token-prediction block."""
    ds = (*TINY, "--model.mtp_depth=1", "--model.bias_update_rate=0.01", "--model.aux_loss_coef=0.01")
    _same(_capture(tmp_path, "none", *ds), _capture(tmp_path, mode, *ds))


def test_full_recompute_of_the_first_blocks_only(tmp_path):
    _same(_capture(tmp_path, "none", "--model.n_layers=3"),
          _capture(tmp_path, "full", "--model.n_layers=3", "--train.recompute_layers=1"))
    plan = Recompute("full", layers=2)
    assert [plan.covers(i) for i in range(4)] == [True, True, False, False]
    assert all(Recompute("selective", layers=1).covers(i) for i in range(4))
    assert not Recompute().covers(0)


def _metrics(tmp_path, mode, *extra):
    cfg = tiny_config(tmp_path / mode, *FP32, f"--train.recompute={mode}", "--monitoring.mode=debug", *extra)
    RuntimeEngine(cfg).run()
    rows = [json.loads(line) for line in (tmp_path / mode / "run" / "metrics.jsonl").read_text().splitlines()]
    skip = ("elapsed_s", "tokens_per_s", "mfu", "step_ms")  # wall-clock figures
    return [{k: v for k, v in r.items() if k not in skip and not k.startswith(("time/", "mem/"))} for r in rows]


@pytest.mark.parametrize("mode", MODES)
def test_what_runs_twice_counts_once(tmp_path, mode):
    """Every logged figure is the same: the monitor's internals (attention entropy and logits,
    residual and norm scales) and the MoE load per expert and expert biases (the router-bias update
    reads the step's load), which a recomputed forward would count twice."""
    ds = (*TINY, "--model.bias_update_rate=0.01")
    none, other = _metrics(tmp_path, "none", *ds), _metrics(tmp_path, mode, *ds)
    assert any("moe/layer1/tokens_per_expert" in r for r in none)
    assert any(k.startswith("internals/") for r in none for k in r)
    assert none == other


@pytest.mark.parametrize("mode", MODES)
def test_fp8_delayed_scaling_replays_its_scales(tmp_path, mode):
    """fp8 with delayed scaling: a recomputed GEMM must use the scale of its first forward and add no
    amax to the history; both show in the losses, and the histories end equal."""
    runs = {}
    for m in ("none", mode):
        cfg = tiny_config(tmp_path / m, "--precision.recipe=fp8_tensorwise", "--precision.fp8.scaling=delayed",
                          "--train.max_steps=8", "--model.dropout=0.0", f"--train.recompute={m}")
        engine = RuntimeEngine(cfg)
        result = engine.run()
        histories = {(n, k): h.clone() for n, mod in engine.model.named_modules()
                     if module_spec(mod).gemm_state is not None
                     for k, h in module_spec(mod).gemm_state.histories.items()}
        runs[m] = (result.losses, histories)
    assert runs["none"][0] == runs[mode][0]
    assert runs["none"][1].keys() == runs[mode][1].keys()
    assert all(torch.equal(runs["none"][1][k], runs[mode][1][k]) for k in runs["none"][1])


def test_full_recompute_keeps_only_the_block_inputs():
    """What backward keeps, counted with saved-tensor hooks around one forward: full keeps each
    block's input (the hooks of torch.utils.checkpoint take the rest), a small fraction of none's."""
    cfg = tiny_config(__import__("pathlib").Path("/tmp"), "--model.n_layers=4", "--model.d_model=64").model
    cfg.max_seq_len, cfg.vocab_size = 64, 65
    kept = {}
    for mode in ("none", "full"):
        model = build_model(cfg)
        model.init_weights(0)
        mark(model, recompute=Recompute(mode))
        x = torch.randint(0, 65, (4, 64))
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x, x)
        loss.backward()
        kept[mode] = total[0]
    assert kept["full"] < 0.3 * kept["none"], kept


@pytest.mark.parametrize("extra", [
    ["--precision.recipe=fp16"],  # loss scaling: skipped steps and the scale replay alike
    ["--precision.recipe=fp8_deepseek"],
    ["--precision.recipe=nvfp4"],  # stochastic rounding and Hadamard signs draw in backward only
    ["--precision.recipe=fp32", "--precision.lowbit.weights=layers.*.mlp.*"],  # persistent fp8 weights
], ids=["fp16", "fp8_deepseek", "nvfp4", "lowbit_fp8"])
@pytest.mark.parametrize("mode", MODES)
def test_recompute_under_every_recipe_bit_for_bit(tmp_path, mode, extra):
    losses = {m: RuntimeEngine(tiny_config(tmp_path / m, f"--train.recompute={m}", "--train.max_steps=6", *extra))
              .run().losses for m in ("none", mode)}
    assert losses["none"] == losses[mode]


@pytest.mark.slow
def test_recompute_of_compiled_blocks_bit_for_bit(tmp_path):
    """train.compile: the checkpoint wraps the compiled block; its replay runs the compiled code again."""
    losses = {m: RuntimeEngine(tiny_config(tmp_path / m, "--precision.recipe=fp32", "--train.compile=true",
                                           f"--train.recompute={m}", "--train.max_steps=6")).run().losses
              for m in ("none", "full", "selective")}
    assert losses["none"] == losses["full"] == losses["selective"]
