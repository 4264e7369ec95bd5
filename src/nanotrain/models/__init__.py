"""Model zoo: blocks (attention, MLP) and the models composed from them."""

from .transformer import IGNORE_INDEX, TransformerModel

__all__ = ["IGNORE_INDEX", "TransformerModel", "build_model", "load_model"]


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


def load_model(path):
    """(model in eval mode, the checkpoint's reader) from a training checkpoint: a checkpoint folder,
    its metadata.json, or a run folder with a `latest`. Whatever layout wrote it, the tensors are
    read whole into the one-process model its config describes. The one loader of a trained model
    (sampling, conversion to Hugging Face); the reader gives the rest (its tokenizer, its step)."""
    from ..checkpoint import load_checkpoint
    from ..config import Config

    reader = load_checkpoint(path)
    cfg = Config.from_dict(reader.objects["config"], source=f"checkpoint {path}")
    model = build_model(cfg.model)
    model.load_state_dict(reader.full_state("model/"))
    return model.eval(), reader
