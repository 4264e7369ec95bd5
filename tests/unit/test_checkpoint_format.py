"""The pieces of format v2 on one process: flat ranges as boxes, and reading any box back
from boxes cut another way."""

import pytest
import torch
from torch import nn

from nanotrain.checkpoint import (CheckpointError, CheckpointManager, Piece, flat_pieces, flat_range_boxes,
                                  load_checkpoint)
from nanotrain.layers import Shard
from nanotrain.params import declare


@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 3, 4), (4, 1, 3)])
def test_flat_range_boxes_tile_the_range_in_order(shape):
    full = torch.arange(torch.Size(shape).numel()).view(shape)
    n = full.numel()
    for start in range(n + 1):
        for end in range(start, n + 1):
            boxes = flat_range_boxes(shape, start, end)
            assert len(boxes) <= 2 * len(shape) - 1
            values, at = [], start
            for offsets, sizes, first in boxes:
                assert first == at  # each box is the next contiguous run of the range
                box = full
                for d, (o, s) in enumerate(zip(offsets, sizes)):
                    box = box.narrow(d, o, s)
                values += box.reshape(-1).tolist()
                at += box.numel()
            assert values == list(range(start, end))


def test_zero_like_slices_read_back_under_another_cut(tmp_path):
    """A [4, 6] tp shard (rank 1 of 2 along dim 1, so logical [4, 12]) saved as two flat
    slices that split it mid-row, then read as whole rows and as the logical tensor."""
    p = nn.Parameter(torch.arange(24.0).view(4, 6))
    declare(p, shard=Shard(dim=1, rank=1, world=2))
    flat = p.detach().reshape(-1)
    pieces = flat_pieces("optim/exp_avg/w", flat[:9], p, 0, 9) + flat_pieces("optim/exp_avg/w", flat[9:], p, 9, 24)
    assert [piece.offsets for piece in pieces] == [(0, 6), (1, 6), (1, 9), (2, 6)]
    other = torch.zeros(4, 6)  # the other tp rank's half, whole
    pieces.append(Piece("optim/exp_avg/w", other, (0, 0), (4, 12)))
    CheckpointManager(tmp_path).save(1, pieces, {})
    reader = load_checkpoint(tmp_path)
    whole = reader.full("optim/exp_avg/w")
    assert torch.equal(whole, torch.cat([other, p.detach()], dim=1))
    rows = Piece("optim/exp_avg/w", torch.empty(2, 12), (1, 0), (4, 12))  # a box across all chunks
    reader.fill(rows)
    assert torch.equal(rows.tensor, whole[1:3])
    with pytest.raises(CheckpointError, match="shape"):
        reader.fill(Piece("optim/exp_avg/w", torch.empty(2, 2), (0, 0), (4, 14)))
    with pytest.raises(CheckpointError, match="no tensor optim/exp_avg/v"):
        reader.fill(Piece("optim/exp_avg/v", torch.empty(1), (0,), (1,)))


def test_a_box_not_covered_is_an_error(tmp_path):
    CheckpointManager(tmp_path).save(1, [Piece("model/w", torch.ones(2, 3), (0, 0), (4, 3))], {})
    reader = load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"holds 6 of the 12 values of model/w"):
        reader.full("model/w")
