"""Monitoring: sinks, console progress, loss plot, FLOPs accounting."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from nanotrain.monitoring import (
    ConsoleProgress,
    JSONLSink,
    MetricsLogger,
    NullLogger,
    TensorBoardSink,
    build_logger,
    mfu,
    plot_loss_curve,
    tensorboard_tag,
    transformer_flops_per_token,
)


# ---------------------------------------------------------------------------
# Sinks
# ---------------------------------------------------------------------------

def test_jsonl_appends_across_sinks(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    a = JSONLSink(path)
    a.log(1, {"loss": 2.5, "lr": 1e-3})
    a.log(2, {"loss": torch.tensor(2.25)})  # 0-d tensors become plain numbers
    a.close()
    b = JSONLSink(path)  # a resumed run opens the same file
    b.log(2, {"loss": 2.0, "val_loss": 2.1})
    b.close()
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert recs == [{"step": 1, "loss": 2.5, "lr": 1e-3}, {"step": 2, "loss": 2.25},
                    {"step": 2, "loss": 2.0, "val_loss": 2.1}]


def test_jsonl_flushes_each_write(tmp_path):
    sink = JSONLSink(tmp_path / "m.jsonl")
    sink.log(7, {"loss": 1.0})
    # Readable before close: a crashed run keeps what it logged.
    assert json.loads((tmp_path / "m.jsonl").read_text()) == {"step": 7, "loss": 1.0}
    sink.close()


def test_tensorboard_tags():
    assert tensorboard_tag("loss") == "train/loss"
    assert tensorboard_tag("val_loss") == "val/loss"
    assert tensorboard_tag("sys/mem_gb") == "sys/mem_gb"


def test_tensorboard_sink_roundtrip(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(tmp_path / "tb")
    sink.log(10, {"loss": 3.0, "lr": 0.5, "note": "skipped"})
    sink.log(20, {"loss": 2.0, "val_loss": 2.5, "moe/layer1/tokens_per_expert": [7, 9]})
    sink.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["moe/layer1/tokens_per_expert/0", "moe/layer1/tokens_per_expert/1",
                                             "train/loss", "train/lr", "val/loss"]
    assert [(e.step, e.value) for e in acc.Scalars("moe/layer1/tokens_per_expert/1")] == [(20, 9.0)]
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(10, 3.0), (20, 2.0)]
    assert [(e.step, e.value) for e in acc.Scalars("train/lr")] == [(10, 0.5)]
    assert [(e.step, e.value) for e in acc.Scalars("val/loss")] == [(20, 2.5)]


# ---------------------------------------------------------------------------
# Console progress and the logger
# ---------------------------------------------------------------------------

def test_console_plain(capsys):
    p = ConsoleProgress(total_steps=100, start_step=0, mode="plain")
    p.log(10, {"loss": 2.34567, "lr": 3e-4, "tokens_per_s": 12345.0, "mfu": 0.123})
    p.log(20, {"loss": 2.0, "val_loss": 2.2})
    p.message("saved checkpoint step_20")
    p.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert "step  10/100" in lines[0] and "loss 2.3457" in lines[0] and "ETA " in lines[0]
    assert "lr 3.00e-04" in lines[0] and "12.3k tok/s" in lines[0] and "MFU 12.3%" in lines[0]
    assert "val_loss 2.2000" in lines[1] and "ETA " in lines[1]
    assert lines[2] == "saved checkpoint step_20"


def test_console_none_is_silent(capsys):
    p = ConsoleProgress(total_steps=100, start_step=0, mode="none")
    p.log(10, {"loss": 2.0})
    p.message("hello")
    p.close()
    assert capsys.readouterr().out == ""


def test_console_rich_runs(capsys):
    p = ConsoleProgress(total_steps=50, start_step=10, mode="rich")
    p.log(20, {"loss": 1.5, "lr": 1e-3})
    p.message("saved checkpoint")
    p.close()
    out = capsys.readouterr().out
    assert "loss 1.5000" in out and "saved checkpoint" in out


def test_build_logger_rank0_and_rank1(tmp_path, capsys):
    cfg = SimpleNamespace(progress="plain", tensorboard=False, wandb=False)
    log = build_logger(cfg, tmp_path, total_steps=10, start_step=0, rank=0)
    assert isinstance(log, MetricsLogger)
    log.log(5, {"loss": 1.0})
    log.message("hi")
    log.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 5, "loss": 1.0}
    assert not (tmp_path / "tensorboard").exists()

    other = build_logger(cfg, tmp_path / "r1", total_steps=10, start_step=0, rank=1)
    assert isinstance(other, NullLogger)
    other.log(5, {"loss": 1.0})
    other.message("hi")
    other.close()
    assert not (tmp_path / "r1").exists()  # non-zero ranks write nothing
    assert capsys.readouterr().out.count("hi") == 1


# ---------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------

def test_plot_loss_curve(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JSONLSink(path)
    for s in range(1, 41):
        sink.log(s, {"loss": 3.0 / math.sqrt(s)})
    sink.log(40, {"val_loss": 0.6})
    sink.close()
    sink = JSONLSink(path)  # a resumed run re-logs steps 31..50
    for s in range(31, 51):
        sink.log(s, {"loss": 2.5 / math.sqrt(s)})
    sink.close()
    with open(path, "a") as f:
        f.write('{"step": 51, "lo')  # a partial line from a killed run
    out = plot_loss_curve(path, tmp_path / "plots" / "loss.png", title="test")
    data = out.read_bytes()
    assert out.exists() and len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------
# FLOPs and MFU
# ---------------------------------------------------------------------------

class _Block(nn.Module):
    """Attention + MLP as bare matmuls, so FlopCounterMode sees every FLOP
    (it does not count the fused CPU scaled_dot_product_attention kernel)."""

    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.h = n_heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, 4 * d, bias=False)
        self.down = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.h)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, d)
        x = x + self.proj(y)
        return x + self.down(torch.relu(self.up(x)))


def test_flops_per_token_matches_flop_counter():
    torch.manual_seed(0)
    V, d, L, H, B, T = 64, 32, 3, 4, 2, 16
    emb = nn.Embedding(V, d)
    blocks = nn.Sequential(*[_Block(d, H) for _ in range(L)])
    head = nn.Linear(d, V, bias=False)
    idx = torch.randint(0, V, (B, T))
    with FlopCounterMode(display=False) as counter:
        logits = head(blocks(emb(idx)))
        nn.functional.cross_entropy(logits.view(-1, V), idx.view(-1)).backward()
    measured = counter.get_total_flops() / (B * T)
    n_matmul = sum(p.numel() for m in (blocks, head) for p in m.parameters())  # not the embedding
    expected = transformer_flops_per_token(n_matmul, L, d, T)
    # The mask doesn't change the matmuls: the full T x T scores are computed, as PaLM counts them.
    assert measured == pytest.approx(expected, rel=0.01)


def test_mfu():
    assert mfu(1000.0, 6e6, 1e10) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        mfu(1000.0, 6e6, 0.0)
