"""Pipeline parallelism: partitioning, timetables, and each schedule against one process.

A tiny model runs a global batch of 8 sequences as 4 micro-batches of 2 through pp
ranks; the summed last-rank loss and every rank's gradients must equal the
single-process loss and gradients of the same (global) parameter names."""

import pytest
import torch

from nanotrain.config import ModelConfig
from nanotrain.models.transformer import TransformerModel
from nanotrain.parallel.launch import run_world
from nanotrain.parallel.layout import Layout
from nanotrain.parallel.pipeline import (
    SCHEDULES,
    pipeline_stage,
    cached_timetable,
    check_chunks,
    check_schedule,
    chunk_ids,
    chunk_layers,
    partition_layers,
    textbook_bubble,
    timetable,
)
from nanotrain.parallel.pipeline.actions import Action
from nanotrain.parallel.pipeline.runner import PipelineRunner
from nanotrain.parallel.pipeline.timeline import measured_bubble, timetable_timelines
from nanotrain.parallel.state import init_parallel
from nanotrain.verify import grad_floor, rel_diff
from nanotrain.params import spec

SEQ, MICRO, N_MICRO, SEED = 16, 2, 4, 1234


def make_model(n_layers=4, tie=False):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=n_layers, n_heads=2, max_seq_len=SEQ, tie_embeddings=tie)
    model = TransformerModel(cfg)
    model.init_weights(SEED)
    return model


def make_batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 64, (MICRO * N_MICRO, SEQ + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def reference(n_layers=4, tie=False):
    model = make_model(n_layers, tie)
    x, y = make_batch()
    loss = model(x, y, y.numel())
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
    assert [i for p in parts for i in p] == list(range(6))


def test_partition_rejects_too_few_layers():
    with pytest.raises(ValueError, match="at least one layer"):
        partition_layers(2, 3)


def test_chunks_are_round_robin():
    # 8 layers, pp 2, v 2: chunks 0..3 = [0,1] [2,3] [4,5] [6,7]; rank 0 holds chunks 0 and 2.
    assert chunk_layers(8, 2, 2) == [[[0, 1], [4, 5]], [[2, 3], [6, 7]]]


def test_stage_keeps_global_names_and_init_matches():
    full_sd = make_model().state_dict()
    for rank, chunks in enumerate(chunk_layers(4, 2)):
        cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=2, max_seq_len=SEQ, tie_embeddings=False)
        stage = pipeline_stage(TransformerModel(cfg), rank, 2, chunks)
        stage.init_weights(SEED)  # init after wrapping: same weights, drawn from (seed, name)
        sd = stage.state_dict()
        assert set(sd) <= set(full_sd)
        assert all(torch.equal(v, full_sd[k]) for k, v in sd.items())
        assert any(n.startswith("tok_emb") for n in sd) == (rank == 0)
        assert any(n.startswith("head") for n in sd) == (rank == 1)
        assert {n.split(".")[1] for n in sd if n.startswith("layers.")} == {str(i) for i in chunks[0]}


def test_tied_embedding_copy_on_last_rank():
    last = pipeline_stage(make_model(tie=True), 1, 2, chunk_layers(4, 2)[1])
    w = dict(last.named_parameters())["tok_emb.weight"]
    assert last.head.weight is w and spec(w).pipeline_shared and spec(w).pipeline_duplicate
    first = pipeline_stage(make_model(tie=True), 0, 2, chunk_layers(4, 2)[0])
    w0 = dict(first.named_parameters())["tok_emb.weight"]
    assert spec(w0).pipeline_shared and not spec(w0).pipeline_duplicate
    assert torch.equal(w0, w)  # same init: both copies start equal


# -- timetables (no processes) ------------------------------------------------------------

@pytest.mark.parametrize("name,pp,v,m", [("gpipe", 4, 1, 8), ("1f1b", 4, 1, 8), ("1f1b", 2, 1, 4),
                                         ("1f1b", 4, 1, 2), ("gpipe", 2, 1, 1)])
