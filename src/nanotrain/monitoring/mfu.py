"""Model FLOPs utilization (MFU): how much of the hardware's matmul throughput we use.

    MFU = achieved model FLOP/s / peak FLOP/s
        = tokens_per_s * flops_per_token / peak_flops

"Model" FLOPs count only what the math of the model needs (PaLM, appendix B):
recomputation (activation checkpointing) and padding don't count, so MFU is
comparable across implementations. Both sides are the whole job's: tokens/s of
the global batch, and the peak of every GPU (the datasheet's, in the dtype the
run computes in) or of every CPU node (torch.mm timed once with all its cores;
runtime/machine.py), so 0 < MFU <= 1 whatever the layout.

A run's figures come from `Throughput`: the model's FLOPs per token and the job's peak are found
once at start-up, and each logging step divides its tokens/s by them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable



def transformer_flops_per_token(n_matmul_params: int, n_layers: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token of a decoder-only transformer (PaLM's convention).

        6 * N            the weight matmuls. Each parameter in a matmul does one
                         multiply-add (2 FLOPs) per token in the forward pass, and
                         twice that in the backward pass (gradient w.r.t. the
                         input and w.r.t. the weight): 2 + 4 = 6.
                         N counts the parameters that take part in matmuls,
                         the output head included; embedding lookups, norms and
                         biases are not matmuls and are left out.
        12 * L * d * T   attention's own matmuls, which have no parameters:
                         scores Q K^T and the weighted sum P V each cost
                         2 * d * T FLOPs per token per layer forward (a d-wide
                         dot product with each of T positions), 4 * d * T for
                         both, times 3 for forward + backward.
                         It counts the full T x T score matrix, as PaLM does,
                         although a causal mask makes half of it unnecessary.
    """
    return 6.0 * n_matmul_params + 12.0 * n_layers * d_model * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilization as a fraction (0.42 = 42%)."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops}")
    return tokens_per_s * flops_per_token / peak_flops


@dataclass
class Throughput:
    """The fixed terms of a run's MFU, found once.

    FLOPs per token of the logical model (inspection/counts.py, the count `nanotrain inspect`
    prints: every matmul a token runs, attention's included), from a copy on the meta device,
    so the layout does not enter. The MFU divides the whole job's FLOP/s by the whole job's
    peak: every GPU's, or every CPU node's (runtime/machine.py: probed once, not per rank)."""

    n_params: int  # of the logical model
    flops_per_token: float
    peak: float  # FLOP/s of the whole job
    peak_source: str
    # A peak timed on this CPU at start-up: how to time it again (runtime/machine.py's retimed_peak).
    # None: a datasheet's or logging.peak_tflops, which no measurement overrules.
    retime: Callable[[], float] | None = None
    remeasured: bool = False

    def mfu(self, tokens_per_s: float) -> float:
        value = mfu(tokens_per_s, self.flops_per_token, self.peak)
        if value > 1 and self.retime is not None and not self.remeasured:
            # The run computes faster than the peak: the peak was timed on busy cores (or stands in
            # for a rejected measurement, runtime/machine_cache.py). Time the matmuls again, once.
            self.remeasured = True
            again = self.retime()
            if again > self.peak:
                print(f"warning: this run reached {value:.0%} of the peak ({self.peak / 1e12:.3g} TFLOP/s): "
                      f"it was timed on busy cores. Measured again: {again / 1e12:.3g} TFLOP/s, the MFU's "
                      "peak from now on (`nanotrain machine --measure` keeps a new one).", flush=True)
                self.peak, self.peak_source = again, self.peak_source + ", measured again during the run"
            value = mfu(tokens_per_s, self.flops_per_token, self.peak)
        if value > 1 and self.retime is not None:
            # Still faster than the peak: a peak is the most the machine does, and this run did more.
            # The run's own rate is the best measurement there is; it becomes the peak (MFU 100%).
            achieved = tokens_per_s * self.flops_per_token
            print(f"warning: this run computes at {achieved / 1e12:.3g} TFLOP/s, above the measured peak of "
                  f"{self.peak / 1e12:.3g}: the peak was timed low. The run's own rate is the peak from now on.",
                  flush=True)
            self.peak, self.peak_source = achieved, self.peak_source + ", raised to the run's own rate"
            value = 1.0
        return value
