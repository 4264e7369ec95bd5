"""Hugging Face interop: load a transformers checkpoint (Llama, Mistral, DeepSeek-V3), save one back.

    model = load_hf_model("path/to/hf_folder")       # fp32, CPU, eval mode
    save_hf_model(model, "path/to/out")              # AutoModelForCausalLM can load it
    convert_from_hf("hf_folder", "out")              # -> out/model.safetensors + out/nanotrain_config.json
    convert_to_hf("runs/x/checkpoints", "hf_out")    # a training checkpoint (or a convert_from_hf folder) -> HF

Only safetensors files are read and written; transformers itself is not needed.

Llama / Mistral
---------------
A TransformerModel built with norm="rmsnorm", mlp="swiglu", pos_emb="rope" and
bias=False *is* a Llama: the same pre-norm block, the same SwiGLU, the same RoPE.
Converting is therefore only a renaming of tensors (and of config fields):

    Hugging Face (LlamaForCausalLM)                     nanotrain (TransformerModel)
    --------------------------------------------------  -------------------------------
    model.embed_tokens.weight                           tok_emb.weight
    model.layers.{i}.input_layernorm.weight             layers.{i}.attn_norm.weight
    model.layers.{i}.self_attn.q_proj.weight            layers.{i}.attn.wq.weight
    model.layers.{i}.self_attn.k_proj.weight            layers.{i}.attn.wk.weight
    model.layers.{i}.self_attn.v_proj.weight            layers.{i}.attn.wv.weight
    model.layers.{i}.self_attn.o_proj.weight            layers.{i}.attn.wo.weight
    model.layers.{i}.post_attention_layernorm.weight    layers.{i}.mlp_norm.weight
    model.layers.{i}.mlp.gate_proj.weight               layers.{i}.mlp.w1.weight  (gate, through silu)
    model.layers.{i}.mlp.up_proj.weight                 layers.{i}.mlp.w3.weight  (up)
    model.layers.{i}.mlp.down_proj.weight               layers.{i}.mlp.w2.weight  (down)
    model.norm.weight                                   norm.weight
    lm_head.weight                                      head.weight  (absent when tied:
                                                        head.weight *is* tok_emb.weight)

Both sides store a linear layer's weight as [out_features, in_features] (y = x W^T),
so every tensor is copied as-is: no transpose.

Why no permutation of q_proj/k_proj? RoPE rotates pairs of channels of each head.
Meta's original Llama code pairs *neighbouring* channels (2j, 2j+1); Hugging Face's
conversion script permutes the rows of wq and wk so that its `rotate_half` can pair
channel j with channel j + head_dim/2 instead. Our rope.py uses that same
rotate_half layout, so HF's q_proj/k_proj rows already sit where we expect them.
(Converting from Meta's own checkpoints would need the permutation; from HF, none.)

Config fields map as: vocab_size, hidden_size -> d_model, num_hidden_layers -> n_layers,
num_attention_heads -> n_heads, num_key_value_heads -> n_kv_heads,
intermediate_size -> d_ff, max_position_embeddings -> max_seq_len,
rms_norm_eps -> norm_eps, tie_word_embeddings -> tie_embeddings, and RoPE (below).

What we refuse (a clear ValueError naming the field): biases (attention_bias,
mlp_bias; hence Qwen2, whose q/k/v projections always have one), a head_dim other
than hidden_size / num_attention_heads, an activation other than silu, Mistral's
sliding window when it is shorter than the context, and RoPE types other than
"default" and "yarn" (Llama 3.1's "llama3", "linear", "dynamic", "longrope", ...).

RoPE and YaRN (both families)
-----------------------------
transformers 4 writes rope_theta + rope_scaling at the top level, transformers 5 a
rope_parameters dict; like transformers 5 we read rope_scaling when it is set, else
rope_parameters. rope_type "yarn" maps to model.rope_scaling="yarn" with
factor -> rope_factor (absent: max_position_embeddings / original),
original_max_position_embeddings -> rope_original_max_seq_len, beta_fast/beta_slow ->
rope_beta_fast/rope_beta_slow (absent: 32/1), mscale/mscale_all_dim ->
rope_mscale/rope_mscale_all_dim (absent: 0, which rope.py and transformers both read
as "not given"). attention_factor and truncate=false have no ModelConfig field: refused.
We export rope_parameters (and the same dict as rope_scaling, for transformers 4).

DeepSeek-V3 (model_type "deepseek_v3" <-> arch "deepseek")
-----------------------------------------------------------
    HF model.layers.{i}.                           ours layers.{i}.
    input_layernorm / post_attention_layernorm     attn_norm / mlp_norm
    self_attn.q_proj (q_lora_rank None)            attn.wq          (rope rows reordered, below)
    self_attn.q_a_proj, q_a_layernorm, q_b_proj    attn.wq_a, attn.q_norm, attn.wq_b (wq_b: rope rows)
    self_attn.kv_a_proj_with_mqa                   attn.wkv_a       (its last qk_rope_head_dim rows: rope)
    self_attn.kv_a_layernorm, kv_b_proj, o_proj    attn.kv_norm, attn.wkv_b, attn.wo
    mlp.{gate,up,down}_proj      (i < first_k)     mlp.{w1,w3,w2}   (dense GatedMLP)
    mlp.gate.weight              (MoE layers)      mlp.router.weight
    mlp.gate.e_score_correction_bias               mlp.router.expert_bias (a buffer)
    mlp.shared_experts.{gate,up,down}_proj         mlp.shared_experts.{w1,w3,w2}
    mlp.experts.{j}.{gate,up,down}_proj.weight     mlp.experts.{w1,w3,w2}[j]  (stacked [E, ...])

save_pretrained in transformers 5 writes the per-expert names above (the layout of
DeepSeek's own checkpoints), although the module holds fused experts.gate_up_proj
[E, 2*moe_d_ff, d] (gate rows first) and experts.down_proj [E, d, moe_d_ff] in
memory; we read both layouts and write the per-expert one. Tensors of the
multi-token-prediction layers (model.layers.{n_layers..n_layers+num_nextn_predict_layers-1},
layer 61 in V3) are skipped, as transformers does (the import has mtp_depth=0); on export
a model's training-only mtp.* module is left out, with a warning.

Config: q_lora_rank (None -> 0), kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim,
v_head_dim copy across; intermediate_size -> d_ff (dense layers), moe_intermediate_size
-> moe_d_ff, num_experts_per_tok -> moe_top_k, n_routed_experts, n_shared_experts,
first_k_dense_replace, n_group, topk_group, norm_topk_prob, routed_scaling_factor copy
across; score_func is "sigmoid" (V3 hard-codes it). num_key_value_heads means nothing
for MLA (ignored; exported as num_attention_heads). bias_update_rate and aux_loss_coef
are training settings HF does not store: they keep ModelConfig's defaults.

Two things transformers does that a ModelConfig cannot say, handled here so that
models/deepseek.py stays as it is:

- rope_interleave (default true, as DeepSeek's checkpoints): the rope channels of
  q_proj/q_b_proj and kv_a_proj_with_mqa rows come in adjacent pairs. Instead of
  building MLA with rope_interleaved=True, we reorder those rows once at load time
  (rope.deinterleave's permutation: evens, then odds), which gives weights for the
  rotate-half layout that any model built from the ModelConfig alone runs correctly,
  e.g. after `nanotrain convert`. q.k is unchanged (mla.py). On export we interleave
  the rows back and write rope_interleave=true, the layout DeepSeek's checkpoints and
  other inference engines expect.
- q_a_layernorm / kv_a_layernorm use eps 1e-6 whatever rms_norm_eps says. After
  building we set `.eps = 1e-6` on each MLAttention's q_norm / kv_norm
  (`set_mla_norm_eps`); for DeepSeek-V3 itself rms_norm_eps is 1e-6 anyway. Exporting
  a model whose MLA norms use another eps warns: transformers will use 1e-6.

Refused: attention_bias, hidden_act other than silu, scoring_func other than sigmoid,
topk_method other than noaux_tc, moe_layer_freq other than 1, and quantization_config
(the published DeepSeek-V3 weights are FP8 with weight_scale_inv blocks: dequantize
them to bf16 first).
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import as_umask_allows
from ..config import Config, ModelConfig
from . import build_model, load_model
from .transformer import TransformerModel

# Per-layer names: HF suffix after "model.layers.{i}." -> ours after "layers.{i}.".
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn.wq.weight",
    "self_attn.k_proj.weight": "attn.wk.weight",
    "self_attn.v_proj.weight": "attn.wv.weight",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "mlp.gate_proj.weight": "mlp.w1.weight",
    "mlp.up_proj.weight": "mlp.w3.weight",
    "mlp.down_proj.weight": "mlp.w2.weight",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "tok_emb.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "head.weight",
}
# DeepSeek-V3: one table for every layer kind; whether a name belongs to a layer is
# decided by our model's state dict (a dense layer has no mlp.router.weight).
_DS_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "self_attn.q_proj.weight": "attn.wq.weight",
    "self_attn.q_a_proj.weight": "attn.wq_a.weight",
    "self_attn.q_a_layernorm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn.wkv_a.weight",
    "self_attn.kv_a_layernorm.weight": "attn.kv_norm.weight",
    "self_attn.kv_b_proj.weight": "attn.wkv_b.weight",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "mlp.gate_proj.weight": "mlp.w1.weight",
    "mlp.up_proj.weight": "mlp.w3.weight",
    "mlp.down_proj.weight": "mlp.w2.weight",
    "mlp.gate.weight": "mlp.router.weight",
    "mlp.gate.e_score_correction_bias": "mlp.router.expert_bias",
    "mlp.shared_experts.gate_proj.weight": "mlp.shared_experts.w1.weight",
    "mlp.shared_experts.up_proj.weight": "mlp.shared_experts.w3.weight",
    "mlp.shared_experts.down_proj.weight": "mlp.shared_experts.w2.weight",
}
_DS_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_EXPERT_PROJ = {"gate": "w1", "up": "w3", "down": "w2"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Tensors some checkpoints carry that are not weights (old transformers saved RoPE's
# inverse frequencies as a buffer): recomputed from the config, so skipped.
_IGNORED_RE = re.compile(r"\.rotary_emb\.inv_freq$")

HF_MLA_NORM_EPS = 1e-6  # transformers' DeepseekV3Attention: q_a_layernorm / kv_a_layernorm eps
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "deepseek_v3")
CONFIG_FILE = "nanotrain_config.json"  # written by convert_from_hf next to model.safetensors
WEIGHTS_FILE = "model.safetensors"


# ---------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------

def hf_to_ours(name: str) -> str | None:
    """Our parameter name for an HF Llama tensor name; None if it is not one we know."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def ours_to_hf(name: str) -> str:
    """The HF Llama tensor name for one of our parameter names."""
    for hf, ours in _GLOBAL_NAMES.items():
        if name == ours:
            return hf
    parts = name.split(".", 2)  # "layers", "{i}", rest
    if len(parts) == 3 and parts[0] == "layers":
        for hf, ours in _LAYER_NAMES.items():
            if parts[2] == ours:
                return f"model.layers.{parts[1]}.{hf}"
    raise ValueError(f"parameter {name!r} has no Hugging Face Llama counterpart")


