"""The sections of a config: one dataclass per [section] of the TOML file, each with its own rules.

    [model] [parallel] [precision] [optimizer] [schedule] [data] [checkpoint] [logging] [monitoring] [train]

Each section's check() holds the rules on its own fields, next to them, as messages that name
the key and the fix. A section may hold tables of its own: [precision] and its [precision.fp8]
... are in precision.py. Config holds the sections. The rules that span sections are in
rules.py; how a file or the command line sets a key, in keys.py and parser.py.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import failed
from .keys import apply_dict, upgrade_saved
from .precision import PrecisionConfig


@dataclass
class ModelConfig:
    arch: Literal["transformer", "deepseek"] = "transformer"
    vocab_size: int = 0  # 0: take it from the tokenizer
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: same as n_heads (MHA); fewer: grouped-query attention
    d_ff: int = 0  # 0: 4*d_model for gelu, 8/3*d_model rounded up to 64 for swiglu
    max_seq_len: int = 0  # 0: train.seq_len
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "swiglu"] = "swiglu"
    pos_emb: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    dropout: float = 0.0
    bias: bool = False
    init_std: float = 0.02
    # -- RoPE scaling (YaRN, Peng et al. 2023); used by both attention kinds ------------
    rope_scaling: Literal["none", "yarn"] = "none"
    rope_factor: float = 1.0
    rope_original_max_seq_len: int = 0  # context the model was trained at before scaling
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 1.0
    rope_mscale_all_dim: float = 0.0
    # -- arch = "deepseek": multi-head latent attention (DeepSeek-V2 §2.1) ---------------
    q_lora_rank: int = 0  # 0: a plain query projection
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # -- arch = "deepseek": mixture of experts (DeepSeek-V3 §2.1.2) ----------------------
    first_k_dense_replace: int = 1  # the first k layers keep a dense SwiGLU MLP
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    moe_top_k: int = 2
    moe_d_ff: int = 128  # width of each expert (and of each shared expert)
    n_group: int = 1  # group-limited routing: experts in n_group groups, tokens use topk_group
    topk_group: int = 1
    score_func: Literal["softmax", "sigmoid"] = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    bias_update_rate: float = 0.001  # auxiliary-loss-free balancing; 0 turns it off
    aux_loss_coef: float = 0.0  # sequence-wise auxiliary loss; 0 turns it off
    moe_capacity_factor: float = 0.0  # 0: dropless; > 0: each expert takes at most factor x its fair share
    # The local experts' GEMMs as one grouped computation (models/grouped.py); false: one per expert
    moe_grouped_gemm: bool = True
    # -- arch = "deepseek": multi-token prediction (DeepSeek-V3 §2.2), training only -------
    mtp_depth: int = 0  # extra tokens predicted per position; 0 turns it off, only 1 is implemented
    mtp_loss_weight: float = 0.3  # lambda: the MTP loss is lambda / mtp_depth * its cross entropy

    def rope_scaling_dict(self) -> dict | None:
        if self.rope_scaling == "none":
            return None
        return {"type": self.rope_scaling, "factor": self.rope_factor,
                "original_max_position": self.rope_original_max_seq_len or self.max_seq_len,
                "beta_fast": self.rope_beta_fast, "beta_slow": self.rope_beta_slow,
                "mscale": self.rope_mscale, "mscale_all_dim": self.rope_mscale_all_dim}

    def ffn_width(self) -> int:
        """d_ff, or the usual default: 4d for GELU, 8d/3 rounded up to 64 for SwiGLU,
        which keeps SwiGLU's three matrices at the parameter count of GELU's two."""
        if self.d_ff:
            return self.d_ff
        if self.mlp == "gelu":
            return 4 * self.d_model
        return 64 * math.ceil(8 * self.d_model / 3 / 64)

    def check(self) -> list[str]:
        """The model's own rules; those that involve the layout or the batch are in cross_checks."""
        errors = [f"model.{key}={getattr(self, key)} must be positive." for key in ("d_model", "n_layers", "n_heads")
                  if getattr(self, key) <= 0]
        if self.n_heads > 0 and self.d_model % self.n_heads:
            errors.append(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}: "
                          "pick n_heads that divides d_model.")
        elif self.n_heads > 0 and (self.d_model // self.n_heads) % 2 and self.pos_emb == "rope":
            errors.append(f"head dim d_model/n_heads={self.d_model // self.n_heads} must be even for RoPE: "
                          "change model.d_model or model.n_heads.")
        if self.n_kv_heads and self.n_heads % self.n_kv_heads:
            errors.append(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}: "
                          "each KV head must serve the same number of query heads.")
        errors += failed([
            (self.vocab_size >= 0, f"model.vocab_size={self.vocab_size} must be >= 0 (0 takes it from the tokenizer)."),
            (self.n_kv_heads >= 0, f"model.n_kv_heads={self.n_kv_heads} must be >= 0 (0 means n_heads)."),
            (self.d_ff >= 0, f"model.d_ff={self.d_ff} must be >= 0 (0 picks the usual width for model.mlp)."),
            (0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1)."),
            (self.norm_eps > 0, f"model.norm_eps={self.norm_eps} must be positive."),
            (self.init_std > 0, f"model.init_std={self.init_std} must be positive."),
            (self.rope_scaling == "none" or self.rope_factor >= 1.0,
             f"model.rope_factor={self.rope_factor} must be >= 1 with model.rope_scaling={self.rope_scaling!r}."),
            (self.mtp_depth in (0, 1), f"model.mtp_depth={self.mtp_depth} is not supported: 0 (off) or 1 (one "
                                       "extra token, DeepSeek-V3's setting) are implemented."),
            (self.mtp_depth == 0 or self.arch == "deepseek",
             f"model.mtp_depth={self.mtp_depth} needs model.arch='deepseek' (set model.mtp_depth=0)."),
            (self.mtp_loss_weight >= 0, f"model.mtp_loss_weight={self.mtp_loss_weight} must be >= 0."),
        ])
        return errors + (self._deepseek_errors() if self.arch == "deepseek" else [])

    def _deepseek_errors(self) -> list[str]:
        """MLA's and the mixture of experts' sizes, and group-limited routing's groups."""
        errors = [f"model.{key}={getattr(self, key)} must be positive for model.arch='deepseek'."
                  for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                              "n_routed_experts", "moe_top_k", "moe_d_ff") if getattr(self, key) <= 0]
        errors += failed([
            (self.qk_rope_head_dim % 2 == 0,
             f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)."),
            (0 <= self.first_k_dense_replace <= self.n_layers, f"model.first_k_dense_replace="
             f"{self.first_k_dense_replace} must be between 0 and model.n_layers={self.n_layers}."),
            (self.moe_top_k <= self.n_routed_experts,
             f"model.moe_top_k={self.moe_top_k} exceeds model.n_routed_experts={self.n_routed_experts}."),
            (self.moe_capacity_factor >= 0,
             f"model.moe_capacity_factor={self.moe_capacity_factor} must be >= 0 (0: dropless)."),
            (self.bias_update_rate >= 0 and self.aux_loss_coef >= 0,
             "model.bias_update_rate and model.aux_loss_coef must be >= 0 (0 turns each off)."),
        ])
        if self.n_group < 1 or self.n_routed_experts % self.n_group:
            errors.append(f"model.n_group={self.n_group} must divide model.n_routed_experts={self.n_routed_experts}.")
        elif not 1 <= self.topk_group <= self.n_group or \
                self.moe_top_k > self.topk_group * (self.n_routed_experts // self.n_group):
            errors.append(f"model.topk_group={self.topk_group} must be in [1, n_group={self.n_group}] and leave "
                          f"at least moe_top_k={self.moe_top_k} experts to choose from.")
        return errors


# parallel.pp_schedule's values: the schedules parallel/pipeline/schedules.py runs (SCHEDULES)
PPSchedule = Literal["gpipe", "1f1b", "interleaved", "zb_h1", "dualpipev"]
PP_SCHEDULES = typing.get_args(PPSchedule)


def chunks_per_rank(schedule: str, v: int) -> int:
    """Chunks of layers each pipeline rank holds: parallel.pp_virtual_stages (v), or DualPipeV's 2,
    whatever v says. The one place this rule lives (ParallelConfig.chunks_per_rank, the pipeline,
    `nanotrain inspect` and `plan`)."""
    return 2 if schedule == "dualpipev" else v


@dataclass
class ParallelConfig:
    # Sizes of each parallel dimension; tp * cp * pp * dp is the world size (see parallel/state.py).
    tp: int = 1  # tensor parallel: each layer's matrices split over tp ranks
    cp: int = 1  # context parallel: each sequence split over cp ranks, attention as a ring
    pp: int = 1  # pipeline parallel: the layers split into pp stages, micro-batches streamed through them
    dp: int = 1  # data parallel: replicas that split the global batch
    ep: int = 1  # expert parallel: routed experts split over ep ranks carved out of dp (ep divides dp)
    # expert tensor parallel: 1 (each expert whole on every tp rank) or parallel.tp (each expert's
    # width split over the tp group, Megatron's expert-tensor-parallel size; models/moe.py)
    etp: int = 1
    sequence_parallel: bool = False  # with tp > 1: norms/dropout/residuals split along the sequence
    bucket_mb: float = 25.0  # data-parallel gradient all-reduce bucket size
    # How long a collective waits for the other ranks before it fails (the process groups' timeout;
    # gloo's own default is 30 minutes). runtime/watchdog.py names a stalled rank sooner.
    timeout_s: float = 300.0
    # With pp > 1 (ignored otherwise, like bucket_mb without dp): the schedule
    # (parallel/pipeline/), chunks of layers per rank (interleaved only), and what balances
    # the stages: equal layer counts, or equal parameter counts.
    pp_schedule: PPSchedule = "1f1b"
    pp_virtual_stages: int = 1
    pp_partition: Literal["layers", "params"] = "layers"

    @property
    def chunks_per_rank(self) -> int:
        """Chunks of layers each pipeline rank holds under this schedule (chunks_per_rank above)."""
        return chunks_per_rank(self.pp_schedule, self.pp_virtual_stages)

    def check(self) -> list[str]:
        """Rules on the sizes alone. parallel/state.py's init_parallel runs this too: it can be handed
        a ParallelConfig that no Config validated."""
        errors = [f"parallel.{key}={getattr(self, key)} must be >= 1." for key in ("tp", "cp", "pp", "dp", "ep", "etp")
                  if getattr(self, key) < 1]
        return errors + failed([
            (self.pp_virtual_stages >= 1, f"parallel.pp_virtual_stages={self.pp_virtual_stages} must be >= 1."),
            (self.bucket_mb > 0, f"parallel.bucket_mb={self.bucket_mb} must be positive."),
            (self.timeout_s > 0, f"parallel.timeout_s={self.timeout_s} must be positive (seconds)."),
            (not self.sequence_parallel or self.tp > 1, "parallel.sequence_parallel=true needs parallel.tp > 1: "
                                                        "it splits the sequence over the tensor-parallel ranks."),
            (self.etp in (1, self.tp), f"parallel.etp={self.etp} must be 1 (experts whole on every tp rank) or "
                                       f"parallel.tp={self.tp} (each expert split over the tp group)."),
        ]) + expert_groups_errors(self.dp, self.ep)


def expert_groups_errors(dp: int, ep: int) -> list[str]:
    """Expert-parallel groups are carved out of the data-parallel ranks: ep must divide dp. The one
    place this rule lives (ParallelConfig.check, parallel/layout.Layout.check)."""
    if ep <= 1 or dp % ep == 0:
        return []
    return [f"parallel.ep={ep} must divide parallel.dp={dp}: expert-parallel groups are carved out of the "
            "data-parallel ranks."]


@dataclass
class OptimizerConfig:
    name: Literal["adamw"] = "adamw"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to matrices only (not norms, biases)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    impl: Literal["auto", "fused", "foreach", "loop"] = "auto"
    # ZeRO (parallel/zero.py): 0 keeps the whole AdamW state on every dp rank; 1 shards the
    # fp32 master weights and moments over dp (experts: expert-dp); 2 shards the gradients too;
    # 3 the parameters too, gathered block by block for forward and backward (parallel/zero3.py).
    zero_stage: int = 0

    def check(self) -> list[str]:
        return failed([
            (self.lr > 0, f"optimizer.lr={self.lr} must be positive."),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
             f"optimizer.beta1={self.beta1}, beta2={self.beta2} must be in [0, 1)."),
            (self.eps > 0, f"optimizer.eps={self.eps} must be positive."),
            (self.weight_decay >= 0, f"optimizer.weight_decay={self.weight_decay} must be >= 0."),
            (self.zero_stage in (0, 1, 2, 3), f"optimizer.zero_stage={self.zero_stage} is not a ZeRO stage: use 0 "
                                              "(off), 1 (optimizer state sharded), 2 (and gradients) or 3 (and "
                                              "parameters)."),
            (self.grad_clip >= 0, f"optimizer.grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)."),
        ])