def test_one_chunk_schedules_reach_textbook_bubble(name, pp, v, m):
    tt = cached_timetable(name, pp, v, m)
    assert tt.n_slots == 2 * (m + pp - 1)
    assert tt.bubble() == pytest.approx(textbook_bubble(pp, m))


@pytest.mark.parametrize("pp,v,m", [(2, 2, 4), (4, 2, 8), (2, 3, 4), (2, 2, 2), (4, 2, 4)])
def test_interleaved_bubble_is_smaller(pp, v, m):
    tt = cached_timetable("interleaved", pp, v, m)
    # With every chunk's forward or backward one slot, fill and drain are pp - 1 slots of
    # work 1/v as long: (pp - 1) / (v m + pp - 1), about the textbook's 1/v.
    assert tt.bubble() == pytest.approx((pp - 1) / (v * m + pp - 1))
    assert tt.bubble() == pytest.approx(textbook_bubble(pp, m, v))
    assert tt.bubble() < textbook_bubble(pp, m)


def test_impossible_order_is_caught():
    # Rank 1 runs a backward before the forward it needs: no slot can ever run it.
    orders = [[Action("F", 0, 0), Action("B", 0, 0)], [Action("B", 0, 0), Action("F", 0, 0)]]
    with pytest.raises(ValueError, match="cannot proceed"):
        timetable(orders)


def test_check_schedule_messages():
    assert check_schedule("1f1b", 2, 1, 4, 4) == []
    assert check_schedule("interleaved", 2, 2, 4, 4) == []
    assert any("multiple of parallel.pp" in e for e in check_schedule("interleaved", 2, 2, 3, 4))
    assert any("pp_virtual_stages >= 2" in e for e in check_schedule("interleaved", 2, 1, 4, 4))
    assert any("pp_schedule='interleaved'" in e for e in check_schedule("1f1b", 2, 2, 4, 4))
    assert any("n_layers" in e for e in check_schedule("interleaved", 2, 4, 4, 4))
    assert any("one of" in e for e in check_schedule("zb", 2, 1, 4, 4))
    assert check_schedule("zb_h1", 2, 1, 4, 4) == [] and check_schedule("dualpipev", 2, 1, 4, 4) == []
    assert any("2 x parallel.pp = 4 micro-batches" in e for e in check_schedule("dualpipev", 2, 1, 3, 4))
    assert any("2 chunks per rank" in e for e in check_schedule("dualpipev", 2, 3, 4, 8))
    assert any("n_layers" in e for e in check_schedule("dualpipev", 4, 1, 8, 4))  # 8 chunks, 4 layers
    assert set(SCHEDULES) == {"gpipe", "1f1b", "interleaved", "zb_h1", "dualpipev"}
    # The chunk rule alone (what `nanotrain inspect --layout ...,vp=N` checks): check_schedule's first.
    for name, v in (("1f1b", 2), ("gpipe", 3), ("interleaved", 1), ("dualpipev", 3)):
        assert check_chunks(name, v) == check_schedule(name, 2, v, 4, 16)[:1] != []
    assert check_chunks("interleaved", 3) == check_chunks("dualpipev", 2) == check_chunks("zb_h1", 1) == []


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8), (4, 4), (3, 5), (4, 2)])
def test_zb_h1_fills_the_cool_down_with_weight_gradients(pp, m):
    """With F, B and W one unit each, 1F1B (B and W together: 2 units) idles 3 (pp - 1) units
    of its 3 m + 3 (pp - 1); ZB-H1 idles pp - 1 of 3 m + pp - 1 (m >= pp), and holds 1F1B's
    peak (pp)."""
    zb = cached_timetable("zb_h1", pp, 1, m)
    if m >= pp:
        assert zb.n_slots == 3 * m + pp - 1
        assert textbook_bubble(pp, m, 1, "zb_h1") == pytest.approx((pp - 1) / (3 * m + pp - 1))
    assert zb.bubble() == pytest.approx(textbook_bubble(pp, m, 1, "zb_h1"))
    one_f_one_b = timetable_timelines(cached_timetable("1f1b", pp, 1, m))  # backward = 2 slots
    assert textbook_bubble(pp, m, 1, "zb_h1") < measured_bubble(one_f_one_b)
    assert [zb.peak_in_flight(r) for r in range(pp)] == [min(pp, m)] * pp
    for r in range(pp):  # every B has its W, later, on the same rank; nothing is sent for a W
        row = [a for a in zb.slots[r] if a is not None]
        assert sorted((a.mb for a in row if a.kind == "W")) == list(range(m))
        assert all(row.index(Action("B", 0, i)) < row.index(Action("W", 0, i)) for i in range(m))
    assert all(msg.action.kind != "W" for msg in zb.messages)


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8), (2, 7), (4, 16)])
def test_dualpipev_is_a_v_and_beats_interleaved(pp, m):
    """Rank r holds chunks r and 2 pp - 1 - r; the tip hands over on one rank (no message);
    the play-through's bubble (backward = 2 x forward) is below interleaved 1F1B's with v = 2."""
    assert chunk_ids("dualpipev", pp, 2) == [[r, 2 * pp - 1 - r] for r in range(pp)]
    tt = cached_timetable("dualpipev", pp, 2, m)
    assert not [msg for msg in tt.messages if msg.src != msg.dst and abs(msg.src - msg.dst) != 1]
    assert [msg for msg in tt.messages if msg.src == msg.dst]  # the tip: chunk pp - 1 -> chunk pp on rank pp - 1
    assert all(msg.src == pp - 1 for msg in tt.messages if msg.src == msg.dst)
    v_shape = measured_bubble(timetable_timelines(tt))
    assert v_shape < measured_bubble(timetable_timelines(cached_timetable("1f1b", pp, 1, m)))
    if m % pp == 0:
        assert v_shape < measured_bubble(timetable_timelines(cached_timetable("interleaved", pp, 2, m)))
    with pytest.raises(ValueError, match="at least 2 pp"):
        cached_timetable("dualpipev", pp, 2, 2 * pp - 1)


