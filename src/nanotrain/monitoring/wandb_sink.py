"""Weights & Biases: the run's metrics, config and pictures, beside TensorBoard.

    nanotrain train --config ... --logging.wandb=true --logging.wandb_project=myproj

What it logs is what TensorBoard gets (the same tags: 'loss' -> 'train/loss', tags.tensorboard_tag),
the whole config once, and the run's pictures (loss.png, the pipeline's timeline.png) as images when
they are drawn. A resumed run continues the same W&B run: its id is kept in out_dir/wandb_run_id,
and wandb.init is asked to resume it ("allow": a new id starts a new run).

Offline (WANDB_MODE=offline, or no login) wandb writes the run under out_dir/wandb/ for a later
`wandb sync`; nothing here needs the network. wandb is an optional dependency:
pip install 'nanotrain[wandb]'.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from ..config import ConfigError
from .tags import as_number, tensorboard_tag

RUN_ID_FILE = "wandb_run_id"


def _wandb():
    try:
        import wandb
    except ImportError:
        raise ConfigError("logging.wandb=true needs the wandb package: pip install 'nanotrain[wandb]' (or "
                          "pip install wandb), or set logging.wandb=false.") from None
    return wandb


def run_id(out_dir: Path, start_step: int) -> str:
    """The W&B run id of this run folder: the one it had (a resume continues that W&B run), or a
    new one, kept in out_dir/wandb_run_id (a fresh run, start_step 0, always starts a new one)."""
    path = out_dir / RUN_ID_FILE
    if start_step > 0 and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    rid = secrets.token_hex(4)
    path.write_text(rid + "\n")
    return rid


class WandbSink:
    """Metrics to a W&B run (rank 0 only, as every sink: sinks.build_logger)."""

    def __init__(self, logging_cfg, out_dir: str | Path, config: dict, start_step: int):
        wandb = _wandb()
        out_dir = Path(out_dir)
        self._Image = wandb.Image
        self.run = wandb.init(project=logging_cfg.wandb_project, name=logging_cfg.wandb_run or out_dir.name,
                              id=run_id(out_dir, start_step), resume="allow", dir=str(out_dir), config=config,
                              settings=wandb.Settings(silent=True, console="off"))
        self._tags: dict[str, str] = {}

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {}
        for key, value in metrics.items():
            tag = self._tags.get(key) or self._tags.setdefault(key, tensorboard_tag(key))
            if isinstance(value, (list, tuple)):  # a vector (tokens per expert): one scalar per entry
                row.update({f"{tag}/{j}": x for j, v in enumerate(value) if (x := as_number(v)) is not None})
            elif (x := as_number(value)) is not None:
                row[tag] = x
        if row:
            self.run.log(row, step=step)

    def picture(self, name: str, path: str | Path, step: int) -> None:
        """A picture the run drew (loss.png, timeline.png), as a W&B image under `name`."""
        self.run.log({name: self._Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()
