"""Where metrics go: a JSONL file, TensorBoard, and the console.

The trainer calls `logger.log(step, metrics)` every log_interval steps with a
flat dict of plain Python numbers. Conventional keys (all optional):

    loss, lr, grad_norm, tokens_per_s, mfu (a fraction), step_time_ms, val_loss

Keys may already be grouped ("train/loss"); see TensorBoardSink for how bare
keys are grouped. Only rank 0 logs: every other rank gets a NullLogger, so
the training loop never needs an `if rank == 0`.

Pass Python floats, not tensors: a CUDA tensor's .item() would stall the GPU
pipeline inside the logger where nobody expects it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from ..atomic import atomic_write
from .tags import as_number, tensorboard_tag


def _to_plain(v: Any) -> Any:
    # json's fallback for what it can't write: 0-d tensors and numpy scalars.
    if hasattr(v, "item"):
        return v.item()
    raise TypeError(f"cannot log a value of type {type(v).__name__}: {v!r}")


def _row(line: bytes) -> dict | None:
    """One metrics.jsonl line as its row, or None if it is not one: a line cut short by a kill,
    or anything else that is not a JSON object with an integer "step"."""
    try:
        row = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError (a kill can cut a character) both are
        return None
    ok = isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row["step"], bool)
    return row if ok else None


def _lines(data: bytes) -> list[bytes]:
    return [line for line in data.split(b"\n") if line.strip()]


def read_metrics(path: str | Path) -> tuple[list[dict], int]:
    """The rows of a metrics.jsonl in file order, and how many lines were skipped as unreadable
    (a run killed mid-write leaves a partial last line). Readers (report, plot) go through here."""
    rows = [_row(line) for line in _lines(Path(path).read_bytes())]
    return [r for r in rows if r is not None], rows.count(None)


def repair_metrics(path: str | Path, start: int) -> str | None:
    """Make an existing metrics.jsonl fit a run that starts at step `start`, before it appends:
    drop unreadable lines (a kill's partial last line, the odd broken line) and the rows of steps
    past `start` (logged after the checkpoint the run resumes from: the resumed run logs those
    steps again). start=0 is a fresh run: the file starts anew (what is there is a run's that was
    killed before its first checkpoint). Rewritten atomically (tmp + os.replace) when anything is
    dropped, or the last line lacks its newline; returns the warning to show, None if nothing was dropped."""
    path = Path(path)
    if not path.is_file():
        return None
    data = path.read_bytes()
    lines = _lines(data)
    rows = [_row(line) for line in lines]
    kept = [line for line, row in zip(lines, rows) if row is not None and start > 0 and row["step"] <= start]
    bad = rows.count(None)
    beyond = len(rows) - bad - len(kept)
    if not bad and not beyond and (not data or data.endswith(b"\n")):
        return None
    atomic_write(path, b"".join(line + b"\n" for line in kept))  # a lost last newline comes back
    return _repair_warning(path, lines, rows, beyond, start)


def _plural(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n > 1 else ''}"


def _repair_warning(path: Path, lines: list[bytes], rows: list, beyond: int, start: int) -> str | None:
    """One line: what repair_metrics dropped, and why."""
    dropped = []
    partial = bool(rows) and rows[-1] is None
    if partial:
        shown = lines[-1].decode("utf-8", "replace")
        dropped.append(f"a partial last line ({shown[:40]!r}{'...' if len(shown) > 40 else ''})")
    other = rows[:-1].count(None) if partial else rows.count(None)
    if other:
        dropped.append(_plural(other, "unreadable line") + (" before it" if partial else ""))
    if beyond and start > 0:
        dropped.append(f"{_plural(beyond, 'row')} past step {start}, where this run resumes "
                       "(logged after that checkpoint; they are logged again)")
    elif beyond:
        dropped.append(f"{_plural(beyond, 'row')} of a run that stopped before its first "
                       "checkpoint (a run from step 0 starts the file anew)")
    return f"warning: {path}: dropped {', '.join(dropped)}." if dropped else None


class JSONLSink:
    """One JSON object per line: {"step": 100, "loss": 2.31, ...}.

    Append mode, so a resumed run continues the same file (the plot keeps the
    last value per step). Flushed on every write, so a crash loses at most the
    line being written; given `start` (the step the run starts at), the sink
    first repairs what a killed run left (repair_metrics) and prints a warning
    to stderr saying what it dropped. Non-finite floats are written as
    NaN/Infinity, as Python's json does: a diverged loss is exactly what the
    log must show.
    """

    def __init__(self, path: str | Path, start: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        warning = repair_metrics(self.path, start) if start is not None else None
        if warning:
            print(warning, file=sys.stderr, flush=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._f.write(json.dumps({"step": step, **metrics}, default=_to_plain) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class TensorBoardSink:
    """Scalars to TensorBoard event files under log_dir (`tensorboard --logdir <out_dir>`)."""

    def __init__(self, log_dir: str | Path):
        # Imported here: tensorboard takes ~1 s to import and most tests don't need it.
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard import SummaryWriter
        self._Summary = Summary
        # max_queue: events wait in memory for the writer thread; a bigger queue means
        # log() never blocks on it (the default 10 fills up after ~2 calls).
        self._w = SummaryWriter(log_dir=str(log_dir), max_queue=100)
        self._tags: dict[str, str] = {}  # memoized key -> tag, it's on the per-log path

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        # All of a step's scalars in one Summary event: what add_scalar would write,
        # but one event and one queue hand-off per call instead of one per metric
        # (add_scalar costs ~35 us each, mostly in that hand-off).
        values = []
        for key, value in metrics.items():
            tag = self._tags.get(key) or self._tags.setdefault(key, tensorboard_tag(key))
            if isinstance(value, (list, tuple)):  # a vector (tokens per expert): one scalar per entry
                for j, v in enumerate(value):
                    x = as_number(v)
                    if x is not None:
                        values.append(self._Summary.Value(tag=f"{tag}/{j}", simple_value=x))
                continue
            x = as_number(value)
            if x is None:
                continue  # strings and the like: TensorBoard scalars are numbers only
            values.append(self._Summary.Value(tag=tag, simple_value=x))
        if values:
            self._w._get_file_writer().add_summary(self._Summary(value=values), step)

    def close(self) -> None:
        self._w.flush()
        self._w.close()


def _fmt_duration(s: float) -> str:
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s"


def _fmt_count(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


class ConsoleProgress:
    """Progress on the console: a rich live bar, plain lines, or nothing.

    mode: "auto" (rich bar on a terminal, plain lines when piped to a file or
    a job log, where a live bar would write escape codes), "rich", "plain", "none".
    """

    def __init__(self, total_steps: int, start_step: int = 0, mode: str = "auto"):
        if mode not in ("auto", "rich", "plain", "none"):
            raise ValueError(f"progress mode must be auto, rich, plain or none; got {mode!r}")
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.mode, self.total, self.start_step = mode, total_steps, start_step
        self._t_start = time.perf_counter()
        # ETA reference point: the first log call. Steps before it include one-off
        # costs (allocator warm-up, compilation, first data loads) that would skew the average.
        self._ref: tuple[int, float] | None = None
        self._live, self._last_loss = None, None
        if mode == "rich":
            from rich.live import Live
            # A rich Live display of one row (label, bar, numbers) rather than
            # rich.progress.Progress: Progress lays its task columns out as a full
            # table on each redraw, ~0.3 ms more per log call on a slow CPU.
            # auto_refresh=False: no background render thread competing with
            # training for CPU; we redraw when we log, every log_interval steps.
            self._live = Live(self._bar(start_step, None, None), auto_refresh=False)
            self._live.start()

    def _bar(self, step: int, loss: float | None, eta: float | None):
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text
        # Short, one line, never wrapped: the full numbers scroll above it, and
        # wrapping text is the costliest thing rich does on a redraw.
        info = f"{step}/{self.total}"
        if loss is not None:
            info += f" | loss {loss:.4f}"
        info += f" | ETA {_fmt_duration(eta) if eta is not None else '?'}"
        row = Table.grid(padding=(0, 1))
        row.add_row(Text("train", style="bold"), ProgressBar(total=self.total, completed=step, width=25),
                    Text(info, no_wrap=True, overflow="ellipsis"))
        return row

    def _eta(self, step: int) -> float | None:
        now = time.perf_counter()
        if self._ref is None or step <= self._ref[0]:
            if self._ref is None:
                self._ref = (step, now)
            # Nothing past the warm-up yet: fall back to the average since start.
            done, elapsed = step - self.start_step, now - self._t_start
        else:
            done, elapsed = step - self._ref[0], now - self._ref[1]
        if done <= 0:
            return None
        return elapsed / done * max(self.total - step, 0)

    def _line(self, step: int, m: dict[str, Any], eta: float | None) -> str:
        parts = [f"step {step:>{len(str(self.total))}}/{self.total}"]
        if "loss" in m:
            parts.append(f"loss {m['loss']:.4f}")
        if "val_loss" in m:
            parts.append(f"val_loss {m['val_loss']:.4f}")
        if "lr" in m:
            parts.append(f"lr {m['lr']:.2e}")
        if "tokens_per_s" in m:
            parts.append(f"{_fmt_count(m['tokens_per_s'])} tok/s")
        if "mfu" in m:
            parts.append(f"MFU {100 * m['mfu']:.1f}%")
        parts.append(f"ETA {_fmt_duration(eta) if eta is not None else '?'}")
        return " | ".join(parts)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self.mode == "none":
            return
        eta = self._eta(step)
        line = self._line(step, metrics, eta)
        if self._live is None:
            print(line, flush=True)
            return
        if "loss" in metrics:
            self._last_loss = metrics["loss"]  # keep showing it on eval-only calls
        # Swap the bar without drawing it: console.print below scrolls the line
        # above the live bar and redraws the bar with it, one render per call.
        self._live.update(self._bar(step, self._last_loss, eta), refresh=False)
        self._live.console.print(line, markup=False, highlight=False)

    def message(self, text: str) -> None:
        if self.mode != "none":
            self.notice(text)

    def notice(self, text: str) -> None:
        """Printed whatever logging.progress says: a fault and what was done about it."""
        if self._live is None:
            print(text, flush=True)
        else:
            self._live.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


class MetricsLogger:
    """Fans every call out to its sinks."""

    def __init__(self, sinks: list):
        self.sinks = list(sinks)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for s in self.sinks:
            s.log(step, metrics)

    def message(self, text: str) -> None:
        for s in self.sinks:
            if hasattr(s, "message"):
                s.message(text)

    def notice(self, text: str) -> None:
        for s in self.sinks:
            if hasattr(s, "notice"):
                s.notice(text)

    def picture(self, name: str, path: str | Path, step: int) -> None:
        """A picture the run drew (the loss curve, the pipeline timeline), to the sinks that show
        pictures (Weights & Biases); the file itself is already in out_dir."""
        for s in self.sinks:
            if hasattr(s, "picture"):
                s.picture(name, path, step)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


class NullLogger:
    """The logger of ranks != 0: same interface, does nothing."""

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def notice(self, text: str) -> None:
        pass

    def picture(self, name: str, path: str | Path, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def build_logger(logging_cfg, out_dir: str | Path, total_steps: int, start_step: int,
                 rank: int, config: dict | None = None) -> MetricsLogger | NullLogger:
    """Rank 0: console + out_dir/metrics.jsonl (+ out_dir/tensorboard/, + Weights & Biases with the
    run's `config`). Other ranks: NullLogger."""
    if rank != 0:
        return NullLogger()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sinks: list = [ConsoleProgress(total_steps, start_step, logging_cfg.progress),
                   JSONLSink(out_dir / "metrics.jsonl", start_step)]
    if logging_cfg.tensorboard:
        sinks.append(TensorBoardSink(out_dir / "tensorboard"))
    if logging_cfg.wandb:
        from .wandb_sink import WandbSink

        sinks.append(WandbSink(logging_cfg, out_dir, config or {}, start_step))
    return MetricsLogger(sinks)
