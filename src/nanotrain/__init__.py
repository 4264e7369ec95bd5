"""nano-train: a learning-first distributed LLM training framework on PyTorch."""

__version__ = "0.1.0"
