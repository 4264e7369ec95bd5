"""Layout invariance, checked: train one config under a parallel layout and on one process, and compare.

    nanotrain verify --config configs/shakespeare_char.toml --layout tp=2,dp=2 --steps 10

Both runs use the same config and seed, in fp32 with dropout off (dropout masks
come from per-process RNG streams, so they differ by layout by design). The
layout text is parallel/layout.py's, as in `nanotrain inspect`, and is launched as
a local gloo world (parallel/launch.py); under torchrun, on one machine or several, it runs on
torchrun's world instead, and rank 0 then runs the one-process side (docs/multinode.md). Printed: the
loss of every step under both, their relative difference, and the largest
difference of any parameter's gradient after step 1 (put together whole from
every rank's boxes of it, as checkpoints save them: cut by tp, ep and pp, and
by dp under ZeRO-2/3), relative to that gradient's norm or,
where rounding alone could dominate it, to a floor set by the global gradient
norm (grad_floor). Exit status 1 when any exceeds the tolerance. Past step 1
the two runs no longer share parameters, and where a step's loss or gradient
norm exceeds the tolerance, verify measures how far rounding alone moves it
(rounding_spread) and reads it against that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from dataclasses import dataclass, field

import torch

from .checkpoint import assemble
from .config import Config, set_value
from .parallel.layout import Layout


def layout_config(cfg: Config, layout: str) -> Config:
    """cfg under the layout text (parallel/layout.py: what it leaves out stays the config's), validated."""
    return Layout.parse(layout, Layout.from_config(cfg)).apply(cfg)


# What verify sets on both sides whatever the config says that changes what is compared, and why a
# user's value for it cannot stand (it also turns off saving, evaluation and plots, and runs in a
# temporary folder: those change nothing compared).
SETS = {"model.dropout": "dropout masks come from per-process random streams: they differ by layout by design",
        "precision.recipe": "both sides train in verify's --precision"}


def reference_config(cfg: Config, steps: int, out_dir: str, precision: str = "fp32") -> Config:
    """The run both sides share: `steps` steps, no dropout, no saves or plots, quiet."""
    cfg = Config.from_dict(dataclasses.asdict(cfg))
    for key, value in {"train.max_steps": steps, "train.eval_interval": 0, "train.eval_steps": 1,
                       "model.dropout": 0.0, "precision.recipe": precision, "checkpoint.save_final": False,
                       "checkpoint.interval": 0, "checkpoint.resume": "", "logging.progress": "none",
                       "logging.tensorboard": False, "logging.plot": False, "logging.peak_tflops": 1.0,
                       "logging.log_interval": 1, "train.out_dir": out_dir}.items():
        set_value(cfg, key, value, source="verify")
    if cfg.schedule.decay_steps == 0:  # keep the LR schedule of the full run, not of `steps`
        cfg.schedule.decay_steps = max(steps, cfg.schedule.warmup_steps + 1)
    return cfg


class Stopped(Exception):
    """One of verify's runs (the layout, the reference or a rounding probe) was stopped by a signal
    (SIGTERM, Ctrl-C) before its last step: its figures are partial, so nothing is judged."""

    def __init__(self, signal: int):
        super().__init__(signal)  # (the argument travels when a rank of run_world raises it)
        self.signal = signal


def train_and_capture(cfg_dict: dict, grad_step: int = 1) -> dict | None:
    """Run the engine on this process (one rank of a world, or alone); return per-step losses and
    the full gradients of step `grad_step` on global rank 0 (None on other ranks)."""
    from .runtime import RuntimeEngine

    cfg = Config.from_dict(cfg_dict)
    grads: dict[str, torch.Tensor] = {}

    def capture(step, model, ctx):
        # Each rank's summed gradients as boxes of the one-process tensors, the same boxes a
        # checkpoint saves: cut by tp, ep and pp, and under ZeRO-2/3 by dp too (the optimizer holds
        # only its slices then), put together whole on every rank.
        if step == grad_step:
            grads.update(assemble(engine.optimizer.grad_pieces(), ctx.parallel.world_group))

    engine = RuntimeEngine(cfg, on_grads=capture)
    result = engine.run()  # (its process group is gone when it returns)
    if result.signal:
        raise Stopped(result.signal)
    return {"losses": result.losses, "grad_norms": result.grad_norms, "grads": grads} if result.rank == 0 else None


# Unit roundoff of the arithmetic each side trains in: a reordered sum of such numbers moves by
# a few units of this, times the size of its terms.
UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "bf16": 2.0 ** -8}

