"""Communication per optimizer step, per parallel group, for a layout: what each collective of
this code base moves, written out (the counterpart of monitoring/comm.py, which counts the same
messages around the real calls; tests/distributed/test_inspection_world.py checks they agree).

Message sizes follow nccl-tests (see monitoring/comm.py): an all-reduce's tensor, an
all-gather's whole output, a reduce-scatter's whole input, what a rank hands an all-to-all,
what it sends to a pipeline neighbour. The bytes on the wire per rank follow (ring algorithms):

    all-reduce 2 (n-1)/n x size     all-gather, reduce-scatter, all-to-all (n-1)/n x size     send 1 x size

Per micro-batch (N tokens on a rank, N_s = N / tp under sequence parallelism; c bytes per
element of the compute dtype, r of the residual stream and of the gradients flowing into it):

tp   each column-parallel linear gathers its own input: an all-gather of N x in_features (r)
     forward and a reduce-scatter backward under sequence parallelism; without it, an
     all-reduce of the input's gradient backward (Megatron's f). Each row-parallel linear
     (attention's wo, the MLP's w2): a reduce-scatter (SP) or all-reduce forward of N x d (c),
     and under SP an all-gather backward. The vocabulary-parallel embedding: the same as a row
     linear, in r; the head: a column linear; the loss: two all-reduces of N and 2N fp32
     (the max logit; the target logit and the sum of exponentials).
     After backward, under SP: an all-reduce of the gradients of the weights that saw only
     this rank's tokens (norms, and everything not split over tp).
dp   the gradients of the weights synced over dp (experts: over expert-dp, `edp`): all-reduce
     of a bucket once per step (no ZeRO, or ZeRO-1), or reduce-scatter once per micro-batch
     (ZeRO-2, 3; whatever the chunks per pipeline rank), then for ZeRO-1 and 2 an all-gather of
     the updated parameters (param dtype). ZeRO pads each bucket to a multiple of the group size.
ep   per MoE layer: the token counts (E int64), dispatch (N·k tokens of d, r) and combine
     (c) forward, the same two backward; balanced routing assumed (each rank receives as many
     tokens as it sends; the real figure moves with the router's imbalance).
pp   one send per micro-batch and chunk boundary: N_s x d (param dtype) forward from every stage
     but the last, the same backward from every stage but the first.
embd the tied embedding's gradient, summed over the first and last stage.

Scalars (the loss, the gradient norm's partial sums, the loss denominator) are left out: a
few bytes each.
"""

from __future__ import annotations

from ..config import ModelConfig
from ..params import spec
from .memory import (BYTES, Plan, compute_bytes, dense_and_expert, plan_stage, rank_model, root_parameters,
                     stage_layers, stage_parameters, vocab_per_rank)

WIRE = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
        "reduce_scatter": lambda n: (n - 1) / n, "all_to_all": lambda n: (n - 1) / n, "send": lambda n: 1.0}


def _col(t: dict, sp: bool, n: int, width: int, b: int) -> None:
    """A column-parallel linear's input: N x width elements of b bytes."""
    if sp:
        t["all_gather"] += n * width * b
        t["reduce_scatter"] += n * width * b
    else:
        t["all_reduce"] += n * width * b


def _row(t: dict, sp: bool, n: int, d: int, b: int) -> None:
    """A row-parallel linear's output (or the vocabulary-parallel embedding's)."""
    if sp:
        t["reduce_scatter"] += n * d * b
        t["all_gather"] += n * d * b
    else:
        t["all_reduce"] += n * d * b


def block_tp_linears(m: ModelConfig, layer: int, c: int, r: int) -> list[tuple[str, int, int]]:
    """A block's tensor-parallel collectives in forward order: ("col", input width, bytes per
    element) where column-parallel linears take their input (once for those that share it: q, k
    and v; gate and up, tensor_parallel.column_linears), ("row", d, bytes) for a row-parallel
    one's output. Where the block has a dense MLP its closing row-parallel linear comes last."""
    d = m.d_model
    if m.arch == "deepseek":
        ac = c if c < r else r  # the low-rank projections' outputs are in the compute dtype
        out = [("col", m.q_lora_rank, ac) if m.q_lora_rank else ("col", d, r),
               ("col", m.kv_lora_rank, ac),  # wkv_b
               ("col", m.qk_rope_head_dim, ac),  # k_R, shared by every head
               ("row", d, c)]
        if layer < m.first_k_dense_replace:
            out += [("col", d, r), ("row", d, c)]
        return out
    return [("col", d, r), ("row", d, c), ("col", d, r), ("row", d, c)]