def ds_ours_to_hf(name: str) -> str:
    """The HF DeepSeek-V3 tensor name for one of our names (stacked experts: a pattern over j)."""
    for hf, ours in _GLOBAL_NAMES.items():
        if name == ours:
            return hf
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers":
        for hf, ours in _DS_LAYER_NAMES.items():
            if parts[2] == ours:
                return f"model.layers.{parts[1]}.{hf}"
        for proj, ours in _EXPERT_PROJ.items():
            if parts[2] == f"mlp.experts.{ours}":
                return f"model.layers.{parts[1]}.mlp.experts.{{j}}.{proj}_proj.weight"
    raise ValueError(f"parameter {name!r} has no Hugging Face DeepSeek-V3 counterpart")


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------

def _rope_from_hf(hf: dict[str, Any], max_pos: int, problems: list[str]) -> dict[str, Any]:
    """ModelConfig's RoPE fields (rope_theta, and the YaRN ones) from an HF config."""
    scaling = hf.get("rope_scaling") or None
    params = scaling or hf.get("rope_parameters") or {}
    source = "rope_scaling" if scaling else "rope_parameters"
    theta = params.get("rope_theta", hf.get("rope_theta"))
    out: dict[str, Any] = {"rope_theta": float(theta if theta is not None else 10000.0)}
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        problems.append(f"{source}.partial_rotary_factor={partial!r}: RoPE must rotate the whole (rope) head")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return out
    if kind != "yarn":
        problems.append(f"{source}.rope_type={kind!r}: only plain RoPE ('default') and YaRN ('yarn') are "
                        f"supported, not {kind!r} (Llama 3.1's 'llama3', 'linear', 'dynamic', 'longrope', ...)")
        return out
    # transformers gives a top-level original_max_position_embeddings priority (Phi-3 writes it there).
    original = hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") or max_pos
    factor = params.get("factor")
    if factor is None:
        factor = max_pos / original
    if factor < 1:
        problems.append(f"{source}.factor={factor!r}: YaRN's factor must be >= 1")
    if params.get("attention_factor") is not None:
        problems.append(f"{source}.attention_factor={params['attention_factor']!r}: an explicit YaRN attention "
                        "factor is not supported (only the one derived from factor, mscale, mscale_all_dim)")
    if params.get("truncate", True) is not True:
        problems.append(f"{source}.truncate={params['truncate']!r}: only YaRN with a truncated correction range")
    out.update(rope_scaling="yarn", rope_factor=float(factor), rope_original_max_seq_len=int(original),
               rope_beta_fast=float(params.get("beta_fast") or 32), rope_beta_slow=float(params.get("beta_slow") or 1),
               # Absent means "not given" to transformers; 0 means the same to rope.py and mla.py.
               rope_mscale=float(params.get("mscale") or 0.0),
               rope_mscale_all_dim=float(params.get("mscale_all_dim") or 0.0))
    return out


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "yarn":
        params.update(rope_type="yarn", factor=cfg.rope_factor,
                      original_max_position_embeddings=cfg.rope_original_max_seq_len or cfg.max_seq_len,
                      beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow)
        if cfg.rope_mscale:
            params["mscale"] = cfg.rope_mscale
        if cfg.rope_mscale_all_dim:
            params["mscale_all_dim"] = cfg.rope_mscale_all_dim
    elif cfg.rope_scaling != "none":
        raise ValueError(f"model.rope_scaling={cfg.rope_scaling!r} has no Hugging Face counterpart here")
    return params