# Past step 1 each run carries its own rounding in its parameters, and a step whose gradient is
# ill-conditioned (one token's embedding row taking three quarters of the gradient, through the
# first norm layer) turns ulps of parameter into 1e-5 of gradient norm. Measured on the 4-layer
# DeepSeek model of tests/parity/test_zero_bubble_layouts.py: step 10's gradient norm differs from
# one process's by 1.25e-5 under pp=4,dp=2,ep=2 with AMX kernels (7.6e-6 with AVX2 kernels), and
# by as much on ONE process that only splits its batch of 16 into micro-batches: 5.7e-6 (8),
# 1.1e-5 (4), 3.2e-7 (2), 5.8e-6 (1), while steps 1-9 stay within 6e-7. A micro-batch split is a
# layout of one process (the same sums in another order), so rounding_spread runs PROBES of them
# and a later step may differ by up to SPREAD_MARGIN x their largest difference: a layout is one
# more draw of the same rounding, and draws differ by more than 2x (above: 3e-7 to 1.1e-5). A bug
# moves a loss or a norm by 1e-3 or more (test_verify_fails_on_a_real_bug: over 100x the tolerance
# at step 1 already, where the limit stays the tolerance).
PROBES = 2
SPREAD_MARGIN = 2
# In bf16 (or fp16) rounding is 2^16 times coarser, and a reordering of one process's sums moves even
# step 1 by 1e-5 to 1e-4 (deepseek_tiny, micro-batches of 4 instead of 24: loss 2.1e-5, norm 1.3e-4;
# shakespeare_char with micro-batches of 2: 2.0e-5 and 7.8e-5), so the fp32 tolerance judges rounding,
# not the layout. There every step, the first included, and every gradient is read against the
# rounding spread of the same run's reorderings (LOW_PRECISION_PROBES micro-batch splits), with a
# wider margin: the layout is one more draw of that rounding, and its sums are reordered more than a
# micro-batch split reorders them (a tp or cp split cuts inside each row). A tp layout's rounding is
# measured too: one more probe computes each row-parallel GEMM as tp K slices rounded and summed in
# bf16, as the ranks' partial outputs and their all-reduce are (tp=4 on deepseek_tiny moves the
# experts' gradients by 2.5e-2 through routing flips, and so does that probe). A bug moves a loss by 1e-2
# or more in bf16 too (test_verify_bf16_fails_on_a_real_bug), far past it.
LOW_PRECISION_PROBES = 3
LOW_PRECISION_MARGIN = 4