def has_dense_mlp(m: ModelConfig, layer: int) -> bool:
    return m.arch != "deepseek" or layer < m.first_k_dense_replace


def tp_per_micro_batch(m: ModelConfig, plan: Plan, layers: list[int], first: bool, last: bool,
                       c: int, r: int) -> dict[str, int]:
    t = {"all_reduce": 0, "all_gather": 0, "reduce_scatter": 0}
    if plan.tp == 1:
        return t
    n, d, sp = plan.micro_batch_size * plan.seq_len // plan.cp, m.d_model, plan.sp
    if first:
        _row(t, sp, n, d, r)
    mtp = [m.n_layers] * m.mtp_depth if last else []  # DeepSeek's MTP block (on T - 1 positions: ~ N)
    for i in [*layers, *mtp]:
        for kind, width, b in block_tp_linears(m, i, c, r):
            (_col if kind == "col" else _row)(t, sp, n, width, b)
    if plan.layout.etp > 1 and m.arch == "deepseek":  # expert tensor parallelism, each MoE layer:
        # the routed (token, slot) rows: without sp the same on every tp rank; with sp each rank's
        # n/tp tokens pick k experts each (dropless), so the all-gather pads nothing (models/moe.py)
        a = n * m.moe_top_k
        for i in [*layers, *mtp]:
            if i < m.first_k_dense_replace:
                continue
            if sp:  # tokens gathered (r), outputs reduce-scattered (c); each mirrored in backward
                t["all_gather"] += a * d * (r + c) + plan.tp * m.n_routed_experts * 8  # (and the counts)
                t["reduce_scatter"] += a * d * (r + c)
            else:  # outputs summed (c); the input's gradient (r)
                t["all_reduce"] += a * d * (c + r)
    for _ in range(1 + len(mtp) if last else 0):  # the head (shared by MTP) and the loss
        _col(t, sp, n, d, r)
        t["all_reduce"] += 3 * n * 4
    return t


def tp_recomputed_per_micro_batch(m: ModelConfig, plan: Plan, layers: list[int], c: int, r: int) -> dict[str, int]:
    """The forward collectives that recomputed blocks run again in backward (the meter's
    "tp_recompute"): each block's, up to the last tensor its backward needs, where
    torch.utils.checkpoint stops recomputing: all but the dense MLP's closing row-parallel sum.
    Forward halves of tp_per_micro_batch's: with sp the columns' all-gathers and the rows'
    reduce-scatters, without it the rows' all-reduces."""
    t = {"all_reduce": 0, "all_gather": 0, "reduce_scatter": 0}
    if plan.tp == 1 or plan.recompute == "none":
        return t
    n, sp = plan.micro_batch_size * plan.seq_len // plan.cp, plan.sp
    for pos, i in enumerate(layers):
        if not plan.recomputes(pos, len(layers)):
            continue
        linears = block_tp_linears(m, i, c, r)
        for kind, width, b in linears[:-1] if has_dense_mlp(m, i) else linears:
            if kind == "row":
                t["reduce_scatter" if sp else "all_reduce"] += n * width * b
            elif sp:
                t["all_gather"] += n * width * b
    return t