def _missing_keys(hf: dict[str, Any], keys: tuple[str, ...], model_type: str) -> None:
    """The sizes a config.json must give (every one an integer), checked before they are read: a
    hand-written or truncated file gets a named error, not a KeyError."""
    missing = [k for k in keys if hf.get(k) is None]
    if missing:
        raise ValueError(f"{model_type} config lacks required fields: {', '.join(missing)}. Add them "
                         "(transformers' save_pretrained writes them all).")
    wrong = [f"{k}={hf[k]!r}" for k in keys if isinstance(hf[k], bool) or not isinstance(hf[k], int)]
    if wrong:
        raise ValueError(f"{model_type} config: {', '.join(wrong)}: these sizes must be integers.")


def model_config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
    """A ModelConfig equal to an HF config.json: Llama, plain full-attention Mistral, or DeepSeek-V3.

    Raises ValueError listing every field we cannot honour, with its value."""
    hf = hf_config
    if not isinstance(hf, dict):
        raise ValueError(f"the config must hold one JSON object (a Hugging Face model config), not a "
                         f"{type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        hint = (" (its q/k/v projections always have a bias, which this model lacks)"
                if model_type == "qwen2" else "")
        raise ValueError(f"model_type={model_type!r} is not supported{hint}: "
                         f"expected one of {', '.join(SUPPORTED_MODEL_TYPES)}")
    if model_type == "deepseek_v3":
        return _checked(_deepseek_config_from_hf(hf), model_type)

    _missing_keys(hf, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"),
                  model_type)
    d_model = hf["hidden_size"]
    n_heads = hf["num_attention_heads"]
    n_kv_heads = hf.get("num_key_value_heads") or n_heads
    max_pos = hf.get("max_position_embeddings", 2048)
    problems = []
    if hf.get("attention_bias", False):
        problems.append(f"attention_bias={hf['attention_bias']!r}: attention projections without bias only")
    if hf.get("mlp_bias", False):
        problems.append(f"mlp_bias={hf['mlp_bias']!r}: MLP projections without bias only")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        problems.append(f"hidden_act={act!r}: the gated MLP must be SwiGLU ('silu')")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * n_heads != d_model:
        problems.append(f"head_dim={head_dim!r}: must equal hidden_size / num_attention_heads = "
                        f"{d_model}/{n_heads}")
    rope = _rope_from_hf(hf, max_pos, problems)
    if model_type == "mistral":
        window = hf.get("sliding_window")
        if window is not None and window < max_pos:
            problems.append(f"sliding_window={window!r}: sliding-window attention is not supported "
                            f"(only a window >= max_position_embeddings={max_pos}, i.e. none)")
    if problems:
        raise ValueError(f"unsupported {model_type} config:\n  - " + "\n  - ".join(problems))

    return _checked(ModelConfig(
        arch="transformer",
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        d_ff=hf["intermediate_size"],
        max_seq_len=max_pos,
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        mlp="swiglu",
        pos_emb="rope",
        # Llama's and Mistral's configs default to untied embeddings.
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dropout=0.0,
        bias=False,
        **rope,
    ), model_type)


