"""Grouped GEMMs: every local expert's matmul as one computation (model.moe_grouped_gemm).

The routed tokens arrive sorted by expert: expert e owns rows [offs[e-1], offs[e]) of x.

    x_sorted [M, d]      w [E, d, f]               y [M, f]
    ┌────────┐ e=0       ┌───┐┌───┐┌───┐           ┌────────┐
    │        │           │w_0││w_1││w_2│    ──►    │x_0 w_0 │
    ├────────┤ e=1                                 ├────────┤
    │        │                                     │x_1 w_1 │
    ├────────┤ e=2                                 ├────────┤
    └────────┘                                     └────────┘

A Python loop launches E GEMMs (and E backward pairs), each on few tokens: at 32 or 64 experts
per rank the per-op overhead dominates. Two ways to run them at once:

- torch._grouped_mm(x, w, offs): one kernel over the groups (CUTLASS on Hopper, a loop inside
  ATen on CPU), with its own backward. It wants 16-byte aligned rows, so 16-bit dtypes need
  widths that are multiples of 8.
- padded: scatter each expert's rows into a [E, max_tokens, d] batch (zeros elsewhere), one
  torch.bmm, gather the rows back. It wastes the padding's FLOPs when the load is uneven, but
  works on any build and dtype.

Megatron's GroupedMLP calls grouped_gemm (CUTLASS) and TEGroupedMLP Transformer Engine's; both
are this same contract. tests/unit/test_grouped.py holds both paths to the per-expert loop (1e-6
in fp32); bench/moe.py times grouped against the loop.
"""

from __future__ import annotations

import itertools

import torch


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes these operands here: the op exists, and its rows are
    16-byte aligned (the kernel's requirement, on CPU as on CUDA)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    align = 16 // x.element_size()
    return x.shape[-1] % align == 0 and w.shape[-1] % align == 0 and w.shape[-2] % align == 0


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: list[int], offs: torch.Tensor | None = None,
               padded: bool | None = None) -> torch.Tensor:
    """y[rows of e] = x[rows of e] @ w[e] for every expert e: x [M, d] sorted by expert with
    counts[e] rows each, w [E, d, f] -> [M, f]. offs: cumsum(counts) as int32 on x's device
    (pass it to reuse it across the three GEMMs of an expert MLP). padded: None picks
    torch._grouped_mm when it takes the operands, else the padded batch."""
    if x.shape[0] == 0:  # no rows (an expert-parallel rank may get none): an empty output that
        return x @ w[0]  # is still connected to x and w, so this rank's backward runs with its peers'
    if padded is None:
        padded = not grouped_mm_supported(x, w)
    if not padded:
        if offs is None:
            offs = group_offsets(counts, x.device)
        y = torch._grouped_mm(x, w, offs=offs)
        if y.requires_grad:  # its backward refuses a broadcast gradient (stride 0, as from y.sum())
            y.register_hook(torch.Tensor.contiguous)
        return y
    return _padded_bmm(x, w, counts)


def group_offsets(counts: list[int], device) -> torch.Tensor:
    """Where each group's rows end, int32 (torch._grouped_mm's `offs`)."""
    return torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32, device=device)


def _padded_bmm(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    E, most = len(counts), max(counts)
    # Row i of x goes to slot (expert of i, its rank among that expert's rows).
    expert = torch.repeat_interleave(torch.arange(E, device=x.device),
                                     torch.tensor(counts, device=x.device), output_size=x.shape[0])
    starts = torch.tensor([0] + counts[:-1], device=x.device).cumsum(0)
    slot = expert * most + torch.arange(x.shape[0], device=x.device) - starts[expert]
    batch = x.new_zeros(E * most, x.shape[-1]).index_copy(0, slot, x).view(E, most, -1)
    return torch.bmm(batch, w).view(E * most, -1).index_select(0, slot)