def comm_per_step(m: ModelConfig, plan: Plan, precision, pp_rank: int = 0,
                  model=None) -> dict[str, dict[str, int]]:
    """{group: {collective: bytes}} that one rank of stage pp_rank moves in one optimizer step
    (model: memory.rank_model's, to reuse one already built)."""
    c = compute_bytes(precision)
    r = BYTES[precision.param_dtype]
    c = min(c, r)
    grad_b, param_b = BYTES[precision.grad_dtype], BYTES[precision.param_dtype]
    model = model if model is not None else rank_model(m, plan)
    layers = stage_layers(m, plan, pp_rank, model)
    stage = plan_stage(m, plan, pp_rank, model)
    first, last = stage.has_first, stage.has_last
    mb = plan.micro_batches
    out: dict[str, dict[str, int]] = {}

    tp = {k: v * mb for k, v in tp_per_micro_batch(m, plan, layers, first, last, c, r).items()}
    params = stage_parameters(model, m, plan, pp_rank)
    if plan.tp > 1 and plan.sp:  # once per step: the weights that saw only this rank's tokens
        tp["all_reduce"] += summed_slice(sum(p.numel() for p in params if not spec(p).tp_sharded), plan) * grad_b
    if plan.tp > 1:
        out["tp"] = tp
        again = {k: v * mb for k, v in tp_recomputed_per_micro_batch(m, plan, layers, c, r).items() if v}
        if again:  # counted apart, as the communication meter labels it (parallel/collectives.py)
            out["tp_recompute"] = again

    dense, expert = dense_and_expert(params)
    root = root_numel(model, m, plan, pp_rank) if plan.zero_stage == 3 else (0, 0)
    out.update(dp_per_step(plan, dense, expert, root, grad_b, param_b))
    ep = ep_per_micro_batch(m, plan, layers, c, r)
    out.update({g: {op: b * mb for op, b in ops.items()} for g, ops in ep.items()})

    if plan.cp > 1:
        out.update(cp_per_step(m, plan, layers))

    if plan.pp > 1:
        n = plan.micro_batch_size * plan.seq_len // plan.cp // (plan.tp if plan.sp else 1)
        out["pp"] = {"send": mb * pp_sends(plan, pp_rank) * n * m.d_model * param_b}
        if m.tie_embeddings and first != last:  # both on one rank (DualPipeV): one copy, no sum
            out["embd"] = {"all_reduce": summed_slice(vocab_per_rank(m, plan.tp) * m.d_model, plan) * grad_b}
    return out


