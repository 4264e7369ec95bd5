"""Memory per rank for a layout, before anything runs (Megatron's theoretical memory, for this code).

    memory(rank) = weights + gradients + master copies + optimizer moments      (static)
                 + activations per micro-batch x micro-batches in flight        (per step)

Static: the rank's own model is built on the meta device (its tp shard of each matrix, its
ep share of the experts, its pipeline stage's layers), so the parameter counts are exact.
Each copy then takes the bytes of its dtype (precision.*_dtype), and ZeRO divides what it
shards by dp (experts by expert-dp): stage 1 the master copies and moments, stage 2 the
gradients too, stage 3 the weights too (ZeRO paper, Rajbhandari et al. 2020, Figure 1), which
then exist whole only while gathered: the root's and two blocks' at a time (gathered_param_bytes).

Activations: the tensors autograd saves for backward, written out per module for the way
these modules compute (Korthikanti et al. 2022 do the same for Megatron's, §4.1). N tokens
per micro-batch on this rank (b x s), N_s = N / tp where sequence parallelism splits the
sequence; c bytes per element of the compute dtype, r of the residual stream (the parameter
dtype). Under autocast (c < r) every linear keeps its own c-byte copy of its input and of its
weight. Each line is checked against the tensors autograd really saves
(inspection/measure.py; tests/distributed/test_inspection_world.py).

In flight: GPipe keeps all m micro-batches, 1F1B keeps pp - stage (at most m), interleaved
1F1B keeps Megatron's warm-up count of chunks (2 (pp - stage - 1) + (v - 1) pp + 1).

Recomputation (train.recompute, recompute.py): a recomputed block keeps its input (N_s·d·r)
and, selective, its matmul and fused-attention outputs; its backward rebuilds the rest, one
block at a time (recomputed_activations). Each line is checked against the storages the
forward and the recomputations really create (inspection/measure.py's LiveActivationMeter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..config import Config, ModelConfig
from ..parallel.layout import Layout
from ..params import spec
from ..recompute import Recompute

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Plan:
    """What memory and communication are planned for: a layout (parallel/layout.py, its micro-batch
    size resolved: >= 1), the pipeline schedule, and the batch each rank runs per step. tp, pp, dp,
    ep, sp, zero_stage and micro_batch_size read the layout."""
    layout: Layout = Layout(micro=1)
    seq_len: int = 2048
    micro_batches: int = 1  # per optimizer step on each rank (gradient accumulation)
    pp_schedule: str = "1f1b"
    pp_virtual_stages: int = 1
    pp_partition: str = "layers"
    recompute: str = "none"  # train.recompute (recompute.py): none | selective | full
    recompute_layers: int = 0  # the first N blocks of each stage (0: all)
    document_mask: bool = False  # data.document_mask (models/documents.py)

    def recomputes(self, position: int, n_layers: int, mode: str | None = None) -> bool:
        """Whether the block at `position` of a stage of `n_layers` blocks (in pp_virtual_stages
        chunks) is recomputed under `mode` (default: the plan's): recompute.Recompute's rule."""
        chunk = max(1, n_layers // self.pp_virtual_stages)
        return Recompute(mode or self.recompute, self.recompute_layers).covers(position % chunk)

    @classmethod
    def from_config(cls, cfg: Config) -> Plan:
        """The plan of a run of cfg: its layout, the micro-batch size resolved (train.micro_batch_size=0:
        batch_size / dp). With pp=1 there is no pipeline whatever the schedule says (the runtime runs
        the plain step), so no chunks: one, under 1F1B's name."""
        p, t = cfg.parallel, cfg.train
        layout = replace(Layout.from_config(cfg), micro=t.micro_batch(p.dp))
        piped = p.pp > 1
        return cls(layout, seq_len=t.seq_len, micro_batches=max(1, t.grad_accum_steps(p.dp)),
                   pp_schedule=p.pp_schedule if piped else "1f1b",
                   pp_virtual_stages=p.chunks_per_rank if piped else 1, pp_partition=p.pp_partition,
                   recompute=t.recompute, recompute_layers=t.recompute_layers,
                   document_mask=cfg.data.document_mask)

    # The layout's fields, by the names the formulas below use.
    tp = property(lambda self: self.layout.tp)
    cp = property(lambda self: self.layout.cp)
    pp = property(lambda self: self.layout.pp)
    dp = property(lambda self: self.layout.dp)
    # Every replica of a weight: dp x cp ranks sum its gradient and split ZeRO's state (parallel/state.py)
    replicas = property(lambda self: self.layout.dp * self.layout.cp)
    # An expert's replicas: the other expert-parallel groups, and their cp ranks (the edp group)
    expert_replicas = property(lambda self: self.layout.dp // self.layout.ep * self.layout.cp)
    ep = property(lambda self: self.layout.ep)
    sp = property(lambda self: self.layout.sp and self.layout.tp > 1)  # nothing to split without tp
    zero_stage = property(lambda self: self.layout.zero)
    micro_batch_size = property(lambda self: self.layout.micro)

    @property
    def world(self) -> int:
        return self.layout.world_size

    def to_dict(self) -> dict:
        """Flat, for `nanotrain inspect --json`: the layout's fields under the config's names."""
        keys = ("tp", "cp", "pp", "dp", "ep", "sp", "zero_stage", "micro_batch_size", "seq_len", "micro_batches",
                "pp_schedule", "pp_virtual_stages", "pp_partition", "recompute", "recompute_layers")
        return {k: getattr(self, k) for k in keys}


# -- static memory -------------------------------------------------------------------


def rank_model(m: ModelConfig, plan: Plan):
    """The whole model as tp rank 0 and ep rank 0 hold it (their shard of each matrix, their share
    of the experts), on the meta device: shapes, no storage."""
    from ..models import build_model
    from ..parallel.expert_parallel import ExpertParallel
    from ..parallel.tensor_parallel import TensorParallel

    tp = TensorParallel(None, 0, plan.tp, plan.sp, plan.layout.etp > 1) if plan.tp > 1 else None
    ep = ExpertParallel(None, 0, plan.ep) if plan.ep > 1 else None
    with torch.device("meta"):
        return build_model(m, tp, ep)


class RankModelView:
    """rank_model's model for a deep network, built from one block of each kind: the first block
    (every block of a dense transformer is alike) or, for DeepSeek, one dense block and one MoE
    block, each standing for every block of its kind. It answers what memory and comm read of a
    model (named_parameters, layers[str(i)]) as the whole model would, in a fraction of the time:
    DeepSeek-V3's 61 blocks build in 0.1 s instead of 1 s, which `nanotrain plan` pays per
    (tp, ep, etp) it searches."""

    def __init__(self, m: ModelConfig, plan: Plan):
        kinds = min(m.n_layers, m.first_k_dense_replace + 1) if m.arch == "deepseek" else 1
        self.template = rank_model(replace(m, n_layers=kinds), plan)
        self.layers = {str(i): self.template.layers[str(min(i, kinds - 1))] for i in range(m.n_layers)}
        self.n_layers = m.n_layers
        self.cache: dict = {}  # what callers derive from the view and reuse (steptime.stage_counts)

    def named_parameters(self):
        if "named" not in self.cache:  # listed once: memory and comm walk it for every stage
            ends = [(name, p) for name, p in self.template.named_parameters() if not name.startswith("layers.")]
            blocks = [(f"layers.{i}.{name}", p) for i in range(self.n_layers)
                      for name, p in self.layers[str(i)].named_parameters()]
            self.cache["named"] = ends + blocks
        return iter(self.cache["named"])

    def parameters(self):
        return (p for _, p in self.named_parameters())


def stage_parameters(model, m: ModelConfig, plan: Plan, pp_rank: int) -> list:
    """The parameters pipeline stage pp_rank keeps (parallel/pipeline/stage.py's rule, by name:
    its layers; the embeddings on the first stage; norm and head on the last, which also keeps
    its copy of a tied embedding)."""
    if plan.pp == 1:
        return list(model.parameters())
    stage = plan_stage(m, plan, pp_rank, model)
    layers = {str(i) for c in stage.chunks for i in c}
    first, last = stage.has_first, stage.has_last
    keep = []
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        if top == "layers":
            ok = name.split(".")[1] in layers
        elif top in ("tok_emb", "pos_emb"):
            ok = first or (last and top == "tok_emb" and m.tie_embeddings)  # (both: DualPipeV's rank 0, one copy)
        elif top in ("norm", "head", "mtp"):  # MTP beside the head (as DeepSeek-V3 places it; nanotrain's
            ok = last                           # runtime refuses MTP with pp > 1 for now)
        else:
            ok = True
        if ok:
            keep.append(p)
    return keep


def _sharded(numel: int, n: int) -> int:
    return math.ceil(numel / n)  # ZeRO pads a bucket to a multiple of its group size


def static_bytes(params: list, plan: Plan, precision) -> dict[str, int]:
    """Weights, gradients, master copies and AdamW moments of one rank, in bytes."""
    return static_bytes_of(*dense_and_expert(params), plan, precision)


def dense_and_expert(params: list) -> tuple[int, int]:
    """Elements of these parameters synced over dp (dense) and over expert-dp (expert)."""
    expert = sum(p.numel() for p in params if spec(p).expert_parallel)
    return sum(p.numel() for p in params) - expert, expert


def static_bytes_of(dense: int, expert: int, plan: Plan, precision) -> dict[str, int]:
    """static_bytes from the element counts: `dense` parameters replicated over dp x cp, `expert`
    ones over expert-dp."""
    param_b, grad_b = BYTES[precision.param_dtype], BYTES[precision.grad_dtype]
    moment_b = BYTES[precision.exp_avg_dtype] + BYTES[precision.exp_avg_sq_dtype]
    edp = plan.expert_replicas
    stage = plan.zero_stage

    def share(n_dense: int, n_expert: int) -> int:
        return _sharded(n_dense, plan.replicas) + _sharded(n_expert, edp) if stage >= 1 else n_dense + n_expert

    n = dense + expert
    master_needed = precision.param_dtype != "fp32" and precision.master_owner == "optimizer"
    return {
        "weights": (share(dense, expert) if stage == 3 else n) * param_b,
        "gradients": (share(dense, expert) if stage >= 2 else n) * grad_b,
        "master": share(dense, expert) * BYTES[precision.master_dtype] if master_needed else 0,
        "optimizer": share(dense, expert) * moment_b,
    }


def gathered_param_bytes(model, m: ModelConfig, plan: Plan, pp_rank: int, precision) -> int:
    """ZeRO-3 (parallel/zero3.py): whole parameters held at once, besides the slices: the root's
    (embeddings, final norm, head: for the whole forward and again for the backward) and two
    blocks' (the one running and the next one, prefetched)."""
    if plan.zero_stage != 3:
        return 0
    blocks = sorted(sum(p.numel() for p in model.layers[str(i)].parameters())
                    for i in stage_layers(m, plan, pp_rank, model))
    root = sum(p.numel() for p in root_parameters(model, m, plan, pp_rank))
    return (root + sum(blocks[-2:])) * BYTES[precision.param_dtype]


def root_parameters(model, m: ModelConfig, plan: Plan, pp_rank: int) -> list:
    """The parameters of stage pp_rank outside its blocks: ZeRO-3's root unit (parallel/zero3.py)."""
    in_blocks = {id(p) for i in stage_layers(m, plan, pp_rank, model) for p in model.layers[str(i)].parameters()}
    return [p for p in stage_parameters(model, m, plan, pp_rank) if id(p) not in in_blocks]


# -- activations -------------------------------------------------------------------------


@dataclass
class Widths:
    """What one micro-batch on one rank looks like: token counts and bytes per element."""
    n: int  # tokens through the matmuls (b x s)
    ns: int  # tokens through the norms and the residual stream (n / tp under sequence parallelism)
    batch: int
    seq: int
    tp: int
    ep: int
    c: int  # bytes per element of the compute dtype
    r: int  # bytes per element of the residual stream (the parameter dtype)
    a: int  # bytes per element in the attention core (precision.attention: fp32 on CPU under bf16)
    weights_cast: bool = False  # weights stored wider than c, activations already in c (DeepSeek's MTP block)
    documents: bool = False  # data.document_mask: RoPE rows per token, not per position (models/documents.py)
    grouped_experts: bool = False  # the routed experts run as grouped GEMMs (models/grouped.py)
    ring: bool = False  # context parallel: attention is the ring (parallel/context_parallel.py)
    etp: int = 1  # expert tensor parallel: each routed expert's width split over this many tp ranks

    @property
    def autocast(self) -> bool:
        """The residual stream is wider than the compute dtype: each linear casts its input."""
        return self.c < self.r

    @property
    def casts_weights(self) -> bool:
        return self.autocast or self.weights_cast


def _inputs(w: Widths, d_in: int, weights: list[int]) -> int:
    """Linears that read one input. Under autocast each keeps its own c-byte copy of the input and
    of its weight; otherwise they share the input tensor itself (r bytes; the all-gathered N
    tokens under sequence parallelism, not the norm's N_s)."""
    if w.autocast:
        return sum(w.n * d_in * w.c + weight * w.c for weight in weights)
    return w.n * d_in * w.r + (sum(weights) * w.c if w.casts_weights else 0)


def _norm(w: Widths, n: int, d: int, kind: str) -> int:
    """RMSNorm (F.rms_norm in fp32): its fp32 input, 1/rms per token, the normalised input.
    LayerNorm: its input, mean and 1/std per token."""
    if kind == "rmsnorm":
        return n * (2 * d * 4 + 4)
    return n * (d * w.r + 8)


def _rope(w: Widths, dim: int) -> int:
    """cos and sin [T, dim], cast to the compute dtype (a view of the tables in fp32); with packed
    documents one row per token [B, T, dim], cast by each layer (in fp32: gathered_positions_bytes)."""
    return 2 * (w.n if w.documents else w.seq) * dim * w.c if w.autocast else 0


def documents_bytes(m: ModelConfig, w: Widths, first: bool, math_path: bool) -> int:
    """data.document_mask, once per micro-batch (models/documents.py): the additive [B, T, T] mask
    in the attention's dtype, which every layer hands SDPA (so a fused kernel saves it once; the
    math path adds it to the scores and keeps nothing of it), and the positions, one per token."""
    return (0 if math_path else w.batch * w.seq * w.seq * w.a) + gathered_positions_bytes(m, w, w.n, first)


def gathered_positions_bytes(m: ModelConfig, w: Widths, rows: int, first: bool) -> int:
    """Positions gathered once per micro-batch instead of read from the tables: one per token
    (packed documents) or one per position this rank holds (context parallelism). RoPE rows in
    fp32, kept by the layers that use them uncast (a 16-bit attention casts them per layer:
    _rope); or, on the first stage, the learned embedding's row index."""
    if m.arch == "deepseek" or m.pos_emb == "rope":
        dim = m.qk_rope_head_dim if m.arch == "deepseek" else m.d_model // m.n_heads
        return 0 if w.autocast and w.a == w.c else 2 * rows * dim * 4
    return rows * 8 if first else 0


def _flash(w: Widths, h: int, h_kv: int, d_qk: int, d_v: int) -> int:
    """Flash kernels (GPU; CPU when d_qk = d_v) save q, k, v, the output and the log-sum-exp of
    each row (fp32). An fp32 core under autocast hands wo a c-byte copy of the output."""
    out_copy = w.n * h * d_v * w.c if w.a != w.c else 0
    return w.a * w.n * (h * (d_qk + d_v) + h_kv * (d_qk + d_v)) + 4 * w.batch * h * w.seq + out_copy


def dense_attention_bytes(m: ModelConfig, w: Widths) -> int:
    d, hd = m.d_model, m.d_model // m.n_heads
    h, h_kv = m.n_heads // w.tp, (m.n_kv_heads or m.n_heads) // w.tp
    total = _norm(w, w.ns, d, m.norm) + _inputs(w, d, [d * h * hd, d * h_kv * hd, d * h_kv * hd])
    total += _rope(w, hd) if m.pos_emb == "rope" and w.a == w.c else 0
    total += _flash(w, h, h_kv, hd, hd)
    return total + (h * hd * d * w.c if w.casts_weights else 0)  # wo: a weight copy; its input is the output


def dense_mlp_bytes(m: ModelConfig, w: Widths, d_ff: int) -> int:
    d, f = m.d_model, d_ff // w.tp
    gated = m.mlp == "swiglu"
    total = _norm(w, w.ns, d, m.norm) + _inputs(w, d, [d * f] * (2 if gated else 1))
    inner = 4 if gated else 2  # SwiGLU: W1 x, silu(W1 x), W3 x, the product; GELU: W1 x, gelu(W1 x)
    return total + inner * w.n * f * w.c + (f * d * w.c if w.casts_weights else 0)


def mla_bytes(m: ModelConfig, w: Widths, math_path: bool) -> int:
    d, h = m.d_model, m.n_heads // w.tp
    nope, rope, dv = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
    dqk, kv_a = nope + rope, m.kv_lora_rank + rope
    total = _norm(w, w.ns, d, "rmsnorm")
    if m.q_lora_rank:
        total += _inputs(w, d, [d * m.q_lora_rank, d * kv_a]) + _norm(w, w.n, m.q_lora_rank, "rmsnorm")
        total += _inputs(w, m.q_lora_rank, [m.q_lora_rank * h * dqk])
    else:
        total += _inputs(w, d, [d * h * dqk, d * kv_a])
    # kv_norm keeps its input, a view of wkv_a's whole output [N, kv_lora + rope], as fp32
    # (in a 16-bit compute dtype, its fp32 copy of the compressed part only)
    total += (w.n * m.kv_lora_rank * 4 if w.c < 4 else w.n * kv_a * w.c) + w.n * 4 + w.n * m.kv_lora_rank * 4
    total += _inputs(w, m.kv_lora_rank, [m.kv_lora_rank * h * (nope + dv)])
    total += _rope(w, rope) if w.a == w.c else 0
    if math_path:  # scaled q, k, a copy of v, the T x T probabilities (fp32 under CPU autocast); the output
        a = 4 if w.c < 4 else w.a  # copied for wo
        total += a * (2 * w.n * h * dqk + w.n * h * dv + w.batch * h * w.seq * w.seq) + w.n * h * dv * w.c
    else:  # v is a view of the [N, h, nope + v] projection
        total += w.a * w.n * h * (2 * dqk + nope + dv) + w.c * w.n * h * dv + 4 * w.batch * h * w.seq
    return total + (h * dv * d * w.c if w.casts_weights else 0)


def moe_bytes(m: ModelConfig, w: Widths) -> int:
    """Router, dispatch, routed experts (balanced load: N·k / E tokens per expert) and shared experts.
    The layer routes the tokens this rank holds (1/tp of them under sequence parallelism). Under
    expert tensor parallelism (parallel.etp) each expert is d_ff/etp wide here, and with sequence
    parallelism it runs on every tp rank's tokens, all-gathered (models/moe.py)."""
    d, e, k, f = m.d_model, m.n_routed_experts, m.moe_top_k, m.moe_d_ff // w.etp
    n = w.ns  # tokens routed on this rank
    a = n * k  # (token, slot) assignments; under ep each rank receives as many as it sends, on average
    rows = a * (w.tp if w.etp > 1 and w.ns < w.n else 1)  # the experts' rows: every tp rank's under etp + sp
    total = _norm(w, w.ns, d, "rmsnorm")
    total += n * d * max(w.r, 4)  # the router's input: it scores in fp32 (and shares it when not autocast)
    total += n * (e * 4 + k * 8 + 4 + k * 4)  # scores, chosen experts, their sum, the weights
    total += a * (8 + 8 + 4) + 2 * a * d * 4  # order, token of each slot, weights; outputs in fp32
    # Tokens gathered for the experts; their SwiGLUs. Grouped GEMMs cast the gathered tokens once
    # (c bytes); a loop of F.linear under autocast casts each expert's slice for w1 and for w3.
    total += rows * d * (w.c if w.grouped_experts else w.r) + 4 * rows * f * w.c
    if w.casts_weights:  # c-byte copies of each local expert's three weights
        total += e // w.ep * 3 * d * f * w.c
    if m.n_shared_experts:
        fs = m.n_shared_experts * m.moe_d_ff  # whole on every tp rank
        total += 4 * n * fs * w.c + (3 * d * fs * w.c if w.casts_weights else 0)
        if w.autocast:  # w1 and w3 each cast the input
            total += 2 * n * d * w.c
        elif w.r < 4:  # a 16-bit input: the router kept an fp32 copy, the experts keep the input itself
            total += n * d * w.r
    return total


def block_bytes(m: ModelConfig, w: Widths, layer: int, math_path: bool) -> dict[str, int]:
    from ..models.mlp import ffn_width

    if m.arch == "deepseek":
        attn = mla_bytes(m, w, math_path)
        dense = layer < m.first_k_dense_replace
        mlp = dense_mlp_bytes(_swiglu(m), w, m.d_ff or ffn_width(m)) if dense else moe_bytes(m, w)
        return {"attention": attn, "dense_mlp" if dense else "moe": mlp}
    return {"attention": dense_attention_bytes(m, w), "dense_mlp": dense_mlp_bytes(m, w, ffn_width(m))}


def _swiglu(m: ModelConfig) -> ModelConfig:
    return replace(m, mlp="swiglu")


def ends_bytes(m: ModelConfig, w: Widths, first: bool, last: bool, math_path: bool = False) -> dict[str, int]:
    """The embedding (its token ids), the final norm, head and loss, and DeepSeek's MTP module."""
    out = {}
    if first:
        out["embedding"] = w.n * 8
    if last:
        out["head_and_loss"] = _head_and_loss(m, w)
        for _ in range(m.mtp_depth):
            out["mtp"] = out.get("mtp", 0) + _mtp_bytes(m, w, math_path)
    return out


def _mtp_bytes(m: ModelConfig, w: Widths, math_path: bool) -> int:
    """One MTP module on T - 1 positions (models/mtp.py): the hidden state's norm (its input is the
    main model's last hidden state, already counted), the next token's embedding and its norm, their
    concatenation projected back to d, one block, the final norm, the shared head and its loss. The
    projection's output is in the compute dtype, so the block's residual stream is too (its weights
    are still cast under autocast; the head's cast weight is autocast's cached one)."""
    n, d = w.batch * (w.seq - 1), m.d_model
    outer = replace(w, n=n, ns=n, seq=w.seq - 1)
    inner = replace(outer, r=w.c, weights_cast=w.casts_weights)
    total = n * (d * 4 + 4) + _norm(outer, n, d, m.norm) + _inputs(outer, 2 * d, [2 * d * d])
    total += sum(block_bytes(m, inner, m.n_layers, math_path).values()) + _norm(inner, n, d, m.norm)
    return total + n * d * w.c + n * vocab_per_rank(m, w.tp) * 4 + n * 8 + 4


def vocab_per_rank(m: ModelConfig, tp: int) -> int:
    """Rows of the vocabulary (embedding, head, logits) on one tp rank: a vocabulary that tp
    does not divide is padded to a multiple of it (parallel/tensor_parallel.py)."""
    from ..parallel.tensor_parallel import padded_vocab

    return padded_vocab(m.vocab_size, tp) // tp


def _head_and_loss(m: ModelConfig, w: Widths) -> int:
    v = vocab_per_rank(m, w.tp)
    head = _norm(w, w.ns, m.d_model, m.norm) + _inputs(w, m.d_model, [m.d_model * v])
    return head + w.n * v * 4 + w.n * 8 + 4  # fp32 logits kept by the softmax, targets


def in_flight(plan: Plan, pp_rank: int) -> int:
    """Micro-batches (chunks, with several per rank) whose activations a stage holds at its peak:
    counted on the schedule's own order (actions.Timetable.peak_in_flight), from a forward to the
    backward that frees it (a split one's W). GPipe: m; 1F1B: pp - rank; ZB-H1: pp on every rank."""
    from ..parallel.pipeline import cached_timetable

    if plan.pp == 1:
        return 1
    if plan.pp_schedule == "gpipe":  # every forward before the first backward
        return plan.micro_batches
    return cached_timetable(plan.pp_schedule, plan.pp, plan.pp_virtual_stages, flight_micro_batches(plan)) \
        .peak_in_flight(pp_rank)


def flight_micro_batches(plan: Plan) -> int:
    """Micro-batches to play for the peak in flight: the step's, or 4 pp v when it has more. Past
    its warm-up a 1F1B-family schedule frees one micro-batch per one it starts, so its peak is
    reached within the first pp v of them; playing thousands (a large global batch on few
    replicas) would only cost time."""
    cap = 4 * plan.pp * plan.pp_virtual_stages
    return min(plan.micro_batches, cap)


def chunked_activations(m: ModelConfig, plan: Plan, precision, pp_rank: int, device: str, model=None) -> int:
    """Peak activations of a stage that holds several chunks (interleaved, DualPipeV): the most
    the schedule's order keeps at once, each (chunk, micro-batch) in flight weighing its chunk's
    own activations (its layers, and the embedding or head where it has them)."""
    from ..parallel.pipeline import cached_timetable

    stage = plan_stage(m, plan, pp_rank, model)
    size = [sum(activation_bytes(m, plan, precision, list(layers), stage.is_first_chunk(k), stage.is_last_chunk(k),
                                 device).values()) for k, layers in enumerate(stage.chunks)]
    return cached_timetable(plan.pp_schedule, plan.pp, stage.v, flight_micro_batches(plan)).peak_in_flight(
        pp_rank, size.__getitem__)


def plan_stage(m: ModelConfig, plan: Plan, pp_rank: int, model=None):
    """The pipeline.Stage of rank pp_rank, as the runtime assigns it (runtime/components.py): its
    chunks' layers, and whether it holds the model's first chunk (embedding) and last (head, loss;
    both on rank 0 in DualPipeV's V). Balancing by parameter count (parallel.pp_partition=params)
    needs the model."""
    from ..parallel.pipeline import layer_costs, schedule_stage

    costs = layer_costs(model, plan.pp_partition) if model is not None else None
    return schedule_stage(plan.pp_schedule, m.n_layers, plan.pp, plan.pp_virtual_stages, pp_rank, costs)


def compute_bytes(precision) -> int:
    """Bytes per element of what the run computes in: 4 for the fp32 recipe, 2 for every other."""
    if precision.recipe == "auto":  # a programming error: callers resolve it (cli.cmd_inspect, the runtime)
        raise ValueError("precision.recipe=auto is chosen by the device at start-up: resolve it to bf16 or fp32 "
                         "before planning memory or communication")
    return 4 if precision.recipe == "fp32" else 2


def attention_bytes_per_element(precision, device: str) -> int:
    """The attention core's dtype (precision/policy.attention_core_dtype): fp32 when asked, and
    by default on CPU under a 16-bit recipe; otherwise the compute dtype."""
    c = compute_bytes(precision)
    if c == 4 or precision.attention == "fp32" or (precision.attention == "auto" and device == "cpu"):
        return 4
    return c


def _widths(m: ModelConfig, plan: Plan, precision, device: str) -> tuple[Widths, bool]:
    """One micro-batch on one rank; and whether MLA's attention runs as separate matmuls (the CPU
    math path, for unequal q/k and v head dims). Under context parallelism a rank holds 1/cp of
    each sequence, and its attention is the ring (parallel/context_parallel.py), which keeps q, k,
    v, the output and the log-sum-exp in fp32, as a flash kernel keeps them, whatever the dims."""
    c = compute_bytes(precision)
    r = BYTES[precision.param_dtype]
    seq = plan.seq_len // plan.cp
    n = plan.micro_batch_size * seq
    a = 4 if plan.cp > 1 else attention_bytes_per_element(precision, device)
    w = Widths(n=n, ns=n // plan.tp if plan.sp else n, batch=plan.micro_batch_size, seq=seq,
               tp=plan.tp, ep=plan.ep, c=min(c, r), r=r, a=a,
               documents=plan.document_mask, grouped_experts=_grouped_experts(m, precision), ring=plan.cp > 1,
               etp=plan.layout.etp)
    math_path = device == "cpu" and m.arch == "deepseek" and plan.cp == 1 and \
        m.qk_nope_head_dim + m.qk_rope_head_dim != m.v_head_dim
    return w, math_path


def _grouped_experts(m: ModelConfig, precision) -> bool:
    """Whether the routed experts run grouped: model.moe_grouped_gemm, in a plain recipe (a
    low-bit one scales per expert: ExpertMLP runs those in its loop)."""
    from ..precision.policy import LOW_BIT, recipe_name_for

    experts = recipe_name_for(f"layers.{m.n_layers - 1}.mlp.experts", precision)
    return m.moe_grouped_gemm and experts == precision.recipe and experts not in LOW_BIT


def activation_bytes(m: ModelConfig, plan: Plan, precision, layers: list[int], first: bool, last: bool,
                     device: str = "cuda") -> dict[str, int]:
    """Activations of one micro-batch on one rank, per kind of module (no recomputation)."""
    w, math_path = _widths(m, plan, precision, device)
    out: dict[str, int] = {}
    for i in layers:
        for kind, b in block_bytes(m, w, i, math_path).items():
            out[kind] = out.get(kind, 0) + b
    for kind, b in ends_bytes(m, w, first, last, math_path).items():
        out[kind] = out.get(kind, 0) + b
    if plan.document_mask and layers:
        out["document_mask"] = documents_bytes(m, w, first, math_path)
    if plan.cp > 1 and layers:
        out["context_positions"] = gathered_positions_bytes(m, w, w.seq, first)  # [T/cp] rows, every row alike
    return out


# -- recomputation (recompute.py) -------------------------------------------------------
#
# A recomputed block keeps its input through forward (N_s x d in the residual dtype) and, in
# selective mode, the outputs of its matmuls and of the fused attention kernel; backward then
# rebuilds the rest of one block at a time, which holds what the block would have kept without
# recomputation while its backward runs. Under autocast, the c-byte weight copies a block's
# forward makes stay in autocast's cache until the forward ends, saved or not.


def _weight_casts(m: ModelConfig, w: Widths, layer: int) -> int:
    """Bytes of the c-byte weight copies of one block's matmuls that autocast keeps in its cache."""
    from ..models.mlp import ffn_width

    if not w.casts_weights:
        return 0
    d = m.d_model
    if m.arch == "deepseek":
        h = m.n_heads // w.tp
        dqk, nope, dv = m.qk_nope_head_dim + m.qk_rope_head_dim, m.qk_nope_head_dim, m.v_head_dim
        q = d * m.q_lora_rank + m.q_lora_rank * h * dqk if m.q_lora_rank else d * h * dqk
        attn = q + d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * h * (nope + dv) + h * dv * d
        if layer < m.first_k_dense_replace:
            mlp = 3 * d * (m.d_ff or ffn_width(m)) // w.tp
        else:  # the shared experts': autocast caches casts of leaf weights only, not of the routed
            mlp = m.n_shared_experts * 3 * d * m.moe_d_ff  # experts' slices (moe.py unbinds them)
        return (attn + mlp) * w.c
    hd, h, h_kv = d // m.n_heads, m.n_heads // w.tp, (m.n_kv_heads or m.n_heads) // w.tp
    f = ffn_width(m) // w.tp
    return (d * (2 * h + 2 * h_kv) * hd + (3 if m.mlp == "swiglu" else 2) * d * f) * w.c


def _kept_outputs(m: ModelConfig, w: Widths, layer: int, math_path: bool) -> int:
    """What selective recomputation keeps of a block besides its input: the outputs of its matmuls
    (recompute.py's policy: mm and addmm, not MLA's up-projections) and of the fused attention
    kernel (its output and the log-sum-exp of each row; not the ring's under context parallelism:
    its forward runs without grad inside an autograd.Function, which the policy recomputes).
    Matmul outputs are N tokens wide (all of the sequence under sequence parallelism: they come
    before the reduce-scatter)."""
    from ..models.mlp import ffn_width

    d, n, c = m.d_model, w.n, w.c
    if m.arch == "deepseek":
        h = m.n_heads // w.tp
        dqk, dv = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
        q = m.q_lora_rank if m.q_lora_rank else h * dqk  # wq_b is an up-projection: recomputed
        total = n * (q + m.kv_lora_rank + m.qk_rope_head_dim + d) * c  # wq or wq_a, wkv_a, wo
        if not (math_path or w.ring):
            total += w.a * n * h * dv + 4 * w.batch * h * w.seq
        if layer < m.first_k_dense_replace:
            return total + n * (2 * (m.d_ff or ffn_width(m)) // w.tp + d) * c
        a, f = n * m.moe_top_k, m.moe_d_ff // w.etp
        total += n * m.n_routed_experts * 4  # the router's scores, in fp32
        total += a * (2 * f + d) * c  # each expert's w1, w3 and w2 outputs, for its tokens
        fs = m.n_shared_experts * m.moe_d_ff  # the shared experts are whole on every tp rank
        return total + n * (2 * fs + d) * c if m.n_shared_experts else total
    hd, h, h_kv = d // m.n_heads, m.n_heads // w.tp, (m.n_kv_heads or m.n_heads) // w.tp
    f = ffn_width(m) // w.tp
    attn = n * ((h + 2 * h_kv) * hd + d) * c + (0 if w.ring else w.a * n * h * hd + 4 * w.batch * h * w.seq)
    return attn + n * ((2 if m.mlp == "swiglu" else 1) * f + d) * c


def recomputed_activations(m: ModelConfig, plan: Plan, precision, layers: list[int], first: bool, last: bool,
                           device: str, flight: int, mode: str) -> int:
    """Peak activations of a stage under recompute `mode` with `flight` micro-batches (chunks,
    interleaved) in flight: the others' kept tensors, plus the larger of this micro-batch's at the
    end of its forward (and the weight copies in autocast's cache) and, in its backward, the
    blocks not yet reached plus one block rebuilt."""
    w, math_path = _widths(m, plan, precision, device)
    v = plan.pp_virtual_stages
    chunk = max(1, len(layers) // v)
    x = w.ns * m.d_model * w.r  # a block's input
    kept, casts, rebuilt = [], 0, 0
    for pos, i in enumerate(layers):
        whole = sum(block_bytes(m, w, i, math_path).values())
        if not plan.recomputes(pos, len(layers), mode):
            kept.append(whole)
            continue
        kept.append(x + (_kept_outputs(m, w, i, math_path) if mode == "selective" else 0))
        casts += _weight_casts(m, w, i)
        # backward of block i: the blocks before it still keep theirs (its own: rebuilt whole)
        rebuilt = max(rebuilt, sum(kept[pos - pos % chunk:pos]) + whole)
    per_mb = sum(kept) + sum(ends_bytes(m, w, first, last, math_path).values())
    if plan.document_mask and layers:  # the mask and rows are inputs of every block: kept, not rebuilt
        per_mb += documents_bytes(m, w, first, math_path)
    if plan.cp > 1 and layers:
        per_mb += gathered_positions_bytes(m, w, w.seq, first)
    per_chunk, casts = per_mb // v, casts // v
    return (flight - 1) * per_chunk + max(per_chunk + casts, rebuilt)


def stage_layers(m: ModelConfig, plan: Plan, pp_rank: int, model=None) -> list[int]:
    """The layers of stage pp_rank, as the runtime assigns them (runtime/components.py); balancing by
    parameter count (parallel.pp_partition=params) needs the model."""
    if plan.pp == 1:
        return list(range(m.n_layers))
    return [i for chunk in plan_stage(m, plan, pp_rank, model).chunks for i in chunk]


def memory_per_rank(m: ModelConfig, plan: Plan, precision, device: str = "cuda", model=None,
                    stages: list[int] | None = None) -> list[dict]:
    """One entry per pipeline stage (every tp, dp and ep rank of a stage holds the same amount).
    model: rank_model's, to reuse one already built; stages: only these (default: all)."""
    out = []
    model = model if model is not None else rank_model(m, plan)
    for stage in range(plan.pp) if stages is None else stages:
        params = stage_parameters(model, m, plan, stage)
        static = static_bytes(params, plan, precision)
        layers = stage_layers(m, plan, stage, model)
        s = plan_stage(m, plan, stage, model)
        first, last = s.has_first, s.has_last
        per_mb = activation_bytes(m, plan, precision, layers, first, last, device)
        flight = in_flight(plan, stage)
        gathered = gathered_param_bytes(model, m, plan, stage, precision)
        if plan.pp_virtual_stages > 1:  # in flight counts chunks: weigh each by its own activations
            act = chunked_activations(m, plan, precision, stage, device, model)
        else:
            act = sum(per_mb.values()) * flight
        by_mode = {"none": act}
        for mode in ("selective", "full"):
            by_mode[mode] = recomputed_activations(m, plan, precision, layers, first, last,
                                                   device, flight, mode)
        # A stage's output to the next (kept for its backward, until the gradient comes back): each
        # chunk in flight but the model's last.
        sent = plan.micro_batch_size * plan.seq_len // (plan.tp if plan.sp else 1) * m.d_model * \
            BYTES[precision.param_dtype]
        sending = flight if not last else flight * (plan.pp_virtual_stages - 1) // plan.pp_virtual_stages
        by_mode = {k: v + sending * sent for k, v in by_mode.items()}
        act = by_mode[plan.recompute]
        out.append({"stage": stage, "layers": len(layers), "params": sum(p.numel() for p in params),
                    **static, "activations_per_micro_batch": sum(per_mb.values()),
                    "activations_by_kind": per_mb, "in_flight": flight, "activations": act,
                    "activations_by_recompute": by_mode, "gathered_params": gathered,
                    "total": sum(static.values()) + act + gathered})
    return out
