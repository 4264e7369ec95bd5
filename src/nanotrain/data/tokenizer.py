"""Tokenizers: text <-> token ids.

Two kinds, one small interface (vocab_size, encode, decode, to_json):

- CharTokenizer: one id per character of the corpus (nanoGPT's shakespeare_char).
  Tiny vocabulary, no training, ideal for a first run.
- BPETokenizer: byte-level BPE trained with HuggingFace `tokenizers`. Its base
  alphabet is all 256 bytes, so *any* text round-trips exactly, even characters
  never seen in training.

A tokenizer serializes to a JSON string that carries its type, so a checkpoint
can embed it and sampling works without the data folder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


class DataError(ValueError):
    """A problem with the training data: the message names the file/problem and the fix."""


# A newline with a printable, non-space ASCII character on each side is always a
# pre-token of its own for the GPT-2 byte-level regex, so cutting the text right
# after it cannot change the tokenization: encoding the pieces and concatenating
# gives exactly the ids of encoding the whole text.
_SAFE_CUT = re.compile(r"(?<=[!-~]\n)(?=[!-~])")


def text_chunks(text: str, chunk_chars: int = 1 << 20) -> Iterator[str]:
    """Split text into pieces of about chunk_chars, cut only where tokenization is unaffected.

    Why: HF tokenizers train and encode a list of ~1 MB strings in parallel and
    with bounded memory, while one multi-GB string is slow and memory-hungry.
    """
    start = 0
    while start < len(text):
        m = _SAFE_CUT.search(text, start + chunk_chars) if start + chunk_chars < len(text) else None
        end = m.start() if m else len(text)
        yield text[start:end]
        start = end


class CharTokenizer:
    """Character-level: the vocabulary is the sorted set of characters of the corpus."""

    kind = "char"

    def __init__(self, chars: str):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            unknown = sorted(set(text) - self.stoi.keys())
            shown = ", ".join(repr(c) for c in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            raise DataError(
                f"text contains {len(unknown)} character(s) not in the character vocabulary: {shown}. "
                f"A char tokenizer only knows the {self.vocab_size} characters of its training corpus: "
                "remove them from the text (e.g. the prompt), or train with data.tokenizer='bpe', "
                "which can encode any text.") from None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> str:
        return json.dumps({"type": "char", "chars": self.chars}, ensure_ascii=False)


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) backed by a HuggingFace `tokenizers.Tokenizer`."""

    kind = "bpe"

    def __init__(self, hf: Tokenizer):
        self.hf = hf

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "BPETokenizer":
        hf = Tokenizer(models.BPE())
        # add_prefix_space=False: the text is encoded exactly as written (no
        # invented leading space), so decode(encode(text)) == text.
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            # All 256 bytes from the start: no text can ever be out of vocabulary.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(text_chunks(text), trainer=trainer)
        return cls(hf)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch runs on all cores (Rust threads).
        return [e.ids for e in self.hf.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids))

    def to_json(self) -> str:
        return json.dumps({"type": "bpe", "hf": self.hf.to_str()}, ensure_ascii=False)


AnyTokenizer = CharTokenizer | BPETokenizer


def build_tokenizer(kind: str, text: str, vocab_size: int = 0) -> AnyTokenizer:
    """Train a tokenizer of the given kind on text (vocab_size is used by BPE only)."""
    if kind == "char":
        return CharTokenizer.train(text)
    if kind == "bpe":
        if vocab_size <= 256:
            raise DataError(f"data.vocab_size={vocab_size} is too small for byte-level BPE: "
                            "it needs more than 256 (the byte alphabet); 2048 to 32768 are usual.")
        return BPETokenizer.train(text, vocab_size)
    raise DataError(f"unknown tokenizer kind {kind!r}: use data.tokenizer='char' or 'bpe'.")


def tokenizer_from_json(s: str) -> AnyTokenizer:
    """Rebuild a tokenizer from its to_json() string (e.g. embedded in a checkpoint)."""
    try:
        d = json.loads(s)
        kind = d.get("type")
        if kind == "char":
            return CharTokenizer(d["chars"])
        if kind == "bpe":
            return BPETokenizer(Tokenizer.from_str(d["hf"]))
    except Exception as e:  # bad JSON, missing keys, or HF's own parse errors
        raise DataError(f"cannot read the tokenizer JSON ({type(e).__name__}: {e}). "
                        "Re-run `nanotrain prepare` to rebuild it.") from None
    raise DataError(f"unknown tokenizer type {kind!r} in the tokenizer JSON (expected 'char' or 'bpe'). "
                    "Re-run `nanotrain prepare` to rebuild it.")


def load_tokenizer(path: str | Path) -> AnyTokenizer:
    """Read a tokenizer.json written by prepare_data (save one with Path(p).write_text(tok.to_json()))."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"tokenizer file {p} does not exist. Run `nanotrain prepare` to create it.")
    return tokenizer_from_json(p.read_text(encoding="utf-8"))
