"""What each module is, and what parallelize() decided for it, in one typed record: `ModuleSpec`.

The module counterpart of params.ParamSpec. A module of a parallel model runs differently by
layout and by precision, and the code that decides (parallel/parallelize.py, step by step) is
not the code that runs (the module's forward). The decision travels in this record:

    field             on                      written by                          read by
    kind              a GEMM module,          the layer, when it is built         the precision steps
                      an attention core       (layers.Linear, moe.ExpertMLP;      (which modules), the
                                              Attention, MLAttention)             context-parallel step
    cp                attention, the model    context parallel (context_parallel) the ring; the model's
                                                                                  zigzag positions
    core_dtype        attention               precision (policy.py)               RoPE and the core
    gemm_recipe,      a GEMM module           precision (policy.apply_policy)     policy.gemm
    gemm_state
    lowbit            a GEMM module           precision (lowbit.apply_lowbit)     policy.gemm
    row_parallel      a GEMM module           the layer (tensor_parallel.         policy.gemm (verify's
                                              row_linear)                         rounding probe)
    recompute         the model               recomputation (recompute.py)        the model's forward
    document_eos      the model               data.document_mask                  the model's positions
    gemm_policy,      the model               the precision and compile steps     the log, the
    lowbit_weights,                           (what they chose, by module name)   precision_policy.json
    compiled_blocks

Everything reads it through `module_spec(m)`: one record, so a typo is an AttributeError instead
of a silent default (a loose attribute, read with a default for the modules that lack it, never
fails). The
record is frozen; a change is a new record (`mark(m, cp=...)`), which keeps "who decided this" in
one call. The objects it points to may hold state of their own (an amax history, low-bit codes):
frozen means no step swaps them behind another's back, not that they never change.

(Megatron and torchtitan set plain attributes on their modules for the same purposes; a
dataclass read through one accessor is the readable middle, as for the parameters.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .recompute import NONE, Recompute

# The kinds a layer declares when it is built:
GEMM = "gemm"  # runs its GEMMs through precision.policy.gemm, in the recipe its record names
ATTENTION = "attention"  # the MHA/GQA core (models/attention.py): a ring under cp, in core_dtype if set
LATENT_ATTENTION = "latent attention"  # MLA's core (models/mla.py): a ring under cp


@dataclass(frozen=True, eq=False)  # eq=False: compared and hashed as itself (a dict field has no hash)
class ModuleSpec:
    """One module's kind, and what the steps of parallelize() decided for it."""

    kind: str = ""  # GEMM | ATTENTION | LATENT_ATTENTION | "" (anything else): declared by the layer
    # Context parallelism (parallel/context_parallel.py): attention runs as a ring over this group,
    # and the model computes the positions of this rank's zigzag tokens. None: whole sequences.
    cp: Any = None
    # Precision (precision/policy.py, lowbit.py). core_dtype: the attention core's dtype (None:
    # autocast's). gemm_recipe None: F.linear under the active autocast. gemm_state: a
    # DelayedScaling (amax histories, the tp-reduced amax). lowbit: a LowBitWeight for the weight.
    core_dtype: Any = None
    gemm_recipe: Any = None
    gemm_state: Any = None
    lowbit: Any = None
    # A row-parallel GEMM (parallel/tensor_parallel.row_linear, with or without tp): under tp its inner
    # size K is split over the ranks and the partial outputs summed by a collective. Read by
    # policy.gemm for verify's rounding probe, which computes it that way on one process.
    row_parallel: bool = False
    # The whole model's (the root module's record).
    recompute: Recompute = NONE  # train.recompute (recompute.py)
    document_eos: int | None = None  # data.document_mask: the id that ends each document (documents.py)
    gemm_policy: dict[str, str] = field(default_factory=dict)  # module name -> recipe (policy.apply_policy)
    lowbit_weights: tuple[str, ...] = ()  # parameters stored low-bit (lowbit.apply_lowbit)
    compiled_blocks: tuple[str, ...] = ()  # blocks torch.compile'd (compiling.compile_blocks)


UNMARKED = ModuleSpec()  # a module nothing declared or decided anything about


def module_spec(m: nn.Module) -> ModuleSpec:
    """The module's record (UNMARKED for a module nothing marked). vars(): the instance's own
    record, never nn.Module's attribute lookup (torch.compile traces this read in every block)."""
    return vars(m).get("_module_spec", UNMARKED)


def mark(m: nn.Module, **fields) -> nn.Module:
    """Set fields of m's record (the others keep their values); returns m."""
    m._module_spec = dataclasses.replace(module_spec(m), **fields)
    return m