# Our ModelConfig's fields under their Hugging Face names, to say which key of config.json is wrong.
HF_NAMES = {"d_model": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
            "n_kv_heads": "num_key_value_heads", "d_ff": "intermediate_size", "max_seq_len": "max_position_embeddings",
            "norm_eps": "rms_norm_eps", "moe_top_k": "num_experts_per_tok", "moe_d_ff": "moe_intermediate_size",
            "vocab_size": "vocab_size", "kv_lora_rank": "kv_lora_rank", "q_lora_rank": "q_lora_rank",
            "qk_nope_head_dim": "qk_nope_head_dim", "qk_rope_head_dim": "qk_rope_head_dim",
            "v_head_dim": "v_head_dim", "n_routed_experts": "n_routed_experts",
            "n_shared_experts": "n_shared_experts", "first_k_dense_replace": "first_k_dense_replace",
            "n_group": "n_group", "topk_group": "topk_group"}


def _checked(cfg: ModelConfig, model_type: str) -> ModelConfig:
    """cfg, if our own model checks (ModelConfig.check: positive sizes, heads dividing the width, ...)
    accept it; else ValueError naming the config.json keys (hidden_size=64 with 5 heads: transformers
    refuses it too), not our names for them."""
    problems = cfg.check()
    if problems:
        def hf_name(m: re.Match) -> str:
            return HF_NAMES.get(m.group(1), f"model.{m.group(1)}")
        problems = [re.sub(r"model\.([a-z_]+)", hf_name, p) for p in problems]
        raise ValueError(f"unsupported {model_type} config:\n  - " + "\n  - ".join(problems))
    return cfg


def _deepseek_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    _missing_keys(hf, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                       "moe_intermediate_size", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                       "v_head_dim", "n_routed_experts", "num_experts_per_tok"), "deepseek_v3")
    max_pos = hf.get("max_position_embeddings", 4096)
    problems = []
    if hf.get("attention_bias", False):
        problems.append(f"attention_bias={hf['attention_bias']!r}: MLA projections without bias only")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        problems.append(f"hidden_act={act!r}: the experts must be SwiGLU ('silu')")
    for key, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("moe_layer_freq", 1)):
        if hf.get(key, want) != want:
            problems.append(f"{key}={hf[key]!r}: DeepSeek-V3 routing needs {want!r}")
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        problems.append(f"quantization_config (quant_method={method!r}): quantized weights are not read; "
                        "dequantize the checkpoint to bf16/fp32 first")
    rope = _rope_from_hf(hf, max_pos, problems)
    if problems:
        raise ValueError("unsupported deepseek_v3 config:\n  - " + "\n  - ".join(problems))
    return ModelConfig(
        arch="deepseek",
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        d_ff=hf["intermediate_size"],
        max_seq_len=max_pos,
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        mlp="swiglu",
        pos_emb="rope",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dropout=0.0,
        bias=False,
        q_lora_rank=hf.get("q_lora_rank") or 0,
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        first_k_dense_replace=hf.get("first_k_dense_replace", 3) or 0,
        n_routed_experts=hf["n_routed_experts"],
        n_shared_experts=hf.get("n_shared_experts", 1) or 0,
        moe_top_k=hf["num_experts_per_tok"],
        moe_d_ff=hf["moe_intermediate_size"],
        n_group=hf.get("n_group", 8) or 1,
        topk_group=hf.get("topk_group", 4) or 1,
        score_func="sigmoid",
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 2.5)),
        **rope,
    )


