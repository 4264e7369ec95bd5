"""[precision] and its tables: which recipe the GEMMs run in, and the dtypes of a weight's copies.

The section's knobs of one recipe or feature each are tables of their own ([precision.fp8],
--precision.fp8.margin=2); the flat names they had are read through keys.RENAMED. How a recipe
runs is precision/ (recipes.py, policy.py, master.py); this is only what a config may say.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from .errors import failed


def _regex_errors(key: str, patterns: list[str], shown: str | None = None) -> list[str]:
    """A message for each "re:" pattern that does not compile (shown: the entry to name instead)."""
    errors = []
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                errors.append(f"{key}: {shown if shown is not None else pattern!r} is not a valid regex ({e}).")
    return errors


LOW_BIT_RECIPES = ("fp8_tensorwise", "fp8_deepseek", "fp8_custom", "nvfp4", "mxfp4")
RECIPES = ("fp32", "bf16", "fp16") + LOW_BIT_RECIPES


@dataclass
class FP8Config:
    """[precision.fp8]: how the fp8 recipes scale and multiply."""
    # fp8_tensorwise: scale from the amax history of the last amax_history_len steps
    # (delayed, Transformer Engine's default) or from this tensor (current); margin
    # keeps 2^margin of headroom below the format's largest value.
    scaling: Literal["delayed", "current"] = "delayed"
    # fp8_tensorwise's GEMMs: torch._scaled_mm on the fp8 codes on CUDA with fp8 GEMMs (sm_89+)
    # when the dimensions are multiples of 16, else the exact emulation (auto); always
    # _scaled_mm (scaled_mm; this torch build also has a CPU kernel), or always the emulation.
    gemm: Literal["auto", "scaled_mm", "emulated"] = "auto"
    amax_history_len: int = 16
    margin: int = 0
    # fp8_custom: one scale per tensor, channel (row), 1x128 tile or 128x128 block, chosen for
    # activations, weights and gradients; the gradients' format and rounding.
    x_scaling: Literal["tensor", "channel", "tile", "block"] = "tile"
    w_scaling: Literal["tensor", "channel", "tile", "block"] = "block"
    grad_scaling: Literal["tensor", "channel", "tile", "block"] = "tile"
    grad_format: Literal["e4m3", "e5m2"] = "e4m3"
    grad_rounding: Literal["nearest", "stochastic"] = "nearest"

    def check(self) -> list[str]:
        return failed([
            (self.amax_history_len >= 1, f"precision.fp8.amax_history_len={self.amax_history_len} must be >= 1."),
            (self.margin >= 0, f"precision.fp8.margin={self.margin} must be >= 0."),
        ])


@dataclass
class NVFP4Config:
    """[precision.nvfp4]: 16x16 weight blocks (one quantised weight for forward and dgrad) and
    the random Hadamard transform on the weight-gradient GEMM's inputs."""
    weights_2d: bool = True  # was nvfp4_2d_weights: a name cannot start with a digit
    hadamard: bool = True

    def check(self) -> list[str]:
        return []


@dataclass
class MoEPrecisionConfig:
    """[precision.moe]: expert parallelism sends the tokens to their experts (dispatch) and the
    outputs back (combine) as e4m3 with one fp32 scale per 128 values, as DeepSeek-V3 does for
    dispatch. The gradients' exchanges in backward stay full precision."""
    dispatch_fp8: bool = False
    combine_fp8: bool = False

    def check(self) -> list[str]:
        return []


@dataclass
class LowBitConfig:
    """[precision.lowbit]: persistent low-bit weights (precision/lowbit.py). Linear weights whose
    parameter name matches a pattern of `weights` (glob or "re:" regex) and none of `exclude` are
    stored as fp8 (e4m3) or NF4 codes with per-tensor or per-channel scales; the optimizer keeps
    the master."""
    weights: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    format: Literal["fp8", "nf4"] = "fp8"
    scaling: Literal["tensor", "channel"] = "channel"

    def check(self) -> list[str]:
        return _regex_errors("precision.lowbit.weights", self.weights) + \
            _regex_errors("precision.lowbit.exclude", self.exclude)


@dataclass
class LossScaleConfig:
    """[precision.loss_scale]: fp16 dynamic loss scaling (precision/loss_scaling.py): the first
    scale; x 2 after growth_interval clean steps; x backoff after `hysteresis` overflowing
    (skipped) steps; never below min."""
    init: float = 65536.0
    growth_interval: int = 1000
    backoff: float = 0.5
    hysteresis: int = 2
    min: float = 1.0

    def check(self) -> list[str]:
        return failed([
            (self.init >= self.min > 0, f"precision.loss_scale.init={self.init} and precision.loss_scale.min="
                                        f"{self.min} must satisfy init >= min > 0."),
            (0 < self.backoff < 1, f"precision.loss_scale.backoff={self.backoff} must be in (0, 1)."),
            (self.growth_interval >= 1 and self.hysteresis >= 1,
             "precision.loss_scale.growth_interval and precision.loss_scale.hysteresis must be >= 1."),
        ])


