"""`nanotrain inspect`'s memory per rank (inspection/memory.py) against what each rank of a gloo
world of 8 really holds (inspection/measure.py): parameters, gradients, master copies and
moments counted from the tensors, activations as the peak of what the forward passes (and
backward's recomputations) create and keep during one step, ZeRO-3's gathered parameters as the
most it held at once. Layouts with ZeRO-1, 2 and 3, expert and context parallelism, and each
recompute mode."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from nanotrain.config import Config, load_config
from nanotrain.inspection.comm import comm_per_step
from nanotrain.inspection.measure import LiveActivationMeter, unique_bytes
from nanotrain.inspection.memory import Plan, RankModelView, memory_per_rank
from nanotrain.parallel.launch import run_world
from nanotrain.runtime import RuntimeEngine
from conftest import CORPUS  # noqa: E402

TOL = 0.05  # the bar; measured differences are below 1% (see the printout)
MEASURED_STEP = 1  # the second step: the optimizer state exists, the gradients are being rebuilt


def _config(tmp_path, *extra) -> Config:
    return load_config(None, [
        f"--data.path={CORPUS}", f"--data.prepared_dir={tmp_path / 'prep'}", f"--train.out_dir={tmp_path / 'run'}",
        # the character tokenizer's 65 symbols, which training pads to 66 rows at tp=2
        "--model.vocab_size=0", "--model.d_model=64", "--model.n_heads=4", "--model.n_layers=4", "--train.seq_len=32",
        "--train.max_steps=2", "--train.eval_interval=0", "--train.eval_steps=1", "--checkpoint.save_final=false",
        "--logging.progress=none", "--logging.tensorboard=false", "--logging.plot=false",
        "--logging.peak_tflops=1", "--monitoring.mode=minimal", "--schedule.warmup_steps=1",
        "--precision.recipe=bf16", *extra])


class MeasuredEngine(RuntimeEngine):
    """Counts the saved tensors during one step, and the static state just before its update."""

    def __init__(self, cfg: Config):
        super().__init__(cfg, on_grads=self._grads)
        self.measured: dict[str, int] = {}

    def train_step(self, step, model, data, opt, lr, ctx, report=False):
        if step != MEASURED_STEP:
            return super().train_step(step, model, data, opt, lr, ctx, report)
        runner = getattr(self.forward_backward, "runner", None)
        if runner is not None:  # DualPipeV's pairs in turn, as the plan counts them: side by side, the
            runner.overlap = False  # backward frees its activations during the forward, by the clock
        meter, comm = LiveActivationMeter(model), ctx.parallel.meter  # the run's communication meter
        before = dict(comm.bytes)  # (the monitor's figures since its last report)
        with meter.counting(), comm.counting():
            out = super().train_step(step, model, data, opt, lr, ctx, report)
        self.measured["activations"] = meter.peak
        sharding = getattr(opt, "sharding", None)  # ZeRO-3
        self.measured["gathered_params"] = sharding.peak_bytes if sharding is not None else 0
        self.comm = {group: n - before.get(group, 0) for group, n in comm.bytes.items()}
        return out

    def _grads(self, step, model, ctx) -> None:
        if step == MEASURED_STEP + 1:
            self.measured.update(measured_static_bytes(model, self.optimizer))


def measured_static_bytes(model, opt) -> dict[str, int]:
    if hasattr(opt, "state_bytes"):  # the flat-bucket (ZeRO) optimizer keeps its own books
        s = opt.state_bytes()
        return {"weights": s["params"], "gradients": s["grads"], "master": s["master"],
                "optimizer": s["moments"]}
    moments = [t for state in opt.opt.state.values() for t in state.values() if t.dim() > 0]
    return {"weights": unique_bytes(model.parameters()), "gradients": unique_bytes(p.grad for p in model.parameters()),
            "master": 0, "optimizer": unique_bytes(moments)}


def _measure(cfg_dict) -> dict:
    import os

    engine = MeasuredEngine(Config.from_dict(cfg_dict))
    engine.run()
    rank = int(os.environ["RANK"])
    logged = {}
    if rank == 0:  # what the monitor logged at the last step: bytes and seconds per group, per step
        lines = (Path(engine.cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()
        logged = {k: v for line in lines for k, v in json.loads(line).items()
                  if k.startswith(("comm/", "time/")) or k == "step_ms"}
    return {"rank": rank, **engine.measured, "comm": engine.comm, "logged": logged}


DEEPSEEK = ["--model.arch=deepseek", "--model.n_routed_experts=4", "--model.moe_top_k=2", "--model.moe_d_ff=64",
            "--model.kv_lora_rank=32"]
LAYOUTS = {  # name: (arch options, layout options)
    "tp2_sp_pp2_dp2_zero1_1f1b": ([], ["--parallel.tp=2", "--parallel.sequence_parallel=true", "--parallel.pp=2",
                                       "--parallel.dp=2", "--optimizer.zero_stage=1", "--train.batch_size=8",
                                       "--train.micro_batch_size=1"]),
    # bf16 parameters, fp32 master slices (ZeRO-sharded), fp32 gradients and moments
    "tp2_dp4_zero2_bf16_params": ([], ["--parallel.tp=2", "--parallel.dp=4", "--optimizer.zero_stage=2",
                                       "--precision.recipe=bf16", "--precision.param_dtype=bf16",
                                       "--train.batch_size=16"]),
    "deepseek_tp2_dp4_ep2_zero2": (DEEPSEEK, ["--parallel.tp=2", "--parallel.dp=4", "--parallel.ep=2",
                                              "--optimizer.zero_stage=2", "--train.batch_size=16"]),
    # Recomputation: selective keeps each block's input, matmul and attention outputs; full its input
    "tp2_sp_dp4_selective": ([], ["--parallel.tp=2", "--parallel.sequence_parallel=true", "--parallel.dp=4",
                                  "--train.recompute=selective", "--train.batch_size=16"]),
    "tp2_pp2_dp2_full_1f1b": ([], ["--parallel.tp=2", "--parallel.pp=2", "--parallel.dp=2", "--optimizer.zero_stage=1",
                                   "--train.recompute=full", "--train.batch_size=8", "--train.micro_batch_size=1"]),
    # ZeRO-3: weights sharded too, gathered block by block
    "dp8_zero3": ([], ["--parallel.dp=8", "--optimizer.zero_stage=3", "--train.batch_size=16"]),
    # Context parallelism: each rank 1/cp of every sequence; the ring's sends; dp x cp replicas
    "tp2_sp_cp2_dp2_zero1": ([], ["--parallel.tp=2", "--parallel.sequence_parallel=true", "--parallel.cp=2",
                                  "--parallel.dp=2", "--optimizer.zero_stage=1", "--train.batch_size=8"]),
    "cp2_pp2_dp2_zero1_1f1b": ([], ["--parallel.cp=2", "--parallel.pp=2", "--parallel.dp=2",
                                    "--optimizer.zero_stage=1", "--train.batch_size=8", "--train.micro_batch_size=1"]),
    "deepseek_cp2_dp4_ep2_zero1": (DEEPSEEK, ["--parallel.cp=2", "--parallel.dp=4", "--parallel.ep=2",
                                              "--optimizer.zero_stage=1", "--train.batch_size=16"]),
    # Expert tensor parallelism: each expert's width over tp, with and without sp
    "deepseek_tp2_etp2_dp4_ep2": (DEEPSEEK, ["--parallel.tp=2", "--parallel.etp=2", "--parallel.dp=4",
                                             "--parallel.ep=2", "--train.batch_size=16"]),
    "deepseek_tp2_sp_dp4": (DEEPSEEK, ["--parallel.tp=2", "--parallel.sequence_parallel=true", "--parallel.dp=4",
                                       "--train.batch_size=16"]),
    "deepseek_tp2_sp_etp2_dp4_zero1": (DEEPSEEK, ["--parallel.tp=2", "--parallel.sequence_parallel=true",
                                                  "--parallel.etp=2", "--parallel.dp=4", "--optimizer.zero_stage=1",
                                                  "--train.batch_size=16"]),
    "deepseek_tp2_cp2_dp2_selective": (DEEPSEEK, ["--parallel.tp=2", "--parallel.cp=2", "--parallel.dp=2",
                                                  "--train.recompute=selective", "--train.batch_size=8"]),
    # Split backwards: activations live until the W; DualPipeV's V puts both ends on rank 0
    "tp2_sp_pp2_dp2_zero2_zb_h1": ([], ["--parallel.tp=2", "--parallel.sequence_parallel=true", "--parallel.pp=2",
                                        "--parallel.dp=2", "--optimizer.zero_stage=2", "--parallel.pp_schedule=zb_h1",
                                        "--train.batch_size=8", "--train.micro_batch_size=1"]),
    "deepseek_pp2_dp4_ep2_zero1_dualpipev": (DEEPSEEK, ["--parallel.pp=2", "--parallel.dp=4", "--parallel.ep=2",
                                                        "--optimizer.zero_stage=1", "--parallel.pp_schedule=dualpipev",
                                                        "--train.batch_size=16", "--train.micro_batch_size=1"]),
    "deepseek_tp2_dp4_ep2_zero3_selective": (DEEPSEEK, ["--parallel.tp=2", "--parallel.dp=4", "--parallel.ep=2",
                                                        "--optimizer.zero_stage=3", "--train.recompute=selective",
                                                        "--train.batch_size=16"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_memory_per_rank_matches_a_world_of_8(tmp_path, name):
    arch, layout = LAYOUTS[name]
    cfg = _config(tmp_path, *arch, *layout)
    ranks = run_world(_measure, 8, dataclasses.asdict(cfg))
    cfg.model.max_seq_len = cfg.train.seq_len
    cfg.model.vocab_size = 65  # the tokenizer's, as `nanotrain inspect --model.vocab_size=65` plans it (padded)
    layout = Plan.from_config(cfg)
    estimate = memory_per_rank(cfg.model, layout, cfg.precision, device="cpu")
    # `nanotrain plan` weighs the same figures on a model of one block per kind (memory.RankModelView)
    view = RankModelView(cfg.model, layout)
    assert memory_per_rank(cfg.model, layout, cfg.precision, "cpu", view) == estimate
    per_stage = cfg.parallel.tp * cfg.parallel.cp * cfg.parallel.dp
    for r in ranks:
        stage = r["rank"] // per_stage
        e = estimate[stage]
        for key in ("weights", "gradients", "master", "optimizer", "activations", "gathered_params"):
            print(f"{name} rank {r['rank']} {key}: estimate {e[key]} measured {r[key]}")
            assert e[key] == pytest.approx(r[key], rel=TOL, abs=64), (r["rank"], key)
        if r["rank"] == 0:  # the time split: exposed communication apart from compute, adding up to the step
            times = {k: v for k, v in r["logged"].items() if k.startswith("time/")}
            assert min(times.values()) >= 0, times
            assert 0.5 * r["logged"]["step_ms"] <= sum(times.values()) <= 1.05 * r["logged"]["step_ms"], times
        total = sum(r[k] for k in ("weights", "gradients", "master", "optimizer", "activations", "gathered_params"))
        assert e["total"] == pytest.approx(total, rel=TOL)
        by_op = comm_per_step(cfg.model, layout, cfg.precision, stage)
        assert comm_per_step(cfg.model, layout, cfg.precision, stage, view) == by_op
        predicted = {g: sum(ops.values()) for g, ops in by_op.items()}
        for group in set(predicted) | set(r["comm"]):
            measured = r["comm"].get(group, 0)
            if group.startswith("ep"):  # an all-to-all sends what the router sent where: the plan counts
                # balanced experts, so it is the mean over the stage's ranks, each of which varies with routing
                mates = [q for q in ranks if q["rank"] // per_stage == stage]
                measured = sum(q["comm"].get(group, 0) for q in mates) / len(mates)
            print(f"{name} rank {r['rank']} comm {group}: estimate {predicted.get(group, 0)} measured {measured}")
            # scalars (loss, gradient-norm parts) are not in the estimate: at most a few hundred bytes
            assert predicted.get(group, 0) == pytest.approx(measured, rel=TOL, abs=512), (r["rank"], group)
            if r["rank"] == 0:  # the training monitor's own meter: the same bytes, and the time they took
                assert r["logged"][f"comm/{group}_mb"] * 2**20 == pytest.approx(r["comm"][group], rel=TOL, abs=4096)
                assert r["logged"][f"time/comm_{group}_ms"] > 0
