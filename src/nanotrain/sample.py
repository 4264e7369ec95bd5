"""Text generation from a trained checkpoint: temperature and top-k sampling."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import tokenizer_from_json
from .models import load_model


@torch.no_grad()
def generate(model: nn.Module, ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Append max_new_tokens tokens to ids [batch, seq], one at a time.

    No KV cache: each step re-runs the (cropped) context. For the small models
    trained here that costs milliseconds and keeps the model code free of
    inference-only state."""
    max_len = model.cfg.max_seq_len
    for _ in range(max_new_tokens):
        logits = model(ids[:, -max_len:])[:, -1, :].float()
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def load_for_sampling(path: str | Path, device: str = "cpu"):
    """(model, tokenizer) from a checkpoint folder, state file, or run folder."""
    model, reader = load_model(path)  # any layout wrote it: the tensors are read whole
    return model.to(device), tokenizer_from_json(reader.tokenizer_json())


def sample_text(path: str | Path, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                top_k: int = 200, seed: int = 1337, num_samples: int = 1, device: str = "cpu") -> list[str]:
    model, tok = load_for_sampling(path, device)
    start = tok.encode(prompt) if prompt else tok.encode("\n")
    ids = torch.tensor([start] * num_samples, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, ids, max_new_tokens, temperature, top_k, gen)
    return [tok.decode(row.tolist()) for row in out]
