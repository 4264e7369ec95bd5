"""Model FLOPs utilization (MFU): how much of the hardware's matmul throughput we use.

    MFU = achieved model FLOP/s / peak FLOP/s
        = tokens_per_s * flops_per_token / peak_flops

"Model" FLOPs count only what the math of the model needs (PaLM, appendix B):
recomputation (activation checkpointing) and padding don't count, so MFU is
comparable across implementations. Both sides are the whole job's: tokens/s of
the global batch, and the peak of every GPU (the datasheet's, in the dtype the
run computes in) or of every CPU node (torch.mm timed once with all its cores;
runtime/machine.py), so 0 < MFU <= 1 whatever the layout.
"""

from __future__ import annotations


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
