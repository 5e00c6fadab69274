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
    marks = [(time.perf_counter(), 0)]  # (time, blocks done by all ranks) after each round

    def mark(n: int) -> None:
        marks.append((time.perf_counter(), marks[-1][1] + n))

    if config == "forward":  # rounds of one batch per rank, as capture's rounds of one shard per rank
        starts = range(0, len(blocks), world.size * args.batch_size)
        with torch.no_grad():
            for start in starts:
                mine = start + world.rank * args.batch_size
                model(input_ids=blocks[torch.arange(mine, min(mine + args.batch_size, len(blocks)))]).logits
                parallel.barrier(world)
                mark(min(world.size * args.batch_size, len(blocks) - start))
    else:
        write_cache(model, tokenizer, blocks, out / f"cache-{config}", config, 64 if config == "topk" else 16, 1.0,
                    "smollm2-135m", batch_size=args.batch_size, shard_tokens=args.batch_size * args.seq_len,
                    world=world, progress=mark)
        parallel.barrier(world)
        mark(0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # MiB (Linux reports KiB)
    rows = parallel.gather(world, rss)
    if world.main:
        (t0, _), (t1, n1), (t_end, n_end) = marks[0], marks[1], marks[-1]
        (out / "result.json").write_text(json.dumps({
            "tokens_per_s": n_end * args.seq_len / (t_end - t0),
            # after the first round: what each further token costs (no warm-up, no one-time checks)
            "steady_tokens_per_s": (n_end - n1) * args.seq_len / (t_end - t1), "peak_rss_mib": rows}))
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
    return {"rounds": rounds, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}


def report(results: dict) -> str:
    rounds = results["rounds"]

    def median(fn):
        return statistics.median(fn(r) for r in rounds)

    a = results["args"]
    lines = [f"\n## Logit capture at 1 and 2 processes ({datetime.now(timezone.utc):%Y-%m-%d})\n",
             f"`python bench/capture_scale.py --tokens {a['tokens']} --seq-len {a['seq_len']} --batch-size "
             f"{a['batch_size']} --rounds {a['rounds']}` on {platform.machine()}, {os.cpu_count()} cores, torch "
             f"{torch.__version__}, one thread per process; demo teacher (V = 49,152); medians over rounds.\n",
             "Whole run (from after loading) and steady state (after the first round: what each further token "
             "costs, without warm-up and the one-time logit check).\n",
             "| config | tokens/s 1 proc (steady) | tokens/s 2 proc (steady) | 2 / 1 (steady) "
             "| vs forward, 1 proc (steady) | vs forward, 2 proc (steady) | peak RSS per process, MiB (1 / 2 proc) |",
             "|---|---|---|---|---|---|---|"]

    def cell(c: str, key: str, n: int, over: str | None = None) -> float:
        return median(lambda r: r[f"{c}@{n}"][key] / (r[over][key] if over else 1.0))

    for c in CONFIGS:
        both = {key: (cell(c, key, 1), cell(c, key, 2)) for key in ("tokens_per_s", "steady_tokens_per_s")}
        scale = [median(lambda r: r[f"{c}@2"][k] / r[f"{c}@1"][k]) for k in ("tokens_per_s", "steady_tokens_per_s")]
        vs = [[median(lambda r: r[f"{c}@{n}"][k] / r[f"forward@{n}"][k]) for k in ("tokens_per_s",
                                                                               "steady_tokens_per_s")] for n in (1, 2)]
        rss = [median(lambda r: max(r[f"{c}@{n}"]["peak_rss_mib"])) for n in (1, 2)]
        whole, steady = both["tokens_per_s"], both["steady_tokens_per_s"]
        lines.append(f"| {c} | {whole[0]:,.0f} ({steady[0]:,.0f}) | {whole[1]:,.0f} ({steady[1]:,.0f}) | "
                     f"{scale[0]:.2f}x ({scale[1]:.2f}x) | {vs[0][0]:.2f}x ({vs[0][1]:.2f}x) | "
                     f"{vs[1][0]:.2f}x ({vs[1][1]:.2f}x) | {rss[0]:,.0f} / {rss[1]:,.0f} |")
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
