"""parallelize() (parallel/parallelize.py) and the module record it writes (module_spec.py): each step's
decision is in the record of the modules it concerns, and nowhere else."""

import dataclasses

import pytest
import torch

from conftest import tiny_config
from nanotrain.layers import Linear
from nanotrain.models.attention import Attention
from nanotrain.module_spec import ATTENTION, GEMM, UNMARKED, mark, module_spec
from nanotrain.parallel.layout import Layout
from nanotrain.parallel.parallelize import parallelize
from nanotrain.parallel.state import ParallelState
from nanotrain.recompute import Recompute


def one_process_model(tmp_path, *overrides):
    cfg = tiny_config(tmp_path, *overrides)
    cfg.model.vocab_size, cfg.model.max_seq_len = 65, cfg.train.seq_len  # as the runtime resolves them
    return cfg, parallelize(cfg, ParallelState(Layout()), torch.device("cpu"), torch.bfloat16, document_eos=7)


def test_each_step_writes_its_decision_into_the_records(tmp_path):
    cfg, model = one_process_model(tmp_path, "--train.recompute=full", "--train.recompute_layers=1",
                                   "--precision.overrides=layers.0.mlp.*=fp32")
    root = module_spec(model)
    assert root.recompute == Recompute("full", 1) and root.document_eos == 7 and root.cp is None
    assert root.gemm_policy["layers.0.mlp.w1"] == "fp32" and root.gemm_policy["layers.1.mlp.w1"] == "bf16"
    assert root.lowbit_weights == () and root.compiled_blocks == ()  # no low-bit weights, no compile asked
    # precision.attention=auto under bf16 on a CPU: the MHA cores in fp32, every one of them
    cores = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(cores) == 2 and all(module_spec(m).core_dtype == torch.float32 for m in cores)
    assert all(module_spec(m).kind == ATTENTION for m in cores)
    # the overridden GEMMs carry their recipe object; the run's default (bf16: autocast) carries none
    w1 = model.layers["0"].mlp.w1
    assert module_spec(w1).kind == GEMM and module_spec(w1).gemm_recipe.name == "fp32"
    assert module_spec(model.layers["1"].mlp.w1).gemm_recipe is None


def test_the_record_is_frozen_and_a_typo_fails():
    layer = Linear(4, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        module_spec(layer).cp = object()
    with pytest.raises(TypeError, match="core_dtyp"):
        mark(layer, core_dtyp=torch.float32)
    assert module_spec(torch.nn.ReLU()) is UNMARKED  # a module nothing declared: the defaults
    assert module_spec(mark(layer, core_dtype=torch.float32)).kind == GEMM  # other fields kept
