"""Data-parallel bytes per step do not grow with the pipeline chunks a rank holds.

ZeRO-2 reduce-scatters after every backward. An interleaved or DualPipeV rank runs each of its
chunks' backwards once per micro-batch; its buckets are cut per chunk (data_parallel.py,
`backward_chunks`), so each backward sends its own chunk's gradients only: every gradient once
per micro-batch, as under 1F1B. (Before the buckets were per chunk, each backward sent every
bucket of the rank: interleaved pp=2 x v=2 sent 1.86x 1F1B's dp bytes.) Measured with the
communication meter (`comm/dp_mb`, rank 0), and `nanotrain inspect` (inspection/comm.py) counts
the same bytes."""

import dataclasses
import json

import pytest

from nanotrain.inspection.comm import comm_per_step
from nanotrain.inspection.memory import Plan
from nanotrain.parallel.launch import run_world

from test_pipeline_layouts import config  # noqa: E402  (tests/parity is on sys.path through conftest)

# The step's scalars on the dp group, which inspect leaves out: the loss's token count (int64) and
# the ZeRO gradient norm's partial sum (fp32), a few bytes each.
SCALARS = 64


def _dp_bytes(cfg_dict):
    """Rank 0's dp bytes of the last step, as the monitor logged them."""
    from nanotrain.config import Config
    from nanotrain.runtime import RuntimeEngine

    result = RuntimeEngine(Config.from_dict(cfg_dict)).run()
    if result.rank:
        return None
    rows = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "comm/dp_mb" in r][-1]["comm/dp_mb"] * 2**20


@pytest.mark.parametrize("zero", [2, 3])
def test_interleaved_and_dualpipev_send_1f1b_dp_bytes(tmp_path, zero):
    schedules = {"1f1b": [], "interleaved": ["--parallel.pp_virtual_stages=2"], "dualpipev": []}
    if zero == 3:  # the split-backward schedules refuse ZeRO-3
        del schedules["dualpipev"]
    measured, counted = {}, {}
    for schedule, extra in schedules.items():
        cfg = config(tmp_path / schedule, "--parallel.pp=2", "--parallel.dp=2", f"--optimizer.zero_stage={zero}",
                     f"--parallel.pp_schedule={schedule}", *extra, "--train.micro_batch_size=1",
                     "--train.max_steps=3", "--logging.log_interval=1", "--train.eval_interval=0",
                     "--checkpoint.save_final=false", "--precision.recipe=fp32",
                     "--monitoring.mode=minimal")
        measured[schedule] = run_world(_dp_bytes, 4, dataclasses.asdict(cfg))[0]
        cfg.model.max_seq_len = cfg.train.seq_len  # as training resolves it
        counted[schedule] = sum(comm_per_step(cfg.model, Plan.from_config(cfg), cfg.precision, 0)["dp"].values())
    print(measured, counted)
    for schedule in schedules:
        assert measured[schedule] <= 1.1 * measured["1f1b"], schedule
        assert measured[schedule] - SCALARS <= counted[schedule] <= measured[schedule], schedule