def _check_exportable(cfg: ModelConfig, family: str, keys: tuple[str, ...]) -> None:
    wants = {"norm": "rmsnorm", "mlp": "swiglu", "pos_emb": "rope", "bias": False}
    problems = [f"model.{k}={getattr(cfg, k)!r} (a {family} needs {wants[k]!r})"
                for k in keys if getattr(cfg, k) != wants[k]]
    if problems:
        hint = " (configs/shakespeare_llama.toml trains a small Llama)" if family == "Llama" else ""
        raise ValueError(f"this model is not a {family}, cannot save it as one: " + "; ".join(problems) + hint)


def hf_config_from_model_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A config.json dict for a ModelConfig: LlamaConfig (arch "transformer") or DeepseekV3Config ("deepseek")."""
    rope = _rope_to_hf(cfg)
    common = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # Both spellings: transformers 4 reads rope_theta/rope_scaling, 5 reads rope_parameters.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(rope) if rope["rope_type"] != "default" else None,
        "rope_parameters": rope,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if cfg.arch == "deepseek":
        # The final norm follows model.norm; pos_emb="learned" would add a table HF lacks.
        _check_exportable(cfg, "DeepSeek-V3", ("norm", "pos_emb", "bias"))
        if cfg.score_func != "sigmoid":
            raise ValueError(f"model.score_func={cfg.score_func!r}: DeepSeek-V3 in transformers routes "
                             "with sigmoid scores only")
        return {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            **common,
            "num_key_value_heads": cfg.n_heads,  # unused by MLA; transformers divides by it
            "intermediate_size": cfg.ffn_width(),
            "moe_intermediate_size": cfg.moe_d_ff,
            "q_lora_rank": cfg.q_lora_rank or None,
            "kv_lora_rank": cfg.kv_lora_rank,
            "qk_nope_head_dim": cfg.qk_nope_head_dim,
            "qk_rope_head_dim": cfg.qk_rope_head_dim,
            "v_head_dim": cfg.v_head_dim,
            "first_k_dense_replace": cfg.first_k_dense_replace,
            "n_routed_experts": cfg.n_routed_experts,
            "n_shared_experts": cfg.n_shared_experts,
            "num_experts_per_tok": cfg.moe_top_k,
            "n_group": cfg.n_group,
            "topk_group": cfg.topk_group,
            "norm_topk_prob": cfg.norm_topk_prob,
            "routed_scaling_factor": cfg.routed_scaling_factor,
            "rope_interleave": True,  # save_hf_model interleaves the rope rows back
            "num_nextn_predict_layers": 0,  # no multi-token-prediction weights
        }
    _check_exportable(cfg, "Llama", ("norm", "mlp", "pos_emb", "bias"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **common,
        "intermediate_size": cfg.ffn_width(),
        "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
        "head_dim": cfg.d_model // cfg.n_heads,
        "mlp_bias": False,
    }


# ---------------------------------------------------------------------------
# DeepSeek-V3 weight layout: rope row order, stacked experts, MLA norm eps
# ---------------------------------------------------------------------------

def _reorder_rope_rows(w: torch.Tensor, block: int, start: int, rope_dim: int, to_interleaved: bool) -> torch.Tensor:
    """Rows of w come in blocks of `block` (one per head); rows [start, start+rope_dim) of each
    block are rope channels. Interleaved -> rotate-half: evens first, then odds (rope.deinterleave);
    to_interleaved undoes it."""
    perm = torch.cat([torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)])
    if to_interleaved:
        perm = torch.argsort(perm)
    w = w.clone()
    v = w.view(-1, block, *w.shape[1:])
    v[:, start:start + rope_dim] = v[:, start:start + rope_dim][:, perm]
    return w


def _reorder_mla_rope(state: dict[str, torch.Tensor], cfg: ModelConfig, to_interleaved: bool) -> None:
    """In place on a state dict (ours): the rope rows of every wq / wq_b and wkv_a."""
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    for i in range(cfg.n_layers):
        for name in ("wq", "wq_b"):
            key = f"layers.{i}.attn.{name}.weight"
            if key in state:
                state[key] = _reorder_rope_rows(state[key], qk, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                                                to_interleaved)
        key = f"layers.{i}.attn.wkv_a.weight"
        if key in state:
            state[key] = _reorder_rope_rows(state[key], cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.kv_lora_rank,
                                            cfg.qk_rope_head_dim, to_interleaved)


def set_mla_norm_eps(model: torch.nn.Module, eps: float = HF_MLA_NORM_EPS) -> None:
    """Give every MLAttention's q_norm / kv_norm this eps (transformers hard-codes 1e-6)."""
    from .mla import MLAttention

    for module in model.modules():
        if isinstance(module, MLAttention):
            for norm in (module.q_norm, module.kv_norm):
                if norm is not None:
                    norm.eps = eps


