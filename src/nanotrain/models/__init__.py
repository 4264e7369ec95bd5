"""Model zoo: blocks (attention, MLP) and the models composed from them."""

from .transformer import IGNORE_INDEX, TransformerModel

__all__ = ["IGNORE_INDEX", "TransformerModel", "build_model"]


def build_model(cfg):
    """Build the model named by cfg.arch (a ModelConfig with vocab_size and max_seq_len resolved)."""
    if cfg.arch == "transformer":
        return TransformerModel(cfg)
    raise ValueError(f"unknown model.arch={cfg.arch!r}")
