"""Self-contained re-implementation of nanoGPT's documented CPU run.

What this is
------------
A faithful, single-file re-implementation of what Karpathy's nanoGPT
(https://github.com/karpathy/nanoGPT, MIT licence, (c) Andrej Karpathy) runs for
the README's "I only have a macbook" command::

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False \
        --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 \
        --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 \
        --lr_decay_iters=2000 --dropout=0.0

for which the README reports "about ~3 minutes" and "a loss of only 1.88".
nanoGPT cannot be downloaded here, so this file re-creates, from its
``model.py``, ``train.py``, ``config/train_shakespeare_char.py`` and
``data/shakespeare_char/prepare.py``, exactly the code paths that command
executes, so nano-train's single-process trainer can be timed against it on the
same machine. The GPT model, ``configure_optimizers``, ``get_batch``,
``estimate_loss``, ``get_lr`` and the training loop follow the nanoGPT source
line for line (same module construction order, so the same RNG stream under
``torch.manual_seed(1337)``). Credit for the design and code belongs to nanoGPT.

Resolved settings (train.py defaults <- config file <- command line):
  dataset shakespeare_char (65-char vocab), gradient_accumulation_steps 1,
  batch_size 12, block_size 64, n_layer 4, n_head 4, n_embd 128, dropout 0.0,
  bias False, learning_rate 1e-3, max_iters 2000, weight_decay 0.1,
  beta1 0.9, beta2 0.99, grad_clip 1.0, decay_lr True, warmup_iters 100,
  lr_decay_iters 2000, min_lr 1e-4, eval_interval 250, eval_iters 20,
  log_interval 1, always_save_checkpoint False, device cpu, compile False,
  seed 1337 + seed_offset (0 without DDP).

Left out, and why
-----------------
* DDP / ``init_process_group`` / ``destroy_process_group``: only taken when
  ``RANK`` is set (torchrun); the documented command is a single process, where
  ``master_process=True`` and ``seed_offset=0`` (both kept here).
* wandb: ``wandb_log = False`` in the shakespeare_char config.
* ``torch.compile``: disabled by ``--compile=False``.
* ``init_from='resume'`` / ``'gpt2*'`` and ``crop_block_size``/``from_pretrained``:
  the run uses ``init_from='scratch'`` with ``block_size=64`` in the config, so
  no crop happens. ``GPT.generate`` (used only by sample.py) is also omitted.
* Checkpoint saving: train.py does ``torch.save`` of model + optimizer state
  (~10 MB here) after an eval whose val loss improved, when ``iter_num > 0``
  (at most 8 times in 2000 iters). Omitted: it is I/O, not training, and it
  would sit inside the timed loop; ``os.makedirs(out_dir)`` is omitted with it.
* MFU: ``estimate_mfu`` (pure arithmetic, A100-relative) and the ``mfu`` field
  of the per-iter print. The per-iter print itself is kept (``loss.item()``
  every iter, as ``log_interval=1`` does); ``quiet=True`` silences printing.
* ``torch.cuda.amp.GradScaler``: on a CPU-only machine ``dtype`` resolves to
  'float16' so the scaler is constructed enabled, but PyTorch disables it
  ("CUDA is not available"), making ``scale``/``unscale_``/``step``/``update``
  plain pass-throughs; here we call ``loss.backward()`` and
  ``optimizer.step()`` directly, which is the same computation.
* ``torch.backends.cuda.matmul.allow_tf32`` / ``cudnn.allow_tf32``: no effect
  on CPU. The autocast context is ``nullcontext()`` on CPU (fp32), kept here.
* configurator.py / the command-line parser, the meta.pkl ``print``s and the
  "tokens per iteration" print.

Version note: ``get_lr`` uses current nanoGPT master's warmup
``learning_rate * (it + 1) / (warmup_iters + 1)`` (PR #578, merged Dec 2024).
The README's 1.88 figure predates it (then ``learning_rate * it /
warmup_iters``); the two differ by < 1% of lr during the first 100 iters only.

Usage::

    .venv/bin/python bench/nanogpt_ref.py --max-iters 2000   # the documented run
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -----------------------------------------------------------------------------
# data/shakespeare_char/prepare.py
# -----------------------------------------------------------------------------


def prepare_char_data(text_path: str, out_dir: str) -> str:
    """Write train.bin, val.bin (uint16) and meta.pkl into ``out_dir`` like prepare.py.

    Vocabulary = sorted set of the characters of the *full* text; first 90% of
    characters is train, the rest val. Returns ``out_dir``.
    """
    with open(text_path, "r", encoding="utf-8") as f:
        data = f.read()
    chars = sorted(list(set(data)))
    vocab_size = len(chars)
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}

    n = len(data)
    train_data = data[: int(n * 0.9)]
    val_data = data[int(n * 0.9):]
    train_ids = np.array([stoi[c] for c in train_data], dtype=np.uint16)
    val_ids = np.array([stoi[c] for c in val_data], dtype=np.uint16)

    os.makedirs(out_dir, exist_ok=True)
    train_ids.tofile(os.path.join(out_dir, "train.bin"))
    val_ids.tofile(os.path.join(out_dir, "val.bin"))
    meta = {"vocab_size": vocab_size, "itos": itos, "stoi": stoi}
    with open(os.path.join(out_dir, "meta.pkl"), "wb") as f:
        pickle.dump(meta, f)
    return out_dir


# -----------------------------------------------------------------------------
# model.py
# -----------------------------------------------------------------------------


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (nanoGPT; bias=False in this run)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: "GPTConfig"):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # PyTorch >= 2.0 always has SDPA, so nanoGPT takes its "flash" path.
        assert hasattr(F, "scaled_dot_product_attention")

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None,
            dropout_p=self.dropout if self.training else 0, is_causal=True,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        y = self.resid_dropout(self.c_proj(y))
        return y


class MLP(nn.Module):
    def __init__(self, config: "GPTConfig"):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = self.c_fc(x)
        x = self.gelu(x)
        x = self.c_proj(x)
        x = self.dropout(x)
        return x


class Block(nn.Module):
    def __init__(self, config: "GPTConfig"):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # model.py default; train.py passes bias=False


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, verbose: bool = True):
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        # scaled init of the residual projections, per GPT-2
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if verbose:
            print("number of parameters: %.2fM" % (self.get_num_params() / 1e6,))

    def get_num_params(self, non_embedding: bool = True) -> int:
        """nanoGPT's count: position embeddings subtracted, tied wte counted once."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        device = idx.device
        b, t = idx.size()
        assert t <= self.config.block_size
        pos = torch.arange(0, t, dtype=torch.long, device=device)
        tok_emb = self.transformer.wte(idx)
        pos_emb = self.transformer.wpe(pos)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])
            loss = None
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, verbose=True):
        param_dict = {pn: p for pn, p in self.named_parameters()}
        param_dict = {pn: p for pn, p in param_dict.items() if p.requires_grad}
        # every >=2D tensor (matmul weights, embeddings) decays; biases/norms don't
        decay_params = [p for n, p in param_dict.items() if p.dim() >= 2]
        nodecay_params = [p for n, p in param_dict.items() if p.dim() < 2]
        optim_groups = [
            {"params": decay_params, "weight_decay": weight_decay},
            {"params": nodecay_params, "weight_decay": 0.0},
        ]
        use_fused = device_type == "cuda"  # nanoGPT: fused only if available *and* cuda
        extra_args = dict(fused=True) if use_fused else dict()
        optimizer = torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **extra_args)
        if verbose:
            print(f"num decayed parameter tensors: {len(decay_params)}, with "
                  f"{sum(p.numel() for p in decay_params):,} parameters")
            print(f"num non-decayed parameter tensors: {len(nodecay_params)}, with "
                  f"{sum(p.numel() for p in nodecay_params):,} parameters")
            print(f"using fused AdamW: {use_fused}")
        return optimizer


