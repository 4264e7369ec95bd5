"""Published training runs, digit for digit, to validate `nanotrain plan` against.

Each PublishedRun is one row of a table someone measured on real hardware: the model, the
layout (tp, pp, dp, cp, vp, ep, micro-batch, recomputation, schedule, GEMM dtype) and what was
measured (seconds per step, TFLOP/s per GPU, MFU, tokens/s per GPU), with its citation. Where the
source is silent on a knob, `assumptions` says what was assumed and why. Three groups:

  korthikanti-t5        Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
                        Transformer Models" (arXiv 2205.05198), Table 5: 8 iteration times on
                        A100-80GB (Selene), full recomputation vs sequence parallel + selective.
  megatron-readme-h100  NVIDIA/Megatron-LM README, "Training Speed and Scalability" (the table is
                        images/model_table.png, added in f2e5db40 on main and 937571cf on
                        core_r0.8.0, 2024-07-15): 9 GPT models, 1.7B-462B, on up to 6144 H100s.
  extra                 Held-out rows from other sources: Narayanan et al. 2021 Table 1, Llama 3
                        Table 4, NeMo 24.07 and Megatron-Bridge 25.09/25.11 performance summaries.

FLOP conventions (B: global batch in sequences, s: sequence length, l: layers, h: d_model, V:
vocabulary, t: seconds per step, N: GPUs). They differ, so compare a prediction with a published
TFLOP/s or MFU only in that source's convention; tokens/s and seconds per step need none.

- Narayanan et al. 2021 "TFLOP/s per GPU" = 96·B·s·l·h²·(1 + s/6h + V/16lh) / (N·t): every row
  there uses full recomputation, and 96 (not 72) counts the recomputed forward as work done;
  attention's s² terms over the full square (no causal halving); the output layer (6·B·s·h·V) once.
  "% of theoretical peak" is that over 312 TFLOP/s (A100 fp16/bf16 dense), i.e. a hardware
  utilization, not a model-FLOPs one.
- Korthikanti et al. 2022 MFU = model FLOPs 72·B·s·l·h²·(1 + s/6h + V/16lh) / (N·t·312e12) (no
  recompute counted). HFU adds the recomputation the run did: under selective recomputation
  the attention core's forward, 72·B·s·l·h²·(1 + s/3h + V/16lh); under full recomputation the 96
  formula above. With the output-layer term V/16lh (3/4 of the 96 formula's) these reproduce every
  published MFU/HFU below to 0.1 points (tests check 1%); V/12lh (the output layer's 6·B·s·h·V
  exactly) moves them by at most 0.4% relative.
- Megatron-LM README (H100): TFLOP/s per GPU from megatron/training/training.py's
  num_floating_point_operations (r0.8.0): 12·B·s·l·h²·[(1 + g/a + s/h)·(a·d_head/h) +
  (ffn/h)·(3/2 if swiglu) + V/(2lh)] / (N·t); for these GPT models (MHA, 4h GELU) that is
  72·B·s·l·h²·(1 + s/6h + V/12lh): no recompute, no causal halving. MFU = it / 989 TFLOP/s
  (H100 SXM dense BF16; the README's MFU column is TFLOP/s / 989 to the percent).
- Llama 3 (Table 4): "BF16 MFU" citing Chowdhery et al. 2023 (PaLM): 6·N_params + 12·L·H·Q·T
  FLOPs per token over 989 TFLOP/s; whether Meta halves attention for the causal (and
  document) mask is not said. Published TFLOP/s are rounded to 10 (400/989 = 40.4% is printed
  beside "41%").
- NeMo 24.07 "Model TFLOP/sec/GPU": NeMo's formula without causal halving (GPT-3 175B: 716 tok/s x
  1.0764 TFLOP/token = 770.7 vs 771 printed). Megatron-Bridge 25.09/25.11: the same per-token
  formula with the attention s² term halved for causal masks: l·h²·(12 + 12g/a + 18·ffn/h +
  6·s/h) + 6·V·h per token for Llama (405B: 292 tok/s x 2.5239 TFLOP/token = 737.0 vs 737).
  Neither counts recomputation.

Extra fields beyond the layout: tokens_per_s_per_gpu (what NeMo/Megatron-Bridge publish: the
step time is global_batch·seq_len / (it·gpus)), hfu (published hardware FLOPs utilization) and
params_b (the parameter count the source prints, in billions, to check model dims against).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PublishedRun:
    name: str  # short, unique
    source: str  # citation: paper/README + table + row
    set: str  # "korthikanti-t5", "megatron-readme-h100", or "extra"
    hardware: str  # a key of inspection.hardware.ACCELERATORS ("a100" rows: A100-80GB SXM)
    gpus: int
    model: dict  # nanotrain ModelConfig fields (max_seq_len set to the row's seq_len)
    seq_len: int
    global_batch: int  # sequences per optimizer step
    micro_batch: int
    tp: int
    pp: int
    dp: int
    cp: int = 1
    vp: int = 1  # virtual pipeline chunks per rank (interleaved schedule)
    ep: int = 1
    etp: int = 1
    sp: bool = False
    zero: int = 0  # distributed optimizer = ZeRO-1; Llama 3's FSDP (no reshard after forward) = 2
    recompute: str = "none"  # "none" | "selective" | "full"
    schedule: str = "1f1b"  # "gpipe" | "1f1b" | "interleaved" | "zb_h1" | "dualpipev"
    dtype: str = "bf16"  # GEMM dtype: "bf16" | "fp16" | "fp8"
    iteration_s: float | None = None  # measured seconds per optimizer step, if published
    tflops_per_gpu: float | None = None  # as published, in the source's own convention
    mfu: float | None = None  # as published (0..1), in the source's own convention
    convention: str = ""  # what the published TFLOP/s or MFU counts
    assumptions: str = ""  # what the source is silent on, what was assumed, and why
    tokens_per_s_per_gpu: float | None = None  # as published
    hfu: float | None = None  # hardware FLOPs utilization as published (0..1)
    params_b: float | None = None  # total parameters as the source prints them, billions


def _gpt(d_model: int, n_layers: int, n_heads: int, vocab: int, seq: int, tie: bool = True) -> dict:
    """A Megatron GPT-3-style model: 4h GELU MLP, LayerNorm, learned positions, biases, MHA."""
    return dict(arch="transformer", d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=0,
                d_ff=4 * d_model, vocab_size=vocab, mlp="gelu", norm="layernorm", pos_emb="learned",
                tie_embeddings=tie, bias=True, max_seq_len=seq)


def _llama(d_model: int, n_layers: int, n_heads: int, n_kv_heads: int, d_ff: int, seq: int,
           vocab: int = 128256, rope_theta: float = 500000.0) -> dict:
    """A Llama-3-style model: SwiGLU, RMSNorm, RoPE, GQA, untied embeddings, no biases."""
    return dict(arch="transformer", d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                d_ff=d_ff, vocab_size=vocab, mlp="swiglu", norm="rmsnorm", pos_emb="rope", rope_theta=rope_theta,
                tie_embeddings=False, bias=False, max_seq_len=seq)


# ---------------------------------------------------------------------------------------------
# korthikanti-t5: Korthikanti, Casper, Lym, McAfee, Andersch, Shoeybi, Catanzaro, "Reducing
# Activation Recomputation in Large Transformer Models", arXiv 2205.05198 (MLSys 2023), Table 5
# (end-to-end iteration time, A100-80GB on Selene, dp = 1). Model configs (the paper's Table 3:
# heads, hidden, layers, tp, pp, GPUs, global batch; seq 2048, vocab 51200) as calculon encodes
# them in models/{megatron-22B,gpt3-175B,turing-530B,megatron-1T}.json. Iteration times as
# transcribed in calculon-ai/calculon calculon/llm/validation.py (seqsel_tab5, "reported here:
# arxiv.org/pdf/2205.05198.pdf Table 5"); layouts, micro-batch, interleaving and dtype from
# calculon's validation/seqsel/tab5/*.json and models/*.json. MFU/HFU of the "present work" rows:
# NVIDIA/Megatron-LM README at 2e90a342 (2022-05-19, "Update numbers in README") .. f2e5db40,
# "measured using a data parallel size of one", which points to the paper for the definitions.
# ---------------------------------------------------------------------------------------------

_K_SRC = "Korthikanti et al. 2022 (arXiv 2205.05198) Table 5, {model} row, {exp}"
_K_CONV = ("iteration_s as published. MFU/HFU (present-work rows only; Megatron-LM README 2022 table) "
           "= 72*B*s*l*h^2*(1 + s/6h + V/16lh) / (gpus*t*312e12) for MFU, with s/3h (the attention "
           "core's recomputed forward) for HFU; no causal halving.")
_K_ASSUME_FULL = ("Layout from calculon's validation/seqsel/tab5/{file}_full.json (tensor_par_comm_type 'ar': "
                  "no sequence parallelism; activation_recompute 'full'; pipeline_interleaving {vp}; "
                  "datatype float16; optimizer_sharding false). Table 5 gives no MFU for the full-recompute "
                  "rows; the paper's abstract quotes 42.1% (full) vs 54.2% for 530B on 2240 GPUs, a "
                  "different (dp = 8) run not recorded here.")
_K_ASSUME_SEL = ("Layout from calculon's validation/seqsel/tab5/{file}_seqsel.json (tensor_par_comm_type "
                 "'rs_ag' = sequence parallelism; activation_recompute 'attn_only' = the paper's selective "
                 "recomputation: QK^T, softmax, dropout and attention-over-V are recomputed, every matmul "
                 "output kept; pipeline_interleaving {vp}; float16; no optimizer sharding). Note "
                 "nanotrain's 'selective' keeps the attention core and recomputes norms/activations "
                 "instead: the same name, a different cut.")

_KORTHIKANTI = [
    # (model label, file stem, heads, hidden, layers, tp, pp, gpus, global batch, micro batch, vp,
    #  t_full, t_seqsel, mfu, hfu, params_b)
    ("22B", "megatron-22B", 64, 6144, 48, 8, 1, 8, 4, 4, 1, 1.42, 1.10, 0.415, 0.437, 22),
    ("175B", "gpt3-175B", 96, 12288, 96, 8, 8, 64, 64, 1, 3, 18.13, 13.75, 0.514, 0.528, 175),
    ("530B", "turing-530B", 128, 20480, 105, 8, 35, 280, 280, 1, 3, 49.05, 37.83, 0.560, 0.570, 530),
    ("1T", "megatron-1T", 160, 25600, 128, 8, 64, 512, 512, 1, 1, 94.42, 71.49, 0.563, 0.570, 1000),
]


def _korthikanti_rows() -> list[PublishedRun]:
    rows = []
    for label, stem, heads, hidden, layers, tp, pp, gpus, gbs, mbs, vp, t_full, t_sel, mfu, hfu, params in _KORTHIKANTI:
        common = dict(set="korthikanti-t5", hardware="a100", gpus=gpus, model=_gpt(hidden, layers, heads, 51200, 2048),
                      seq_len=2048, global_batch=gbs, micro_batch=mbs, tp=tp, pp=pp, dp=1, vp=vp,
                      schedule="interleaved" if vp > 1 else "1f1b", dtype="fp16", convention=_K_CONV, params_b=params)
        rows.append(PublishedRun(name=f"korthikanti-{label.lower()}-full",
                                 source=_K_SRC.format(model=label, exp="full recompute"),
                                 recompute="full", sp=False, iteration_s=t_full,
                                 assumptions=_K_ASSUME_FULL.format(file=stem, vp=vp), **common))
        rows.append(PublishedRun(name=f"korthikanti-{label.lower()}-seqsel",
                                 source=_K_SRC.format(model=label, exp="present work (sequence parallel + selective)"),
                                 recompute="selective", sp=True, iteration_s=t_sel, mfu=mfu, hfu=hfu,
                                 assumptions=_K_ASSUME_SEL.format(file=stem, vp=vp), **common))
    return rows


# ---------------------------------------------------------------------------------------------
# megatron-readme-h100: NVIDIA/Megatron-LM README.md, "Training Speed and Scalability" /
# "Performance Benchmarking"; the table is the image images/model_table.png (blob f126c2fc,
# unchanged at HEAD d98e8a64 since f2e5db40, 2024-07-15; the strong-scaling figure names
# Megatron-Core r0.8.0). README text: GPT models, vocabulary 131,072, sequence length 4096,
# "--overlap-grad-reduce --overlap-param-gather", "--tp-comm-overlap", PP overlap by default,
# end-to-end throughput (data loading, optimizer, logging included), up to 6144 H100s.
# ---------------------------------------------------------------------------------------------

_M_CONV = ("Per-GPU teraFLOP/s from Megatron's num_floating_point_operations (r0.8.0): for these models "
           "72*B*s*l*h^2*(1 + s/6h + V/12lh)/(gpus*t); no recompute, attention over the full s x s square. "
           "MFU = TFLOP/s / 989 (H100 SXM dense BF16), printed to the percent.")
_M_ASSUME = ("The README calls them GPT models and the strong-scaling text calls the 177B 'the standard "
             "GPT-3 model (slightly more than 175 billion parameters due to larger vocabulary size)': "
             "assumed GPT-3 blocks (MHA, 4h GELU MLP, LayerNorm, learned positions, biases). Embeddings "
             "assumed untied (--untie-embeddings-and-output-weights): only then do the printed sizes come "
             "out (1.75B, 7.12B, 16.11B, 31.48B, 69.80B, 118.46B, 177.18B, 313.55B, 461.47B untied; tied "
             "would give 1.48B, 6.58B, ...). A SwiGLU MLP of width 8h/3 would have the same count and "
             "FLOPs; nothing in the README says which. dp = 48 as printed. dtype bf16: MFU is TFLOP/s "
             "over the 16-bit peak (FP8 would be over 1979). zero = 1: --overlap-param-gather requires "
             "--use-distributed-optimizer. sp = (tp > 1): --tp-comm-overlap requires --sequence-parallel. "
             "Not stated, assumed: micro_batch 1, no recomputation (TE fused attention keeps no s x s "
             "tensor), no interleaving (vp 1); {extra}")

_MEGATRON = [
    # (label, heads, hidden, layers, tp, pp, gpus, batch, TFLOP/s, MFU, aggregate PFLOP/s)
    ("1.7B", 16, 2048, 24, 1, 1, 48, 192, 408.8, 0.41, 19.6),
    ("7.1B", 32, 4096, 30, 2, 1, 96, 192, 465.9, 0.47, 44.7),
    ("16B", 48, 6144, 32, 4, 1, 192, 192, 489.1, 0.49, 93.9),
    ("32B", 56, 7168, 48, 8, 1, 384, 192, 459.6, 0.46, 176.5),
    ("70B", 64, 8192, 84, 8, 2, 768, 384, 419.7, 0.42, 322.3),
    ("119B", 80, 10240, 92, 8, 4, 1536, 768, 420.5, 0.43, 645.9),
    ("177B", 96, 12288, 96, 8, 6, 2304, 1152, 432.8, 0.44, 997.2),
    ("314B", 128, 16384, 96, 8, 8, 3072, 1536, 474.4, 0.48, 1457.4),
    ("462B", 144, 18432, 112, 8, 16, 6144, 3072, 459.9, 0.47, 2825.6),
]


def _megatron_rows() -> list[PublishedRun]:
    rows = []
    for label, heads, hidden, layers, tp, pp, gpus, batch, tflops, mfu, agg in _MEGATRON:
        extra = (f"the aggregate column prints {agg} PFLOP/s (= TFLOP/s x GPUs). With micro_batch 1 each "
                 f"pipeline runs {batch // 48} micro-batches per step.")
        rows.append(PublishedRun(
            name=f"megatron-h100-{label.lower()}",
            source=f"NVIDIA/Megatron-LM README.md, images/model_table.png (H100 weak scaling), {label} row",
            set="megatron-readme-h100", hardware="h100", gpus=gpus,
            model=_gpt(hidden, layers, heads, 131072, 4096, tie=False), seq_len=4096, global_batch=batch,
            micro_batch=1, tp=tp, pp=pp, dp=48, sp=tp > 1, zero=1, recompute="none", schedule="1f1b",
            dtype="bf16", tflops_per_gpu=tflops, mfu=mfu, convention=_M_CONV,
            assumptions=_M_ASSUME.format(extra=extra), params_b=float(label[:-1])))
    return rows


# ---------------------------------------------------------------------------------------------
# extra, (1): Narayanan, Shoeybi, Casper, LeGresley, Patwary, Korthikanti, Vainbrand, Kashinkunti,
# Bernauer, Catanzaro, Zaharia, "Efficient Large-Scale Language Model Training on GPU Clusters
# Using Megatron-LM", arXiv 2104.04473 (SC21), Table 1 (weak scaling, A100-80GB on Selene). The
# numbers as printed in Megatron-LM's README image images/cases_april2021.png (50a4b5fa,
# 2021-04-08); the exact per-row arguments (tp, pp, micro-batch, global batch, heads, interleaving,
# --checkpoint-activations, --fp16, seq 2048) from the paper's artifact script
# examples/sc21/run_table_1.sh + CONFIG.sh in NVIDIA/Megatron-LM (de7dc40f, "scripts for sc21").
# ---------------------------------------------------------------------------------------------

_N_CONV = ("Achieved teraFLOP/s per GPU = 96*B*s*l*h^2*(1 + s/6h + V/16lh)/(gpus*t): counts the full "
           "recomputation's extra forward, the full s x s attention square, the output layer once. "
           "mfu holds the table's 'percentage of theoretical peak FLOPs' = TFLOP/s / 312 (it includes "
           "the recomputation, so it is an HFU, not a model-FLOPs utilization).")
_N_ASSUME = ("Arguments from examples/sc21/run_table_1.sh (MODEL_SIZE={label}): --checkpoint-activations "
             "(full recompute of every layer), --fp16, --DDP-impl {ddp}, no sequence parallelism or "
             "distributed optimizer (neither existed yet){vpnote}. The README prints 'model-parallel size' "
             "{mp} = tp x pp; the script gives tp {tp}, pp {pp}. Table 1 prints {agg} aggregate PFLOP/s. "
             "Vocabulary 51,200, output layer tied to the embedding (Megatron GPT's default); the printed "
             "parameter count is the paper's P = 12lh^2(1 + 13/12h + (V+s)/12lh).")

_NARAYANAN = [
    # (label, heads, hidden, layers, params_b, tp, pp, mbs, gbs, layers per virtual stage, ddp, gpus,
    #  TFLOP/s, % peak, aggregate PFLOP/s)
    ("1.7B", 24, 2304, 24, 1.7, 1, 1, 16, 512, 0, "torch", 32, 137, 0.44, 4.4),
    ("3.6B", 32, 3072, 30, 3.6, 2, 1, 16, 512, 0, "torch", 64, 138, 0.44, 8.8),
    ("7.5B", 32, 4096, 36, 7.5, 4, 1, 16, 512, 0, "torch", 128, 142, 0.46, 18.2),
    ("18B", 48, 6144, 40, 18.4, 8, 1, 8, 1024, 0, "torch", 256, 135, 0.43, 34.6),
    ("39B", 64, 8192, 48, 39.1, 8, 2, 4, 1536, 0, "local", 512, 138, 0.44, 70.8),
    ("76B", 80, 10240, 60, 76.1, 8, 4, 2, 1792, 5, "local", 1024, 140, 0.45, 143.8),
    ("145B", 96, 12288, 80, 145.6, 8, 8, 2, 2304, 5, "local", 1536, 148, 0.47, 227.1),
    ("310B", 128, 16384, 96, 310.1, 8, 16, 1, 2160, 3, "local", 1920, 155, 0.50, 297.4),
    ("530B", 128, 20480, 105, 529.6, 8, 35, 1, 2520, 1, "local", 2520, 163, 0.52, 410.2),
    ("1T", 160, 25600, 128, 1008.0, 8, 64, 1, 3072, 0, "local", 3072, 163, 0.52, 502.0),
]


def _narayanan_rows() -> list[PublishedRun]:
    rows = []
    for (label, heads, hidden, layers, params, tp, pp, mbs, gbs, per_vstage, ddp, gpus,
         tflops, peak, agg) in _NARAYANAN:
        vp = layers // pp // per_vstage if per_vstage else 1
        vpnote = (f"; --num-layers-per-virtual-pipeline-stage {per_vstage}: {layers // pp} layers per stage in "
                  f"{vp} chunks (interleaved 1F1B)" if per_vstage else "")
        rows.append(PublishedRun(
            name=f"narayanan-{label.lower()}",
            source=f"Narayanan et al. 2021 (arXiv 2104.04473) Table 1, {label} row "
                   f"(Megatron-LM README images/cases_april2021.png; examples/sc21/run_table_1.sh)",
            set="extra", hardware="a100", gpus=gpus, model=_gpt(hidden, layers, heads, 51200, 2048),
            seq_len=2048, global_batch=gbs, micro_batch=mbs, tp=tp, pp=pp, dp=gpus // (tp * pp), vp=vp,
            recompute="full", schedule="interleaved" if vp > 1 else "1f1b", dtype="fp16",
            tflops_per_gpu=tflops, mfu=peak, convention=_N_CONV, params_b=params,
            assumptions=_N_ASSUME.format(label=label, ddp=ddp, vpnote=vpnote, mp=tp * pp, tp=tp, pp=pp, agg=agg)))
    return rows


# ---------------------------------------------------------------------------------------------
# extra, (2): Llama Team, AI @ Meta, "The Llama 3 Herd of Models", arXiv 2407.21783, §3.3.2 and
# Table 4 ("Scaling configurations and MFU for each stage of Llama 3 405B pre-training"). Model:
# the paper's Table 3 (126 layers, 16384, FFN 53248, 128 heads, 8 KV heads, vocabulary "128,000";
# the released tokenizer has 128,256 entries, used here), H100 80GB (700 W) on RoCE.
# ---------------------------------------------------------------------------------------------

_L_CONV = ("TFLOPs/GPU and 'BF16 MFU' as printed; MFU cites Chowdhery et al. 2023 (PaLM: 6N + 12LHQT per "
           "token, attention over the full square) over 989 TFLOP/s; whether the causal/document mask is "
           "discounted is not said. TFLOP/s are rounded to 10.")
_L_ASSUME = ("Table 4 gives GPUs, TP, CP, PP, DP, seq len, batch size per DP group (sequences) and tokens per "
             "batch (16M); global_batch = batch/DP x DP. DP is FSDP that shards optimizer state and gradients "
             "and does not reshard parameters after the forward (§3.3.2): zero = 2. Interleaved schedule "
             "(§3.3.2, 'V pipeline stages on one pipeline rank'); V is not printed: vp = 8 inferred from "
             "'we reduce one Transformer layer each from the first and the last stages ... the first model "
             "chunk on the first stage has only the embedding', which needs one-layer chunks: 126 + 2 = "
             "128 slots = pp 16 x 8. micro_batch 1 assumed: not printed; the 16 or 32 sequences per DP group "
             "then make 16 or 32 micro-batches for the 16 stages (§3.3.2 discusses the batch-size limit on "
             "micro-batches at large scale). Recomputation and sequence parallelism not stated: assumed no "
             "recomputation, sequence parallelism on with TP 8 (Megatron-style). The document mask (§3.2: no "
             "attention across documents in a sequence) computes less than a causal one; not modelled. {extra}")

_LLAMA3 = [
    # (name, gpus, tp, cp, pp, dp, seq, batch per dp, TFLOP/s, MFU, note)
    ("llama3-405b-8192gpu", 8192, 8, 1, 16, 64, 8192, 32, 430, 0.43, ""),
    ("llama3-405b-16384gpu", 16384, 8, 1, 16, 128, 8192, 16, 400, 0.41,
     "400/989 is 40.4%: the printed 41% and 400 TFLOP/s disagree by more than rounding to the percent."),
    ("llama3-405b-16384gpu-128k", 16384, 8, 16, 16, 8, 131072, 16, 380, 0.38,
     "DP printed as 8 in arXiv v3 (8x16x16x8 = 16,384 GPUs; 16 x 8 x 131,072 = 16.8M tokens); some "
     "transcriptions of v1 show 4, which fits neither. CP is all-gather based (§3.3.2). Long-context stage."),
]


def _llama3_rows() -> list[PublishedRun]:
    rows = []
    for name, gpus, tp, cp, pp, dp, seq, bpd, tflops, mfu, note in _LLAMA3:
        rows.append(PublishedRun(
            name=name, source=f"Llama 3 Herd of Models (arXiv 2407.21783) Table 4, row {gpus:,} GPUs / TP {tp} / "
                              f"CP {cp} / PP {pp} / DP {dp} / seq {seq:,}",
            set="extra", hardware="h100", gpus=gpus, model=_llama(16384, 126, 128, 8, 53248, seq),
            seq_len=seq, global_batch=bpd * dp, micro_batch=1, tp=tp, pp=pp, dp=dp, cp=cp, vp=8, sp=True, zero=2,
            recompute="none", schedule="interleaved", dtype="bf16", tflops_per_gpu=tflops, mfu=mfu,
            convention=_L_CONV, assumptions=_L_ASSUME.format(extra=note), params_b=405))
    return rows


# ---------------------------------------------------------------------------------------------
# extra, (3): NVIDIA NeMo / Megatron-Bridge performance summaries (DGX-H100, measured).
#  - NeMo 24.07: NVIDIA/NeMo docs/source/performance/performance_summary.md at 9c5c5e97
#    ("24.07 perf numbers", 2024-09-09), "Pretraining", FP8, container NeMo24.07.
#  - Megatron-Bridge 25.11 / 25.09: NVIDIA-NeMo/Megatron-Bridge docs/performance-summary-archive.md
#    (HEAD 067f987d; first published in docs/performance-summary.md at 97ad8cc6 / fa0315ae),
#    "25.11 NeMo Container" and "25.09 NeMo Container", System: DGX-H100. Recipes:
#    scripts/performance/configs/ at those commits.
# ---------------------------------------------------------------------------------------------

_NEMO_CONV_2407 = ("Model TFLOP/sec/GPU from NeMo's formula, attention NOT halved for the causal mask "
                   "(716 tok/s x 1.0764e12 FLOP/token = 770.7): 72lh^2 + 12lsh + 6hV per token with V = 51200; "
                   "no recompute counted.")
_NEMO_CONV_BRIDGE = ("Model TFLOP/sec/GPU from Megatron-Bridge's formula: l*h^2*(12 + 12g/a + 18*ffn/h + 6s/h) "
                     "+ 6*V*h per token (attention halved for the causal mask), V the padded vocabulary (128256 "
                     "rounded up to a multiple of 128*tp, +0.003%); no recompute counted. Tokens/sec/GPU as "
                     "printed; step time = global_batch*seq_len/(tok/s*gpus).")
_NEMO_CONV_DSV3 = ("Model TFLOP/sec/GPU from Megatron-Bridge's formula (training/utils/flop_utils.py at fa0315ae): "
                   "6 x multiply-adds per token of the MLA projections and core attention (halved for the causal "
                   "mask) over 61 + 1 (MTP) layers, 12*h*1.5*width for the 3 dense MLPs and, in 58 + 1 MoE "
                   "layers, top-8 routed + 1 shared expert, plus the output layer; no recompute counted. "
                   "Tokens/sec/GPU as printed; step time = global_batch*seq_len/(tok/s*gpus). params_b 671 is "
                   "the paper's count without MTP.")
_BRIDGE_COMMON = ("Megatron-Bridge perf recipe (scripts/performance/configs/llama/, 97ad8cc6): sequence_parallel "
                  "= tp > 1 (WorkloadBaseConfig), use_distributed_optimizer=True (recipes/llama/llama3.py), "
                  "TP comm overlap (userbuffers configs for H100 at this tp/seq), FP8 'current scaling' (FP8-CS), "
                  "no recompute set, interleaved 1F1B. ")

_EXTRA_NEMO = [
    PublishedRun(
        name="nemo2407-gpt3-175b-fp8",
        source="NVIDIA/NeMo docs/source/performance/performance_summary.md (9c5c5e97), Pretraining FP8, "
               "NeMo24.07, DGX-H100, GPT3-175B 128-GPU row",
        set="extra", hardware="h100", gpus=128, model=_gpt(12288, 96, 96, 51200, 2048), seq_len=2048,
        global_batch=256, micro_batch=1, tp=4, pp=8, dp=4, vp=6, sp=True, zero=1, recompute="none",
        schedule="interleaved", dtype="fp8", tokens_per_s_per_gpu=716, tflops_per_gpu=771, params_b=175,
        convention=_NEMO_CONV_2407,
        assumptions="Printed: GPUs, GBS, MBS, seq, TP, PP, CP 1, VP 6, FP8. Not printed, assumed from NeMo "
                    "GPT-3 defaults of the time: sequence parallel on, distributed (ZeRO-1) optimizer, TP comm "
                    "overlap, no recomputation; vocabulary 51200 (the constant NeMo's FLOP formula uses; the "
                    "GPT-2 BPE has 50257 before padding), tied embeddings, learned positions. The 512-GPU row "
                    "(GBS 2048, MBS 2, 825 tok/s, 888 TFLOP/s) links to MLPerf and is left out."),
    PublishedRun(
        name="mbridge2511-llama3-70b-fp8",
        source="NVIDIA-NeMo/Megatron-Bridge docs/performance-summary-archive.md, 25.11 NeMo Container, "
               "System DGX-H100, LLAMA3_70B row",
        set="extra", hardware="h100", gpus=64, model=_llama(8192, 80, 64, 8, 28672, 8192), seq_len=8192,
        global_batch=128, micro_batch=1, tp=4, pp=8, dp=2, vp=5, sp=True, zero=1, recompute="none",
        schedule="interleaved", dtype="fp8", tokens_per_s_per_gpu=1602, tflops_per_gpu=719, params_b=70,
        convention=_NEMO_CONV_BRIDGE,
        assumptions=_BRIDGE_COMMON + "Printed: FP8-CS, GBS 128, MBS 1, FSDP 0, TP 4, PP 8, CP 1, VP 5, EP 1, "
                                     "GA 64 (= 128 / (dp 2 x 1)). Tokens/s x 0.4492 TFLOP/token = 719.6."),
    PublishedRun(
        name="mbridge2511-llama31-405b-fp8",
        source="NVIDIA-NeMo/Megatron-Bridge docs/performance-summary-archive.md, 25.11 NeMo Container, "
               "System DGX-H100, LLAMA3.1_405B row",
        set="extra", hardware="h100", gpus=1024, model=_llama(16384, 126, 128, 8, 53248, 8192), seq_len=8192,
        global_batch=512, micro_batch=1, tp=8, pp=8, dp=8, cp=2, vp=8, sp=True, zero=1, recompute="none",
        schedule="interleaved", dtype="fp8", tokens_per_s_per_gpu=292, tflops_per_gpu=737, params_b=405,
        convention=_NEMO_CONV_BRIDGE,
        assumptions=_BRIDGE_COMMON + "Printed: FP8-CS, GBS 512, MBS 1, FSDP 0, TP 8, PP 8, CP 2, VP 8, EP 1, "
                                     "GA 64. The 405B recipe also sets account_for_embedding/loss_in_pipeline_split "
                                     "(126 layers + embedding + loss = 128 slots over 64 chunks). Later tables "
                                     "(26.02-26.06) list this layout at GBS 1536 (311-328 tok/s)."),
    PublishedRun(
        name="mbridge2509-deepseek-v3",
        source="NVIDIA-NeMo/Megatron-Bridge docs/performance-summary-archive.md, 25.09 NeMo Container, "
               "System DGX-H100, DeepSeekV3 (dropless) row",
        set="extra", hardware="h100", gpus=1024,
        model=dict(arch="deepseek", vocab_size=129280, d_model=7168, n_layers=61, n_heads=128, d_ff=18432,
                   norm="rmsnorm", mlp="swiglu", pos_emb="rope", rope_theta=10000.0, tie_embeddings=False,
                   bias=False, max_seq_len=4096, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                   qk_rope_head_dim=64, v_head_dim=128, first_k_dense_replace=3, n_routed_experts=256,
                   n_shared_experts=1, moe_top_k=8, moe_d_ff=2048, n_group=8, topk_group=4,
                   score_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, moe_capacity_factor=0.0,
                   mtp_depth=1),
        seq_len=4096, global_batch=8192, micro_batch=1, tp=2, pp=8, dp=64, vp=4, ep=64, etp=1, sp=True, zero=1,
        recompute="selective", schedule="interleaved", dtype="fp8", tokens_per_s_per_gpu=1297,
        tflops_per_gpu=338, params_b=671, convention=_NEMO_CONV_DSV3,
        assumptions="Printed: GBS 8192, MBS 1, seq 4096, FSDP 0, TP 2, PP 8, CP 1, VP 4, EP 64, GA 128, "
                    "1297 tok/s, '338 (330)' TFLOP/s; the 25.09 table has no precision column: its note says the "
                    "parenthesised figure uses 128x128-weight / 1x128-activation FP8 blocks on H100, so both "
                    "are FP8 and 338 is taken as FP8 current scaling. Recipe deepseek_v3_llm_pretrain.yaml "
                    "(fa0315ae): etp 1, recompute_granularity 'selective' (Megatron's default module: the "
                    "attention core), pipeline layout 'Et|(tt|)*30mL' (embedding + 1 layer, 30 chunks of 2 "
                    "layers, MTP + loss: 61 layers + MTP over 32 chunks), so mtp_depth 1. Megatron's EP 64 with "
                    "ETP 1 draws the expert groups from the tp x dp ranks (expert-data-parallel 2), where "
                    "nanotrain carves ep out of dp; MoE tokens force-balanced across experts, dropless. "
                    "Distributed optimizer and SP assumed as in the other Bridge recipes. The layout is not "
                    "DeepSeek's own (2048 H800, PP 16 DualPipe, EP 64, ZeRO-1, no TP: arXiv 2412.19437 §3.2)."),
]


RUNS: list[PublishedRun] = [
    *_korthikanti_rows(),  # korthikanti-t5: arXiv 2205.05198 Table 5 (see the comment above _K_SRC)
    *_megatron_rows(),  # megatron-readme-h100: Megatron-LM README images/model_table.png
    *_narayanan_rows(),  # extra: arXiv 2104.04473 Table 1 + examples/sc21/run_table_1.sh
    *_llama3_rows(),  # extra: arXiv 2407.21783 Table 4
    *_EXTRA_NEMO,  # extra: NeMo 24.07 and Megatron-Bridge 25.09/25.11 performance summaries
]


def runs(set_name: str | None = None) -> list[PublishedRun]:
    """The runs of one set ("korthikanti-t5", "megatron-readme-h100", "extra"), or all of them."""
    return [r for r in RUNS if set_name is None or r.set == set_name]
