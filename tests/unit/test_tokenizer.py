"""Tokenizers: exact round trips, JSON round trips, clear errors."""

from pathlib import Path

import pytest

from nanotrain.data import (BPETokenizer, CharTokenizer, DataError, build_tokenizer, load_tokenizer,
                            tokenizer_from_json)
from nanotrain.data.tokenizer import text_chunks

SHAKESPEARE = Path(__file__).resolve().parents[2] / "data" / "tinyshakespeare.txt"

SAMPLES = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "héllo wörld — naïve café, 日本語, emoji 🙂👍🏽, Ωμέγα",
    "  leading and trailing spaces  ",
    "\t tabs\tand\r\nwindows newlines\r\n\n\n  \n",
    "\n",
    "",
]


@pytest.fixture(scope="module")
def corpus() -> str:
    return SHAKESPEARE.read_text(encoding="utf-8")[:100_000]


@pytest.fixture(scope="module")
def bpe(corpus) -> BPETokenizer:
    return build_tokenizer("bpe", corpus, vocab_size=350)


def test_char_round_trip():
    tok = build_tokenizer("char", "".join(SAMPLES), 0)
    assert isinstance(tok, CharTokenizer)
    for s in SAMPLES:
        ids = tok.encode(s)
        assert len(ids) == len(s) and tok.decode(ids) == s


def test_bpe_round_trip_any_text(bpe):
    # Byte-level: characters never seen in training (CJK, emoji) still round-trip.
    assert bpe.vocab_size == 350
    for s in SAMPLES:
        assert bpe.decode(bpe.encode(s)) == s
    assert len(bpe.encode(SAMPLES[0])) < len(SAMPLES[0])  # it learned merges


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_json_round_trip(kind, corpus, bpe, tmp_path):
    tok = bpe if kind == "bpe" else build_tokenizer("char", corpus, 0)
    again = tokenizer_from_json(tok.to_json())
    p = tmp_path / "tokenizer.json"
    p.write_text(tok.to_json(), encoding="utf-8")
    from_file = load_tokenizer(p)
    for t in (again, from_file):
        assert type(t) is type(tok) and t.vocab_size == tok.vocab_size
        assert t.encode(corpus[:5000]) == tok.encode(corpus[:5000])


def test_char_tinyshakespeare_has_65_symbols():
    tok = build_tokenizer("char", SHAKESPEARE.read_text(encoding="utf-8"), 0)
    assert tok.vocab_size == 65


def test_char_unknown_character_error():
    tok = CharTokenizer.train("abc \n")
    with pytest.raises(DataError, match=r"2 character\(s\).*'Z'.*'é'.*bpe"):
        tok.encode("a Zébc")


def test_chunked_encoding_is_exact(bpe, corpus):
    # prepare_data encodes in pieces; the cut points must not change a single id.
    chunks = list(text_chunks(corpus, chunk_chars=2000))
    assert len(chunks) > 10 and "".join(chunks) == corpus
    assert [i for ids in bpe.encode_batch(chunks) for i in ids] == bpe.encode(corpus)


def test_bad_json_and_kind():
    with pytest.raises(DataError, match="unknown tokenizer type"):
        tokenizer_from_json('{"type": "wordpiece"}')
    with pytest.raises(DataError, match="cannot read the tokenizer JSON"):
        tokenizer_from_json("not json")
    with pytest.raises(DataError, match="data.tokenizer"):
        build_tokenizer("words", "abc", 0)
    with pytest.raises(DataError, match="more than 256"):
        build_tokenizer("bpe", "abc", 200)
