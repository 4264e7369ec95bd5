"""Tokenizers: text <-> token ids.

Three kinds, one small interface (vocab_size, encode, decode, to_json):

- CharTokenizer: one id per character of the corpus (nanoGPT's shakespeare_char).
  Tiny vocabulary, no training, ideal for a first run.
- BPETokenizer: byte-level BPE trained with HuggingFace `tokenizers`. Its base
  alphabet is all 256 bytes, so *any* text round-trips exactly, even characters
  never seen in training.
- PretrainedTokenizer: a model's own (a tokenizer.json, or a Hugging Face model folder), so
  that an imported model (checkpoint.init_from) reads ids that mean what it learned.

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
    def train(cls, text: str | Iterator[str]) -> "CharTokenizer":
        """On a text, or on pieces of one as they stream by (prepare's documents)."""
        chars: set[str] = set()
        for piece in [text] if isinstance(text, str) else text:
            chars.update(piece)
        return cls("".join(sorted(chars)))

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
    def train(cls, text: str | Iterator[str], vocab_size: int) -> "BPETokenizer":
        """On a text, or on pieces of one as they stream by (prepare's documents)."""
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
        hf.train_from_iterator(text_chunks(text) if isinstance(text, str) else text, trainer=trainer)
        return cls(hf)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # On all cores (Rust threads); _fast: the same ids without the character offsets.
        return [e.ids for e in self.hf.encode_batch_fast(texts)]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids))

    def to_json(self) -> str:
        return json.dumps({"type": "bpe", "hf": self.hf.to_str()}, ensure_ascii=False)


class PretrainedTokenizer:
    """A model's own tokenizer: a `tokenizer.json` (HuggingFace `tokenizers`), alone or in a
    Hugging Face model folder, whose tokenizer_config.json names the EOS (and BOS) token.

    encode() applies the tokenizer's post-processor, so a document starts with BOS where the
    model's tokenizer adds one (Llama 3 does, GPT-2 does not); prepare appends EOS after each
    document, so that the model sees where one ends and the next begins."""

    kind = "pretrained"

    def __init__(self, hf: Tokenizer, eos: str | None, name: str = ""):
        self.hf, self.eos, self.name = hf, eos, name
        self.eos_id = hf.token_to_id(eos) if eos is not None else None

    @classmethod
    def load(cls, path: str | Path) -> "PretrainedTokenizer":
        """From a tokenizer.json, or a folder holding one (and perhaps tokenizer_config.json)."""
        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            missing = "the folder has no tokenizer.json" if p.is_dir() else "no such file"
            raise DataError(f"data.tokenizer={str(path)!r}: {missing}"
                            ". Point it at a tokenizer.json (HuggingFace tokenizers' format) or a Hugging Face "
                            "model folder that has one (save_pretrained writes it), or use 'char' or 'bpe'.")
        try:
            hf = Tokenizer.from_file(str(file))
        except Exception as e:  # noqa: BLE001 (tokenizers raises its own Exception types)
            raise DataError(f"{file} is not a tokenizers tokenizer.json ({e}).") from None
        eos = _special_token(file.parent / "tokenizer_config.json", "eos_token")
        if eos is None:  # a bare tokenizer.json: the usual names of an end-of-text token
            vocab = hf.get_vocab(with_added_tokens=True)
            eos = next((t for t in ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>") if t in vocab), None)
        if eos is not None and hf.token_to_id(eos) is None:
            raise DataError(f"{file}: the EOS token {eos!r} of tokenizer_config.json is not in the vocabulary.")
        return cls(hf, eos, file.parent.name if p.is_dir() else file.stem)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch_fast(texts)]  # (no character offsets: not needed)

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        """Each document's ids (with BOS where the tokenizer adds it) and EOS after it."""
        tail = [self.eos_id] if self.eos_id is not None else []
        return [ids + tail for ids in self.encode_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        return json.dumps({"type": "pretrained", "hf": self.hf.to_str(), "eos": self.eos, "name": self.name},
                          ensure_ascii=False)

    def save_hf(self, folder: str | Path) -> list[str]:
        """The files transformers' AutoTokenizer loads: tokenizer.json (this tokenizer) and a
        tokenizer_config.json that names its fast class and EOS. Returns the file names."""
        folder = Path(folder)
        self.hf.save(str(folder / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        if self.eos is not None:
            config["eos_token"] = self.eos
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return ["tokenizer.json", "tokenizer_config.json"]


def _special_token(config: Path, key: str) -> str | None:
    """A token named by a Hugging Face tokenizer_config.json ("eos_token": "</s>" or {"content": ...})."""
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get(key)
    except ValueError as e:
        raise DataError(f"{config} is not valid JSON ({e}).") from None
    return value.get("content") if isinstance(value, dict) else value


AnyTokenizer = CharTokenizer | BPETokenizer | PretrainedTokenizer


def is_pretrained(kind: str) -> bool:
    """data.tokenizer names a tokenizer file or folder, not one to train ('char', 'bpe')."""
    return kind not in ("char", "bpe")


def build_tokenizer(kind: str, text: str | Iterator[str], vocab_size: int = 0) -> AnyTokenizer:
    """Train a tokenizer of the given kind on text (vocab_size is used by BPE only), or load the
    pretrained one that `kind` names (a tokenizer.json or a Hugging Face model folder)."""
    if kind == "char":
        return CharTokenizer.train(text)
    if kind == "bpe":
        if vocab_size <= 256:
            raise DataError(f"data.vocab_size={vocab_size} is too small for byte-level BPE: "
                            "it needs more than 256 (the byte alphabet); 2048 to 32768 are usual.")
        return BPETokenizer.train(text, vocab_size)
    return PretrainedTokenizer.load(kind)


def tokenizer_from_json(s: str) -> AnyTokenizer:
    """Rebuild a tokenizer from its to_json() string (e.g. embedded in a checkpoint)."""
    try:
        d = json.loads(s)
        kind = d.get("type")
        if kind == "char":
            return CharTokenizer(d["chars"])
        if kind == "bpe":
            return BPETokenizer(Tokenizer.from_str(d["hf"]))
        if kind == "pretrained":
            return PretrainedTokenizer(Tokenizer.from_str(d["hf"]), d.get("eos"), d.get("name", ""))
    except Exception as e:  # bad JSON, missing keys, or HF's own parse errors
        raise DataError(f"cannot read the tokenizer JSON ({type(e).__name__}: {e}). "
                        "Re-run `nanotrain prepare` to rebuild it.") from None
    raise DataError(f"unknown tokenizer type {kind!r} in the tokenizer JSON (expected 'char', 'bpe' or "
                    "'pretrained'). "
                    "Re-run `nanotrain prepare` to rebuild it.")


def load_tokenizer(path: str | Path) -> AnyTokenizer:
    """Read a tokenizer.json written by prepare_data (save one with Path(p).write_text(tok.to_json()))."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"tokenizer file {p} does not exist. Run `nanotrain prepare` to create it.")
    return tokenizer_from_json(p.read_text(encoding="utf-8"))
