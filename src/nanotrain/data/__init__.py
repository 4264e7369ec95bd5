"""Data pipeline: corpus sources, tokenizers, one-time preparation to token files, and step-indexed
batch sampling."""

from nanotrain.data.prepare import PreparedData, prepare_data
from nanotrain.data.sampler import BatchSampler
from nanotrain.data.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    DataError,
    PretrainedTokenizer,
    build_tokenizer,
    load_tokenizer,
    tokenizer_from_json,
)

__all__ = [
    "DataError", "CharTokenizer", "BPETokenizer", "PretrainedTokenizer", "build_tokenizer", "tokenizer_from_json",
    "load_tokenizer", "PreparedData", "prepare_data", "BatchSampler",
]
