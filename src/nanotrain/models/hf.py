"""Hugging Face interop for the Llama family: load a transformers checkpoint, save one back.

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
rms_norm_eps -> norm_eps, rope_theta -> rope_theta (transformers 5 keeps it in
rope_parameters["rope_theta"]), tie_word_embeddings -> tie_embeddings.

What we refuse (a clear ValueError naming the field): biases (attention_bias,
mlp_bias; hence Qwen2, whose q/k/v projections always have one), RoPE scaling
(rope_scaling / a rope_type other than "default": Llama 3.1's "llama3", YaRN, ...),
a head_dim other than hidden_size / num_attention_heads, an activation other than
silu, and Mistral's sliding window when it is shorter than the context.

    model = load_hf_model("path/to/hf_folder")       # fp32, CPU, eval mode
    save_hf_model(model, "path/to/out")              # AutoModelForCausalLM can load it
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ModelConfig
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
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Tensors some checkpoints carry that are not weights (old transformers saved RoPE's
# inverse frequencies as a buffer): recomputed from the config, so skipped.
_IGNORED_RE = re.compile(r"\.rotary_emb\.inv_freq$")

SUPPORTED_MODEL_TYPES = ("llama", "mistral")


# ---------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------

def hf_to_ours(name: str) -> str | None:
    """Our parameter name for an HF tensor name; None if it is not one we know."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def ours_to_hf(name: str) -> str:
    """The HF tensor name for one of our parameter names."""
    for hf, ours in _GLOBAL_NAMES.items():
        if name == ours:
            return hf
    parts = name.split(".", 2)  # "layers", "{i}", rest
    if len(parts) == 3 and parts[0] == "layers":
        for hf, ours in _LAYER_NAMES.items():
            if parts[2] == ours:
                return f"model.layers.{parts[1]}.{hf}"
    raise ValueError(f"parameter {name!r} has no Hugging Face Llama counterpart")


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------

def _rope_settings(hf: dict[str, Any]) -> tuple[float, list[str]]:
    """rope_theta and the problems with the RoPE settings. transformers 4 writes
    rope_theta + rope_scaling at the top level; transformers 5 writes rope_parameters."""
    problems = []
    theta = hf.get("rope_theta")
    scaling = hf.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "default" or set(scaling) - {"rope_type", "type", "rope_theta"}:
            problems.append(f"rope_scaling={scaling!r}: RoPE scaling (YaRN, llama3, linear, ...) is not "
                            "supported yet; only plain RoPE")
    params = hf.get("rope_parameters")
    if params:
        theta = params.get("rope_theta", theta)
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            problems.append(f"rope_parameters.rope_type={kind!r}: RoPE scaling (YaRN, llama3, linear, ...) "
                            "is not supported yet; only 'default'")
        partial = params.get("partial_rotary_factor", 1.0)
        if partial != 1.0:
            problems.append(f"rope_parameters.partial_rotary_factor={partial!r}: RoPE must rotate the whole head")
    return float(theta if theta is not None else 10000.0), problems


def model_config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
    """A ModelConfig equal to an HF Llama (or plain-RoPE, full-attention Mistral) config.json.

    Raises ValueError listing every field we cannot honour, with its value."""
    hf = hf_config
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        hint = (" (its q/k/v projections always have a bias, which this model lacks)"
                if model_type == "qwen2" else "")
        raise ValueError(f"model_type={model_type!r} is not supported{hint}: "
                         f"expected one of {', '.join(SUPPORTED_MODEL_TYPES)}")

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
    rope_theta, rope_problems = _rope_settings(hf)
    problems += rope_problems
    if model_type == "mistral":
        window = hf.get("sliding_window")
        if window is not None and window < max_pos:
            problems.append(f"sliding_window={window!r}: sliding-window attention is not supported "
                            f"(only a window >= max_position_embeddings={max_pos}, i.e. none)")
    if problems:
        raise ValueError(f"unsupported {model_type} config:\n  - " + "\n  - ".join(problems))

    return ModelConfig(
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
        rope_theta=rope_theta,
        # Llama's and Mistral's configs default to untied embeddings.
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dropout=0.0,
        bias=False,
    )


