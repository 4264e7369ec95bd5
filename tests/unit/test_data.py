"""prepare_data: files written once, reused when unchanged, clear errors before any write."""

import json
from pathlib import Path

import numpy as np
import pytest

from nanotrain.config import DataConfig
from nanotrain.data import DataError, prepare_data
from nanotrain.data.prepare import token_dtype

SHAKESPEARE = Path(__file__).resolve().parents[2] / "data" / "tinyshakespeare.txt"
TEXT = SHAKESPEARE.read_text(encoding="utf-8")[:20_000]
FILES = ["train.bin", "val.bin", "tokenizer.json", "meta.json"]


def _prep(path, seq_len=32, **kw):
    logs = []
    return prepare_data(DataConfig(path=str(path), **kw), seq_len, log=logs.append), logs


@pytest.fixture
def txt(tmp_path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def test_prepare_writes_files(txt):
    pd, logs = _prep(txt)
    assert pd.dir == txt.parent / "corpus.nanotrain" / "char"
    assert all((pd.dir / f).is_file() for f in FILES) and "prepared" in logs[0]
    train, val = pd.tokens("train"), pd.tokens("val")
    assert train.dtype == val.dtype == np.uint16 and pd.meta["dtype"] == "uint16"
    assert (len(train), len(val)) == (pd.n_train_tokens, pd.n_val_tokens) == (18_000, 2_000)
    assert pd.tokenizer.decode(np.concatenate([train, val]).tolist()) == TEXT
    meta = json.loads((pd.dir / "meta.json").read_text())
    assert meta["files"] == [{"path": "corpus.txt", "bytes": txt.stat().st_size}]


def test_bpe_prepare(txt):
    pd, _ = _prep(txt, tokenizer="bpe", vocab_size=300)
    assert pd.dir.name == "bpe-300" and pd.vocab_size == 300 == pd.tokenizer.vocab_size
    ids = np.concatenate([pd.tokens("train"), pd.tokens("val")])
    assert ids.tolist() == pd.tokenizer.encode(TEXT) and pd.tokenizer.decode(ids.tolist()) == TEXT


def test_dtype_choice():
    assert token_dtype(65) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_second_call_is_noop(txt):
    pd, _ = _prep(txt)
    mtimes = {f: (pd.dir / f).stat().st_mtime_ns for f in FILES}
    pd2, logs = _prep(txt)
    assert "data up to date" in logs[0]
    assert {f: (pd.dir / f).stat().st_mtime_ns for f in FILES} == mtimes
    assert pd2.n_train_tokens == pd.n_train_tokens and pd2.meta == pd.meta


def test_changes_reprepare(txt, tmp_path):
    pd, _ = _prep(txt)
    txt.write_text(TEXT + "more text\n", encoding="utf-8")
    pd2, logs = _prep(txt)
    assert "prepared" in logs[0] and pd2.meta["fingerprint"] != pd.meta["fingerprint"]
    # Another tokenizer goes to its own folder; with prepared_dir it replaces the old one.
    out = tmp_path / "prep"
    pd3, _ = _prep(txt, prepared_dir=str(out))
    pd4, logs = _prep(txt, prepared_dir=str(out), tokenizer="bpe", vocab_size=300)
    assert "prepared" in logs[0] and pd3.dir == pd4.dir == out and pd4.meta["tokenizer"] == "bpe"
    # A damaged preparation (wrong size) is redone, not trusted.
    with open(pd4.train_path, "ab") as f:
        f.write(b"\0\0")
    _, logs = _prep(txt, prepared_dir=str(out), tokenizer="bpe", vocab_size=300)
    assert "a token file's size is not what meta.json says: preparing again" in logs[0] and "prepared" in logs[1]


def test_folder_of_txt_files(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "b").mkdir(parents=True)
    (corpus / "b" / "two.txt").write_text(TEXT[5000:], encoding="utf-8")
    (corpus / "a.txt").write_text(TEXT[:5000], encoding="utf-8")
    (corpus / "notes.md").write_text("ignored", encoding="utf-8")
    pd, _ = _prep(corpus)
    assert pd.dir == tmp_path / "corpus.nanotrain" / "char"
    assert [f["path"] for f in pd.meta["files"]] == ["a.txt", "b/two.txt"]
    ids = np.concatenate([pd.tokens("train"), pd.tokens("val")]).tolist()
    assert pd.tokenizer.decode(ids) == TEXT[:5000] + "\n" + TEXT[5000:]


def _error(path, match, **kw):
    with pytest.raises(DataError, match=match):
        _prep(path, **kw)
    assert not list(Path(path).parent.glob("*.nanotrain")), "nothing may be written on error"


def test_missing_path(tmp_path):
    _error(tmp_path / "nope.txt", r"nope\.txt.*does not exist.*data/tinyshakespeare\.txt")


def test_folder_without_txt(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.csv").write_text("a,b\n")
    _error(tmp_path / "d", "no corpus files")


def test_empty_file(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text(TEXT)
    (tmp_path / "d" / "empty.txt").write_text("")
    _error(tmp_path / "d", r"empty\.txt is empty")


def test_unreadable_file(txt):
    txt.chmod(0)
    try:
        try:
            open(txt, "rb").close()
            pytest.skip("running as root: chmod 000 does not stop reading")
        except PermissionError:
            pass
        _error(txt, r"cannot read .*corpus\.txt: permission denied")
    finally:
        txt.chmod(0o644)


def test_unreadable_file_simulated(txt, monkeypatch):
    # Same path as above, also exercised when running as root.
    def deny(self):
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(Path, "read_bytes", deny)
    _error(txt, r"cannot read .*corpus\.txt: permission denied.*chmod")


def test_not_utf8(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf".encode() + "é au lait\n".encode("latin-1") * 100)
    _error(p, r"latin1\.txt is not valid UTF-8: byte 0xe9 at byte offset 3.*Convert the file to UTF-8")


def test_too_short(txt):
    # 20,000 chars: val split is 2,000 tokens.
    _error(txt, r"train split has 18,000 tokens and the val split 2,000.*seq_len \+ 1 = 2049.*smaller train\.seq_len",
           seq_len=2048)


def test_too_short_checked_on_reuse(txt):
    _prep(txt, seq_len=32)
    with pytest.raises(DataError, match="too short for train.seq_len=4096"):
        _prep(txt, seq_len=4096)
