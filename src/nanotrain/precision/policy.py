"""The precision policy: which recipe each GEMM of the model runs in.

`precision.recipe` names the default; `precision.overrides` puts chosen modules in
another, by name pattern (a glob like "layers.0.*" or "*.mlp.*", or a regex after "re:"):

    recipe = "fp8_deepseek"
    overrides = ["layers.0.*=bf16"]      # the first block in bf16 too
    low_bit_exclude = ["head"]           # (default) DeepSeek-V3 keeps the output head in bf16

The model's modules know nothing of this: after the model is built, apply_policy() (a
step of parallel/parallelize.py) writes a `gemm_recipe` into the record (module_spec.py) of
every module that runs GEMMs (those built as kind GEMM: layers.Linear and its tensor-parallel
subclasses, moe.ExpertMLP), and their forward calls gemm() below. A module left at None runs
F.linear under whatever autocast is active: that is the bf16 and fp16 path (torch.autocast)
and the fp32 path (no autocast). Embedding lookups, norms, softmax and the router's scores are
not GEMMs of a linear layer and follow autocast; the attention core has its own setting,
precision.attention (attention_core_dtype, set_attention_core).
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from ..compiling import eager
from ..module_spec import ATTENTION, GEMM, mark, module_spec
from .recipes import NVFP4, DelayedScaling, Fp8Custom, Fp8DeepSeek, Fp8Tensorwise, MXFP4, Recipe

LOW_BIT = ("fp8_tensorwise", "fp8_deepseek", "fp8_custom", "nvfp4", "mxfp4")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class AutocastOverride(Recipe):
    """A module kept at fp32 (autocast off) or at bf16/fp16 (autocast to it) inside a run
    whose default is another recipe."""

    def __init__(self, name: str):
        self.name = name

    def linear(self, x, weight, bias, state):
        device = x.device.type
        if self.name == "fp32":
            with torch.autocast(device, enabled=False):
                return F.linear(x.float(), weight.float(), None if bias is None else bias.float())
        with torch.autocast(device, dtype=AUTOCAST[self.name]):
            return F.linear(x, weight, bias)


def build_recipe(name: str, p) -> Recipe | None:
    """The recipe object for a name; None for the autocast-only recipes at the run's default."""
    if name == "fp8_tensorwise":
        return Fp8Tensorwise(p.fp8.margin, p.fp8.gemm)  # fp8.scaling: the module's gemm_state
    if name == "fp8_deepseek":
        return Fp8DeepSeek()
    if name == "fp8_custom":
        f = p.fp8
        return Fp8Custom(f.x_scaling, f.w_scaling, f.grad_scaling, f.grad_format, f.grad_rounding)
    if name == "nvfp4":
        return NVFP4(p.nvfp4.weights_2d, p.nvfp4.hadamard)
    if name == "mxfp4":
        return MXFP4()
    return None


def parse_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    """["pattern=recipe", ...] -> [(pattern, recipe)]; config.validate checks them."""
    return [tuple(item.rsplit("=", 1)) for item in overrides]


def matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def recipe_name_for(name: str, p) -> str:
    """The recipe of module `name`: the last matching override, else bf16 for a module in
    precision.low_bit_exclude under a low-bit recipe, else precision.recipe."""
    chosen = p.recipe
    if chosen in LOW_BIT and any(matches(pattern, name) for pattern in p.low_bit_exclude):
        chosen = "bf16"
    for pattern, recipe in parse_overrides(p.overrides):
        if matches(pattern, name):
            chosen = recipe
    return chosen


def runs_gemms(module: nn.Module) -> bool:
    return module_spec(module).kind == GEMM


def apply_policy(model: nn.Module, p) -> dict[str, str]:
    """Give every GEMM-running module its recipe (its record's gemm_recipe and gemm_state);
    return {module name: recipe name}, which the model's record keeps as its gemm_policy."""
    chosen = {}
    shared: dict[str, Recipe | None] = {}
    for name, module in model.named_modules():
        if not runs_gemms(module):
            continue
        recipe = chosen[name] = recipe_name_for(name, p)
        if recipe == p.recipe:
            if recipe not in shared:  # one recipe object per run (NVFP4's generator is shared)
                shared[recipe] = build_recipe(recipe, p)
            gemm_recipe = shared[recipe]
        else:
            gemm_recipe = build_recipe(recipe, p) if recipe in LOW_BIT else AutocastOverride(recipe)
        delayed = recipe == "fp8_tensorwise" and p.fp8.scaling == "delayed"
        group = tp_group(module) if recipe in TENSOR_AMAX else None
        state = DelayedScaling(p.fp8.amax_history_len, delayed=delayed, group=group) \
            if delayed or group is not None else None
        mark(module, gemm_recipe=gemm_recipe, gemm_state=state)
    mark(model, gemm_policy=chosen)
    return chosen


