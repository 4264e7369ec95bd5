"""Model zoo: blocks (attention, MLP) and the models composed from them."""

from .transformer import IGNORE_INDEX, TransformerModel

__all__ = ["IGNORE_INDEX", "TransformerModel", "build_model"]


def build_model(cfg, tp=None):
    """Build the model named by cfg.arch (a ModelConfig with vocab_size and max_seq_len resolved),
    tensor-parallel over `tp` (a parallel.tensor_parallel.TensorParallel) when given."""
    if cfg.arch == "transformer":
        return TransformerModel(cfg, tp)
    if cfg.arch == "deepseek":
        from .deepseek import DeepSeekModel  # imported on demand: MLA and MoE are only needed here

        return DeepSeekModel(cfg, tp)
    raise ValueError(f"unknown model.arch={cfg.arch!r}")
