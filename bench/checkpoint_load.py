"""What checking checksums costs a resume: CheckpointReader + fill of every piece, verify on and off.

    python bench/checkpoint_load.py [--d-model 384] [--layers 6] [--vocab 512] [--rounds 7]
                                    [--dir /tmp/nanotrain_bench_load]

One process saves a model (TransformerModel, fp32) with its AdamW moments after one step, then loads
it back as a resume does: a CheckpointReader, fill() of every model piece, the optimizer's
load_pieces. Timed with verify=True (each chunk's bytes hashed with xxh3_128 right after they are
read, still in the CPU's cache) and verify=False, rounds alternating which goes first, round 0 a
warm-up. Two cases:

  hot   the files are in the page cache (a restart soon after the save, on the same machine)
  cold  the files are evicted from the page cache before each load (posix_fadvise DONTNEED):
        a restart on another machine, or after other work pushed them out

Also printed: the hash candidates (xxh3_128, sha256, blake2b) over the same file, hot, and the
ratio each would give as one pass added to the hot load.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import time
from pathlib import Path

from common import table

import torch
import xxhash


def cpu_kind() -> str:
    """The model name and the flags that decide hashing speed (sha_ni: sha256 in hardware)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    shown = [f for f in ("sha_ni", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return f"{name} ({', '.join(shown) or 'none of sha_ni/avx512/amx'}), {os.cpu_count()} cores"


def build(a):
    from nanotrain.config import load_config
    from nanotrain.models import build_model
    from nanotrain.parallel.layout import Layout
    from nanotrain.parallel.state import init_parallel
    from nanotrain.parallel.zero import ZeroOptimizer

    cfg = load_config(None, [f"--model.d_model={a.d_model}", f"--model.n_layers={a.layers}",
                             f"--model.vocab_size={a.vocab}", "--model.max_seq_len=64"])
    model = build_model(cfg.model)
    model.init_weights(0)
    opt = ZeroOptimizer(model, 0, init_parallel(Layout.from_config(cfg)), cfg.optimizer, cfg.parallel.bucket_mb)
    x = torch.randint(0, a.vocab, (2, 64), generator=torch.Generator().manual_seed(0))
    with opt.backward_context(last=True):
        model(x, x, loss_denominator=128.0).backward()
    opt.sync_grads()
    opt.step(1e-3)  # moments exist now
    return model, opt


def evict(folder: Path) -> None:
    """Drop the folder's files from the page cache (clean pages only: they were fsynced)."""
    for f in folder.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def hash_time(path: Path, new, rounds: int) -> float:
    def once():
        h, buf = new(), bytearray(1 << 20)
        view = memoryview(buf)
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
    times = []
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-model", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dir", default="/tmp/nanotrain_bench_load")
    a = ap.parse_args()
    from nanotrain.checkpoint import CheckpointManager, CheckpointReader, model_pieces

    torch.set_num_threads(1)  # one rank's load is one thread; keep the comparison to it
    shutil.rmtree(a.dir, ignore_errors=True)
    model, opt = build(a)
    folder = CheckpointManager(a.dir).save(1, model_pieces(model) + opt.pieces(), {})
    os.sync()  # written back: eviction can drop the pages
    size = sum(f.stat().st_size for f in folder.iterdir())

    def load(verify: bool | str) -> float:
        t0 = time.perf_counter()
        reader = CheckpointReader(folder, verify=verify)
        for piece in model_pieces(model):
            reader.fill(piece)
        opt.load_pieces(reader)
        return time.perf_counter() - t0

    modes = (False, True)

    def rounds(case: str) -> dict:
        times = {m: [] for m in modes}
        for r in range(a.rounds + 1):
            for verify in modes[r % 2:] + modes[:r % 2]:  # each mode goes first in turn
                if case == "cold":
                    evict(folder)
                t = load(verify)
                if r:
                    times[verify].append(t)
        return {v: statistics.median(ts) * 1e3 for v, ts in times.items()}

    try:
        res = {"hot": rounds("hot")}
        rank_file = folder / "rank_00000.safetensors"  # in the page cache, as in the hot loads
        candidates = {name: hash_time(rank_file, new, a.rounds) * 1e3 for name, new in
                      (("xxh3_128", xxhash.xxh3_128), ("sha256", hashlib.sha256), ("blake2b", hashlib.blake2b))}
        res["cold"] = rounds("cold")
    finally:
        shutil.rmtree(a.dir, ignore_errors=True)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"checkpoint load, verify on vs off: {n_params / 1e6:.2f}M parameters + AdamW moments (fp32), "
          f"{size / 2**20:.1f} MB in one rank file; one process, one thread; median of {a.rounds} round(s)\n"
          f"CPU: {cpu_kind()}\n")
    rows = [[case, f"{r[False]:.1f}", f"{r[True]:.1f}", f"{r[True] / r[False]:.2f}"] for case, r in res.items()]
    print(table(rows, ["page cache", "verify off ms", "verify on ms", "on / off"]))
    print()
    hot = res["hot"][False]
    rows = [[name, f"{ms:.1f}", f"{size / 2**20 / ms:.1f}", f"{(hot + ms) / hot:.2f}"]
            for name, ms in candidates.items()]
    print("\nwhat a check of each whole file before reading it would cost instead (one pass, hot):")
    print(table(rows, ["hash", "one pass ms", "GB/s", "(hot load + pass) / hot load"]))


if __name__ == "__main__":
    main()
