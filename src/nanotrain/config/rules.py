"""The rules between sections, and validate(): every problem of a config in one error.

A config is validated before any heavy work (data preparation, model build, process groups), so a
typo costs a second, not a run. Each section checks its own fields (sections.py); the rules here
span sections: how the model, batch and sequence split over the layout (parallel.*), what a
pipeline schedule asks of the sizes (check_schedule), and settings of two sections that exclude
each other. validate() only reads: what is filled in from other sections (Config.resolve) is done
before, where the config is made.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .errors import ConfigError, failed
from .sections import PP_SCHEDULES, Config, ModelConfig, TrainConfig, chunks_per_rank


def validate(cfg: Config) -> None:
    """NaN and infinities anywhere, else each section's own check(), then the rules between sections;
    every problem in one error. It changes nothing in cfg.
    load_config runs it after the TOML file and the overrides, so errors name the final values."""
    # NaN or inf first, alone: the other rules compare numbers and would add odd messages of their own.
    errors = nonfinite_errors(cfg)
    if not errors:
        errors = [e for f in dataclasses.fields(cfg) for e in getattr(cfg, f.name).check()]
    if not errors:
        errors = cross_checks(cfg)
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


def nonfinite_errors(obj: Any, prefix: str = "") -> list[str]:
    """Every float field, in every section and table, that is NaN or infinite. TOML and float()
    read "inf" and "nan", and a rule like `lr > 0` lets inf through (nan fails every comparison,
    so its message would say "must be positive" of a value that is not a number)."""
    errors = []
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            errors += nonfinite_errors(value, key + ".")
        elif isinstance(value, float) and not math.isfinite(value):
            errors.append(f"{key}={value} is not a finite number: set a finite value (the default is {f.default}).")
    return errors


def cross_checks(cfg: Config) -> list[str]:
    """The rules that span sections: how the model, batch and sequence split over the layout,
    and settings of two sections that exclude each other."""
    m, t, o, s = cfg.model, cfg.train, cfg.optimizer, cfg.schedule
    decay_steps = s.decay_steps or t.max_steps
    return _layout_errors(cfg) + whole_sequence_errors(m, cfg.parallel.tp > 1 and cfg.parallel.sequence_parallel) + \
        failed([
            (m.max_seq_len == 0 or m.max_seq_len >= t.seq_len,
             f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}: raise model.max_seq_len "
             "or set it to 0 (= train.seq_len)."),
            (0 <= s.min_lr <= o.lr, f"schedule.min_lr={s.min_lr} must be between 0 and optimizer.lr={o.lr}."),
            (s.decay == "constant" or s.warmup_steps < decay_steps,
             f"schedule.warmup_steps={s.warmup_steps} must be below the decay length ({decay_steps}): "
             "shorten the warm-up or lengthen schedule.decay_steps."),
            (not cfg.precision.lowbit.weights or o.zero_stage == 0,
             f"precision.lowbit.weights with optimizer.zero_stage={o.zero_stage}: a low-bit weight's fp32 master "
             "is kept whole on every dp rank (stage 0). Use optimizer.zero_stage=0, or drop precision.lowbit.weights."),
            (all(0 <= b < m.n_layers for b in cfg.monitoring.sentinel_blocks),
             f"monitoring.sentinel_blocks={cfg.monitoring.sentinel_blocks}: block indices run from 0 to "
             f"model.n_layers-1={m.n_layers - 1}."),
        ])


def whole_sequence_errors(m: ModelConfig, sequence_parallel: bool) -> list[str]:
    """Multi-token prediction shifts the sequence by a token and the auxiliary loss averages over
    whole sequences: neither works on a rank that holds seq_len/tp positions. DeepSeekModel asks
    this too, since a model can be built without a validated Config."""
    return failed([
        (not (sequence_parallel and m.mtp_depth), "model.mtp_depth > 0 (multi-token prediction) needs whole "
         "sequences on each rank: turn off parallel.sequence_parallel or set model.mtp_depth=0."),
        (not (sequence_parallel and m.arch == "deepseek" and m.aux_loss_coef), "model.aux_loss_coef > 0 needs "
         "whole sequences on each rank: turn off parallel.sequence_parallel or set model.aux_loss_coef=0."),
    ])


def _layout_errors(cfg: Config) -> list[str]:
    """Whether the heads, experts, layers, batch and sequence split evenly over parallel.tp/pp/dp/ep."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    errors = []
    if p.pp > 1 and p.pp_virtual_stages >= 1 and p.dp > 0 and t.batch_size > 0 and t.micro_batch(p.dp) > 0:
        errors += check_schedule(p.pp_schedule, p.pp, p.pp_virtual_stages, t.grad_accum_steps(p.dp), m.n_layers)
        split = p.pp_schedule in ("zb_h1", "dualpipev")  # a backward split into B and W
        errors += failed([
            (not (split and t.recompute != "none"),
             f"parallel.pp_schedule={p.pp_schedule!r} with train.recompute={t.recompute!r}: the W half of a split "
             "backward would recompute each block a second time (B's recomputation is freed when B ends). "
             "Set train.recompute=none, or use pp_schedule='1f1b' or 'interleaved' with recomputation."),
            (not (split and t.compile),
             f"parallel.pp_schedule={p.pp_schedule!r} with train.compile=true: a compiled block's backward is one "
             "kernel graph that computes the input's and the weights' gradients together, so B and W would each "
             "run all of it (torch's zero-bubble schedules refuse compile too). Set train.compile=false, or use "
             "pp_schedule='1f1b'."),
            (not (split and cfg.optimizer.zero_stage == 3),
             f"parallel.pp_schedule={p.pp_schedule!r} with optimizer.zero_stage=3: the W half of a split backward "
             "runs after ZeRO-3 has released the gathered weights its nodes saved. Use optimizer.zero_stage=1 or "
             "2, or pp_schedule='1f1b'."),
            (m.mtp_depth == 0, "model.mtp_depth > 0 (multi-token prediction) with parallel.pp > 1 is not "
                               "implemented: the MTP block needs the embedding on the last stage. Set "
                               "model.mtp_depth=0 or parallel.pp=1."),
            (m.arch != "deepseek" or m.aux_loss_coef == 0,
             "model.aux_loss_coef > 0 with parallel.pp > 1 is not implemented: each stage's auxiliary loss "
             "would need its own backward. Use the auxiliary-loss-free balancing (model.aux_loss_coef=0, "
             "model.bias_update_rate > 0) or parallel.pp=1."),
        ])
    # Routed experts split over ep (whole experts) or etp (each expert's width): a DeepSeek model's,
    # in equal parts.
    for key, size, total, name, part in (("ep", p.ep, m.n_routed_experts, "n_routed_experts", "experts"),
                                         ("etp", p.etp, m.moe_d_ff, "moe_d_ff", "of every expert's width")):
        if size > 1:
            errors += failed([
                (m.arch == "deepseek", f"parallel.{key}={size} splits routed experts, which model.arch={m.arch!r} "
                                       f"does not have: use model.arch='deepseek' or parallel.{key}=1."),
                (m.arch != "deepseek" or total % size == 0,
                 f"model.{name}={total} is not divisible by parallel.{key}={size}: each rank holds "
                 f"{name}/{key} {part}."),
            ])
    if p.tp > 1 and m.n_heads > 0:
        n_kv, d_ff = m.n_kv_heads or m.n_heads, m.ffn_width()
        errors += failed([
            (m.n_heads % p.tp == 0, f"model.n_heads={m.n_heads} is not divisible by parallel.tp={p.tp}: each "
                                    "tensor-parallel rank holds n_heads/tp heads; pick a tp that divides it."),
            (n_kv % p.tp == 0, f"model.n_kv_heads={n_kv} is not divisible by parallel.tp={p.tp}: each rank "
                               "holds n_kv_heads/tp KV heads; raise n_kv_heads or lower tp."),
            (d_ff % p.tp == 0, f"the MLP width {d_ff} (model.d_ff) is not divisible by parallel.tp={p.tp}: "
                               "set model.d_ff to a multiple of tp."),
        ])
    if p.sequence_parallel and p.tp > 0 and t.seq_len % (p.tp * max(p.cp, 1)):
        errors.append(f"train.seq_len={t.seq_len} is not divisible by parallel.tp={p.tp}"
                      + (f" x parallel.cp={p.cp}" if p.cp > 1 else "") + ": sequence parallelism gives each "
                      "rank seq_len/tp positions" + (" of its seq_len/cp" if p.cp > 1 else "") + ".")
    return errors + _context_errors(cfg) + _batch_errors(t, p.dp)