# -- distributed schedules ------------------------------------------------------------------

def _pipeline_run(pp, schedule, v, n_layers, tie, micro=MICRO):
    state = init_parallel(Layout(pp=pp))
    ids = chunk_ids(schedule, pp, v)
    stage = pipeline_stage(make_model(n_layers, tie), state.pp_rank, pp, chunk_layers(n_layers, pp, v, None, ids)[
        state.pp_rank], ids[state.pp_rank])
    runner = PipelineRunner.from_state(stage, schedule, state)
    x, y = make_batch()
    mbs = list(zip(x.split(micro), y.split(micro)))
    loss = runner.train_step(mbs, y.numel(), record=True)
    kinds = {e[0] for e in runner.events}
    grads = {n: p.grad.clone() for n, p in stage.named_parameters()}
    with torch.no_grad():
        eval_sum = runner.forward_only(mbs)
    return {"loss": loss.item(), "grads": grads, "max_in_flight": runner.max_in_flight, "kinds": kinds,
            "eval_sum": eval_sum.item(), "has_last": stage.stage.has_last,
            "planned_in_flight": cached_timetable(schedule, pp, v, len(mbs)).peak_in_flight(state.pp_rank)}


@pytest.mark.parametrize("pp,schedule,v,n_layers,micro", [
    (2, "gpipe", 1, 4, MICRO), (2, "1f1b", 1, 4, MICRO), (4, "gpipe", 1, 4, MICRO), (4, "1f1b", 1, 4, MICRO),
    (2, "interleaved", 2, 4, MICRO), (2, "zb_h1", 1, 4, MICRO), (4, "zb_h1", 1, 4, MICRO),
    (2, "dualpipev", 2, 4, MICRO), (4, "dualpipev", 2, 8, 1)])
