"""The probe batch: a few fixed val sequences, forwarded now and then to watch how the model's
predictions change, on the same tokens every time and under every layout.

    probe/hash        sha256 of the probe's token ids: logged at the start, kept in checkpoints
    probe/loss        mean cross entropy (nats) over the probe's targets
    probe/entropy     mean entropy (nats) of the next-token distribution softmax(logits)
    probe/top1_mass   mean probability of the most likely token
    probe/top5_mass   mean probability of the five most likely tokens

Why a fixed batch: the train loss moves with the batch drawn at each step, and the val
loss averages many. The probe changes only when the model does, so its figures compare
across steps, across runs and across a resume. Entropy and top-k mass say how sure the
model is, which the loss alone does not: a model that is confidently wrong and one that
hedges can have the same loss. The hash makes sure it is the same batch: a resume whose
probe differs from the checkpoint's stops, because then the val tokens, so the data, changed.

Under tensor parallelism the head's logits are split over the vocabulary (rank r holds
columns [r V/tp, (r+1) V/tp)). The figures come from the shards without gathering the
logits, the way vocab_parallel_cross_entropy computes the loss (z = logits - max, e = exp z,
S = sum e over the whole vocabulary):

    max        all-reduce MAX of each shard's max
    S, sum e z all-reduce SUM of each shard's sums; entropy H = log S - sum(e z) / S
    loss       log S - z[target] (the target's z lives on one shard, 0 elsewhere: SUM)
    top-k      gather each shard's own top k of e; the global top k are among them

A vocabulary padded to a multiple of tp has logit -inf in its padding columns
(tensor_parallel.VocabParallelHead): e = 0 there, and e z, which would be 0 x -inf, is
taken as its limit, 0. The figures are those of the unpadded vocabulary.

Only the last pipeline stage runs the head: its sums are all-reduced over the pp group (the
other stages add 0). Every data-parallel rank forwards the whole probe (a few sequences, in
one forward): no dp reduction, and the forward is the one-process one.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch

from ..checkpoint.storage import CheckpointError
from ..parallel.collectives import all_reduce, gather_last
from ..parallel.tensor_parallel import shifted_softmax_sums

if TYPE_CHECKING:
    from ..runtime.step import ForwardBackward

IGNORE_INDEX = -100
TOP_K = (1, 5)
KEYS = ("probe/loss", "probe/entropy", *(f"probe/top{k}_mass" for k in TOP_K))


def probe_hash(x: torch.Tensor, y: torch.Tensor) -> str:
    """sha256 over the inputs and targets as little-endian int64, shape first: any change shows."""
    h = hashlib.sha256(f"nanotrain-probe|{list(x.shape)}|".encode())
    for t in (x, y):
        h.update(t.detach().cpu().to(torch.int64).numpy().astype("<i8").tobytes())
    return h.hexdigest()


def logit_sums(logits: torch.Tensor, targets: torch.Tensor, group=None, rank: int = 0) -> torch.Tensor:
    """[len(KEYS) + 1] float64: the sums over the non-ignored targets of each figure in KEYS,
    then their count. logits [..., V/tp] is this rank's vocabulary shard (with group, the
    tensor-parallel group, and rank, its rank in it) or the whole vocabulary (group None)."""
    keep = targets.flatten() != IGNORE_INDEX
    z, t = logits.detach().float().flatten(0, -2)[keep], targets.flatten()[keep]
    n = z.shape[-1]

    def ez_sum(z, e):  # for the entropy: sum e z (e z -> 0 as z -> -inf: padding columns are 0 x -inf)
        return (torch.where(e > 0, e * z, 0.0).sum(-1),)

    _, e, (z_target, s, ez), _, _ = shifted_softmax_sums(z, t, rank * n, group, IGNORE_INDEX, ez_sum)
    log_s = s.log()
    most = max(TOP_K)
    top = gather_last(e.topk(min(most, n), -1).values, group)  # each shard's own top k, side by side
    top = top.topk(min(most, top.shape[-1]), -1).values / s.unsqueeze(-1)
    per_token = torch.stack([log_s - z_target, log_s - ez / s, *(top[:, :k].sum(-1) for k in TOP_K)])
    count = torch.tensor([float(t.numel())], dtype=torch.float64, device=per_token.device)
    return torch.cat([per_token.double().sum(-1), count])


class Probe:
    """The probe batch (x, y) [n, seq_len], the same on every rank, and when to measure it."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, interval: int):
        self.x, self.y, self.interval = x, y, interval
        self.hash = probe_hash(x, y)

    @classmethod
    def build(cls, cfg, data, is_main: bool = True) -> Probe | None:
        """The run's probe; None in monitoring modes off and minimal, or with probe_batch=0."""
        m = cfg.monitoring
        if m.mode in ("off", "minimal") or m.probe_batch == 0:
            return None
        if cfg.parallel.cp > 1:
            if is_main:
                print("monitoring: the probe batch and the attention figures are off under parallel.cp > 1 (no "
                      "rank holds a whole sequence, or a whole row of attention)", flush=True)
            return None
        if not hasattr(data, "probe_batch"):
            if is_main:
                print(f"monitoring: {type(data).__name__} has no probe_batch(n): the probe batch is off", flush=True)
            return None
        x, y = data.probe_batch(m.probe_batch)
        return cls(x, y, m.probe_interval or cfg.train.eval_interval)

    def due(self, step: int, is_last: bool) -> bool:
        """At every `interval` steps and at the end (interval 0: at the end only), as evaluation."""
        return is_last or (self.interval > 0 and step % self.interval == 0)

    def state(self) -> dict:
        """What a checkpoint keeps, for check_resume."""
        return {"hash": self.hash, "sequences": len(self.x)}

    @torch.no_grad()
    def measure(self, step: ForwardBackward, ctx) -> dict[str, float]:
        """Forward the probe in eval mode (no dropout, no gradients, no state) and return the
        figures, the same on every rank. step: the run's ForwardBackward (runtime/step.py), which
        runs it as one evaluation batch, through the pipeline's stages if there is one."""
        ps = ctx.parallel
        # The head's output is the (vocabulary-sharded) logits under every layout, and on the
        # last pipeline stage: a hook reads them there, so the model needs no probe path of its own.
        head = getattr(step.model, "head", None)  # None on pipeline stages before the last
        logits: list[torch.Tensor] = []
        hook = head.register_forward_hook(lambda mod, inp, out: logits.append(out)) if head is not None else None
        try:
            step.evaluate([(self.x, self.y)])  # one batch: one forward of every stage
        finally:
            if hook is not None:
                hook.remove()
        sums = torch.zeros(len(KEYS) + 1, dtype=torch.float64, device=ctx.device)
        for out in logits:  # one forward of the head, or none (an earlier pipeline stage)
            sums += logit_sums(out, self.y, ps.tp_group, ps.tp_rank)
        all_reduce(sums, ps.pp_group)  # the last stage's sums to every stage
        return dict(zip(KEYS, (sums[:-1] / sums[-1].clamp(min=1)).tolist()))


