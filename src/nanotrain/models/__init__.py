"""Model zoo: blocks (attention, MLP) and the models composed from them."""

from .transformer import IGNORE_INDEX, TransformerModel

__all__ = ["IGNORE_INDEX", "TransformerModel", "build_model"]


def build_model(cfg, tp=None, ep=None):
    """Build the model named by cfg.arch (a ModelConfig with vocab_size and max_seq_len resolved),
    tensor-parallel over `tp` (a parallel.tensor_parallel.TensorParallel) and with routed experts
    split over `ep` (a parallel.expert_parallel.ExpertParallel) when given."""
    if cfg.arch == "transformer":
        if ep is not None:
            raise ValueError("parallel.ep > 1 needs a model with routed experts (model.arch='deepseek')")
        return TransformerModel(cfg, tp)
    if cfg.arch == "deepseek":
        from .deepseek import DeepSeekModel  # imported on demand: MLA and MoE are only needed here

        return DeepSeekModel(cfg, tp, ep)
    raise ValueError(f"unknown model.arch={cfg.arch!r}")
