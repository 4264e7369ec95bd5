"""parallelize(): how one rank's model of a layout is made, in one place.

Every parallelism, and everything else that changes how the model runs on this rank, is one step
of the recipe below, in this order, and each step is a short function in the file of its
parallelism. A step that changes how a module runs writes it into the module's record
(module_spec.py), which the module's forward reads; no step sets a loose attribute.

Tensor and expert parallelism are the exception to "build plain, then transform": they are
arguments of the layers' constructors, as in Megatron. The blocks themselves say which linears are
column- and which row-parallel, where the one entry into the tp region goes (column_linears), how
the stacked experts split; a plan applied afterwards (torchtitan's parallelize_module) would say
each block's structure a second time, away from the block. So the recipe's first steps make the
objects the layers are built with, and the model is built sharded.

torchtitan's models/llama3/parallelize.py and picotron's train.py (its model wrapped in turn by
tp, cp, pp and dp) have the same shape: one function a reader can follow from top to bottom.
"""

from __future__ import annotations

import torch
from torch import nn

from ..compiling import compile_blocks
from ..config import Config, ConfigError, ParallelConfig, PrecisionConfig
from ..models import build_model
from ..module_spec import mark
from ..precision.lowbit import apply_lowbit
from ..precision.policy import apply_policy, attention_core_dtype, set_attention_core
from ..recompute import Recompute
from .context_parallel import apply_context_parallel
from .expert_parallel import expert_parallel
from .pipeline import layer_costs, pipeline_stage, schedule_stage
from .state import ParallelState
from .tensor_parallel import tensor_parallel


def parallelize(cfg: Config, ps: ParallelState, device: torch.device, autocast: torch.dtype | None,
                document_eos: int | None = None) -> nn.Module:
    """This rank's model of the layout `ps`: built, initialised and transformed step by step.
    autocast: the run's autocast dtype (None: fp32); document_eos: data.document_mask's EOS id."""
    # 1-2. Tensor (+ sequence) and expert parallelism: the layers are built holding their shards.
    tp, ep = tensor_parallel(ps, cfg.parallel), expert_parallel(ps, cfg.precision.moe)
    model = build_model(cfg.model, tp, ep)
    model.init_weights(cfg.train.seed)  # every weight from (seed, its name): the one-process values, sliced
    mark(model, document_eos=document_eos)  # data.document_mask: attention stays inside each document
    # 3. Context parallelism: attention as a ring over the cp group, on this rank's zigzag tokens.
    apply_context_parallel(model, ps)
    # 4. The pipeline cut: this rank keeps its stage's layers, under the one-process names.
    model = pipeline_cut(model, ps, cfg.parallel)
    # 5. Recomputation: which blocks backward runs again, keeping less for it (recompute.py).
    mark(model, recompute=Recompute(cfg.train.recompute, cfg.train.recompute_layers))
    # 6. Precision: each GEMM's recipe, the attention core's dtype, the weights stored low-bit.
    model = apply_precision(model, cfg.precision, autocast, device)
    # 7. Compile: each block, in place, last (the compiled blocks are the ones training runs).
    if cfg.train.compile:
        compile_blocks(model, ps.world_size)
    # 8. ZeRO-3 (optimizer.zero_stage=3) shards the parameters over dp when the optimizer lays them
    #    out in its flat buckets, whose slices they become: parallel/zero.py hands the buckets to
    #    zero3.ParameterSharding, which gathers each block's for its forward and backward.
    return model


def pipeline_cut(model: nn.Module, ps: ParallelState, p: ParallelConfig) -> nn.Module:
    """The stage this pipeline rank runs (pp > 1): the schedule's chunks of layers, balanced by
    parallel.pp_partition (parallel/pipeline/stage.py); the rest of the model is deleted."""
    if ps.pp == 1:
        return model
    stage = schedule_stage(p.pp_schedule, model.cfg.n_layers, ps.pp, p.chunks_per_rank, ps.pp_rank,
                           layer_costs(model, p.pp_partition))
    return pipeline_stage(model, ps.pp_rank, ps.pp, stage.chunks, stage.ids)


def apply_precision(model: nn.Module, p: PrecisionConfig, autocast: torch.dtype | None,
                    device: torch.device) -> nn.Module:
    """The precision policy (precision/policy.py, lowbit.py), and the move to the device between
    its two halves: the low-bit weights' codes are made where they will live."""
    apply_policy(model, p)  # which recipe each GEMM runs in
    set_attention_core(model, attention_core_dtype(p.attention, autocast, device))
    model = model.to(device)
    try:  # persistent fp8/NF4 weights; the optimizer moves the values into them
        apply_lowbit(model, p)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return model
