"""Monitoring: MFU accounting, metric sinks (console, JSONL, TensorBoard) and the loss plot."""

from nanotrain.monitoring.mfu import mfu, transformer_flops_per_token
from nanotrain.monitoring.plot import plot_loss_curve
from nanotrain.monitoring.sinks import (
    ConsoleProgress,
    JSONLSink,
    MetricsLogger,
    NullLogger,
    TensorBoardSink,
    build_logger,
    read_metrics,
    repair_metrics,
    tensorboard_tag,
)

__all__ = [
    "ConsoleProgress",
    "JSONLSink",
    "MetricsLogger",
    "NullLogger",
    "TensorBoardSink",
    "build_logger",
    "mfu",
    "plot_loss_curve",
    "read_metrics",
    "repair_metrics",
    "tensorboard_tag",
    "transformer_flops_per_token",
]
