"""How long one optimizer step takes for a layout on a cluster, as a sum whose parts can be read.

    step = pipeline makespan                     (the schedule played with each action's time)
         + exposed data-parallel communication   (what the backward could not hide)
         + optimizer                              (AdamW over this rank's share, memory bound)

Each pipeline action (F, B, W of one micro-batch through one chunk, parallel/pipeline/actions.py)
costs what its layers cost on one rank:

    GEMMs        each linear layer's [tokens, in] @ [in, out] on this rank's shard: forward once,
                 backward twice (the input's gradient in B, the weights' in W), each through
                 Cluster.gemm_s: max(FLOPs / achievable peak, bytes / HBM) + a kernel's fixed cost
    attention    a fused (flash) kernel over the causal half of the T x T square it really
                 computes: forward F, backward 2.5 F (FlashAttention recomputes the scores)
    elementwise  norms, residual adds, RoPE, the MLP activation, the MoE permutation, the loss:
                 the bytes they read and write at HBM bandwidth, backward twice the forward
    tp, ep, cp   the bytes comm.py counts for this code's collectives, through the alpha-beta
                 cost of the group's links (cluster.py), exposed: tensor-parallel collectives
                 wait for their inputs; the expert all-to-alls too, except under DualPipeV, whose
                 paired forward and backward hide each other's; the context-parallel ring
                 overlaps its sends with attention and shows what attention cannot cover
    recompute    a recomputed block's forward again in its backward: everything under
                 `full`; under `selective` (recompute.py keeps matmul and attention outputs) the
                 elementwise ops and the collectives before them

The pipeline is then played (schedules.timed_play) with these costs, the real orders the runner
executes, so every schedule's bubble comes from the schedule itself. Pipeline sends overlap: they
only delay the neighbour's next action by their transfer time. The data-parallel gradient sync
overlaps with the last micro-batch's backward (bucketed, as parallel/data_parallel.py posts it),
ZeRO-3's gathers with the compute they prefetch for; the tail that cannot hide is exposed.

MFU counts model FLOPs (counts.py: 6 N + attention over the full square, no recomputation)
against the dense peak of the GEMM dtype; HFU adds the recomputed forward.

On this machine's CPU (--hardware cpu: cluster.cpu_cluster, a cluster with measured `pieces`), a
tiny model's step is another machine's: PyTorch's per-operation cost, not arithmetic, rules it,
and gloo's calls cost what a VM's sleeping cores take to wake. There the parts are:

    blocks       each kind of block's forward and backward timed whole at the rank's shapes
                 (cpu_measure.block_seconds: its tp shard, its share of the experts, the run's
                 autocast and attention dtype, a chunk's blocks in a row); W is its weight-gradient
                 GEMMs, timed at their shapes and operand layouts (cpu_measure.gemm_seconds)
    new shapes   the routed experts' GEMMs: the rows each expert receives change every step, and a
                 bf16 GEMM at a shape oneDNN has not built yet costs ~30x one it has
                 (cpu_measure.new_shape_seconds): NEW_SHAPE_SHARE of them, a stated measurement;
                 under ep each all-to-all also waits for the rank that met the most of them
                 (slowest_rank_wait: the binomial spread of the ranks' counts, its expected maximum)
    ends         the embedding, and the final norm, head and loss, timed the same way
    collectives  each call as the code makes it (one per bucket, per ZeRO-3 unit, the expert
                 all-to-alls' token counts, the step's scalar all-reduces: the loss's token count,
                 the gradient norm, the experts' load, the tied embedding's gradient), each at the
                 mean cost of a gloo call between two computations (cpu_measure.measure_gloo)
    optimizer    ZeroOptimizer's step over the rank's tensors timed (cpu_measure.optimizer_seconds:
                 the norm, the clipping and fused AdamW cost per tensor more than per byte)
    data         drawing the step's micro-batches (cpu_measure.data_seconds)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..config import ModelConfig
from ..layers import Linear
from ..params import spec
from .cluster import Cluster
from .comm import block_tp_linears, cp_per_step, dp_per_step, ep_per_micro_batch, root_numel, tp_per_micro_batch, \
    tp_recomputed_per_micro_batch
from .memory import BYTES, Plan, RankModelView, compute_bytes, dense_and_expert, plan_stage, stage_layers, \
    stage_parameters, vocab_per_rank

DP_BUCKET_BYTES = 40e6  # the last gradient bucket, whose sync nothing hides (Megatron's default size)

# A measured CPU (cluster.CpuPieces): the share of the routed experts' GEMMs that meet a shape oneDNN
# has not built in this process. Measured on the 2-core AMX Xeon with ONEDNN_VERBOSE=all over steps
# 1-60 of deepseek_tiny at dp=2, ep=2: 24 cache misses per rank and step among its 108 expert GEMMs
# (3 MoE layers x 4 local experts x 3 forward + 6 backward), 0.22; the routing's spread keeps them
# coming for hundreds of steps (the step time at steps 280-300 is within 10% of steps 5-25's).
NEW_SHAPE_SHARE = 0.22
BLOCK_CHAIN = 4  # a measured CPU times up to this many blocks of a kind in a row (cpu_measure.block_seconds)


def expected_max_of_normals(n: int) -> float:
    """E[max of n independent standard normals]: 0 for one, 1/sqrt(pi) = 0.564 for two, 1.03 for
    four, 1.42 for eight (integrated numerically over the max's density, n phi(z) Phi(z)^(n-1))."""
    if n <= 1:
        return 0.0
    step, total = 0.01, 0.0
    for i in range(-800, 801):
        z = i * step
        total += z * n * math.exp(-z * z / 2) / math.sqrt(2 * math.pi) * (0.5 * (1 + math.erf(z / math.sqrt(2)))) ** (n - 1)
    return total * step


def slowest_rank_wait(ranks: int, gemms: float, new_shape_seconds: list[float]) -> float:
    """A measured CPU: what an all-to-all waits for the slowest of `ranks` beyond the mean. Between
    two all-to-alls each rank runs `gemms` expert GEMMs of each layout, and each meets a shape oneDNN
    has not built with probability NEW_SHAPE_SHARE, at the given extra seconds: the ranks' counts of
    new shapes differ at random (binomial, variance g s (1 - s) c^2), and the all-to-all ends when
    the rank that met the most does. Normal approximation: the mean plus E[max of n normals] sigma."""
    s = NEW_SHAPE_SHARE
    variance = sum(gemms * s * (1 - s) * c * c for c in new_shape_seconds)
    return expected_max_of_normals(ranks) * math.sqrt(variance)


@dataclass
class Cost:
    """Seconds of one pass (F, B's input half, W) of one micro-batch through some layers, by part."""
    compute: float = 0.0
    tp: float = 0.0
    ep: float = 0.0
    cp: float = 0.0
    dp: float = 0.0  # ZeRO-3's gathers that prefetching could not hide

    def __add__(self, o: Cost) -> Cost:
        return Cost(*(a + b for a, b in zip(self.parts(), o.parts())))

    def __mul__(self, k: float) -> Cost:
        return Cost(*(a * k for a in self.parts()))

    def parts(self) -> tuple[float, ...]:
        return self.compute, self.tp, self.ep, self.cp, self.dp

    @property
    def total(self) -> float:
        return sum(self.parts())


# -- one micro-batch through one block ------------------------------------------------------------


@dataclass(frozen=True)
class Shapes:
    """One micro-batch on one rank: tokens through the matmuls (n) and through the norms and the
    router (ns: n / tp under sequence parallelism), bytes per element of the compute dtype (c)
    and of the residual stream (r), and the GEMM dtype."""
    n: int
    ns: int
    c: int
    r: int
    dtype: str


def block_gemms(module, m: ModelConfig, plan: Plan, w: Shapes) -> list[tuple[float, int, int, float]]:
    """(tokens, in, out, count) of every GEMM a block (or the head, the MTP module) runs forward on
    this rank. A weight split over tp sees all n tokens (gathered under sequence parallelism); a
    replicated one (router, low-rank projections, shared experts) the ns this rank holds. Routed
    experts: each of this rank's experts takes its share of the (token, slot) assignments, which
    all-to-all brings from every rank of the ep group (balanced routing)."""
    out = []
    for name, mod in module.named_modules():
        if isinstance(mod, Linear):
            out.append((w.n if spec(mod.weight).tp_sharded else w.ns, mod.in_features, mod.out_features, 1))
        elif name.endswith("router"):
            out.append((w.ns, mod.weight.shape[1], mod.weight.shape[0], 1))
        elif name.endswith("experts") and not name.endswith("shared_experts"):
            rows = w.ns * m.moe_top_k * (plan.tp if plan.layout.etp > 1 and plan.sp else 1)
            for p in mod.parameters():  # [local experts, out, in]
                e = p.shape[0]
                out.append((rows * plan.ep / m.n_routed_experts, p.shape[2], p.shape[1], e))
    return out


def attention_flops(m: ModelConfig, plan: Plan) -> float:
    """Forward FLOPs of one micro-batch's attention core in one block on one rank, over the causal
    half of the square that a flash kernel computes (cp ranks share it evenly: the ring's load
    balancing)."""
    from .counts import attention_dims

    heads, dqk, dv = attention_dims(m)
    t = plan.seq_len
    return 2.0 * plan.micro_batch_size * heads / plan.tp * t * t / 2 * (dqk + dv) / plan.cp


def elementwise_bytes(m: ModelConfig, plan: Plan, layer: int, w: Shapes) -> tuple[float, int]:
    """(bytes, kernels) the memory-bound ops of one block move forward: each reads its inputs and
    writes its output once. Norms and residual adds run on ns tokens in the residual dtype."""
    from ..models.mlp import ffn_width

    d, n, ns, c, r = m.d_model, w.n, w.ns, w.c, w.r
    total = 2 * ns * d * (r + c) + 2 * 3 * ns * d * r  # two norms, two residual adds
    kernels = 4
    heads = m.n_heads // plan.tp
    if m.arch == "deepseek":
        lo = (m.q_lora_rank + m.kv_lora_rank) * ns * 2 * c  # q_norm, kv_norm
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        total += lo + 2 * 2 * n * heads * qk * c  # RoPE and the q, k assembled from nope and rope parts
        kernels += 4
    elif m.pos_emb == "rope":
        hd, kv = d // m.n_heads, (m.n_kv_heads or m.n_heads) // plan.tp
        total += 2 * n * (heads + kv) * hd * c
        kernels += 2
    if m.arch == "deepseek" and layer >= m.first_k_dense_replace:
        a = ns * m.moe_top_k * (plan.tp if plan.layout.etp > 1 and plan.sp else 1)
        f = m.moe_d_ff // plan.layout.etp
        total += 3 * ns * m.n_routed_experts * 4  # scores, top-k, their weights (fp32)
        total += 2 * 2 * a * d * c + a * d * c + ns * d * c  # permute out and back, weighted combine
        total += 3 * a * f * c + 3 * ns * m.n_shared_experts * m.moe_d_ff * c  # SwiGLUs
        kernels += 8
    else:
        f = (m.d_ff or ffn_width(m)) // plan.tp
        total += (3 if m.mlp == "swiglu" or m.arch == "deepseek" else 2) * n * f * c
        kernels += 1
    return total, kernels


def weight_cast_bytes(module, w: Shapes) -> float:
    """Under autocast with wider stored weights (r > c), every weight is cast to the compute dtype
    once per micro-batch: read r bytes, write c."""
    if w.r <= w.c:
        return 0.0
    return sum(p.numel() for p in module.parameters() if p.dim() >= 2) * (w.r + w.c)


def loss_bytes(m: ModelConfig, plan: Plan, w: Shapes) -> float:
    """The last stage's final norm and cross entropy over this rank's vocabulary slice, forward:
    the logits written, then read and written in fp32 by the softmax."""
    v = vocab_per_rank(m, plan.tp)
    return w.ns * m.d_model * (w.r + w.c) + w.n * v * (w.c + 3 * 4)


class BlockCosts:
    """The costs of one micro-batch through each kind of block and through the model's ends, on one
    rank of a layout: computed once per (model, layout, micro-batch, dtype), shared by every
    chunk (a DeepSeek model has two kinds of block; a dense transformer one)."""

    def __init__(self, m: ModelConfig, plan: Plan, precision, cluster: Cluster, dtype: str, view: RankModelView,
                 tp_overlap: bool = False, attention: str = "flash", selective_core: bool = False):
        self.m, self.plan, self.cluster, self.dtype = m, plan, cluster, dtype
        self.precision_recipe = precision.recipe
        self.tp_overlap = tp_overlap and cluster.overlap
        self.attention, self.selective_core = attention, selective_core
        r = BYTES[precision.param_dtype]
        c = min(compute_bytes(precision), r)
        n = plan.micro_batch_size * plan.seq_len // plan.cp
        self.w = Shapes(n, n // plan.tp if plan.sp else n, c, r, dtype)
        self.view = view
        self._kind: dict[str, tuple[Cost, Cost, Cost, Cost, Cost]] = {}
        # A measured CPU's timed pieces (cluster.CpuPieces), None elsewhere: the formulas below.
        self.pieces = cluster.measured.get("pieces") if cluster.measured else None

    def _gemm_passes(self, gemms) -> tuple[float, float, float]:
        g, dt = self.cluster.gemm_s, self.dtype
        if self.pieces is not None:  # the operand layouts autograd hands torch.mm (cpu_measure.LAYOUTS)
            fwd = sum(g(t, k, o, dt, e, "nt") for t, k, o, e in gemms)  # Y = X W^T, W stored [out, in]
            dx = sum(g(t, o, k, dt, e, "nn") for t, k, o, e in gemms)
            dw = sum(g(k, t, o, dt, e, "tn") for t, k, o, e in gemms)
            return fwd, dx, dw
        fwd = sum(g(t, k, o, dt, e) for t, k, o, e in gemms)
        dx = sum(g(t, o, k, dt, e) for t, k, o, e in gemms)  # dX = dY W^T: [t, out] @ [out, in]
        dw = sum(g(k, t, o, dt, e) for t, k, o, e in gemms)  # dW = X^T dY: [in, t] @ [t, out]
        if dt == "fp8":  # every operand quantized first: read in 16 bits, written in 8, and again transposed
            # for the backward's other layout (Transformer Engine's cast-transpose): 4 bytes per element
            fwd += self.cluster.memory_s(sum(4 * e * (t * k + k * o) for t, k, o, e in gemms), len(gemms))
            dx += self.cluster.memory_s(sum(4 * e * t * o for t, k, o, e in gemms), len(gemms))
        return fwd, dx, dw

    def block(self, layer: int) -> tuple[Cost, Cost, Cost, Cost, Cost]:
        """(F, B's input half, W, recomputed forward under `selective`, under `full`) of one block."""
        dense = self.m.arch != "deepseek" or layer < self.m.first_k_dense_replace
        kind = "dense" if dense else "moe"
        if kind not in self._kind:
            self._kind[kind] = self._block(layer)
        return self._kind[kind]

    def _block(self, layer: int):
        m, plan, cl, w = self.m, self.plan, self.cluster, self.w
        module = self.view.layers[str(layer)]
        if self.pieces is not None:
            timed = self._timed_block(layer, module)
            if timed is not None:
                return timed
        fwd, dx, dw = self._gemm_passes(block_gemms(module, m, plan, w))
        if self.attention == "unfused":
            attn, attn_b = self._unfused_attention()
        else:
            attn = cl.attention_s(attention_flops(m, plan), self.dtype)
            attn_b = cl.attention_s(2.5 * attention_flops(m, plan), self.dtype)
        elem, kernels = elementwise_bytes(m, plan, layer, w)
        elem_f = cl.memory_s(elem + weight_cast_bytes(module, w), kernels)
        elem_b = cl.memory_s(2 * elem, 2 * kernels)
        tp_f, tp_b = self._tp(layer)
        if self.tp_overlap:  # each collective pipelined with the GEMM beside it: only the excess shows
            tp_f, tp_b = max(0.0, tp_f - fwd), max(0.0, tp_b - dx - dw)
        ep = self._ep(layer)
        cp_f, cp_b = self._cp(attn, attn_b)
        F = Cost(fwd + attn + elem_f, tp_f, ep, cp_f)
        B = Cost(dx + attn_b + elem_b, tp_b, ep, cp_b)
        W = Cost(dw)
        tp_again = self._tp_recomputed(layer)
        ep_again = ep if plan.recompute != "none" else 0.0
        # Selective recomputation reruns what is cheap to compute and costly to keep: here (recompute.py)
        # the elementwise ops and the collectives before them; in Megatron, the attention core alone.
        if self.selective_core:
            selective = Cost(attn, 0.0, 0.0, cp_f)
        else:
            selective = Cost(cl.memory_s(elem, kernels), tp_again, ep_again, cp_f)
        full = Cost(fwd + attn + elem_f, tp_again, ep_again, cp_f)
        if plan.pp > 1 and plan.pp_schedule == "dualpipev":  # a paired backward's compute hides the all-to-alls
            for cost in (F, B, selective, full):
                cost.ep = max(0.0, cost.ep - cost.compute)
        return F, B, W, selective, full

    def _timed_block(self, layer: int, module):
        """A measured CPU: the block's forward and backward timed whole (cpu_measure.block_seconds,
        None where it cannot be: too large, or context parallel, whose ring needs its group), its
        collectives as the code calls them, and the routed experts' GEMMs at new shapes."""
        m, plan, w = self.m, self.plan, self.w
        moe = m.arch == "deepseek" and layer >= m.first_k_dense_replace
        if plan.cp > 1 or self.precision_recipe not in ("bf16", "fp32"):
            return None
        kind_count = m.n_layers - m.first_k_dense_replace if moe else \
            (m.first_k_dense_replace if m.arch == "deepseek" else m.n_layers)
        chunk = max(1, m.n_layers // (plan.pp * plan.pp_virtual_stages))
        chain = max(1, min(BLOCK_CHAIN, kind_count, chunk))
        timed = self.pieces.block(m, "moe" if moe else "dense", plan.micro_batch_size, plan.seq_len // plan.cp,
                                  plan.tp, plan.sp, plan.layout.etp, plan.ep, self.dtype, chain)
        if timed is None:
            return None
        fwd, bwd = timed
        gemms = block_gemms(module, m, plan, w)
        fwd_gemms, _, dw = self._gemm_passes(gemms)
        dw = min(dw, bwd)  # the weights' gradients (W), the rest of backward is B
        if moe:  # each local expert's 3 GEMMs forward and 6 backward, some at shapes not built yet
            experts = sum(e for _, _, _, e in gemms if e > 1) / 3 or m.n_routed_experts / plan.ep
            width = m.moe_d_ff // plan.layout.etp
            cost = {lay: self.pieces.new_shape(self.dtype, lay, width) for lay in ("nn", "nt", "tn")}
            new = {lay: 3 * NEW_SHAPE_SHARE * experts * c for lay, c in cost.items()}  # forward X W;
            fwd, bwd = fwd + new["nn"], bwd + new["nt"] + new["tn"]  # backward dY W^T and X^T dY
        tp_f, tp_b = self._tp(layer)
        ep_f, ep_b = self._ep_calls(layer)
        if moe and plan.ep > 1:  # each all-to-all waits for the rank that met the most new shapes
            ep_f += slowest_rank_wait(plan.ep, 3 * experts, [cost["nn"]])
            ep_b += slowest_rank_wait(plan.ep, 3 * experts, [cost["nt"], cost["tn"]])
        F = Cost(fwd, tp_f, ep_f)
        B = Cost(bwd - dw, tp_b, ep_b)
        W = Cost(dw)
        tp_again = self._tp_recomputed(layer)
        ep_again = ep_f if plan.recompute != "none" else 0.0
        # Selective recomputation reruns what is not a GEMM (recompute.py keeps the matmul outputs).
        selective = Cost(max(0.0, fwd - fwd_gemms), tp_again, ep_again)
        full = Cost(fwd, tp_again, ep_again)
        return F, B, W, selective, full

    def _ep_calls(self, layer: int) -> tuple[float, float]:
        """A measured CPU: one MoE block's all-to-alls as expert_parallel_forward calls them: forward
        the token counts (E integers), the dispatch and the combine; backward the two reversed."""
        plan = replace(self.plan, recompute="none")
        ep = ep_per_micro_batch(self.m, plan, [layer], self.w.c, self.w.r).get("ep")
        if not ep:
            return 0.0, 0.0
        counts = self.m.n_routed_experts * 8
        data = (ep["all_to_all"] - counts) / 2  # each direction's dispatch and combine
        a2a = self.cluster.collective_s
        return (a2a("all_to_all", counts, self.plan.tp, self.plan.ep) + a2a("all_to_all", data, self.plan.tp,
                                                                             self.plan.ep, 2),
                a2a("all_to_all", data, self.plan.tp, self.plan.ep, 2))

    def _unfused_attention(self) -> tuple[float, float]:
        """Forward and backward seconds of an attention core that writes the T x T scores to memory
        (Megatron before FlashAttention: batched QK^T and PV GEMMs over the full square, a fused
        scale-mask-softmax and dropout between them): per head, the scores written (2 bytes), read and
        the probabilities written by the softmax (4), the dropout's mask and output (3), read by PV (2)."""
        from .counts import attention_dims

        m, plan, cl = self.m, self.plan, self.cluster
        heads, dqk, dv = attention_dims(m)
        t, count = plan.seq_len // plan.cp, plan.micro_batch_size * heads // plan.tp
        square = count * t * plan.seq_len
        fwd = cl.gemm_s(t, dqk, plan.seq_len, self.dtype, count) + cl.gemm_s(t, plan.seq_len, dv, self.dtype, count)
        return fwd + cl.memory_s(11 * square, 3), 2 * fwd + cl.memory_s(2 * 11 * square, 6)

    def _tp(self, layer: int) -> tuple[float, float]:
        """A block's tensor-parallel collectives, each mirrored in backward: half the time each way."""
        if self.plan.tp == 1:
            return 0.0, 0.0
        t = tp_per_micro_batch(self.m, self.plan, [layer], False, False, self.w.c, self.w.r)
        count = len(block_tp_linears(self.m, layer, self.w.c, self.w.r))
        s = sum(self.cluster.collective_s(op, b, 1, self.plan.tp, count) for op, b in t.items() if b)
        return s / 2, s / 2

    def _tp_recomputed(self, layer: int) -> float:
        if self.plan.tp == 1 or self.plan.recompute == "none":
            return 0.0
        plan = replace(self.plan, recompute_layers=0)  # per block: the caller chooses which recompute
        t = tp_recomputed_per_micro_batch(self.m, plan, [layer], self.w.c, self.w.r)
        count = len(block_tp_linears(self.m, layer, self.w.c, self.w.r))
        return sum(self.cluster.collective_s(op, b, 1, self.plan.tp, count) for op, b in t.items() if b)

    def _ep(self, layer: int) -> float:
        """One direction's all-to-alls of one MoE block: dispatch and combine (half of the pass's)."""
        plan = replace(self.plan, recompute="none")
        ep = ep_per_micro_batch(self.m, plan, [layer], self.w.c, self.w.r).get("ep")
        if not ep:
            return 0.0
        return self.cluster.collective_s("all_to_all", ep["all_to_all"] / 2, self.plan.tp, self.plan.ep, 2)

    def _cp(self, attn_f: float, attn_b: float) -> tuple[float, float]:
        """The ring's sends of one block: k and v cp - 1 hops forward; again and their gradients
        cp hops backward. Each hop hides behind the attention step it feeds."""
        cp = self.plan.cp
        if cp == 1:
            return 0.0, 0.0
        total = cp_per_step(self.m, replace(self.plan, micro_batches=1, recompute="none"), [0])["cp"]["send"]
        hop = total / (3 * cp - 2)
        send = self.cluster.collective_s("send", hop, self.plan.tp, cp)
        return (max(0.0, (cp - 1) * send - attn_f * (cp - 1) / cp),
                max(0.0, (2 * cp - 1) * send - attn_b * (cp - 1) / cp))

    def ends(self, first: bool, last: bool) -> tuple[Cost, Cost, Cost]:
        """(F, B, W) of the embedding (first) and of the final norm, head, loss and MTP (last)."""
        F, B, W = Cost(), Cost(), Cost()
        m, plan, cl, w = self.m, self.plan, self.cluster, self.w
        if first:
            emb = w.n * m.d_model * w.r
            F += Cost(cl.memory_s(emb))
            B += Cost(cl.memory_s(2 * emb))
            if plan.tp > 1:  # the vocabulary-parallel lookup is summed like a row-parallel output
                s = cl.collective_s("reduce_scatter" if plan.sp else "all_reduce", w.n * m.d_model * w.r, 1, plan.tp)
                F += Cost(tp=s)
                B += Cost(tp=s if plan.sp else 0.0)
        timed = self._timed_ends() if first or last else None
        if timed is not None and first:  # a measured CPU: the embedding timed (the formula above, replaced)
            F, B = Cost(timed[0], F.tp), Cost(timed[1], B.tp)
        if last:
            template = self.view.template
            head = template.head
            uses = 1 + m.mtp_depth
            fwd, dx, dw = self._gemm_passes([(w.n, head.in_features, head.out_features, uses)])
            if timed is not None:  # norm, head and loss timed whole; W their weight-gradient GEMM
                dw = min(dw, timed[3])
                F += Cost(timed[2])
                B += Cost(timed[3] - dw)
            else:
                loss = cl.memory_s(uses * loss_bytes(m, plan, w), 3)
                cast = cl.memory_s(weight_cast_bytes(head, w)) if w.r > w.c else 0.0
                F += Cost(fwd + loss + cast)
                B += Cost(dx + 2 * loss / 3 * 2)
            W += Cost(dw)
            if m.mtp_depth and template.mtp is not None:  # (mtp_depth > 0: a DeepSeekModel)
                f2, dx2, dw2 = self._gemm_passes(block_gemms(template.mtp, m, plan, w))
                F += Cost(f2)
                B += Cost(dx2)
                W += Cost(dw2)
            if plan.tp > 1:
                t = tp_per_micro_batch(m, plan, [], False, True, w.c, w.r)
                # the head's input (its gradient summed backward) and the loss (the logits' max and
                # the (target logit, sum of exponentials) pair, forward: tensor_parallel.py), counted
                # per call on a measured CPU
                calls = 3 if self.pieces is not None else 2
                s = sum(cl.collective_s(op, b, 1, plan.tp, calls) for op, b in t.items() if b)
                F += Cost(tp=s / 2)
                B += Cost(tp=s / 2)
        return F, B, W

    def _timed_ends(self):
        """A measured CPU: (embedding forward, backward, output forward, backward) timed at this rank's
        vocabulary slice (cpu_measure.ends_seconds); None elsewhere, or where they cannot be timed."""
        if self.pieces is None or self.plan.cp > 1 or self.precision_recipe not in ("bf16", "fp32") \
                or self.m.mtp_depth:
            return None
        return self.pieces.ends(self.m, self.plan.micro_batch_size, self.plan.seq_len,
                                vocab_per_rank(self.m, self.plan.tp), self.dtype)


# -- the step --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPlan:
    """What the step-time model needs beyond memory's Plan: the global batch and the GEMM dtype."""
    plan: Plan
    global_batch: int  # sequences per optimizer step
    dtype: str = "bf16"
    # Tensor-parallel collectives overlapped with the GEMMs beside them (Megatron's --tp-comm-overlap,
    # Transformer Engine's userbuffers); off, as this code base runs them: exposed.
    tp_overlap: bool = False
    # The attention core: "flash" (fused, as this code base and every current framework run it) or
    # "unfused" (the T x T scores in memory: Megatron-LM before 2023).
    attention: str = "flash"
    # ZeRO-1 syncs gradients by reduce-scatter (Megatron's distributed optimizer) instead of this code
    # base's all-reduce (parallel/zero.py: every rank keeps the whole gradient).
    distributed_optimizer: bool = False
    # train.recompute=selective reruns the attention core alone (Megatron's --recompute-granularity
    # selective) instead of recompute.py's elementwise ops and the collectives before them.
    selective_core: bool = False


def chunk_costs(costs: BlockCosts, m: ModelConfig, plan: Plan, rank: int) -> list[tuple[Cost, Cost, Cost]]:
    """(F, B, W) of one micro-batch through each of this pipeline rank's chunks; B whole includes
    the recomputed forward of the blocks its recompute mode covers, and W."""
    stage = plan_stage(m, plan, rank, costs.view) if plan.pp > 1 else None
    chunks = stage.chunks if stage is not None else (tuple(range(m.n_layers)),)
    out = []
    n_layers = sum(len(c) for c in chunks)
    pos = 0
    for k, layers in enumerate(chunks):
        F, B, W = Cost(), Cost(), Cost()
        for i in layers:
            f, b, w, sel, full = costs.block(i)
            F, B, W = F + f, B + b, W + w
            if plan.recompute != "none" and plan.recomputes(pos, n_layers):
                B = B + (full if plan.recompute == "full" else sel)
            pos += 1
        first = stage.is_first_chunk(k) if stage is not None else True
        last = stage.is_last_chunk(k) if stage is not None else True
        ef, eb, ew = costs.ends(first, last)
        out.append((F + ef, B + eb, W + ew))
    return out


def _action_cost(chunks: list[list[tuple[Cost, Cost, Cost]]]):
    """cost(rank, action, split) of timed_play: an action's seconds from its chunk's (F, B, W)."""
    def cost(rank, a, split):
        f, b, w = chunks[rank][a.chunk]
        if a.kind == "F":
            return f.total
        if a.kind == "B":
            return b.total if split else b.total + w.total
        return w.total if split else 0.0
    return cost


def pipeline_makespan(plan: Plan, chunks: list[list[tuple[Cost, Cost, Cost]]], hop_s: float,
                      cap: int = 64) -> tuple[float, list[float]]:
    """The played schedule's makespan and each rank's busy seconds. Long steps are played up to
    `cap` micro-batches (a multiple of pp) and extended at the steady state's pace: past the
    warm-up every further micro-batch adds the same time, which playing two lengths measures."""
    from ..parallel.pipeline import chunks_per_rank
    from ..parallel.pipeline.schedules import timed_play

    pp, m = plan.pp, plan.micro_batches
    v = chunks_per_rank(plan.pp_schedule, plan.pp_virtual_stages)

    def play(n):
        return timed_play(plan.pp_schedule, pp, v, n, _action_cost(chunks), lambda s, d: hop_s)

    if pp == 1:
        f, b, w = chunks[0][0]
        return m * (f.total + b.total + w.total), [m * (f.total + b.total + w.total)]
    step = pipeline_period(plan)
    base = max(step, cap // step * step)
    if m <= base + step:
        return play(m)
    t1, busy1 = play(base)
    t2, busy2 = play(base + step)
    k = (m - base) / step
    return t1 + k * (t2 - t1), [b1 + k * (b2 - b1) for b1, b2 in zip(busy1, busy2)]


def pipeline_period(plan: Plan) -> int:
    """The micro-batches of one round of the schedule: a played step is extended by whole rounds."""
    return 1 if plan.pp == 1 else 2 * plan.pp if plan.pp_schedule == "dualpipev" else plan.pp


def played_timetable(plan: Plan, chunks: list[list[tuple[Cost, Cost, Cost]]], hop_s: float, n: int) -> list[tuple]:
    """The schedule played with n micro-batches, as pipeline_makespan plays it: every action as
    (rank, kind, local chunk, mb, start s, end s). Without a pipeline, rank 0 runs F then B (its W
    included) of each micro-batch in turn."""
    from ..parallel.pipeline import chunks_per_rank
    from ..parallel.pipeline.schedules import timed_play

    events: list[tuple] = []
    if plan.pp == 1:
        f, b, w = (c.total for c in chunks[0][0])
        for mb in range(n):
            t = mb * (f + b + w)
            events += [(0, "F", 0, mb, t, t + f), (0, "B", 0, mb, t + f, t + f + b + w)]
        return events
    v = chunks_per_rank(plan.pp_schedule, plan.pp_virtual_stages)
    timed_play(plan.pp_schedule, plan.pp, v, n, _action_cost(chunks), lambda s, d: hop_s, events)
    return events


def stage_counts(view: RankModelView, m: ModelConfig, plan: Plan) -> list[tuple[int, int]]:
    """(dense, expert) parameters of each pipeline stage, kept on the view: they depend only on how
    the layers are cut."""
    key = ("stage_counts", plan.pp, plan.pp_virtual_stages, plan.pp_schedule if plan.pp > 1 else "")
    if key not in view.cache:
        view.cache[key] = [dense_and_expert(stage_parameters(view, m, plan, r)) for r in range(plan.pp)]
    return view.cache[key]


def optimizer_s(cluster: Cluster, dense: int, expert: int, plan: Plan, precision) -> float:
    """AdamW over the parameters this rank updates (its ZeRO slice), memory bound: read the gradient,
    master weight and two moments, write them back and the model's copy; and one read of the
    gradients for their norm."""
    n = dense / plan.replicas + expert / plan.expert_replicas if plan.zero_stage >= 1 else dense + expert
    g, p = BYTES[precision.grad_dtype], BYTES[precision.param_dtype]
    moments = BYTES[precision.exp_avg_dtype] + BYTES[precision.exp_avg_sq_dtype]
    master = BYTES[precision.master_dtype] if p != 4 or precision.master_dtype != precision.param_dtype else 0
    per = 2 * g + 2 * moments + 2 * master + 2 * p
    return cluster.memory_s(n * per, 4)


def data_parallel_s(cluster: Cluster, plan: Plan, dense: int, expert: int, root: tuple[int, int], precision,
                    backward_s: float, forward_s: float, distributed_optimizer: bool = False,
                    calls: dict[str, int] | None = None) -> dict[str, float]:
    """Exposed seconds of the data-parallel groups' collectives per step. The gradient sync and
    ZeRO-1/2's parameter gather are bucketed: all but one bucket hides behind the last
    micro-batch's backward (its forward, for the gather) where the cluster overlaps at all.
    calls: the buckets each group's collectives run in, one call each (a measured CPU, where a
    call's fixed cost is a good part of it: cpu_buckets); default one."""
    calls = calls or {}
    groups = dp_per_step(plan, dense, expert, root, BYTES[precision.grad_dtype], BYTES[precision.param_dtype])
    strides = {"dp": plan.tp, "edp": plan.tp * plan.ep, "dp_gather": plan.tp, "edp_gather": plan.tp * plan.ep}
    sizes = {"dp": plan.replicas, "edp": plan.expert_replicas, "dp_gather": plan.replicas,
             "edp_gather": plan.expert_replicas}
    out = {}
    for g, ops in groups.items():
        if g.endswith("_gather"):  # ZeRO-3's per-pass gathers are charged inside the passes
            continue
        exposed = 0.0
        for op, nbytes in ops.items():
            if distributed_optimizer and plan.zero_stage == 1 and op == "all_reduce":
                op = "reduce_scatter"
            # ZeRO-2/3 reduce-scatter after every micro-batch's backward (each hides behind its own);
            # the others sync once, behind the last backward (the gather: the next step's first forward).
            repeats = plan.micro_batches * plan.pp_virtual_stages if op == "reduce_scatter" and \
                plan.zero_stage >= 2 else 1
            t = cluster.collective_s(op, nbytes / repeats, strides[g], sizes[g], calls.get(g, 1))
            if not cluster.overlap:
                exposed += repeats * t
                continue
            window = forward_s if op == "all_gather" else backward_s
            tail = cluster.collective_s(op, min(nbytes / repeats, DP_BUCKET_BYTES), strides[g], sizes[g])
            exposed += repeats * max(tail, t - window)
        out[g] = out.get(g, 0.0) + exposed
    return out


def zero3_gather_s(cluster: Cluster, plan: Plan, dense: int, expert: int, precision,
                   calls: dict[str, int] | None = None) -> float:
    """ZeRO-3: the seconds of one pass's parameter gathers over this stage (all its blocks). calls:
    the all-gathers they take ({"dp": n, "edp": n}: every unit's buckets, cpu_buckets); default one."""
    if plan.zero_stage != 3:
        return 0.0
    calls = calls or {}
    p = BYTES[precision.param_dtype]
    t = cluster.collective_s("all_gather", dense * p, plan.tp, plan.replicas, calls.get("dp", 1))
    return t + cluster.collective_s("all_gather", expert * p, plan.tp * plan.ep, plan.expert_replicas,
                                    calls.get("edp", 1))


def cpu_buckets(view: RankModelView, m: ModelConfig, plan: Plan, rank: int, bucket_mb: float = 25.0
                ) -> dict[str, int]:
    """The flat buckets (parallel/data_parallel.bucket_layout) of pipeline stage `rank`'s parameters,
    per group: one per category (experts or not, matrices or not, summed after dp over tp or the
    embedding group) and per bucket_mb, and under ZeRO-3 per unit (each block, and the rest: the
    root) too. Each is one collective of its own."""
    from ..parallel.data_parallel import _category

    def count(params) -> dict[str, int]:
        sizes: dict[tuple, int] = {}
        for p in params:
            key = _category(p)
            sizes[key] = sizes.get(key, 0) + p.numel() * 4
        out = {"dp": 0, "edp": 0}
        for key, nbytes in sizes.items():
            out["edp" if key[0] else "dp"] += max(1, -(-nbytes // int(bucket_mb * 2 ** 20)))
        return out

    layers = stage_layers(m, plan, rank, view)
    params = stage_parameters(view, m, plan, rank)
    if plan.zero_stage < 3:
        return count(params)
    in_blocks = {id(p) for i in layers for p in view.layers[str(i)].parameters()}
    units = [list(view.layers[str(i)].parameters()) for i in layers]
    units.append([p for p in params if id(p) not in in_blocks])
    total = {"dp": 0, "edp": 0}
    for unit in units:
        for g, n in count(unit).items():
            total[g] += n
    return total


def cpu_step_extras(cluster: Cluster, m: ModelConfig, plan: Plan, view: RankModelView, rank: int,
                    precision) -> dict[str, float]:
    """A measured CPU: what a step does beside the passes and the gradient sync, each of which costs
    there (cluster.CpuPieces): drawing the micro-batches ("data"), the optimizer step over this
    rank's tensors timed ("optimizer"), and the step's small all-reduces ("scalars"): the loss's
    token count over dp, the gradient norm's partial sums (ZeRO-1+ over dp, experts over edp and ep,
    then tp and pp), the experts' load for the bias update (over dp), and a tied embedding's gradient
    summed by its two pipeline stages (the embd group)."""
    from ..parallel.data_parallel import _category
    from ..params import spec

    pieces = cluster.measured["pieces"]
    data = pieces.data(plan.micro_batch_size, plan.seq_len, plan.micro_batches)
    params = stage_parameters(view, m, plan, rank)
    sliced = plan.zero_stage >= 1 and plan.replicas > 1
    dense_n = [p.numel() for p in params if not spec(p).expert_parallel]
    expert_n = [p.numel() for p in params if spec(p).expert_parallel]
    numels = tuple(-(-n // plan.replicas) if sliced else n for n in dense_n) + \
        tuple(-(-n // plan.expert_replicas) if sliced else n for n in expert_n)
    if plan.zero_stage == 0:
        units = numels  # plain AdamW: a unit per parameter
    else:  # this rank's slice of each category's buckets
        sizes: dict[tuple, int] = {}
        for p in params:
            key = _category(p)
            sizes[key] = sizes.get(key, 0) + p.numel()
        units = tuple(-(-n // (plan.expert_replicas if key[0] else plan.replicas)) for key, n in sizes.items())
    optimizer = pieces.optimizer(numels, units)

    def scalar(stride: int, size: int) -> float:  # one all-reduce of a few numbers over a group
        return cluster.collective_s("all_reduce", 8, stride, size)

    experts = bool(expert_n)
    scalars = scalar(plan.tp, plan.replicas) if plan.replicas > 1 else 0.0  # the loss's token count
    if sliced or any(g > 1 for g in (plan.tp, plan.ep, plan.pp)):  # the gradient norm (reduce_squares)
        if sliced:
            scalars += scalar(plan.tp, plan.replicas)
            if experts and plan.expert_replicas > 1:
                scalars += scalar(plan.tp * plan.ep, plan.expert_replicas)
        if experts and plan.ep > 1:
            scalars += scalar(plan.tp, plan.ep)
        if plan.tp > 1:
            scalars += scalar(1, plan.tp)
        if plan.pp > 1:
            scalars += scalar(plan.tp * plan.cp * plan.dp, plan.pp)
    if m.arch == "deepseek" and m.n_layers > m.first_k_dense_replace and plan.replicas > 1:
        scalars += scalar(plan.tp, plan.replicas)  # the experts' load (DeepSeekModel.update_expert_bias)
    if plan.pp > 1 and m.tie_embeddings and rank in (0, plan.pp - 1):
        embedding = vocab_per_rank(m, plan.tp) * m.d_model * BYTES[precision.grad_dtype]
        scalars += cluster.collective_s("all_reduce", embedding, plan.tp * plan.cp * plan.dp, 2)
    return {"data": data, "optimizer": optimizer, "scalars": scalars}


def predict(m: ModelConfig, sp: StepPlan, precision, cluster: Cluster, view: RankModelView | None = None,
            flops: dict | None = None, cap: int = 512, timetable: int = 0) -> dict:
    """The step time of a plan and its parts (see the module docstring); with flops (model_flops),
    also model TFLOP/s per GPU, MFU and HFU; with timetable=n, also "timetable": the schedule
    played with n micro-batches (played_timetable), for a picture."""
    plan = sp.plan
    view = view if view is not None else RankModelView(m, plan)
    costs = BlockCosts(m, plan, precision, cluster, sp.dtype, view, sp.tp_overlap, sp.attention, sp.selective_core)
    chunks = [chunk_costs(costs, m, plan, r) for r in range(plan.pp)]
    stages = stage_counts(view, m, plan)
    pieces = cluster.measured.get("pieces") if cluster.measured else None
    buckets = [cpu_buckets(view, m, plan, r) if pieces is not None else None for r in range(plan.pp)]
    # ZeRO-3 gathers each pass's weights ahead of it: only what the pass's compute cannot cover shows.
    for r, (dense, expert) in enumerate(stages):
        gather = zero3_gather_s(cluster, plan, dense, expert, precision, buckets[r]) / max(1, len(chunks[r]))
        for f, b, _ in chunks[r]:
            for c in (f, b):
                c.dp = gather if not cluster.overlap else max(0.0, gather - c.compute)
    n_send = plan.micro_batch_size * plan.seq_len // plan.cp // (plan.tp if plan.sp else 1)
    hop = cluster.collective_s("send", n_send * m.d_model * BYTES[precision.param_dtype],
                               plan.tp * plan.cp * plan.dp, 2) if plan.pp > 1 else 0.0
    makespan, busy = pipeline_makespan(plan, chunks, hop, cap)
    # The breakdown follows the busiest rank: its work, then the wait the schedule leaves it.
    rank = max(range(plan.pp), key=busy.__getitem__)
    mb = plan.micro_batches
    work = Cost()
    for f, b, w in chunks[rank]:
        work = work + (f + b + w) * mb
    dense, expert = stages[rank]
    backward = sum(b.compute + w.compute for _, b, w in chunks[rank])
    forward = sum(f.compute for f, _, _ in chunks[rank])
    root = (0, 0)
    if plan.zero_stage == 3:
        root = root_numel(view, m, plan, rank)
    dp = data_parallel_s(cluster, plan, dense, expert, root, precision, backward, forward, sp.distributed_optimizer,
                         buckets[rank])
    extras = cpu_step_extras(cluster, m, plan, view, rank, precision) if pieces is not None else {}
    opt = extras.pop("optimizer", None)
    opt = optimizer_s(cluster, dense, expert, plan, precision) if opt is None else opt
    breakdown = {"compute": work.compute, "tp": work.tp, "ep": work.ep, "cp": work.cp,
                 "dp": work.dp + dp.get("dp", 0.0), "edp": dp.get("edp", 0.0),
                 "bubble": max(0.0, makespan - busy[rank]), "optimizer": opt, **extras}
    breakdown = {k: v for k, v in breakdown.items() if v > 0 or k in ("compute", "bubble", "optimizer")}
    step = sum(breakdown.values())
    gpus = plan.world
    tokens = sp.global_batch * plan.seq_len
    out = {"step_s": step, "tokens_per_s_per_gpu": tokens / step / gpus, "breakdown": breakdown}
    if timetable:
        out["timetable"] = played_timetable(plan, chunks, hop, timetable)
    if flops is not None:
        peak = cluster.peak(sp.dtype)
        per_gpu = tokens / step / gpus
        out.update(model_tflops_per_gpu=flops["train"] * per_gpu / 1e12, mfu=flops["train"] * per_gpu / peak,
                   hfu=(flops["train"] + recomputed_flops_per_token(flops, m, plan)) * per_gpu / peak)
    return out


def model_flops(m: ModelConfig, seq_len: int) -> dict:
    """counts.flops_per_token of the whole model (built once on the meta device): "train" per token
    and its parts per kind."""
    from .counts import flops_per_token, meta_model

    return flops_per_token(meta_model(m), m, seq_len)


def recomputed_flops_per_token(flops: dict, m: ModelConfig, plan: Plan) -> float:
    """The forward FLOPs recomputation reruns per token: full reruns the covered blocks' forward
    (a third of their training FLOPs); selective reruns no matmul (recompute.py keeps their
    outputs), so its FLOPs are the model's."""
    if plan.recompute != "full":
        return 0.0
    per_kind = flops["train_per_kind"]
    blocks = flops["train"] - per_kind.get("head", 0.0) - per_kind.get("mtp", 0.0)
    chunk = max(1, m.n_layers // (plan.pp * plan.pp_virtual_stages))
    covered = min(1.0, plan.recompute_layers / chunk) if plan.recompute_layers else 1.0
    return blocks / 3 * covered