def hf_config_from_model_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A LlamaConfig-compatible config.json dict for a Llama-shaped ModelConfig."""
    problems = []
    for key, want in (("norm", "rmsnorm"), ("mlp", "swiglu"), ("pos_emb", "rope"), ("bias", False)):
        if getattr(cfg, key) != want:
            problems.append(f"model.{key}={getattr(cfg, key)!r} (a Llama needs {want!r})")
    if problems:
        raise ValueError("this model is not a Llama, cannot save it as one: " + "; ".join(problems))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_width(),
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
        "head_dim": cfg.d_model // cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # Both spellings: transformers 4 reads rope_theta/rope_scaling, 5 reads rope_parameters.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


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
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name in tensors:
                    raise ValueError(f"tensor {name!r} appears in more than one file of {folder}")
                tensors[name] = f.get_tensor(name)
    return tensors


@torch.no_grad()
def load_hf_model(folder: str | Path) -> TransformerModel:
    """A TransformerModel with the weights of an HF Llama checkpoint folder
    (config.json + safetensors), in fp32 on CPU, in eval mode."""
    folder = Path(folder)
    cfg = model_config_from_hf(json.loads((folder / "config.json").read_text()))
    model = TransformerModel(cfg)
    expected = model.state_dict()  # with tied embeddings: both tok_emb.weight and head.weight

    ours: dict[str, torch.Tensor] = {}
    unexpected = []
    for name, t in load_hf_state_dict(folder).items():
        if _IGNORED_RE.search(name):
            continue
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue  # tied: the head is the embedding, as transformers does it
        key = hf_to_ours(name)
        if key is None or key not in expected:
            unexpected.append(name)
        else:
            ours[key] = t
    if cfg.tie_embeddings and "tok_emb.weight" in ours:
        ours["head.weight"] = ours["tok_emb.weight"]
    missing = [ours_to_hf(k) for k in expected
               if k not in ours and not (cfg.tie_embeddings and k == "head.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {folder} does not match its config.json:"
                         + (f"\n  missing tensors: {', '.join(missing)}" if missing else "")
                         + (f"\n  unexpected tensors: {', '.join(unexpected)}" if unexpected else ""))
    bad_shapes = [f"{ours_to_hf(k)}: {tuple(t.shape)} in the checkpoint, {tuple(expected[k].shape)} expected"
                  for k, t in ours.items() if t.shape != expected[k].shape]
    if bad_shapes:
        raise ValueError(f"checkpoint {folder} has tensors of the wrong shape:\n  " + "\n  ".join(bad_shapes))

    model.load_state_dict({k: t.float() for k, t in ours.items()}, strict=True)
    return model.eval()


# ---------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------

@torch.no_grad()
def save_hf_model(model: TransformerModel, folder: str | Path) -> None:
    """Write config.json and model.safetensors with HF Llama names, so that
    transformers.AutoModelForCausalLM.from_pretrained(folder) loads the same model.

    Tensors keep the parameters' dtype. With tied embeddings lm_head.weight is left out,
    as transformers does (it re-ties the head to embed_tokens on load)."""
    if getattr(model, "tp", None) is not None:
        raise ValueError("save_hf_model needs the whole model: gather a tensor-parallel model first")
    cfg = model.cfg
    dtype = model.tok_emb.weight.dtype
    hf_config = hf_config_from_model_config(cfg, dtype)

    tensors = {}
    for name, t in model.state_dict().items():
        if cfg.tie_embeddings and name == "head.weight":
            continue
        # safetensors refuses tensors sharing memory and views: give each its own copy.
        tensors[ours_to_hf(name)] = t.detach().to("cpu").contiguous().clone()

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