@dataclass
class Report:
    rows: list[tuple[int, float, float, float]]  # step, reference loss, layout loss, relative diff
    worst_grad: tuple[str, float]  # parameter, difference relative to its scale (grad_floor)
    tolerance: float
    norm_diffs: dict[int, float] = field(default_factory=dict)  # step: relative difference of the gradient norm
    floor: float = 0.0  # the smallest scale a gradient is measured against (grad_floor)
    spread: dict[int, float] = field(default_factory=dict)  # step: rounding_spread, where it was measured
    # bf16/fp16: the largest gradient difference the reorderings show (None in fp32: the tolerance rules)
    grad_spread: float | None = None
    precision_name: str = "fp32"
    split_k: int = 1  # bf16 under tp: the rounding probes include a row-parallel K split of this size

    @property
    def low_precision(self) -> bool:
        return self.grad_spread is not None

    def limit(self, step: int) -> float:
        """The largest relative difference step `step` may show: the tolerance, or past step 1
        (different parameters) SPREAD_MARGIN x the rounding spread where that was measured; in bf16
        every step, LOW_PRECISION_MARGIN x it."""
        if self.low_precision:
            return max(self.tolerance, LOW_PRECISION_MARGIN * self.spread.get(step, 0.0))
        return max(self.tolerance, SPREAD_MARGIN * self.spread.get(step, 0.0) if step > 1 else 0.0)

    @property
    def grad_limit(self) -> float:
        return self.tolerance if not self.low_precision else max(self.tolerance,
                                                                  LOW_PRECISION_MARGIN * self.grad_spread)

    def over(self) -> list[int]:
        """Steps whose loss or gradient norm differs by more than their limit."""
        losses = {s: d for s, _, _, d in self.rows}
        return [s for s in sorted(losses) if max(losses[s], self.norm_diffs.get(s, 0.0)) > self.limit(s)]

    @property
    def ok(self) -> bool:
        return self.worst_grad[1] <= self.grad_limit and not self.over()

    def table(self, layout: str) -> str:
        spread = bool(self.spread)
        lines = [f"{'step':>4}  {'1 process':>12}  {layout:>12}  {'rel diff':>9}  {'norm diff':>9}"
                 + (f"  {'limit':>9}" if spread else "")]
        for step, a, b, d in self.rows:
            lines.append(f"{step:>4}  {a:>12.7f}  {b:>12.7f}  {d:>9.2e}  {self.norm_diffs.get(step, 0.0):>9.2e}"
                         + (f"  {self.limit(step):>9.2e}" if spread else ""))
        name, d = self.worst_grad
        lines.append(f"largest gradient difference after step 1: {d:.2e} relative ({name}; "
                     f"|a - b| / max(|b|, u·G/tol = {self.floor:.1e}))")
        lines.append("norm diff: relative difference of the global gradient norm (the clipping input)")
        if self.low_precision:
            worst = max(self.rows, key=lambda r: max(r[3], self.norm_diffs.get(r[0], 0.0)) / self.limit(r[0]))
            step = worst[0]
            lines.append(f"limit: the tolerance or {LOW_PRECISION_MARGIN} x the most one process moves when it splits "
                         f"its batch into micro-batches" + (f", or each row-parallel GEMM into tp={self.split_k} sums"
                                                            if self.split_k > 1 else "")
                         + f" (the rounding spread of {self.precision_name}), every step")
            lines.append(f"layout {max(worst[3], self.norm_diffs.get(step, 0.0)):.1e} vs rounding spread "
                         f"{self.spread.get(step, 0.0):.1e} (step {step}); gradients {d:.1e} vs rounding spread "
                         f"{self.grad_spread:.1e}: {'PASS' if self.ok else 'FAIL'}")
        elif spread:
            lines.append(f"limit past step 1: the tolerance or {SPREAD_MARGIN} x the most that one process moves "
                         "when it splits its batch into micro-batches (rounding_spread), whichever is larger")
        lines.append(f"tolerance {self.tolerance:.0e}: {'PASS' if self.ok else 'FAIL'}"
                     + (f" (steps over their limit: {', '.join(map(str, self.over()))})" if self.over() else "")
                     + (f" (gradients over theirs: {d:.1e} > {self.grad_limit:.1e})" if d > self.grad_limit else ""))
        return "\n".join(lines)


def grad_floor(grads: dict[str, torch.Tensor | None], tolerance: float, precision: str = "fp32") -> float:
    """The smallest scale a tensor's gradient difference is measured against: u x G / tolerance,
    with G the global gradient norm and u the unit roundoff (2^-24 in fp32).

    Layouts differ only in the order of sums, and a reordered sum moves by a few u times the
    size of its terms. For most tensors the terms are the size of the tensor's own gradient,
    so its own norm is the scale (measured: differences of 1e-7 to 4e-7 of it). A gradient
    that vanishes in exact arithmetic is nothing but that rounding: the key bias's (softmax
    ignores a shift shared by every key) is sum_t dL/dk_t, the terms that also make the key
    weight's gradient, so it comes out at about u x |grad wk| (measured: 1e-11 x G, with
    |grad wk| = 3e-4 x G) and two layouts' values differ by as much as the values: O(1) of its
    own norm. The terms of any gradient are of the size of the gradients around it, so
    rounding moves a tensor by up to about u x G (measured: the embedding's gradient, 0.4 x G,
    moves by 0.96 u x G) and a difference below that is no evidence of anything. Against
    max(|b|, u·G/tol) a tensor passes when |a - b| <= max(tol·|b|, u·G): the tolerance of its
    own norm, or the rounding of the whole gradient, whichever is larger. A real bug (a
    missing reduction, a wrong shard) moves a tensor by O(1) of its norm and fails wherever
    that exceeds u·G (tests/parity/test_tp_dp.py::test_verify_fails_on_a_real_bug)."""
    total = sum(g.double().pow(2).sum() for g in grads.values() if g is not None)
    return UNIT_ROUNDOFF[precision] * float(total) ** 0.5 / tolerance