@dataclass
class ScheduleConfig:
    warmup_steps: int = 100
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    decay_steps: int = 0  # 0: train.max_steps
    min_lr: float = 1e-4

    def check(self) -> list[str]:
        return failed([
            (self.warmup_steps >= 0, f"schedule.warmup_steps={self.warmup_steps} must be >= 0."),
            (self.decay_steps >= 0, f"schedule.decay_steps={self.decay_steps} must be >= 0 (0: train.max_steps)."),
        ])


@dataclass
class DataConfig:
    # A .txt, .jsonl (.json) or .parquet file, a datasets.save_to_disk folder, or a folder of them
    # (data/sources.py)
    path: str = "data/tinyshakespeare.txt"
    text_field: str = "text"  # jsonl / parquet / datasets: the field that holds each document's text
    # "char", "bpe" (trained on the corpus), or a model's own: a tokenizer.json or a Hugging Face
    # model folder (its tokenizer.json and tokenizer_config.json: EOS ends each document)
    tokenizer: str = "char"
    vocab_size: int = 2048  # BPE only: size of the learned vocabulary
    val_fraction: float = 0.1  # the last fraction of the token stream is the val split
    prepared_dir: str = ""  # "": next to the data, in <path stem>.nanotrain/
    # A mixture, instead of data.path: ["corpus_a.jsonl:0.7", "shards/:0.3"] draws each sequence
    # from a corpus picked by weight, deterministically in (seed, step); one tokenizer for all.
    sources: list[str] = field(default_factory=list)
    # Attention stays within each document of a packed window, and positions restart after each
    # EOS (models/documents.py). Needs a tokenizer with an EOS token: a model's own.
    document_mask: bool = False
    # prepare: worker processes that tokenize (0: this process; HF tokenizers then use a thread per
    # core on their own), and tokens per token file (0: one train.bin and one val.bin)
    prepare_workers: int = 0
    shard_tokens: int = 0

    def mixture(self) -> list[tuple[str, float]]:
        """data.sources as (path, weight) pairs, the weights summing to 1."""
        pairs = [(s.rsplit(":", 1)[0], float(s.rsplit(":", 1)[1])) for s in self.sources]
        total = sum(w for _, w in pairs)
        return [(p, w / total) for p, w in pairs]

    def _source_errors(self) -> list[str]:
        bad = []
        for s in self.sources:
            path, _, weight = s.rpartition(":")
            try:
                ok = bool(path) and float(weight) > 0 and math.isfinite(float(weight))
            except ValueError:
                ok = False
            if not ok:
                bad.append(f"data.sources entry {s!r} is not PATH:WEIGHT with a positive weight "
                           "(e.g. 'corpus.jsonl:0.7').")
        return bad

    def check(self) -> list[str]:
        return self._source_errors() + failed([
            (bool(self.path), "data.path is empty: point it at a .txt, .jsonl or .parquet file, a datasets "
                              "folder, or a folder of them."),
            (bool(self.tokenizer), "data.tokenizer is empty: use 'char', 'bpe', or a tokenizer.json or Hugging Face "
                                   "model folder."),
            (bool(self.text_field), "data.text_field is empty: name the field that holds the text (e.g. 'text')."),
            (0 < self.val_fraction < 1, f"data.val_fraction={self.val_fraction} must be in (0, 1)."),
            (self.prepare_workers >= 0, f"data.prepare_workers={self.prepare_workers} must be >= 0 (0: tokenize "
                                        "in this process)."),
            (self.shard_tokens >= 0, f"data.shard_tokens={self.shard_tokens} must be >= 0 (0: one file per "
                                     "split; e.g. 100000000 for shards of 100M tokens)."),
            (self.tokenizer != "bpe" or 256 < self.vocab_size <= 2**32 - 1,
             f"data.vocab_size={self.vocab_size} is too small for byte-level BPE: it needs more than 256 "
             "(the byte alphabet); 2048 to 32768 are usual."),
            (not self.document_mask or self.tokenizer not in ("char", "bpe"),
             f"data.document_mask=true needs a tokenizer with an end-of-text token to find the documents, and "
             f"data.tokenizer={self.tokenizer!r} joins them with a newline, which also occurs inside them: use a "
             "model's own tokenizer (data.tokenizer=path/to/tokenizer.json or a model folder), or "
             "data.document_mask=false."),
        ])


