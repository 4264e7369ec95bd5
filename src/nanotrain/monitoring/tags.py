"""What a logged figure is called and what number it is, for every sink that shows figures
(TensorBoard, Weights & Biases): one naming, so the two show the same curves under the same names."""

from __future__ import annotations

from typing import Any


def as_number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if hasattr(v, "item"):
        return as_number(v.item())
    return None


def tensorboard_tag(key: str) -> str:
    """'loss' -> 'train/loss', 'val_loss' -> 'val/loss', 'x/y' stays 'x/y'.

    Grouping puts train and val curves in their own TensorBoard sections.
    """
    if "/" in key:
        return key
    if key.startswith("val_"):
        return "val/" + key[len("val_"):]
    return "train/" + key