def rel_diff(a: torch.Tensor, b: torch.Tensor, floor: float) -> float:
    """|a - b| / max(|b|, floor), norms over the whole tensor: relative to the tensor's scale, not
    element by element (elementwise ratios explode on entries that are zero up to rounding)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=floor)).item()


def step_diffs(ref: dict, other: dict) -> tuple[dict[int, float], dict[int, float]]:
    """Per step, the relative differences of `other`'s loss and global gradient norm from `ref`'s."""
    losses = {s: abs(other["losses"][s] - a) / abs(a) for s, a in ref["losses"].items()}
    norms = {s: abs(other["grad_norms"][s] - n) / n for s, n in ref["grad_norms"].items()}
    return losses, norms


def compare(ref: dict, other: dict, tolerance: float, precision: str = "fp32") -> Report:
    losses, norms = step_diffs(ref, other)
    rows = [(s, ref["losses"][s], other["losses"][s], losses[s]) for s in sorted(ref["losses"])]
    floor = grad_floor(ref["grads"], tolerance, precision)
    return Report(rows, worst_grad(ref, other, floor), tolerance, norms, floor)


def worst_grad(ref: dict, other: dict, floor: float) -> tuple[str, float]:
    """The parameter whose step-1 gradient differs most, and by how much (rel_diff)."""
    worst = ("", 0.0)
    for name, g in ref["grads"].items():  # those one process has (not an expert no token chose)
        mine = other["grads"].get(name)  # (none: the layout lost a gradient one process has)
        d = rel_diff(mine if mine is not None else torch.zeros_like(g), g, floor)
        if d >= worst[1]:
            worst = (name, d)
    return worst


def rounding_spread(ref_cfg: dict, ref: dict, out_dir: str, probes: int = PROBES, floor: float | None = None,
                    split_k: int = 1) -> dict[int, float] | tuple[dict[int, float], float]:
    """Step: the largest relative difference of loss or gradient norm between the one-process run
    `ref` and `probes` reruns of it that split the batch into smaller micro-batches (the largest
    divisors of the batch below the reference's micro-batch): how far rounding alone moves each step
    on this config. Empty where the batch does not split (one sequence). With split_k > 1 (a tp
    layout in bf16), one more rerun computes each row-parallel GEMM as that many K slices summed in
    the output dtype (policy.split_k_gemm): the reordering inside each row that tp makes and
    micro-batches never do. With a gradient `floor`, also the largest step-1 gradient difference of
    the reruns (worst_grad against that floor)."""
    t = ref_cfg["train"]
    micro = t["micro_batch_size"] or t["batch_size"]
    runs = [(m, 1) for m in [d for d in range(micro - 1, 0, -1) if t["batch_size"] % d == 0][:probes]]
    spread: dict[int, float] = {}
    grads = 0.0
    for m, k in runs + ([(t["micro_batch_size"], split_k)] if split_k > 1 else []):
        name = f"probe_micro{m}" if k == 1 else f"probe_split{k}"
        probe = split_k_run({**ref_cfg, "train": {**t, "micro_batch_size": m, "out_dir": f"{out_dir}/{name}"}}, k)
        losses, norms = step_diffs(ref, probe)
        for s in norms:
            spread[s] = max(spread.get(s, 0.0), losses[s], norms[s])
        if floor is not None:
            grads = max(grads, worst_grad(ref, probe, floor)[1])
    return spread if floor is None else (spread, grads)


def split_k_run(cfg: dict, k: int) -> dict:
    """train_and_capture with policy.SPLIT_K = k for the run (1: as it is)."""
    from .precision import policy

    policy.SPLIT_K = k
    try:
        return train_and_capture(cfg)
    finally:
        policy.SPLIT_K = 1


def verify(cfg: Config, layout: str, steps: int = 10, tolerance: float = 1e-5, precision: str = "fp32",
           references: dict | None = None) -> Report | None:
    """references: a dict the caller keeps to reuse one-process runs between calls (the test suite
    checks many layouts of one config); None runs the reference every time. Under torchrun (a world
    already started, on one machine or several) the layout runs on that world, and rank 0 then runs
    the one-process reference and judges: the report on rank 0, None on the others."""
    from .parallel.launch import run_world

    with tempfile.TemporaryDirectory(prefix="nanotrain-verify-") as tmp:
        # One process: every size 1 (a --parallel.etp=2 given beside --layout tp=2,ep=2 is the
        # layout's); each side is checked under its own sizes, after every value is in.
        one = dataclasses.replace(Layout.from_config(cfg), tp=1, cp=1, pp=1, vp=1, dp=1, ep=1, etp=1, sp=False)
        ref_cfg = one.apply(reference_config(cfg, steps, f"{tmp}/reference", precision))
        # The reference keeps every activation: recomputation (train.recompute) is a memory trade that
        # must not change the model, so a layout that recomputes is checked against one that does not.
        ref_cfg.train.recompute = "none"
        par_cfg = layout_config(reference_config(cfg, steps, f"{tmp}/layout", precision), layout)
        ref_dict = dataclasses.asdict(ref_cfg)
        if under_torchrun():
            other = train_and_capture(dataclasses.asdict(par_cfg))  # this process: one rank of the world
            if other is None:  # not rank 0
                return None
            with alone():
                return judge(reference_run(ref_dict, references), other, ref_dict, tmp, tolerance, precision,
                             par_cfg.parallel.tp)
        ref = reference_run(ref_dict, references)
        world = Layout.from_config(par_cfg).world_size
        other = run_world(train_and_capture, world, dataclasses.asdict(par_cfg))[0]
        return judge(ref, other, ref_dict, tmp, tolerance, precision, par_cfg.parallel.tp)


def under_torchrun() -> bool:
    """This process is one of a world that torchrun started (docs/multinode.md: verify on a cluster)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def alone():
    """Rank 0 of a torchrun world, its share of the layout's run done (the process group gone), runs
    the one-process runs as a world of one."""
    world = os.environ["WORLD_SIZE"]
    os.environ["WORLD_SIZE"] = "1"
    try:
        yield
    finally:
        os.environ["WORLD_SIZE"] = world


def reference_run(ref_cfg: dict, references: dict | None = None) -> dict:
    """train_and_capture(ref_cfg), or the result of an earlier call with the same config in
    `references`. The key is the whole config but where it writes (train.out_dir) and where its
    prepared tokens live (data.prepared_dir: the same tokens wherever prepared): a one-process run is
    deterministic, so a run with an equal key gives equal losses and gradients, bit for bit."""
    if references is None:
        return train_and_capture(ref_cfg)
    key = repr({section: {k: v for k, v in body.items() if k not in ("out_dir", "prepared_dir")}
                for section, body in ref_cfg.items()})
    if key not in references:
        references[key] = train_and_capture(ref_cfg)
    return references[key]


def judge(ref: dict, other: dict, ref_cfg: dict, out_dir: str, tolerance: float, precision: str = "fp32",
          tp: int = 1) -> Report:
    """compare(); where only steps past the first exceed the tolerance, with the rounding spread of
    the one-process run `ref` (of config ref_cfg) measured (the probes run in out_dir)."""
    if precision != "fp32":  # bf16: every figure against the same run's own rounding
        report = compare(ref, other, tolerance, "fp32")  # gradients at fp32's floor: the spread sets the scale
        report.spread, report.grad_spread = rounding_spread(ref_cfg, ref, out_dir, LOW_PRECISION_PROBES,
                                                            report.floor, tp)
        report.precision_name, report.split_k = precision, tp
        return report
    report = compare(ref, other, tolerance, precision)
    over = report.over()
    if over and over[0] > 1 and report.worst_grad[1] <= tolerance:  # step 1 stays strict
        report.spread = rounding_spread(ref_cfg, ref, out_dir)
    return report