@dataclass
class CheckpointConfig:
    dir: str = ""  # "": <train.out_dir>/checkpoints
    interval: int = 0  # save every N steps; 0: only at the end
    keep_last: int = 3
    # "auto": continue from the newest valid checkpoint in checkpoint.dir if there is one, else start
    # fresh (a command that is safe to repeat, e.g. under torchrun --max-restarts); "": a fresh run
    # (refused where another run's checkpoints are, unless train.overwrite); "latest" or a
    # checkpoint path: continue that one (an error if there is none).
    resume: str = "auto"
    save_final: bool = True
    async_save: bool = False  # write on a background thread while training goes on (rank 0)
    # Start from these weights (fresh optimizer, step 0): a Hugging Face folder, a
    # `nanotrain convert --from-hf` folder, or a training checkpoint. "": initialise from seed.
    # With resume=auto, only while the run's folder holds no checkpoint (a restarted run resumes).
    init_from: str = ""

    def check(self) -> list[str]:
        return failed([
            (self.interval >= 0, f"checkpoint.interval={self.interval} must be >= 0 (0: save at the end only)."),
            (not (self.init_from and self.resume not in ("", "auto")),
             f"checkpoint.init_from and checkpoint.resume={self.resume!r} are both set: resume continues a run "
             "(weights, optimizer, step); init_from starts a new one from weights. Keep one (with resume=auto, "
             "init_from is used when the run's folder holds no checkpoint yet)."),
            (self.keep_last >= 1, f"checkpoint.keep_last={self.keep_last} must be >= 1."),
        ])