def _mla_norm_eps(model: torch.nn.Module) -> set[float]:
    from .mla import MLAttention

    return {norm.eps for m in model.modules() if isinstance(m, MLAttention)
            for norm in (m.q_norm, m.kv_norm) if norm is not None}


def _deepseek_tensors_to_ours(tensors: dict[str, torch.Tensor], cfg: ModelConfig, hf_cfg: dict[str, Any],
                              expected: dict[str, torch.Tensor]):
    """(ours, unexpected HF names, missing HF names of partly present stacked experts, keys they cover)."""
    n_mtp = hf_cfg.get("num_nextn_predict_layers") or 0
    ours: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    experts: dict[str, dict[int, torch.Tensor]] = {}  # our stacked key -> {j: HF expert j}
    for name, t in tensors.items():
        if _IGNORED_RE.search(name) or (cfg.tie_embeddings and name == "lm_head.weight"):
            continue
        if name in _GLOBAL_NAMES:
            key = _GLOBAL_NAMES[name]
        elif m := _LAYER_RE.match(name):
            i, rest = int(m.group(1)), m.group(2)
            if cfg.n_layers <= i < cfg.n_layers + n_mtp:
                continue  # a multi-token-prediction module: not modelled (transformers skips it too)
            if cfg.n_shared_experts == 0 and rest.startswith("mlp.shared_experts.") and t.numel() == 0:
                continue  # transformers builds a zero-width shared expert when there is none
            if e := _DS_EXPERT_RE.match(rest):
                key = f"layers.{i}.mlp.experts.{_EXPERT_PROJ[e.group(2)]}"
                if key in expected and int(e.group(1)) < cfg.n_routed_experts:
                    experts.setdefault(key, {})[int(e.group(1))] = t
                else:
                    unexpected.append(name)
                continue
            if rest == "mlp.experts.gate_up_proj" and f"layers.{i}.mlp.experts.w1" in expected and t.dim() == 3:
                ours[f"layers.{i}.mlp.experts.w1"], ours[f"layers.{i}.mlp.experts.w3"] = t.chunk(2, dim=1)
                continue
            if rest == "mlp.experts.down_proj":
                key = f"layers.{i}.mlp.experts.w2"
            else:
                key = f"layers.{i}.{_DS_LAYER_NAMES[rest]}" if rest in _DS_LAYER_NAMES else None
        else:
            key = None
        if key is None or key not in expected or key in ours:
            unexpected.append(name)
        else:
            ours[key] = t
    missing, covered = [], set()
    for key, by_j in experts.items():
        if key in ours:  # fused and per-expert tensors both present
            unexpected += [ds_ours_to_hf(key).format(j=j) for j in sorted(by_j)]
            continue
        absent = [j for j in range(cfg.n_routed_experts) if j not in by_j]
        if absent:
            missing += [ds_ours_to_hf(key).format(j=j) for j in absent]
            covered.add(key)
        else:
            ours[key] = torch.stack([by_j[j] for j in range(cfg.n_routed_experts)])
    return ours, unexpected, missing, covered


def _deepseek_state_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    state = dict(state)
    _reorder_mla_rope(state, cfg, to_interleaved=True)
    out = {}
    for key, t in state.items():
        hf = ds_ours_to_hf(key)
        if "{j}" in hf:
            for j, tj in enumerate(t.unbind(0)):
                out[hf.format(j=j)] = tj
        else:
            if key.endswith(("mlp.router.weight", "mlp.router.expert_bias")):
                t = t.float()  # transformers keeps the router in fp32 (_keep_in_fp32_modules_strict)
            out[hf] = t
    return out


# ---------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------

def _safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's files: those named by model.safetensors.index.json (sharded), else every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / f for f in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {folder} (PyTorch .bin checkpoints are not read)")
    return files


def load_hf_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF safetensors checkpoint (sharded or not), by its HF name, as stored."""
    tensors: dict[str, torch.Tensor] = {}
    for path in _safetensors_files(Path(folder)):
        with _open_safetensors(path) as f:
            for name in f.keys():
                if name in tensors:
                    raise ValueError(f"tensor {name!r} appears in more than one file of {folder}")
                tensors[name] = _read_tensor(f, name, path)
    return tensors


def _open_safetensors(path: Path):
    """safe_open, with a damaged file (truncated by an interrupted download, not safetensors at
    all) named as a ValueError instead of safetensors' own error."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}): it may be truncated (an "
                         "interrupted download or copy). Download or convert it again.") from None


def _read_tensor(f, name: str, path: Path) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except SafetensorError as e:
        raise ValueError(f"{path}: tensor {name!r} cannot be read ({e}): the file may be truncated. Download or "
                         "convert it again.") from None


