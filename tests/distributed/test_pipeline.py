"""Pipeline parallelism: partitioning, and GPipe / 1F1B against one process.

A tiny model runs a global batch of 8 sequences as 4 micro-batches of 2 through pp
stages; the summed last-stage loss and every stage's gradients must equal the
single-process loss and gradients of the same (global) parameter names."""

import pytest
import torch

from nanotrain.config import ModelConfig, ParallelConfig
from nanotrain.models.transformer import TransformerModel
from nanotrain.parallel.launch import run_world
from nanotrain.parallel.pipeline import (
    P2P,
    PipelineStage,
    gpipe,
    one_f_one_b,
    partition_layers,
)
from nanotrain.parallel.state import init_parallel

SEQ, MICRO, N_MICRO, SEED = 16, 2, 4, 1234


def make_model():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=2, max_seq_len=SEQ, tie_embeddings=False)
    model = TransformerModel(cfg)
    model.init_weights(SEED)
    return model


def make_batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 64, (MICRO * N_MICRO, SEQ + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def reference():
    model = make_model()
    x, y = make_batch()
    denom = y.numel()
    loss = model(x, y, denom)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


# -- partition_layers ------------------------------------------------------------------

def test_partition_even_and_uneven():
    assert partition_layers(4, 2) == [[0, 1], [2, 3]]
    assert partition_layers(4, 4) == [[0], [1], [2], [3]]
    assert partition_layers(4, 1) == [[0, 1, 2, 3]]
    parts = partition_layers(5, 2)
    assert sorted(len(p) for p in parts) == [2, 3] and parts[-1] == [3, 4]  # last stage lighter
    assert [len(p) for p in partition_layers(10, 4)] in ([3, 3, 2, 2], [3, 2, 3, 2], [2, 3, 3, 2])


def test_partition_by_cost_is_contiguous_and_balanced():
    parts = partition_layers(4, 2, costs=[3.0, 1.0, 1.0, 1.0])
    assert parts == [[0], [1, 2, 3]]
    parts = partition_layers(6, 3, costs=[1, 1, 1, 1, 4, 4])
    assert parts == [[0, 1, 2, 3], [4], [5]]
    flat = [i for p in parts for i in p]
    assert flat == list(range(6))


def test_partition_rejects_too_few_layers():
    with pytest.raises(ValueError, match="at least one layer"):
        partition_layers(2, 3)


def test_tied_embeddings_not_supported_yet():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=2, max_seq_len=SEQ, tie_embeddings=True)
    with pytest.raises(NotImplementedError, match="tie_embeddings"):
        PipelineStage(TransformerModel(cfg), 0, 2, [0, 1])


def test_stage_keeps_global_names_and_init_matches():
    full = make_model()
    full_sd = full.state_dict()
    for stage_id, layers in enumerate(partition_layers(4, 2)):
        cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=2, max_seq_len=SEQ, tie_embeddings=False)
        stage = PipelineStage(TransformerModel(cfg), stage_id, 2, layers)
        stage.init_weights(SEED)  # init after wrapping: same weights, drawn from (seed, name)
        sd = stage.state_dict()
        assert set(sd) <= set(full_sd)
        assert all(torch.equal(v, full_sd[k]) for k, v in sd.items())
        names = set(sd)
        assert any(n.startswith("tok_emb") for n in names) == (stage_id == 0)
        assert any(n.startswith("head") for n in names) == (stage_id == 1)
        assert {n.split(".")[1] for n in names if n.startswith("layers.")} == {str(i) for i in layers}


def test_single_stage_matches_model():
    ref_loss, ref_grads = reference()
    stage = PipelineStage(make_model(), 0, 1, [0, 1, 2, 3])
    x, y = make_batch()
    comm = P2P(None, None, (MICRO, SEQ, 32))
    mbs = list(zip(x.split(MICRO), y.split(MICRO)))
    loss = one_f_one_b(stage, mbs, y.numel(), comm)
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    for n, p in stage.named_parameters():
        assert (p.grad - ref_grads[n]).abs().max() <= 1e-5 * ref_grads[n].abs().max()


# -- distributed schedules ------------------------------------------------------------------

def _pipeline_run(pp):
    # Neighbours from ParallelState (Megatron rank order), as the engine will get them.
    state = init_parallel(ParallelConfig(pp=pp))
    rank = state.pp_rank
    layers = partition_layers(4, pp)[rank]
    stage = PipelineStage(make_model(), rank, pp, layers)
    comm = P2P.from_state(state, (MICRO, SEQ, 32))
    x, y = make_batch()
    mbs = list(zip(x.split(MICRO), y.split(MICRO)))
    out = {}
    for name, schedule in (("gpipe", gpipe), ("1f1b", one_f_one_b)):
        stage.zero_grad(set_to_none=True)
        stats = {}
        loss = schedule(stage, mbs, y.numel(), comm, stats)
        grads = {n: p.grad.clone() for n, p in stage.named_parameters()}
        out[name] = (loss, grads, stats["max_in_flight"])
    # Mixed precision: activations and their gradients travel in bf16.
    stage.zero_grad(set_to_none=True)
    comm_bf16 = P2P.from_state(state, (MICRO, SEQ, 32), dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out["bf16_loss"] = one_f_one_b(stage, mbs, y.numel(), comm_bf16)
    out["bf16_grads_finite"] = all(torch.isfinite(p.grad).all() for p in stage.parameters())
    return out


@pytest.mark.parametrize("pp", [2, 4])
def test_schedules_match_single_process(pp):
    ref_loss, ref_grads = reference()
    results = run_world(_pipeline_run, pp, pp)
    for name in ("gpipe", "1f1b"):
        seen = set()
        for rank, out in enumerate(results):
            loss, grads, max_in_flight = out[name]
            if rank == pp - 1:
                assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss), (name, loss, ref_loss)
            else:
                assert loss == 0.0  # only the last stage computes the loss
            for n, g in grads.items():
                ref = ref_grads[n]
                err = (g - ref).abs().max() / ref.abs().max()
                assert err <= 1e-5, (name, rank, n, err.item())
                seen.add(n)
            # GPipe keeps every micro-batch; 1F1B at most pp - stage (first stage: pp).
            expect = N_MICRO if name == "gpipe" else min(pp - rank, N_MICRO)
            assert max_in_flight == expect, (name, rank, max_in_flight)
            if rank == 0 and name == "1f1b":
                assert max_in_flight <= pp
        assert seen == set(ref_grads), f"{name}: parameters not held by any stage"
    assert abs(results[-1]["bf16_loss"] - ref_loss) <= 2e-2 * abs(ref_loss)
    assert all(out["bf16_grads_finite"] for out in results)