@dataclass
class LoggingConfig:
    log_interval: int = 10
    progress: Literal["auto", "rich", "plain", "none"] = "auto"
    tensorboard: bool = True
    # Weights & Biases (monitoring/wandb_sink.py; pip install 'nanotrain[wandb]'): the project, and the
    # run's name ("": the run folder's name). Offline with WANDB_MODE=offline.
    wandb: bool = False
    wandb_project: str = "nanotrain"
    wandb_run: str = ""
    plot: bool = True
    # The matmul peak of one GPU, or of one CPU node (all its cores), in the dtype the run computes in,
    # for the MFU; 0: the datasheet (known GPUs) or a short torch.mm probe on rank 0 (runtime/machine.py).
    peak_tflops: float = 0.0
    # With pp > 1: record this step's pipeline timeline (timeline.png, timeline.json and the
    # measured bubble against the textbook one); 0: never.
    timeline_step: int = 0

    def check(self) -> list[str]:
        return failed([
            (self.log_interval >= 1, f"logging.log_interval={self.log_interval} must be >= 1."),
            (not self.wandb or bool(self.wandb_project), "logging.wandb_project is empty: name the W&B project."),
            (self.timeline_step >= 0, f"logging.timeline_step={self.timeline_step} must be >= 0 (0: off)."),
            (self.peak_tflops >= 0, f"logging.peak_tflops={self.peak_tflops} must be >= 0 (0: measure it)."),
        ])


