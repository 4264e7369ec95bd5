"""`nanotrain inspect`: a model's parameters and FLOPs, from a config, before it runs."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError, ModelConfig, load_config
from .counts import KINDS, flops_per_token, meta_model, param_counts


def model_config(config: str | None, hf_config: str | None, overrides: list[str], seq_len: int | None
                 ) -> tuple[ModelConfig, int]:
    """The model config (ours, or a Hugging Face config.json: Llama family, DeepSeek-V3) and the
    sequence length, with vocab_size and max_seq_len resolved."""
    if hf_config:
        from ..models.hf import model_config_from_hf

        path = Path(hf_config)
        if not path.exists():
            raise ConfigError(f"--hf-config {path} does not exist: pass a Hugging Face config.json.")
        try:
            m = model_config_from_hf(json.loads(path.read_text()))
        except (ValueError, KeyError) as e:
            raise ConfigError(f"--hf-config {path}: {e}") from None
        seq = seq_len or m.max_seq_len
    else:
        cfg = load_config(config, overrides)
        m = cfg.model
        seq = seq_len or cfg.train.seq_len
        if not m.vocab_size:
            raise ConfigError("model.vocab_size is 0 (it comes from the tokenizer at training time): give it, "
                              "e.g. --model.vocab_size=65 for the character-level Shakespeare data.")
    m.max_seq_len = m.max_seq_len or seq
    return m, seq


def inspect_model(m: ModelConfig, seq_len: int) -> dict:
    model = meta_model(m)
    counts = param_counts(model, m)
    flops = flops_per_token(model, m, seq_len)
    return {"arch": m.arch, "seq_len": seq_len, "params_total": counts["all"]["total"],
            "params_active": counts["all"]["active"], "params_active_matmul": counts["all"]["active_matmul"],
            "params_by_kind": {k: v for k, v in counts.items() if k != "all"},
            "flops_per_token": flops["train"], "flops_per_token_prefill": flops["prefill"],
            "flops_per_token_decode": flops["decode"], "train_flops_by_kind": flops["train_per_kind"]}


def _n(x: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.2f}{unit}"
    return f"{x:.0f}"


def markdown(r: dict) -> str:
    lines = [f"# {r['arch']} model, sequence length {r['seq_len']}", "",
             f"Parameters: **{_n(r['params_total'])}** total, **{_n(r['params_active'])}** active per token "
             f"({_n(r['params_active_matmul'])} without the embedding lookup).", "",
             "| kind | total | active per token | share of total |", "| --- | ---: | ---: | ---: |"]
    for kind in KINDS:
        c = r["params_by_kind"].get(kind)
        if c:
            lines.append(f"| {kind} | {_n(c['total'])} | {_n(c['active'])} | "
                         f"{c['total'] / r['params_total']:.1%} |")
    lines += ["", "FLOPs per token (training: forward + backward, attention over the full T x T square as PaLM "
              "counts it; prefill and decode: causal positions only):", "",
              "| phase | FLOPs per token |", "| --- | ---: |",
              f"| training | {_n(r['flops_per_token'])} |",
              f"| prefill (forward) | {_n(r['flops_per_token_prefill'])} |",
              f"| decode (one token, {r['seq_len']} in context) | {_n(r['flops_per_token_decode'])} |", "",
              "| training FLOPs by kind | per token | share |", "| --- | ---: | ---: |"]
    for kind, f in sorted(r["train_flops_by_kind"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {kind} | {_n(f)} | {f / r['flops_per_token']:.1%} |")
    return "\n".join(lines) + "\n"