def _llama_tensors_to_ours(tensors: dict[str, torch.Tensor], cfg: ModelConfig, expected: dict[str, torch.Tensor]):
    ours: dict[str, torch.Tensor] = {}
    unexpected = []
    for name, t in tensors.items():
        if _IGNORED_RE.search(name):
            continue
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue  # tied: the head is the embedding, as transformers does it
        key = hf_to_ours(name)
        if key is None or key not in expected:
            unexpected.append(name)
        else:
            ours[key] = t
    return ours, unexpected


@torch.no_grad()
def load_hf_model(folder: str | Path) -> TransformerModel:
    """Our model (TransformerModel for Llama/Mistral, DeepSeekModel for DeepSeek-V3) with the
    weights of an HF checkpoint folder (config.json + safetensors), in fp32 on CPU, in eval mode."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json: pass a Hugging Face model folder (config.json and "
                         "*.safetensors, as save_pretrained writes it).")
    try:
        hf_cfg = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder / 'config.json'} is not valid JSON ({e}).") from None
    try:
        cfg = model_config_from_hf(hf_cfg)
    except ValueError as e:  # name the file: convert and init_from only name the folder
        raise ValueError(f"{folder / 'config.json'}: {e}") from None
    model = build_model(cfg)
    expected = model.state_dict()  # with tied embeddings: both tok_emb.weight and head.weight
    tensors = load_hf_state_dict(folder)
    if cfg.arch == "deepseek":
        ours, unexpected, missing, covered = _deepseek_tensors_to_ours(tensors, cfg, hf_cfg, expected)
        name_of = ds_ours_to_hf
    else:
        (ours, unexpected), missing, covered = _llama_tensors_to_ours(tensors, cfg, expected), [], set()
        name_of = ours_to_hf
    if cfg.tie_embeddings and "tok_emb.weight" in ours:
        ours["head.weight"] = ours["tok_emb.weight"]
    missing = [name_of(k) for k in expected if k not in ours and k not in covered
               and not (cfg.tie_embeddings and k == "head.weight")] + missing
    if missing or unexpected:
        raise ValueError(f"checkpoint {folder} does not match its config.json:"
                         + (f"\n  missing tensors: {', '.join(missing)}" if missing else "")
                         + (f"\n  unexpected tensors: {', '.join(unexpected)}" if unexpected else ""))
    bad_shapes = [f"{name_of(k)}: {tuple(t.shape)} in the checkpoint, {tuple(expected[k].shape)} expected"
                  for k, t in ours.items() if t.shape != expected[k].shape]
    if bad_shapes:
        raise ValueError(f"checkpoint {folder} has tensors of the wrong shape:\n  " + "\n  ".join(bad_shapes))

    ours = {k: t.float() for k, t in ours.items()}
    if cfg.arch == "deepseek" and hf_cfg.get("rope_interleave", True):
        _reorder_mla_rope(ours, cfg, to_interleaved=False)
    model.load_state_dict(ours, strict=True)
    if cfg.arch == "deepseek":
        set_mla_norm_eps(model)
    return model.eval()


# ---------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------

@torch.no_grad()
def save_hf_model(model: TransformerModel, folder: str | Path) -> None:
    """Write config.json and model.safetensors with HF names (LlamaForCausalLM or
    DeepseekV3ForCausalLM), so that transformers.AutoModelForCausalLM.from_pretrained(folder)
    loads the same model.

    Tensors keep the parameters' dtype (the DeepSeek router: fp32). With tied embeddings
    lm_head.weight is left out, as transformers does (it re-ties the head on load)."""
    if model.tp is not None:
        raise ValueError("save_hf_model needs the whole model: gather a tensor-parallel model first")
    cfg = model.cfg
    dtype = model.tok_emb.weight.dtype
    hf_config = hf_config_from_model_config(cfg, dtype)
    state = {name: t.detach().to("cpu") for name, t in model.state_dict().items()
             if not (cfg.tie_embeddings and name == "head.weight")}
    if cfg.arch == "deepseek":
        mtp = [name for name in state if name.startswith("mtp.")]
        if mtp:
            warnings.warn(f"the multi-token-prediction module ({len(mtp)} tensors, mtp.*) is training-only and "
                          "is not exported: num_nextn_predict_layers=0", stacklevel=2)
            state = {name: t for name, t in state.items() if not name.startswith("mtp.")}
        eps = _mla_norm_eps(model) - {HF_MLA_NORM_EPS}
        if eps:
            warnings.warn(f"MLA q_norm/kv_norm use eps {sorted(eps)}, transformers uses {HF_MLA_NORM_EPS}: "
                          "the exported model's logits will differ slightly", stacklevel=2)
        hf_state = _deepseek_state_to_hf(state, cfg)
    else:
        hf_state = {ours_to_hf(name): t for name, t in state.items()}
    # safetensors refuses tensors sharing memory and views: give each its own copy.
    tensors = {name: t.contiguous().clone() for name, t in hf_state.items()}

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    as_umask_allows(folder / WEIGHTS_FILE)


# ---------------------------------------------------------------------------
# Convert (the `nanotrain convert` subcommand)
# ---------------------------------------------------------------------------

@torch.no_grad()
def convert_from_hf(hf_folder: str | Path, out_dir: str | Path) -> TransformerModel:
    """HF checkpoint folder -> out_dir/model.safetensors (our parameter names, fp32) and
    out_dir/nanotrain_config.json ({"model": ModelConfig fields}: Config.from_dict reads it).

    Not a training checkpoint (no optimizer, step or tokenizer: an HF tokenizer.json is not
    our tokenizer format), so `nanotrain sample` cannot use it; load_converted and
    `nanotrain convert --to-hf` can. MLA's q/kv norm eps, which a ModelConfig cannot hold,
    rides in the safetensors metadata and load_converted restores it."""
    model = load_hf_model(hf_folder)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: t.contiguous().clone() for k, t in model.state_dict().items()
             if not (model.cfg.tie_embeddings and k == "head.weight")}
    metadata = {"format": "pt", "nanotrain_source": str(hf_folder)}
    if model.cfg.arch == "deepseek":
        metadata["mla_norm_eps"] = repr(HF_MLA_NORM_EPS)
    save_file(state, str(out / WEIGHTS_FILE), metadata=metadata)
    as_umask_allows(out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps({"model": dataclasses.asdict(model.cfg)}, indent=2) + "\n")
    return model


@torch.no_grad()
def load_converted(folder: str | Path) -> TransformerModel:
    """The model convert_from_hf wrote (fp32, CPU, eval mode)."""
    folder = Path(folder)
    cfg = Config.from_dict(json.loads((folder / CONFIG_FILE).read_text()), source=str(folder / CONFIG_FILE)).model
    model = build_model(cfg)
    with _open_safetensors(folder / WEIGHTS_FILE) as f:
        state = {k: _read_tensor(f, k, folder / WEIGHTS_FILE) for k in f.keys()}
        metadata = f.metadata() or {}
    if cfg.tie_embeddings and "tok_emb.weight" in state:
        state["head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, strict=True)
    if "mla_norm_eps" in metadata:
        set_mla_norm_eps(model, float(metadata["mla_norm_eps"]))
    return model.eval()


def convert_to_hf(path: str | Path, out_dir: str | Path) -> TransformerModel:
    """A nano-train training checkpoint, or a folder written by convert_from_hf -> an HF folder.
    A checkpoint trained with a model's own tokenizer (data.tokenizer: a tokenizer.json or model
    folder) exports it too, so that AutoTokenizer loads the folder as AutoModelForCausalLM does."""
    from ..checkpoint.manager import resolve_checkpoint
    from ..checkpoint.storage import TOKENIZER
    from ..data.tokenizer import PretrainedTokenizer, tokenizer_from_json

    path = Path(path)
    model = load_converted(path) if (path / CONFIG_FILE).is_file() else load_model(path)[0]
    save_hf_model(model, out_dir)
    if (path / CONFIG_FILE).is_file():
        return model
    saved = Path(resolve_checkpoint(path)) / TOKENIZER
    if saved.is_file():
        tok = tokenizer_from_json(saved.read_text(encoding="utf-8"))
        if isinstance(tok, PretrainedTokenizer):
            tok.save_hf(out_dir)
    return model


def load_any(path: str | Path) -> TransformerModel:
    """The model in a Hugging Face folder, a convert_from_hf folder or a training checkpoint."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return load_converted(path)
    if (path / "config.json").is_file():
        return load_hf_model(path)
    return load_model(path)[0]