@dataclass
class MonitoringConfig:
    # How much of the run's health to report (monitoring/monitor.py): off (loss, lr, gradient
    # norm, throughput only), minimal (+ loss EMA/spikes, data, time split, memory), standard
    # (+ gradient, weight and update norms per block, update ratios, clip rate and
    # optimizer-state checks, on logging steps), debug (+ every tensor's update ratio).
    mode: Literal["off", "minimal", "standard", "debug"] = "standard"
    ema_beta: float = 0.9  # the loss EMA's decay; the spike ratio is loss / the EMA before it
    # Blocks whose attention logits/entropy, residual stream and norm outputs are watched on
    # logging steps (monitoring/internals.py); empty: the first, middle and last (debug: all).
    sentinel_blocks: list[int] = field(default_factory=list)
    # A step whose gradient norm is not finite: stop the run naming the step, or skip the
    # update (no change to weights or optimizer state) and count it (skipped_nonfinite).
    # rollback: reload the newest checkpoint and skip the batches since it (logged), then go on.
    nonfinite: Literal["stop", "skip", "rollback"] = "stop"
    # skip and rollback stop the run (a named error, non-zero exit) after this many non-finite
    # steps in a row: a run that keeps diverging is not saved as if it were training.
    max_skipped_steps: int = 10
    # The probe batch (monitoring/probe.py): this many fixed val sequences, the same on every
    # layout, whose loss, output entropy and top-1/top-5 mass are logged (standard and debug);
    # 0: off. probe_interval: every that many steps (0: at every evaluation, train.eval_interval).
    probe_batch: int = 4
    probe_interval: int = 0

    def check(self) -> list[str]:
        """sentinel_blocks against model.n_layers is in cross_checks."""
        return failed([
            (0 <= self.ema_beta < 1, f"monitoring.ema_beta={self.ema_beta} must be in [0, 1)."),
            (self.max_skipped_steps >= 1,
             f"monitoring.max_skipped_steps={self.max_skipped_steps} must be >= 1."),
            (self.probe_batch >= 0, f"monitoring.probe_batch={self.probe_batch} must be >= 0 (0: off)."),
            (self.probe_interval >= 0,
             f"monitoring.probe_interval={self.probe_interval} must be >= 0 (0: at every evaluation)."),
        ])