def _context_errors(cfg: Config) -> list[str]:
    """What context parallelism (parallel/context_parallel.py) needs, and what it does not run yet."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if p.cp <= 1:
        return []
    fix = "or set parallel.cp=1"
    return failed([
        (t.seq_len % (2 * p.cp) == 0, f"train.seq_len={t.seq_len} is not divisible by 2 x parallel.cp = {2 * p.cp}: "
                                      "the zigzag split cuts each sequence into 2·cp equal chunks."),
        (m.dropout == 0, f"model.dropout={m.dropout} with parallel.cp={p.cp}: ring attention has no attention "
                         f"dropout. Set model.dropout=0 {fix}."),
        (not cfg.data.document_mask, f"data.document_mask=true with parallel.cp={p.cp} is not implemented: the "
                                     f"ring attends to every earlier chunk. Set data.document_mask=false {fix}."),
        (m.mtp_depth == 0, f"model.mtp_depth > 0 with parallel.cp={p.cp}: multi-token prediction shifts the "
                           f"sequence by a token, which a zigzag chunk does not hold. Set model.mtp_depth=0 {fix}."),
        (m.arch != "deepseek" or m.aux_loss_coef == 0,
         f"model.aux_loss_coef > 0 with parallel.cp={p.cp}: the auxiliary loss averages over whole sequences. "
         f"Use model.aux_loss_coef=0 {fix}."),
    ])


def _batch_errors(t: TrainConfig, dp: int) -> list[str]:
    """The global batch must split into equal micro-batches on every data-parallel rank."""
    if t.batch_size <= 0 or dp <= 0:
        return []
    per_rank = t.micro_batch(dp) * dp
    if per_rank and t.batch_size % per_rank == 0:
        return []
    return [f"train.batch_size={t.batch_size} is not divisible by train.micro_batch_size={t.micro_batch(dp)} x "
            f"parallel.dp={dp}: the global batch must split into equal micro-batches on every data-parallel rank; "
            "change one of the three."]


# ---------------------------------------------------------------------------
# What a pipeline schedule asks of the sizes (parallel/pipeline/ runs the schedules). The rules are
# here, with the config's, so that validating a config needs no pipeline code; each names the keys
# that fix it.
# ---------------------------------------------------------------------------

def check_chunks(name: str, v: int) -> list[str]:
    """Whether schedule `name` runs v (parallel.pp_virtual_stages) chunks per rank, as messages that
    name the fix (empty: fine). check_schedule's first rule, on its own for `nanotrain inspect`: its
    layout's vp (parallel/layout.py) meets the config's schedule in no validated config."""
    if name == "dualpipev":  # the V is 2 chunks whatever v says (chunks_per_rank): 1, the default, or 2
        return [] if v in (1, 2) else [f"parallel.pp_schedule='dualpipev' runs 2 chunks per rank (a V), not "
                                       f"parallel.pp_virtual_stages={v}: leave pp_virtual_stages at 1."]
    if name == "interleaved":
        return [] if v >= 2 else ["parallel.pp_schedule='interleaved' needs parallel.pp_virtual_stages >= 2 "
                                  "(chunks per rank); with 1 it is plain 1F1B: set pp_schedule='1f1b'."]
    return [] if v == 1 else [f"parallel.pp_virtual_stages={v} needs parallel.pp_schedule='interleaved' ({name} "
                              "runs one chunk per rank): set pp_virtual_stages=1 or pp_schedule='interleaved'."]


def check_schedule(name: str, pp: int, v: int, m: int, n_layers: int) -> list[str]:
    """What is wrong with this combination, as messages that name the fix (empty: fine).
    v: parallel.pp_virtual_stages as configured; m: micro-batches per step on a rank."""
    if name not in PP_SCHEDULES:
        return [f"parallel.pp_schedule={name!r} is not a schedule: use one of {', '.join(PP_SCHEDULES)}."]
    errors = check_chunks(name, v)
    if name == "dualpipev":
        if m < 2 * pp:
            errors.append(f"DualPipeV needs at least 2 x parallel.pp = {2 * pp} micro-batches per step, got {m} "
                          "(train.batch_size / (parallel.dp x train.micro_batch_size)): lower "
                          "train.micro_batch_size or raise train.batch_size.")
    elif name == "interleaved" and m % pp:
        errors.append(f"interleaved 1F1B needs the micro-batches per step ({m} = train.batch_size / "
                      f"(parallel.dp x train.micro_batch_size)) to be a multiple of parallel.pp={pp}: "
                      "change train.micro_batch_size or train.batch_size.")
    v = chunks_per_rank(name, v)
    if n_layers < pp * v:
        errors.append(f"model.n_layers={n_layers} cannot fill parallel.pp={pp} x pp_virtual_stages={v} = "
                      f"{pp * v} chunks (each needs a layer): lower pp or pp_virtual_stages.")
    return errors