@dataclass
class PrecisionConfig:
    # auto (default): bf16 where this device multiplies bf16 at least as fast as fp32 (CUDA with bf16;
    # CPUs with AMX or AVX512-BF16, timed at start-up), else fp32 (AVX2-only CPUs, where bf16 is ~100x
    # slower); one log line says which and why (runtime/machine.py).
    # fp32: everything in fp32. bf16: parameters and optimizer in fp32, matmuls
    # under torch.autocast(bfloat16) (no loss scaling needed: bf16 has fp32's range).
    # The low-bit recipes (precision/recipes.py) run every linear layer's three GEMMs with
    # quantised operands (emulated exactly on CPU) and everything else under bf16 autocast.
    # fp16: matmuls under torch.autocast(float16), with dynamic loss scaling ([precision.loss_scale]).
    recipe: Literal["auto", "fp32", "bf16", "fp16", "fp8_tensorwise", "fp8_deepseek", "fp8_custom", "nvfp4",
                    "mxfp4"] = "auto"
    # dtype of RoPE + softmax(QK^T)V under bf16. auto: fp32 on CPU (PyTorch's bf16
    # flash-attention backward is ~3x slower than fp32 on CPUs without AMX; measured in
    # docs/performance.md), the autocast dtype on CUDA (flash attention's fast path).
    attention: Literal["auto", "fp32", "autocast"] = "auto"
    # Per-module recipes: "pattern=recipe", pattern a glob on module names ("layers.0.*",
    # "*.mlp.*") or a regex after "re:"; the last match wins. On the command line: comma-separated.
    overrides: list[str] = field(default_factory=list)
    # Under a low-bit recipe these modules stay in bf16: DeepSeek-V3 keeps the output head
    # (with the embedding, router, norms and attention core, which are not linear layers here).
    low_bit_exclude: list[str] = field(default_factory=lambda: ["head"])
    # The dtypes of the copies of each weight (precision/master.py): the model's parameters, the
    # optimizer's master weights, the master gradients (accumulated over micro-batches, reduced
    # over dp and clipped in it), AdamW's two moments. master_owner=optimizer: the model keeps
    # param_dtype parameters and the optimizer a master_dtype copy (sharded by ZeRO); module: the
    # model's parameters are the master (master_dtype) and autocast casts them per GEMM.
    # master_rounding: how a bf16/fp16 master takes its update (nearest, stochastic, kahan).
    param_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    master_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    exp_avg_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    exp_avg_sq_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    master_owner: Literal["optimizer", "module"] = "optimizer"
    master_rounding: Literal["nearest", "stochastic", "kahan"] = "nearest"
    # The knobs of one recipe or feature each, as TOML tables ([precision.fp8]) and dotted keys
    # (--precision.fp8.margin=2); the flat names they had (fp8_margin) are refused, naming these.
    fp8: FP8Config = field(default_factory=FP8Config)
    nvfp4: NVFP4Config = field(default_factory=NVFP4Config)
    moe: MoEPrecisionConfig = field(default_factory=MoEPrecisionConfig)
    lowbit: LowBitConfig = field(default_factory=LowBitConfig)
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)

    def check(self) -> list[str]:
        errors = []
        for item in self.overrides:
            pattern, _, recipe = item.rpartition("=")
            if not (pattern and recipe in RECIPES):
                errors.append(f"precision.overrides: {item!r} must be 'pattern=recipe' with recipe one of "
                              f"{', '.join(RECIPES)} (e.g. 'head=bf16').")
            errors += _regex_errors("precision.overrides", [pattern], item)
        errors += self._dtype_errors()
        for section in (self.fp8, self.nvfp4, self.moe, self.lowbit, self.loss_scale):
            errors += section.check()
        return errors

    def _dtype_errors(self) -> list[str]:
        """The weight copies' dtypes must suit the recipe and each other (precision/master.py)."""
        storage = self.param_dtype if self.master_owner == "optimizer" else self.master_dtype
        compute = {"bf16": "bf16", "fp16": "fp16"}.get(self.recipe, "bf16" if self.recipe != "fp32" else "fp32")
        return failed([
            (self.recipe != "auto" or (storage == "fp32" and self.param_dtype == "fp32"),
             f"precision.recipe=auto with {self.param_dtype} parameters: auto picks fp32 on CPUs without fast "
             "bf16, and fp32 computes with fp32 parameters. Name the recipe (precision.recipe=bf16), or keep "
             "precision.param_dtype=fp32."),
            (storage == "fp32" or self.recipe != "fp32",
             f"precision.recipe=fp32 with {storage} parameters: the fp32 recipe computes in fp32. Pick a recipe "
             "that computes in low precision (bf16, fp16, fp8_*, nvfp4, mxfp4), or keep precision.param_dtype=fp32."),
            ("fp16" not in (storage, self.grad_dtype) or self.recipe == "fp16",
             f"precision: fp16 parameters or gradients (param_dtype={self.param_dtype}, grad_dtype={self.grad_dtype}) "
             "need loss scaling: use precision.recipe=fp16, or bf16 (fp32's range) for those dtypes."),
            (self.master_dtype in (self.param_dtype, "fp32"),
             f"precision.master_dtype={self.master_dtype} with param_dtype={self.param_dtype}: the master is the "
             "copy the update goes into, so it is fp32 or the parameters' own dtype. Use master_dtype=fp32 or "
             f"{self.param_dtype}."),
            (self.master_owner == "optimizer" or self.param_dtype in (self.master_dtype, compute),
             f"precision.master_owner=module keeps the parameters in master_dtype={self.master_dtype} and casts "
             f"them to the compute dtype of recipe {self.recipe} ({compute}) per GEMM, so param_dtype="
             f"{self.param_dtype} cannot hold: set param_dtype={compute}, or master_owner=optimizer for a stored "
             f"{self.param_dtype} copy."),
            (self.master_rounding == "nearest" or self.master_dtype != "fp32",
             f"precision.master_rounding={self.master_rounding} rounds a bf16/fp16 master, and master_dtype is "
             "fp32: set precision.master_dtype=bf16 (and param_dtype=bf16), or master_rounding=nearest."),
        ])
