"""`nanotrain prepare` on a large jsonl corpus against `tokenizers`' own encode_batch, same text, same cores.

    python bench/prepare.py [--gb 2] [--workers 0,2] [--shard-tokens 0] [--dir /tmp/nanotrain-prepare-bench] [--keep]

Generates a jsonl corpus of --gb gigabytes (documents of 200-4000 characters cut from tiny
Shakespeare, shuffled words, so the vocabulary is realistic and nothing is downloaded), and a
byte-level BPE tokenizer.json of 8192 tokens trained on a sample of it. Then, each in a fresh
process (so each peak RSS is its own):

  ours     nanotrain's prepare_data with data.tokenizer=<that tokenizer.json>: streams the
           file, tokenizes in ~1 MB batches, writes train.bin/val.bin (or shards of
           --shard-tokens); once per --workers count (data.prepare_workers; 0: in this process,
           HF tokenizers' own threads)
  peer     tokenizers.Tokenizer.encode_batch over the same documents, read with json.loads in
           batches of the same size, the ids kept as numpy arrays (nothing written): the library's
           own speed on this text with the same cores; and encode_batch_fast, the same without
           computing character offsets, which is what prepare calls

Prints MB/s of each (corpus bytes / wall seconds), the ratio (ours / peer, goal >= 1.0), peak RSS
(goal under 1 GB): the process's own, and the proportional set size of it and every forkserver
process (the workers), sampled every 0.2 s; and that both produced the same number of tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generate(path: Path, gb: float, seed: int = 0) -> int:
    words = (ROOT / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8").split()
    rng = random.Random(seed)
    target, written = int(gb * 2**30), 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            lines = []
            for _ in range(1000):
                n = rng.randint(40, 800)
                start = rng.randrange(len(words) - n)
                chunk = words[start:start + n]
                rng.shuffle(chunk)
                lines.append(json.dumps({"id": written, "text": " ".join(chunk)}) + "\n")
            block = "".join(lines)
            f.write(block)
            written += len(block.encode("utf-8"))
    return written


def train_tokenizer(corpus: Path, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    sample = []
    with open(corpus, encoding="utf-8") as f:
        for _, line in zip(range(20000), f):
            sample.append(json.loads(line)["text"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sample, trainer=trainer)
    tok.save(str(out))


def run_ours(corpus: Path, tokenizer: Path, work: Path, workers: int, shard_tokens: int) -> dict:
    from nanotrain.config import DataConfig
    from nanotrain.data import prepare_data

    t0 = time.perf_counter()
    shutil.rmtree(work / "ours", ignore_errors=True)
    pd = prepare_data(DataConfig(path=str(corpus), tokenizer=str(tokenizer), prepared_dir=str(work / "ours"),
                                 prepare_workers=workers, shard_tokens=shard_tokens),
                      1024, log=lambda s: print(s, file=sys.stderr, flush=True))
    return {"seconds": time.perf_counter() - t0, "tokens": pd.n_train_tokens + pd.n_val_tokens}


def run_peer(corpus: Path, tokenizer: Path, work: Path, fast: bool = False) -> dict:
    import numpy as np
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    encode = tok.encode_batch_fast if fast else tok.encode_batch
    eos = tok.token_to_id("<|endoftext|>")
    def count(batch: list[str]) -> int:
        return sum(np.asarray(e.ids + [eos], dtype=np.uint16).size for e in encode(batch))

    t0 = time.perf_counter()
    tokens, batch, size = 0, [], 0
    with open(corpus, "rb") as f:
        for line in f:
            text = json.loads(line)["text"]
            batch.append(text)
            size += len(text)
            if size >= 1 << 20:
                tokens += count(batch)
                batch, size = [], 0
    tokens += count(batch)
    return {"seconds": time.perf_counter() - t0, "tokens": tokens}


def _descendants(root: int) -> set[int]:
    """root and every process under it (the forkserver it started, the workers forked from that),
    from /proc/*/stat's parent ids."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])  # after "pid (comm) state"
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
        children.setdefault(ppid, []).append(int(d.name))
    found, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _pss() -> int:
    """Proportional set size (shared pages split between their users) of this process and of the
    processes under it (the workers are forked from a forkserver it starts, not from it): the memory
    they use in all. Only its own: other jobs' forkservers on a shared machine are not counted."""
    total = 0
    for pid in _descendants(os.getpid()):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def one(who: str, corpus: Path, tokenizer: Path, work: Path, shard_tokens: int) -> None:
    import threading

    peak, done = [0], threading.Event()

    def sample():  # every 0.2 s, the whole footprint (ru_maxrss cannot see forkserver children)
        while not done.wait(0.2):
            peak[0] = max(peak[0], _pss())
    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    if who.startswith("ours"):
        r = run_ours(corpus, tokenizer, work, int(who.split("_w")[1]), shard_tokens)
    else:
        r = run_peer(corpus, tokenizer, work, fast=who == "peer_fast")
    done.set()
    watcher.join()
    r["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    r["peak_pss"] = peak[0]
    print(json.dumps(r))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--dir", default="/tmp/nanotrain-prepare-bench")
    ap.add_argument("--workers", default="0,2", help="data.prepare_workers counts to run, comma-separated")
    ap.add_argument("--shard-tokens", type=int, default=0, help="data.shard_tokens (0: train.bin/val.bin)")
    ap.add_argument("--keep", action="store_true", help="keep the generated corpus for the next run")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.dir)
    corpus, tokenizer = work / "corpus.jsonl", work / "tokenizer.json"
    if args.one:
        one(args.one, corpus, tokenizer, work, args.shard_tokens)
        return
    work.mkdir(parents=True, exist_ok=True)
    if not corpus.is_file() or abs(corpus.stat().st_size - args.gb * 2**30) > 0.05 * args.gb * 2**30:
        t = time.perf_counter()
        generate(corpus, args.gb)
        print(f"generated {corpus} ({corpus.stat().st_size / 2**30:.2f} GB) in {time.perf_counter() - t:.0f} s")
    if not tokenizer.is_file():
        train_tokenizer(corpus, tokenizer)
    mb = corpus.stat().st_size / 2**20
    counts = [int(w) for w in args.workers.split(",")]
    ours = [f"ours_w{w}" for w in counts]
    results = {}
    for who in ("peer", "peer_fast", *ours):
        out = subprocess.run([sys.executable, __file__, "--one", who, "--dir", str(work),
                              "--shard-tokens", str(args.shard_tokens)], check=True,
                             stdout=subprocess.PIPE, text=True).stdout
        results[who] = json.loads(out.strip().splitlines()[-1])
    shutil.rmtree(work / "ours", ignore_errors=True)
    print(f"\nprepare of {mb:,.0f} MB of jsonl, BPE 8192, {os.cpu_count()} cores (same machine, one after the other):")
    labels = [("peer", "tokenizers encode_batch (json.loads, 1 MB batches, ids kept)"),
              ("peer_fast", "tokenizers encode_batch_fast (the same, no character offsets)")]
    files = f"shards of {args.shard_tokens:,} tokens" if args.shard_tokens else "train.bin/val.bin"
    labels += [(f"ours_w{w}", f"nanotrain prepare_data, {w} workers ({files})") for w in counts]
    for who, label in labels:
        r = results[who]
        rss = f"peak RSS {r['peak_rss'] / 2**20:,.0f} MB, PSS in all {r['peak_pss'] / 2**20:,.0f} MB"
        print(f"  {label:<66} {mb / r['seconds']:6.1f} MB/s  {r['seconds']:7.1f} s  {rss}  {r['tokens']:,} tokens")
    for who in ours:
        r = results[who]
        whole = max(r["peak_rss"], r["peak_pss"])
        print(f"{who}: throughput / encode_batch = {results['peer']['seconds'] / r['seconds']:.2f} (goal >= 1.0), "
              f"/ encode_batch_fast = {results['peer_fast']['seconds'] / r['seconds']:.2f}; peak RSS "
              f"{whole / 2**30:.2f} GB in all (goal < 1 GB); tokens "
              f"{'equal' if r['tokens'] == results['peer']['tokens'] else 'DIFFER'}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