def dp_per_step(plan: Plan, dense: int, expert: int, root: tuple[int, int], grad_b: int, param_b: int
                ) -> dict[str, dict[str, int]]:
    """The data-parallel groups' bytes per step for a stage holding `dense` parameters (synced over
    dp x cp) and `expert` ones (over expert-dp); root: ZeRO-3's root unit's (dense, expert)."""
    out: dict[str, dict[str, int]] = {}
    mb = plan.micro_batches
    # Stages 2 and 3 reduce-scatter after every micro-batch's backward. A rank with several
    # pipeline chunks sends after each chunk's backward that chunk's buckets only (their buckets are
    # cut per chunk: data_parallel.backward_chunks), so each gradient goes once per micro-batch.
    backwards = mb if plan.zero_stage >= 2 else 1
    for group, size, numel, root_numel in (("dp", plan.replicas, dense, root[0]),
                                           ("edp", plan.expert_replicas, expert, root[1])):
        if size == 1 or numel == 0:
            continue
        padded = -(-numel // size) * size if plan.zero_stage else numel
        sync = "reduce_scatter" if plan.zero_stage >= 2 else "all_reduce"
        out[group] = {sync: padded * grad_b * backwards}
        if plan.zero_stage in (1, 2):  # the updated slices, after the step
            out[group]["all_gather"] = padded * param_b
        if plan.zero_stage == 3:  # each block for its forward and its backward; the root for every
            # forward and backward of the model, one per chunk (parallel/zero3.py), on a group of its own
            per_pass = padded + root_numel * (plan.pp_virtual_stages - 1)
            out[f"{group}_gather"] = {"all_gather": 2 * mb * per_pass * param_b}
    return out


def ep_per_micro_batch(m: ModelConfig, plan: Plan, layers: list[int], c: int, r: int) -> dict[str, dict[str, int]]:
    """Expert parallelism's all-to-alls for one micro-batch through `layers` (models/moe.py): per MoE
    layer the token counts (E int64), dispatch (N·k tokens of d, r bytes) and combine (c) forward,
    the same two backward; a recomputed MoE block sends its tokens out and back again."""
    if plan.ep == 1 or m.arch != "deepseek":
        return {}
    n = plan.micro_batch_size * plan.seq_len // plan.cp // (plan.tp if plan.sp else 1)
    a = n * m.moe_top_k
    moe = sum(1 for i in layers if i >= m.first_k_dense_replace)
    out = {"ep": {"all_to_all": moe * (m.n_routed_experts * 8 + 2 * a * m.d_model * (r + c))}}
    if plan.recompute != "none":
        again = sum(1 for pos, i in enumerate(layers)
                    if i >= m.first_k_dense_replace and plan.recomputes(pos, len(layers)))
        if again:
            out["ep_recompute"] = {"all_to_all": again * (m.n_routed_experts * 8 + a * m.d_model * (r + c))}
    return out


def summed_slice(numel: int, plan: Plan) -> int:
    """Elements of a gradient summed over a second group after dp (sequence parallelism's tp sum,
    the tied embedding's): the whole, or under ZeRO-2/3 this rank's slice (data_parallel.py sums
    the reduce-scattered slice)."""
    return -(-numel // plan.replicas) if plan.zero_stage >= 2 else numel


def pp_sends(plan: Plan, pp_rank: int) -> int:
    """Messages a rank sends per micro-batch: each chunk's output forward and its input's gradient
    backward, except at the model's ends and where the neighbouring chunk is on the same rank (the
    tip of DualPipeV's V: handed over in memory)."""
    from ..parallel.pipeline import chunk_ids

    placement = chunk_ids(plan.pp_schedule, plan.pp, plan.pp_virtual_stages)
    rank_of = {c: r for r, ids in enumerate(placement) for c in ids}
    return sum(rank_of.get(c + 1, pp_rank) != pp_rank for c in placement[pp_rank]) + \
        sum(rank_of.get(c - 1, pp_rank) != pp_rank for c in placement[pp_rank])


def cp_per_step(m: ModelConfig, plan: Plan, layers: list[int]) -> dict[str, dict[str, int]]:
    """The ring's sends (parallel/context_parallel.py): per attention layer and micro-batch, k and
    v of this rank's tokens (fp32, this tp rank's KV heads) go cp - 1 hops forward and again in
    backward, and their gradients cp hops; a recomputed block runs its forward ring again."""
    n = plan.micro_batch_size * plan.seq_len // plan.cp
    if m.arch == "deepseek":  # MLA's keys and values: every head, q/k and v widths apart
        kv = m.n_heads // plan.tp * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
    else:
        kv = 2 * (m.n_kv_heads or m.n_heads) // plan.tp * (m.d_model // m.n_heads)
    hop = n * kv * 4
    cp, mb = plan.cp, plan.micro_batches
    out = {"cp": {"send": mb * len(layers) * hop * ((cp - 1) + (cp - 1) + cp)}}
    again = sum(1 for pos, _ in enumerate(layers) if plan.recompute != "none" and plan.recomputes(pos, len(layers)))
    if again:
        out["cp_recompute"] = {"send": mb * again * hop * (cp - 1)}
    return out


def root_numel(model, m: ModelConfig, plan: Plan, pp_rank: int) -> tuple[int, int]:
    """(dense, expert) parameters of ZeRO-3's root unit on stage pp_rank."""
    rest = root_parameters(model, m, plan, pp_rank)
    return (sum(p.numel() for p in rest if not spec(p).expert_parallel),
            sum(p.numel() for p in rest if spec(p).expert_parallel))


def wire_bytes(groups: dict[str, dict[str, int]], plan: Plan) -> dict[str, float]:
    """Bytes each rank puts on the wire per step, per group (ring algorithms)."""
    sizes = {"tp": plan.tp, "dp": plan.replicas, "edp": plan.expert_replicas, "ep": plan.ep,
             "pp": plan.pp, "embd": 2, "dp_gather": plan.replicas, "edp_gather": plan.expert_replicas,
             "tp_recompute": plan.tp, "ep_recompute": plan.ep, "cp": plan.cp, "cp_recompute": plan.cp}
    return {g: sum(WIRE[op](sizes[g]) * b for op, b in ops.items()) for g, ops in groups.items()}
