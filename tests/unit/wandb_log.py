"""Reading back a Weights & Biases run file (run-<id>.wandb), as wandb writes it: LevelDB's log
format (32 KiB blocks of records: checksum, length, type, data) after a 7-byte file header, each
record one wandb.proto Record. wandb 0.31 reads these files in its Go core only, so the tests
read them here, with wandb's own protobuf definitions."""

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7  # checksum (4), length (2), type (1); the file's own header (":W&B", magic, version) is 7 bytes too
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(pending)
            yield rec


def history(path: Path) -> dict[int, dict]:
    """{step: {key: value}} of the run's logged rows."""
    out: dict[int, dict] = {}
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            out.setdefault(int(row.get("_step", rec.history.step.num)), {}).update(row)
    return out