TENSOR_AMAX = ("fp8_tensorwise", "fp8_custom", "nvfp4")  # recipes with a scale over a whole tensor


def tp_group(module: nn.Module):
    """The tensor-parallel group of a sharded linear layer (ColumnParallelLinear and
    RowParallelLinear keep theirs as .tp; a plain layers.Linear has tp None), over which a
    per-tensor amax is reduced. (Not the experts': ExpertMLP is no nn.Linear.)"""
    if not isinstance(module, nn.Linear) or module.tp is None:
        return None
    return module.tp.group if module.tp.size > 1 else None


def attention_core_dtype(choice: str, autocast: torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """precision.attention's dtype for the attention core (None: follow autocast). "auto" keeps
    the core in fp32 under a bf16/fp16 autocast on a CPU, whose low-precision attention backward
    is the slow one (models/attention.py)."""
    if autocast is None or choice == "autocast":
        return None
    if choice == "auto" and device.type == "cuda":
        return None
    return torch.float32


def set_attention_core(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Every MHA/GQA attention core of the model runs RoPE and the core in `dtype` (None:
    autocast's). MLA's core (kind LATENT_ATTENTION) is left in autocast's dtype, as it always was:
    the CPU measurement behind "auto" is the MHA core's."""
    for module in model.modules():
        if module_spec(module).kind == ATTENTION:
            mark(module, core_dtype=dtype)


def describe_policy(chosen: dict[str, str]) -> str:
    """One line for the log: how many GEMM modules run in each recipe, with examples."""
    counts = Counter(chosen.values())
    parts = []
    for recipe, n in counts.most_common():
        names = [k for k, v in chosen.items() if v == recipe]
        parts.append(f"{recipe}: {n} module(s) ({', '.join(names[:3])}{', ...' if n > 3 else ''})")
    return "; ".join(parts)


def gemm(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         site: str = "") -> torch.Tensor:
    """x Wᵀ + b in the module's recipe (F.linear under the active autocast if it has none).
    `site` names the weight when a module runs several (delayed scaling keeps one history each)."""
    spec = module_spec(module)
    if SPLIT_K > 1 and spec.row_parallel and module.tp is None and x.shape[-1] % SPLIT_K == 0:
        return split_k_gemm(module, x, weight, bias, site)
    return whole_gemm(module, x, weight, bias, site)


def whole_gemm(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               site: str) -> torch.Tensor:
    spec = module_spec(module)
    if spec.gemm_recipe is None and spec.lowbit is None:
        return F.linear(x, weight, bias)
    return recipe_gemm(module, x, weight, bias, site)


# verify's rounding probe for tensor parallelism (verify.rounding_spread): 1, or a tp size with which
# one process computes each row-parallel GEMM as a tp split does. Set only by verify, around a probe.
SPLIT_K = 1


def split_k_gemm(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 site: str) -> torch.Tensor:
    """x Wᵀ as tp ranks of a RowParallelLinear compute it, on one process: K in SPLIT_K slices, each
    slice's product rounded to the GEMM's output dtype (bf16 under autocast), then summed in that
    dtype as the all-reduce sums them. The same sums as one GEMM in another order: in bf16 it moves
    the result by as much as a tp layout's rounding does, which micro-batch splits never show (they
    reorder sums over the batch, not inside a row)."""
    parts = [whole_gemm(module, xk, wk, None, site) for xk, wk in
             zip(x.chunk(SPLIT_K, -1), weight.chunk(SPLIT_K, -1))]
    out = parts[0]
    for part in parts[1:]:
        out = out + part
    return out if bias is None else out + bias


@eager  # under train.compile: amax histories, generators and hand-over hooks are Python state (compiling.py)
def recipe_gemm(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                site: str) -> torch.Tensor:
    spec = module_spec(module)
    if spec.lowbit is not None and weight is module.weight:  # a persistent low-bit weight (lowbit.py): its codes
        weight = spec.lowbit.compute_weight()
    recipe, state = spec.gemm_recipe, spec.gemm_state
    if recipe is None:
        return F.linear(x, weight, bias)
    return recipe.linear(x, weight, bias, state.at(site) if state is not None and site else state)