@dataclass
class TrainConfig:
    seed: int = 1337
    max_steps: int = 2000
    seq_len: int = 64
    batch_size: int = 12  # global batch: sequences per optimizer step, over all dp ranks
    # sequences per forward on one rank; 0: batch_size / dp (no accumulation), except under
    # parallel.pp_schedule='dualpipev', which needs 2 pp micro-batches: the largest size that makes them
    micro_batch_size: int = 0
    eval_interval: int = 250  # 0: only at the end
    eval_steps: int = 20  # val batches per evaluation
    out_dir: str = "runs/default"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0  # torch intra-op threads; 0: leave PyTorch's default
    # torch.compile each transformer block in place (nanotrain/compiling.py): same parameter
    # names, checkpoints and pipeline split; collectives, MoE experts and low-bit GEMMs stay
    # eager between the compiled pieces. Compiles at start-up (a missing C++ compiler or a
    # failing block stops the run there, named). Compiled kernels round differently from
    # eager ones: compare a compiled run with a compiled run.
    compile: bool = False
    # Activation recomputation (nanotrain/recompute.py): what each block keeps for backward and
    # recomputes there. none; selective (keeps matmul outputs and attention's core, recomputes norms,
    # activations, RoPE; for MLA also the up-projections); full (keeps each block's input only).
    recompute: Literal["none", "selective", "full"] = "none"
    recompute_layers: int = 0  # full: recompute the first N blocks of each pipeline chunk; 0: all
    # A fresh run (checkpoint.resume="") in an out_dir that holds another run's checkpoints: false
    # stops with an error; true moves the old run aside to <out_dir>.archived-<time> first.
    overwrite: bool = False
    # The watchdog (runtime/watchdog.py): a step that runs longer than this ends the job, naming the
    # stalled rank and the collective each rank waits in. 0: 10 x the median step, at least 60 s.
    step_timeout_s: float = 0.0

    def micro_batch(self, dp: int) -> int:
        return self.micro_batch_size or self.batch_size // dp

    def grad_accum_steps(self, dp: int) -> int:
        """Micro-batches per rank per step: batch_size = micro_batch_size x accumulation x dp."""
        return self.batch_size // (self.micro_batch(dp) * dp)

    def check(self) -> list[str]:
        errors = [f"train.{key}={getattr(self, key)} must be positive."
                  for key in ("max_steps", "seq_len", "batch_size", "eval_steps") if getattr(self, key) <= 0]
        return errors + failed([
            (self.micro_batch_size >= 0,
             f"train.micro_batch_size={self.micro_batch_size} must be >= 0 (0: train.batch_size / parallel.dp)."),
            (self.eval_interval >= 0,
             f"train.eval_interval={self.eval_interval} must be >= 0 (0: evaluate at the end only)."),
            (self.threads >= 0, f"train.threads={self.threads} must be >= 0 (0: PyTorch's default)."),
            (self.recompute_layers >= 0,
             f"train.recompute_layers={self.recompute_layers} must be >= 0 (0: every block of each chunk)."),
            (self.step_timeout_s >= 0,
             f"train.step_timeout_s={self.step_timeout_s} must be >= 0 (0: 10 x the median step, at least 60 s)."),
            (bool(self.out_dir), "train.out_dir is empty: name a folder for the run's outputs."),
        ])


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "Config":
        """A config saved by to_dict (a checkpoint's, a run's config.json), also from before a rename."""
        cfg = cls()
        apply_dict(cfg, upgrade_saved(d), source)
        cfg.resolve()
        return cfg

    def resolve(self) -> None:
        """Fill in what a section's default takes from another section: train.micro_batch_size=0 under
        DualPipeV. Done where a config is made (load_config, from_dict) and again by whoever edits the
        sizes after (Layout.apply), before validate(), which only reads."""
        fill_micro_batch(self)


def fill_micro_batch(cfg: Config) -> None:
    """train.micro_batch_size=0 under DualPipeV: the largest micro-batch that still gives the schedule
    its 2 pp micro-batches per step (it cannot run with fewer). Where none does, the size stays 0 and
    the schedule's check names the fix."""
    t, p = cfg.train, cfg.parallel
    if t.micro_batch_size or p.pp_schedule != "dualpipev" or p.pp < 2 or p.dp < 1 or t.batch_size % p.dp:
        return
    per_rank = t.batch_size // p.dp
    sizes = [s for s in range(per_rank, 0, -1) if per_rank % s == 0 and per_rank // s >= 2 * p.pp]
    if sizes:
        t.micro_batch_size = sizes[0]
