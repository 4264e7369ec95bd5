"""Checkpoints (format version 2): sharded writes, any-layout reads, atomic appearance.

    pieces.py   what a rank holds: boxes of logical (single-process) tensors
    storage.py  the folder: one safetensors file per rank + metadata.json; reading any box
    manager.py  saving (who writes which box, the temporary folder, `latest`, async)
"""

from .manager import CheckpointManager, load_checkpoint, resolve_checkpoint
from .pieces import (Piece, assemble, flat_pieces, flat_range_boxes, gather_full, load_full_model_state, local_slice,
                     merge_over_pipeline, model_pieces, sharded, whole)
from .storage import (FORMAT_VERSION, CheckpointError, CheckpointReader, CorruptCheckpointError,
                      check_compatible)

__all__ = ["CheckpointManager", "CheckpointError", "CheckpointReader", "CorruptCheckpointError", "FORMAT_VERSION",
           "Piece", "assemble", "check_compatible", "flat_pieces", "flat_range_boxes", "gather_full", "load_checkpoint",
           "load_full_model_state", "local_slice", "merge_over_pipeline", "model_pieces", "resolve_checkpoint",
           "sharded", "whole"]
