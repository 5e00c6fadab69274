"""Data at scale: the in-memory path vs token stores, tokenizing with 1 and 2 workers, distil start-up on stores.

A corpus of general and technical English that is on every machine (the Python reference, Debian's licence texts
and package documentation), cut into paragraphs, shuffled and repeated to ``--sizes`` million tokens (jsonl, one
paragraph-group per document). Side by side, each configuration in its own process (its peak RSS, VmHWM reset once the tokenizer is loaded, is its own):

  (a) memory: today's in-memory path (every document tokenized one call at a time into a Python list, an int64
      tensor, shuffled, sha256 of the whole tensor), as ``data.load_blocks`` did before token stores;
  (b) tokenize-1 / tokenize-2: ``whelp tokenize`` with 1 and 2 worker processes (tokens/s, peak RSS, bytes/token);
  (c) startup: a distil run's data start-up on each store: open the store, build the rows, read the first global
      batch (time to the first batch, peak RSS above the interpreter with torch loaded).

Cost grows linearly with the corpus for tokenizing (once) and not at all for start-up: the reader maps the shards
and keeps 8 bytes per block (the shuffled block order) plus one window of mixture state, so its memory grows by
8 bytes per ``seq_len`` tokens (0.6 MiB from 20M to 200M tokens at seq_len 512) while the in-memory path holds
~40 bytes per token. Targets: tokenization >= 1.8x faster on 2 workers than on 1; the reader's peak
RSS grows <= 64 MiB from 20M to 200M tokens; time to the first batch <= 2 s on either size; 2 bytes/token.

    python bench/data_scale.py [--sizes 20 200] [--skip-memory-above 20] [--work DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

TOKENS_PER_CHAR = 0.356  # the demo tokenizer on this corpus, measured: a target size in characters


def paragraphs() -> list[str]:
    """Paragraphs of the Python reference, Debian's licence texts and Debian's package docs (all plain text)."""
    from pydoc_data.topics import topics

    texts = list(topics.values())
    texts += [p.read_text(errors="replace") for p in Path("/usr/share/common-licenses").glob("*") if p.is_file()]
    for p in sorted(Path("/usr/share/doc").rglob("*")):
        if p.is_file() and p.stat().st_size < 2 << 20 and not p.is_symlink():
            try:
                raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
                texts.append(raw.decode("utf-8"))
            except (UnicodeDecodeError, OSError, EOFError):
                continue
    return [para.strip() for text in texts for para in text.split("\n\n") if len(para.strip()) > 40]


def make_corpus(path: Path, million_tokens: int, seed: int = 0) -> None:
    """Shuffled paragraphs, ~8 to a document, repeated until the corpus holds about ``million_tokens`` M tokens."""
    if path.exists():
        return
    paras, rng = paragraphs(), random.Random(seed)
    target, written = million_tokens * 1e6 / TOKENS_PER_CHAR, 0
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        while written < target:
            rng.shuffle(paras)
            for i in range(0, len(paras), 8):
                doc = "\n\n".join(paras[i : i + 8])
                f.write(json.dumps({"text": doc}) + "\n")
                written += len(doc)
                if written >= target:
                    break
    tmp.rename(path)


def child(config: str, corpus: str, store: str, seq_len: int, batch: int) -> dict:
    """One configuration in this (fresh) process; returns its numbers and peak RSS."""
    import numpy as np  # noqa: F401  (loaded before the baseline, as the others are)
    import torch

    from whelp import data
    from whelp.data import tokenstore
    from whelp.distillation import schedule
    from whelp.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    Path("/proc/self/clear_refs").write_text("5")  # reset this process's peak RSS (VmHWM) to its current RSS
    base = _status("VmRSS")
    start = time.perf_counter()
    if config == "memory":
        blocks = data.pack(data.read_documents(corpus), tokenizer, seq_len)
        blocks = blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))]
        import hashlib

        hashlib.sha256(blocks.numpy().tobytes()).hexdigest()
        tokens = blocks.numel()
    elif config.startswith("tokenize"):
        path = tokenstore.tokenize(corpus, tokenizer, store, num_proc=int(config[-1]), force=True, progress=False)
        m = tokenstore.open_store(path).manifest
        tokens = m["total_tokens"]
        disk = sum(s["bytes"] for s in m["shards"])
    else:  # startup: what a distil run does before its first step, on an existing store
        rows = data.open_blocks(store, tokenizer, seq_len)
        first = rows[schedule.step_blocks(0, len(rows), batch, seed=0)]
        assert first.shape == (batch, seq_len)
        tokens = len(rows) * seq_len
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest tokenizer worker
    out = {
        "config": config,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_rss": peak,
        "rss_above_base": peak - base,
        "worker_peak_rss": workers,
    }
    if config.startswith("tokenize"):
        out["bytes_per_token"] = disk / tokens
    return out


def _status(field: str) -> int:
    """A memory field of /proc/self/status in bytes (VmRSS now, VmHWM the peak since the last reset)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def run(config: str, corpus: Path, store: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", config, str(corpus), str(store), str(args.seq_len), str(args.batch)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{config} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[20, 200], help="corpus sizes in million tokens")
    p.add_argument("--skip-memory-above", type=int, default=20, help="run (a) only up to this size (M tokens)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=16, help="blocks in the first global batch")
    p.add_argument("--work", type=Path, default=Path("/tmp/whelp-data-scale"))
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        config, corpus, store, seq_len, batch = args.child
        print(json.dumps(child(config, corpus, store, int(seq_len), int(batch))))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for size in args.sizes:
        corpus, store = args.work / f"corpus-{size}M.jsonl", args.work / f"store-{size}M"
        make_corpus(corpus, size)
        configs = (["memory"] if size <= args.skip_memory_above else []) + ["tokenize-1", "tokenize-2", "startup"]
        for config in configs:
            row = {"size_M": size, **run(config, corpus, store, args)}
            results.append(row)
            print(json.dumps(row), flush=True)
    report(results, args)


def report(results: list[dict], args) -> None:
    rows = [
        "| corpus | configuration | tokens | seconds | tokens/s | peak RSS | RSS above base | worker peak RSS | "
        "bytes/token |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['size_M']}M | {r['config']} | {r['tokens']:,} | {r['seconds']:.2f} | "
            f"{r['tokens_per_s']:,.0f} | {r['peak_rss'] / 2**20:,.0f} MiB | {r['rss_above_base'] / 2**20:,.1f} MiB"
            f" | {r['worker_peak_rss'] / 2**20:,.0f} MiB | {r.get('bytes_per_token', '')} |"
        )
    by = {(r["size_M"], r["config"]): r for r in results}
    lines = []
    for size in args.sizes:
        one, two = by[(size, "tokenize-1")], by[(size, "tokenize-2")]
        lines.append(
            f"- {size}M tokens: 2 workers / 1 worker = {two['tokens_per_s'] / one['tokens_per_s']:.2f}x; "
            f"first batch in {by[(size, 'startup')]['seconds']:.2f} s"
        )
    if len(args.sizes) > 1:
        small, large = by[(args.sizes[0], "startup")], by[(args.sizes[-1], "startup")]
        lines.append(
            f"- reader peak RSS growth {args.sizes[0]}M -> {args.sizes[-1]}M tokens: "
            f"{(large['rss_above_base'] - small['rss_above_base']) / 2**20:.1f} MiB"
        )
    if (args.sizes[0], "memory") in by:
        mem, st = by[(args.sizes[0], "memory")], by[(args.sizes[0], "startup")]
        lines.append(
            f"- in-memory path at {args.sizes[0]}M tokens: {mem['seconds']:.1f} s, "
            f"{mem['rss_above_base'] / mem['tokens']:.1f} bytes/token of RSS; the store's start-up: "
            f"{st['seconds']:.2f} s, {st['rss_above_base'] / 2**20:.1f} MiB"
        )
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    text = (
        f"\n## Data at scale: token stores\n\n`python bench/data_scale.py --sizes {' '.join(map(str, args.sizes))}`"
        f" on {platform.machine()} with {os.cpu_count()} cores, {when}; seq_len {args.seq_len}, first batch of "
        f"{args.batch} blocks; each row its own process.\n\n" + "\n".join(rows) + "\n\n" + "\n".join(lines) + "\n"
    )
    with open(Path(__file__).with_name("RESULTS.md"), "a") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