IGNORED_FOR_INIT = ("dropout", "init_std")  # training settings, not the weights' shape or meaning


@torch.no_grad()
def init_from(model: torch.nn.Module, cfg: ModelConfig, path: str | Path, groups) -> None:
    """Load the weights at `path` into `model` (this rank's shards and layers of it: the
    names are the single-process ones), after checking that they describe the same model."""
    from ..checkpoint import load_full_model_state

    try:
        source = load_any(path)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"checkpoint.init_from={path}: cannot read weights there ({e}). Point it at a Hugging "
                         "Face folder, a `nanotrain convert --from-hf` folder or a training checkpoint.") from None
    def resolved(c: ModelConfig) -> dict[str, Any]:  # 0 means "the usual value" for these two
        return {**dataclasses.asdict(c), "n_kv_heads": c.n_kv_heads or c.n_heads, "d_ff": c.ffn_width()}

    mine, theirs = resolved(cfg), resolved(source.cfg)
    ignored = IGNORED_FOR_INIT + (("max_seq_len",) if cfg.pos_emb == "rope" else ())  # RoPE has no weights per position
    diffs = [f"model.{k}: weights have {theirs[k]!r}, config has {mine[k]!r}" for k in mine
             if k not in ignored and mine[k] != theirs.get(k)]
    if diffs:
        raise ValueError(f"checkpoint.init_from={path} holds a different model:\n  - " + "\n  - ".join(diffs)
                         + "\nSet these model.* values to the weights' (or drop init_from).")
    load_full_model_state(model, source.state_dict())
    eps = _mla_norm_eps(source)
    if eps:  # DeepSeek-V3's q/kv norm eps (a ModelConfig cannot hold it) follows the weights
        set_mla_norm_eps(model, eps.pop())