def check_resume(saved: dict | None, probe: Probe | None, path, is_main: bool = True) -> None:
    """A resumed run must probe the batch the checkpoint's run did. The same number of
    sequences with other tokens means the val tokens changed, so the data did (the text at
    data.path, or how it was prepared): stop. Another number is a choice (monitoring.probe_batch
    changed): a note, since the probe figures before and after no longer compare."""
    if not saved or probe is None:  # the probe was off then, or is now
        return
    if saved.get("sequences") != len(probe.x):
        if is_main:
            print(f"note: the probe batch has {len(probe.x)} sequences, the checkpoint's had {saved.get('sequences')} "
                  "(monitoring.probe_batch changed): probe figures before and after this resume do not compare",
                  flush=True)
        return
    if saved.get("hash") != probe.hash:
        raise CheckpointError(
            f"the probe batch differs from the one checkpoint {path} was trained with: sha256 {saved.get('hash')} "
            f"in the checkpoint, {probe.hash} now. Its {len(probe.x)} sequences are drawn from the val tokens by "
            "(train.seed, train.seq_len) alone, so the data changed: the text at data.path or its preparation is "
            "not what this run trained on. Restore that data to resume, or start a fresh run without "
            "checkpoint.resume (set monitoring.probe_batch=0 to resume on the new data anyway, knowingly).")