def test_schedules_match_single_process(pp, schedule, v, n_layers, micro):
    ref_loss, ref_grads = reference(n_layers)
    results = run_world(_pipeline_run, pp, pp, schedule, v, n_layers, False, micro)
    seen = set()
    floor = grad_floor(ref_grads, 1e-5)  # verify's measure: each tensor's norm, floored at rounding of the whole
    for rank, out in enumerate(results):
        # The loss is on the last rank, or on rank 0 where DualPipeV's V turns back.
        assert out["has_last"] == (rank == (0 if schedule == "dualpipev" else pp - 1))
        if out["has_last"]:
            assert out["loss"] == pytest.approx(ref_loss, rel=1e-6)
            assert out["eval_sum"] == pytest.approx(ref_loss * MICRO * N_MICRO * SEQ, rel=1e-6)
        else:
            assert out["loss"] == 0.0 and out["eval_sum"] == 0.0  # only the last rank computes the loss
        for n, g in out["grads"].items():
            err = rel_diff(g, ref_grads[n], floor)
            assert err <= 1e-5, (schedule, rank, n, err)
            seen.add(n)
        assert {"F", "B"} <= out["kinds"]
        assert ("W" in out["kinds"]) == (schedule in ("zb_h1", "dualpipev") and not (rank == 0 and schedule == "zb_h1"))
        assert out["max_in_flight"] == out["planned_in_flight"]  # measured = the play-through's count
        if schedule == "gpipe":
            assert out["max_in_flight"] == N_MICRO  # GPipe keeps every micro-batch
        elif schedule == "1f1b":
            assert out["max_in_flight"] == min(pp - rank, N_MICRO)  # first rank: pp, not m
    assert seen == set(ref_grads), "parameters not held by any rank"


def test_dualpipev_rank_0_holds_both_ends_of_a_tied_embedding():
    """In the V, the lookup and the head are on rank 0: one tensor, its two uses' gradients in it."""
    ref_loss, ref_grads = reference(tie=True)
    results = run_world(_pipeline_run, 2, 2, "dualpipev", 2, 4, True)
    assert "tok_emb.weight" not in results[1]["grads"]
    ref = ref_grads["tok_emb.weight"]
    assert rel_diff(results[0]["grads"]["tok_emb.weight"], ref, grad_floor(ref_grads, 1e-5)) <= 1e-5
    assert results[0]["loss"] == pytest.approx(ref_loss, rel=1e-6)


def test_tied_embeddings_sum_over_the_embedding_group():
    """Each copy gets the gradient of its own use (lookup on the first rank, head on the
    last); their sum is the single-process gradient of the tied matrix."""
    ref_loss, ref_grads = reference(tie=True)
    results = run_world(_pipeline_run, 2, 2, "1f1b", 1, 4, True)
    total = results[0]["grads"]["tok_emb.weight"] + results[1]["grads"]["tok_emb.weight"]
    ref = ref_grads["tok_emb.weight"]
    assert rel_diff(total, ref, grad_floor(ref_grads, 1e-5)) <= 1e-5


def _bf16_run():
    state = init_parallel(Layout(pp=2))
    stage = pipeline_stage(make_model(), state.pp_rank, 2, chunk_layers(4, 2)[state.pp_rank])

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    runner = PipelineRunner.from_state(stage, "1f1b", state, autocast=autocast)
    x, y = make_batch()
    loss = runner.train_step(list(zip(x.split(MICRO), y.split(MICRO))), y.numel())
    return loss.item(), all(torch.isfinite(p.grad).all() for p in stage.parameters())


def test_bf16_autocast_pipeline():
    """Under bf16 autocast the residual stream stays fp32 and crosses ranks as fp32."""
    ref_loss, _ = reference()
    (_, finite0), (loss, finite1) = run_world(_bf16_run, 2)
    assert loss == pytest.approx(ref_loss, rel=2e-2) and finite0 and finite1
