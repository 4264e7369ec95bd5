"""`nanotrain plan` against published runs: each row of published.py predicted and compared.

What a row measured becomes seconds per step, in the source's own convention (published.py's
docstring lists them): a printed iteration time as it is; tokens/s per GPU as
global_batch x seq_len / (tokens/s x GPUs); a printed TFLOP/s per GPU through the formula its
source used to count FLOPs. The prediction is steptime.predict on the preset of the row's GPU,
with the row's layout and Megatron's precision (bf16 weights, fp32 gradients, master weights and
moments). `python -m nanotrain.inspection.validation` prints the table docs/planning.md shows.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys

from ..config import Config, ModelConfig
from ..parallel.layout import Layout
from .cluster import PRESETS
from .memory import Plan
from .published import PublishedRun, runs
from .steptime import StepPlan, model_flops, predict


def megatron_gpt_flops(run: PublishedRun, recompute_factor: int, vocab_term: float) -> float:
    """Megatron's GPT count per step: f·B·s·l·h²·(1 + s/6h + V/(vocab_term·l·h)), f = 72 without
    recomputation, 96 when the recomputed forward counts (Narayanan et al. 2021)."""
    m, b, s = run.model, run.global_batch, run.seq_len
    h, l, v = m["d_model"], m["n_layers"], m["vocab_size"]
    return recompute_factor * b * s * l * h * h * (1 + s / (6 * h) + v / (vocab_term * l * h))


def measured_step_s(run: PublishedRun) -> float:
    """Seconds per step as the source measured them (see the module docstring)."""
    if run.iteration_s:
        return run.iteration_s
    tokens = run.global_batch * run.seq_len
    if run.tokens_per_s_per_gpu:
        return tokens / (run.tokens_per_s_per_gpu * run.gpus)
    if run.name.startswith("narayanan-"):
        flops = megatron_gpt_flops(run, 96, 16)
    elif run.name.startswith("megatron-h100-"):
        flops = megatron_gpt_flops(run, 72, 12)
    else:  # Llama 3: PaLM's 6N + 12 L H Q T per token, as counts.py counts
        flops = model_flops(model_config(run), run.seq_len)["train"] * tokens
    return flops / (run.tflops_per_gpu * 1e12 * run.gpus)


def model_config(run: PublishedRun) -> ModelConfig:
    """The row's model. Multi-token prediction needs whole sequences on a rank here
    (config.whole_sequence_errors), so a row that runs it under sequence parallelism (DeepSeek-V3 in
    Megatron-Bridge) is planned without its MTP block: one block in 62 (1.6% of the FLOPs) left out."""
    fields = dict(run.model)
    if run.sp and run.tp > 1 and fields.get("mtp_depth"):
        fields["mtp_depth"] = 0
    return ModelConfig(**fields)


def megatron_precision():
    """Megatron's mixed precision: 16-bit weights and gradients (main_grad reduced in bf16 unless
    --accumulate-allreduce-grads-in-fp32), fp32 master weights and moments (the distributed
    optimizer shards the last two)."""
    p = Config().precision
    p.recipe, p.param_dtype, p.master_dtype, p.grad_dtype = "bf16", "bf16", "fp32", "bf16"
    return p


def run_plan(run: PublishedRun) -> StepPlan:
    """The row's layout as this code base cuts it. Where the source counts the embedding and the loss as
    pipeline slots (Llama 3: 126 layers in 16 x 8 chunks), every chunk here still needs a layer:
    the most chunks per rank that the layers fill."""
    vp = min(run.vp, run.model["n_layers"] // run.pp)
    run = dataclasses.replace(run, vp=vp)
    layout = Layout(tp=run.tp, cp=run.cp, pp=run.pp, vp=run.vp, dp=run.dp, ep=run.ep, etp=run.etp,
                    sp=run.sp and run.tp > 1, zero=run.zero, micro=run.micro_batch)
    plan = Plan(layout, seq_len=run.seq_len, micro_batches=run.global_batch // (run.dp * run.micro_batch),
                pp_schedule=run.schedule, pp_virtual_stages=run.vp, recompute=run.recompute)
    return StepPlan(plan, run.global_batch, "fp8" if run.dtype == "fp8" else "bf16", tp_overlap=tp_overlap(run),
                    attention="unfused" if run.name.startswith(("korthikanti-", "narayanan-")) else "flash",
                    distributed_optimizer=True, selective_core=True)


# Every row is a Megatron (or NeMo, Megatron-Bridge) run: ZeRO-1 is its distributed optimizer
# (gradients reduce-scattered), selective recomputation reruns the attention core, and before
# FlashAttention (2021-2022: Narayanan, Korthikanti) that core kept the T x T scores in memory.


def tp_overlap(run: PublishedRun) -> bool:
    """Whether the source states that tensor-parallel communication overlapped with compute:
    --tp-comm-overlap in the Megatron-LM README's runs and the NeMo / Megatron-Bridge recipes."""
    return run.name.startswith(("megatron-h100-", "nemo", "mbridge"))


def compare(run: PublishedRun) -> dict:
    """The row's measured and predicted step, and the prediction's parts."""
    m = model_config(run)
    result = predict(m, run_plan(run), megatron_precision(), PRESETS[run.hardware], flops=model_flops(m, run.seq_len))
    measured = measured_step_s(run)
    return {"name": run.name, "set": run.set, "gpus": run.gpus, "measured_s": measured,
            "predicted_s": result["step_s"], "error": result["step_s"] / measured - 1, "prediction": result}


def table(set_name: str | None = None) -> list[dict]:
    return [compare(r) for r in runs(set_name)]


def markdown(rows: list[dict]) -> str:
    lines = ["| run | GPUs | measured s/step | predicted s/step | error |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['gpus']:,} | {r['measured_s']:.3f} | {r['predicted_s']:.3f} | "
                     f"{r['error']:+.1%} |")
    errors = [abs(r["error"]) for r in rows]
    lines.append(f"\nmedian |error| {statistics.median(errors):.1%}, largest {max(errors):.1%} over {len(rows)} rows")
    return "\n".join(lines)


if __name__ == "__main__":
    for name in (sys.argv[1:] or ["korthikanti-t5", "megatron-readme-h100", "extra"]):
        print(f"## {name}\n\n{markdown(table(name))}\n")
