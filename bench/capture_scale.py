"""Teacher-logit capture throughput and memory: plain teacher forward vs ``cache-logits`` (top-64, sampled) at 1
and 2 processes.

Side by side in one run on the demo teacher (SmolLM2-135M, V = 49,152), the same token blocks and batch size:
``forward`` runs ``model(input_ids=...).logits`` over this process's share of the blocks (what any use of the
teacher costs), ``topk``/``sample`` run ``whelp.distillation.capture.write_cache`` (backbone, chunked lm_head,
on-device top-k / sampling, bit packing, sha256, atomic shard writes, manifest merges). Every configuration is its
own launch (``python`` for 1 process, ``torchrun --nproc_per_node 2`` for 2, one thread per process), so peak RSS
is per process. Rounds interleave the configurations on this shared machine; ratios are taken within a round and
the median over rounds is reported.

Targets (issue 15): capture >= 0.9 x the plain forward's tokens/s (extraction <= 10% overhead); 2 processes >= 1.8 x
one. Cost grows linearly with tokens (each block is read, run and written once; the manifest grows by one record
per shard of ``shard_tokens``) and is independent of the corpus size in memory (a process holds one batch of
logits chunks and one shard of targets at a time).

    python bench/capture_scale.py [--tokens 16384] [--seq-len 256] [--batch-size 4] [--rounds 3] [--json F] [--dry]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from publish import publish  # noqa: E402

CONFIGS = ("forward", "topk", "sample")


def worker(config: str, out: Path, args) -> None:
    """One configuration on this rank: tokens/s of its share (timed after loading) and its peak RSS."""
    from whelp.data import open_blocks
    from whelp.distillation import parallel
    from whelp.distillation.capture import write_cache
    from whelp.models import load_model, registered_dir

    world = parallel.init_world()
    model, tokenizer = load_model(str(registered_dir("smollm2-135m")))
    blocks = parallel.main_first(world, lambda: open_blocks("pydoc:train", tokenizer, args.seq_len,
                                                            max_tokens=args.tokens))
    parallel.barrier(world)
    t0 = time.perf_counter()
    if config == "forward":
        mine = torch.arange(world.rank * args.batch_size, len(blocks), world.size * args.batch_size)
        with torch.no_grad():
            for start in mine.tolist():
                model(input_ids=blocks[torch.arange(start, min(start + args.batch_size, len(blocks)))]).logits
        parallel.barrier(world)
    else:
        write_cache(model, tokenizer, blocks, out / f"cache-{config}", config, 64 if config == "topk" else 16, 1.0,
                    "smollm2-135m", batch_size=args.batch_size, shard_tokens=args.batch_size * args.seq_len * 2,
                    world=world)
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # MiB (Linux reports KiB)
    rows = parallel.gather(world, rss)
    if world.main:
        (out / "result.json").write_text(json.dumps({"tokens_per_s": len(blocks) * args.seq_len / seconds,
                                                     "peak_rss_mib": rows}))
    parallel.close_world(world)


def launch(config: str, nproc: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        flags = [config, "--worker-out", tmp, "--tokens", str(args.tokens), "--seq-len", str(args.seq_len),
                 "--batch-size", str(args.batch_size)]
        launcher = ([sys.executable] if nproc == 1 else
                    [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(nproc)])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(launcher + [__file__, "--worker", *flags], capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        return json.loads((Path(tmp) / "result.json").read_text())


def run(args) -> dict:
    rounds = []
    for _ in range(args.rounds):
        rounds.append({f"{c}@{n}": launch(c, n, args) for n in (1, 2) for c in CONFIGS})
    return {"rounds": rounds, "args": vars(args)}


def report(results: dict) -> str:
    rounds = results["rounds"]

    def median(fn):
        return statistics.median(fn(r) for r in rounds)

    a = results["args"]
    lines = [f"\n## Logit capture at 1 and 2 processes ({datetime.now(timezone.utc):%Y-%m-%d})\n",
             f"`python bench/capture_scale.py --tokens {a['tokens']} --seq-len {a['seq_len']} --batch-size "
             f"{a['batch_size']} --rounds {a['rounds']}` on {platform.machine()}, {os.cpu_count()} cores, torch "
             f"{torch.__version__}, one thread per process; demo teacher (V = 49,152); medians over rounds.\n",
             "| config | 1 process tokens/s | 2 processes tokens/s | 2 / 1 | vs forward (1 / 2 proc) "
             "| peak RSS per process, MiB (1 / 2 proc) |", "|---|---|---|---|---|---|"]
    for c in CONFIGS:
        one, two = median(lambda r: r[f"{c}@1"]["tokens_per_s"]), median(lambda r: r[f"{c}@2"]["tokens_per_s"])
        scale = median(lambda r: r[f"{c}@2"]["tokens_per_s"] / r[f"{c}@1"]["tokens_per_s"])
        vs = [median(lambda r: r[f"{c}@{n}"]["tokens_per_s"] / r[f"forward@{n}"]["tokens_per_s"]) for n in (1, 2)]
        rss = [median(lambda r: max(r[f"{c}@{n}"]["peak_rss_mib"])) for n in (1, 2)]
        lines.append(f"| {c} | {one:,.0f} | {two:,.0f} | {scale:.2f}x | {vs[0]:.2f}x / {vs[1]:.2f}x "
                     f"| {rss[0]:,.0f} / {rss[1]:,.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", choices=CONFIGS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dry", action="store_true", help="print, do not append to RESULTS.md")
    args = parser.parse_args()
    if args.worker:
        return worker(args.config, args.worker_out, args)
    results = run(args)
    publish(report(results), results, args.json, args.dry)


if __name__ == "__main__":
    main()
