"""Single-process pieces of the parallel code: layout checks, clipping arithmetic, verify's verdict."""

import pytest
import torch

from nanotrain.config import ConfigError, ParallelConfig, load_config
from nanotrain.parallel.data_parallel import clip_grad_norm
from nanotrain.parallel.state import ParallelState, check_layout
from nanotrain.runtime.engine import resolve_model_config
from nanotrain.verify import Report, parse_layout


def test_world_size_must_match_the_layout():
    with pytest.raises(ValueError, match=r"tp=2 x parallel.pp=1 x parallel.dp=2 = 4, but the world has 2"):
        check_layout(ParallelConfig(tp=2, dp=2), world_size=2)
    with pytest.raises(ValueError, match="parallel.ep=3 must divide parallel.dp=4"):
        check_layout(ParallelConfig(dp=4, ep=3), world_size=4)


def test_vocab_must_split_over_tp():
    cfg = load_config("configs/shakespeare_char.toml", ["--parallel.tp=2", "--parallel.dp=1"])
    with pytest.raises(ConfigError, match=r"65 tokens.*parallel.tp=2.*model.vocab_size=66"):
        resolve_model_config(cfg, 65)


def test_coordinates_follow_megatron_order():
    s = ParallelState(tp=2, dp=2, pp=2, rank=6, world_size=8)
    assert (s.tp_rank, s.dp_rank, s.pp_rank) == (0, 1, 1)
    assert s.global_rank(tp_rank=1) == 7 and s.prev_stage_rank == 2 and s.next_stage_rank is None


def test_clip_matches_torch_exactly_on_one_rank():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for pa, pb in zip(a, b):
        pa.grad = torch.randn_like(pa) * 3
        pb.grad = pa.grad.clone()
        pa.shard = None
    ours = clip_grad_norm(a, 1.0, None)
    ref = torch.nn.utils.clip_grad_norm_(b, 1.0)
    assert torch.equal(ours, ref)
    assert all(torch.equal(pa.grad, pb.grad) for pa, pb in zip(a, b))


def test_parse_layout_and_verdict():
    assert parse_layout("tp=2,dp=2,sp") == {"parallel.tp": "2", "parallel.dp": "2",
                                            "parallel.sequence_parallel": "true"}
    with pytest.raises(ConfigError, match="unknown dimension 'xp'"):
        parse_layout("xp=2")
    good = Report([(1, 4.0, 4.0, 0.0)], ("w", 1e-7), 1e-5)
    assert good.ok
    assert not Report([(1, 4.0, 4.1, 0.025)], ("w", 1e-7), 1e-5).ok
    assert not Report([(1, 4.0, 4.0, 0.0)], ("w", 1e-3), 1e-5).ok