# -----------------------------------------------------------------------------
# train.py (single process, device=cpu, compile=False)
# -----------------------------------------------------------------------------


def run_nanogpt(data_dir: str, max_iters: int = 2000, eval_interval: int = 250,
                eval_iters: int = 20, log_interval: int = 1, quiet: bool = False,
                threads: int = 0) -> dict:
    """Run nanoGPT's documented CPU shakespeare_char training on ``data_dir``.

    ``data_dir`` must hold train.bin / val.bin / meta.pkl (see prepare_char_data).
    As in train.py, evals happen when ``iter_num % eval_interval == 0`` (so at
    iter 0 and at ``max_iters`` when it is a multiple), and ``max_iters + 1``
    optimizer steps are taken (iters 0..max_iters).

    Returns dict: wall_s (model and optimizer built, then the loop incl. evals), val_curve
    ((iter, seconds into wall_s, val estimate) at each eval),
    val_loss / train_loss (last estimate_loss), iter_ms (mean per-iter time,
    evals excluded; iter_ms_median is the median, robust to warm-up/contention),
    losses (per-iter train loss), n_params (nanoGPT's count, excludes wpe),
    n_params_total, last_eval_iter, iters, evals.
    """
    if threads > 0:
        torch.set_num_threads(threads)
    say = (lambda *a, **k: None) if quiet else print

    # --- resolved config -----------------------------------------------------
    gradient_accumulation_steps = 1
    batch_size = 12
    block_size = 64
    n_layer, n_head, n_embd = 4, 4, 128
    dropout = 0.0
    bias = False
    learning_rate = 1e-3
    weight_decay = 1e-1
    beta1, beta2 = 0.9, 0.99
    grad_clip = 1.0
    decay_lr = True
    warmup_iters = 100
    lr_decay_iters = 2000
    min_lr = 1e-4
    device = "cpu"
    eval_only = False

    master_process = True
    seed_offset = 0
    torch.manual_seed(1337 + seed_offset)
    device_type = "cuda" if "cuda" in device else "cpu"
    ctx = nullcontext()  # device_type == 'cpu' -> no autocast, fp32

    # poor man's data loader: memmap re-created every batch, as in train.py
    def get_batch(split):
        if split == "train":
            data = np.memmap(os.path.join(data_dir, "train.bin"), dtype=np.uint16, mode="r")
        else:
            data = np.memmap(os.path.join(data_dir, "val.bin"), dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - block_size, (batch_size,))
        x = torch.stack([torch.from_numpy((data[i:i + block_size]).astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy((data[i + 1:i + 1 + block_size]).astype(np.int64)) for i in ix])
        x, y = x.to(device), y.to(device)
        return x, y

    iter_num = 0
    best_val_loss = 1e9

    # The whole run after the imports, as bench/nanogpt.py times nano-train's: the model and the
    # optimizer are built inside it (the first torch.optim optimizer of a process imports
    # torch._dynamo, ~1.3 s, in both), then the loop with its evals.
    wall_start = time.perf_counter()
    with open(os.path.join(data_dir, "meta.pkl"), "rb") as f:
        meta_vocab_size = pickle.load(f)["vocab_size"]

    model_args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                      bias=bias, vocab_size=meta_vocab_size, dropout=dropout)
    model = GPT(GPTConfig(**model_args), verbose=not quiet)
    model.to(device)
    optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2),
                                           device_type, verbose=not quiet)

    @torch.no_grad()
    def estimate_loss():
        out = {}
        model.eval()
        for split in ["train", "val"]:
            losses = torch.zeros(eval_iters)
            for k in range(eval_iters):
                X, Y = get_batch(split)
                with ctx:
                    logits, loss = model(X, Y)
                losses[k] = loss.item()
            out[split] = losses.mean()
        model.train()
        return out

    def get_lr(it):
        if it < warmup_iters:
            return learning_rate * (it + 1) / (warmup_iters + 1)
        if it > lr_decay_iters:
            return min_lr
        decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
        assert 0 <= decay_ratio <= 1
        coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
        return min_lr + coeff * (learning_rate - min_lr)

    # --- training loop -------------------------------------------------------
    train_losses: list[float] = []
    iter_times: list[float] = []
    last = {"train": float("nan"), "val": float("nan")}
    last_eval_iter = -1
    val_curve: list[tuple[int, float, float]] = []  # (iter, seconds since wall_start, val estimate)
    n_evals = 0

    X, Y = get_batch("train")
    t0 = time.time()
    while True:
        lr = get_lr(iter_num) if decay_lr else learning_rate
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr

        if iter_num % eval_interval == 0 and master_process:
            losses = estimate_loss()
            say(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            last = {"train": float(losses["train"]), "val": float(losses["val"])}
            val_curve.append((iter_num, time.perf_counter() - wall_start, last["val"]))
            last_eval_iter = iter_num
            n_evals += 1
            if losses["val"] < best_val_loss:  # always_save_checkpoint=False
                best_val_loss = losses["val"]  # (checkpoint torch.save omitted)
        if iter_num == 0 and eval_only:
            break

        it_start = time.perf_counter()
        for micro_step in range(gradient_accumulation_steps):
            with ctx:
                logits, loss = model(X, Y)
                loss = loss / gradient_accumulation_steps
            X, Y = get_batch("train")  # prefetch next batch
            loss.backward()
        if grad_clip != 0.0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        t1 = time.time()
        dt = t1 - t0
        t0 = t1
        lossf = loss.item() * gradient_accumulation_steps
        train_losses.append(lossf)
        if iter_num % log_interval == 0 and master_process:
            say(f"iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms")
        iter_times.append(time.perf_counter() - it_start)
        iter_num += 1

        if iter_num > max_iters:
            break
    wall_s = time.perf_counter() - wall_start

    return {
        "wall_s": wall_s,
        "val_loss": last["val"],
        "train_loss": last["train"],
        "iter_ms": 1000.0 * sum(iter_times) / max(len(iter_times), 1),
        "iter_ms_median": 1000.0 * float(np.median(iter_times)) if iter_times else float("nan"),
        "losses": train_losses,
        "n_params": model.get_num_params(),
        "n_params_total": model.get_num_params(non_embedding=False),
        "last_eval_iter": last_eval_iter,
        "iters": len(train_losses),
        "evals": n_evals,
        "val_curve": val_curve,
        "model": model,  # the trained model, so a caller can evaluate it on its own batches
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=os.path.join(REPO_ROOT, "data", "tinyshakespeare.txt"))
    p.add_argument("--max-iters", type=int, default=2000)
    p.add_argument("--eval-interval", type=int, default=250)
    p.add_argument("--eval-iters", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = default")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="nanogpt_ref_") as tmp:
        data_dir = prepare_char_data(args.data, tmp)
        res = run_nanogpt(data_dir, max_iters=args.max_iters, eval_interval=args.eval_interval,
                          eval_iters=args.eval_iters, quiet=args.quiet, threads=args.threads)
    losses = res.pop("losses")
    print(f"threads {torch.get_num_threads()}  n_params {res['n_params'] / 1e6:.2f}M "
          f"(total {res['n_params_total']:,})")
    print(f"first loss {losses[0]:.4f}  last loss {losses[-1]:.4f}  over {len(losses)} iters")
    for k, v in res.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")


if __name__ == "__main__":
    main()
