"""Teacher-logit capture throughput and memory: plain teacher forward vs ``cache-logits`` (top-64, sampled) at 1
and 2 processes.

Side by side in one run on the demo teacher (SmolLM2-135M, V = 49,152), the same token blocks and batch size:
``forward`` runs ``model(input_ids=...).logits`` over this process's share of the blocks (what any use of the
teacher costs), ``topk``/``sample`` run ``whelp.distillation.capture.write_cache`` (backbone, chunked lm_head,
on-device top-k / sampling, bit packing, sha256, atomic shard writes, manifest merges). Every configuration is its
own launch (``python`` for 1 process, ``torchrun --nproc_per_node 2`` for 2, one thread per process), so peak RSS
is per process. Rounds interleave the configurations on this shared machine; ratios are taken within a round and
the median over rounds is reported.

Targets: capture >= 0.9 x the plain forward's tokens/s (extraction <= 10% overhead); 2 processes >= 1.8 x
one. Cost grows linearly with tokens (each block is read, run and written once; the manifest grows by one record
per shard of ``shard_tokens``) and is independent of the corpus size in memory (a process holds one batch of
logits chunks and one shard of targets at a time).

    python bench/capture_scale.py [--tokens 16384] [--seq-len 256] [--batch-size 4] [--rounds 3] [--json F] [--dry]

On a GPU, the same at V = 128,256: a random teacher of Llama-3.2-1B's shape (whelp/configs), in bf16, one
process on the one GPU, the peak GPU memory beside the RSS (scripts/gpu_checks.sh runs it). Its blocks are random
ids under a word-level tokenizer of the teacher's whole vocabulary (``synthetic``), so top-k and sampling run over
all 128,256 logits and nothing has to be carried to the machine:

    python bench/capture_scale.py --teacher llama-3.2-1b --device cuda --dtype bfloat16 --procs 1 --tokens 262144 \
        --seq-len 2048 --batch-size 8
"""

from __future__ import annotations

import argparse
import hashlib
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
DEFAULTS = {"teacher": "demo", "device": "cpu", "dtype": "float32"}


class RandomBlocks:
    """``whelp.data.Blocks`` of random ids (rows [N, T]): what capture reads, for a teacher without its text."""

    def __init__(self, ids: torch.Tensor):
        self.ids, self.seq_len, self.source = ids, ids.shape[1], "random"
        self.fingerprint = hashlib.sha256(ids.numpy().tobytes()).hexdigest()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index):
        return self.ids[index]


def synthetic(vocab: int, tokens: int, seq_len: int):
    """A word-level tokenizer of ``vocab`` tokens and random blocks of its ids (throughput does not depend on them)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    )
    ids = torch.randint(0, vocab, (tokens // seq_len, seq_len), generator=torch.Generator().manual_seed(0))
    return tokenizer, RandomBlocks(ids)


def worker(config: str, out: Path, args) -> None:
    """One configuration on this rank: tokens/s of its share (timed after loading) and its peak RSS."""
    from whelp.data import open_blocks
    from whelp.distillation import parallel
    from whelp.distillation.capture import Teacher, write_cache
    from whelp.models import load_model, registered_dir
    from whelp.specs import CacheSpec

    world = parallel.init_world()
    if args.teacher == "demo":
        model, tokenizer = load_model(str(registered_dir("smollm2-135m")))
        blocks = parallel.main_first(
            world, lambda: open_blocks("pydoc:train", tokenizer, args.seq_len, max_tokens=args.tokens)
        )
    else:  # a random teacher of that shipped shape, over random ids of its whole vocabulary
        from transformers import AutoModelForCausalLM

        from whelp.models import load_config

        torch.manual_seed(0)
        shape = load_config(args.teacher)
        model = AutoModelForCausalLM.from_config(shape, dtype=getattr(torch, args.dtype)).eval()
        tokenizer, blocks = synthetic(shape.vocab_size, args.tokens, args.seq_len)
    model = model.to(device=world.device, dtype=getattr(torch, args.dtype))
    parallel.barrier(world)
    marks = [(time.perf_counter(), 0)]  # (time, blocks done by all ranks) after each round

    def mark(n: int) -> None:
        marks.append((time.perf_counter(), marks[-1][1] + n))

    if config == "forward":  # rounds of one batch per rank, as capture's rounds of one shard per rank
        starts = range(0, len(blocks), world.size * args.batch_size)
        with torch.no_grad():
            for start in starts:
                mine = start + world.rank * args.batch_size
                ids = blocks[torch.arange(mine, min(mine + args.batch_size, len(blocks)))].to(world.device)
                model(input_ids=ids)
                parallel.barrier(world)
                mark(min(world.size * args.batch_size, len(blocks) - start))
    else:
        write_cache(
            Teacher(model, tokenizer, args.teacher),
            blocks,
            out / f"cache-{config}",
            CacheSpec(
                config,
                64 if config == "topk" else 16,
                1.0,
                batch_size=args.batch_size,
                shard_tokens=args.batch_size * args.seq_len,
            ),
            world=world,
            progress=mark,
        )
        parallel.barrier(world)
        mark(0)
    if world.device.type == "cuda":
        torch.cuda.synchronize()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # MiB (Linux reports KiB)
    rows = parallel.gather(world, rss)
    gpu = torch.cuda.max_memory_allocated() / 2**20 if world.device.type == "cuda" else None
    if world.main:
        (t0, _), (t1, n1), (t_end, n_end) = marks[0], marks[1], marks[-1]
        (out / "result.json").write_text(
            json.dumps(
                {
                    "tokens_per_s": n_end * args.seq_len / (t_end - t0),
                    # after the first round: what each further token costs (no warm-up, no one-time checks)
                    "steady_tokens_per_s": (n_end - n1) * args.seq_len / (t_end - t1),
                    "peak_rss_mib": rows,
                    "peak_gpu_mib": gpu,
                    "vocab_size": model.config.vocab_size,
                }
            )
        )
    parallel.close_world(world)


def launch(config: str, nproc: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        flags = [
            config,
            "--worker-out",
            tmp,
            "--tokens",
            str(args.tokens),
            "--seq-len",
            str(args.seq_len),
            "--batch-size",
            str(args.batch_size),
            "--teacher",
            args.teacher,
            "--device",
            args.device,
            "--dtype",
            args.dtype,
        ]
        launcher = (
            [sys.executable]
            if nproc == 1
            else [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(nproc)]
        )
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {}),
        }
        done = subprocess.run(launcher + [__file__, "--worker", *flags], capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        return json.loads((Path(tmp) / "result.json").read_text())


def run(args) -> dict:
    rounds = []
    for _ in range(args.rounds):
        rounds.append({f"{c}@{n}": launch(c, n, args) for n in args.procs for c in CONFIGS})
    return {"rounds": rounds, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}


def report(results: dict) -> str:
    rounds, a = results["rounds"], results["args"]
    procs = [int(n) for n in a["procs"]]
    keys = ("tokens_per_s", "steady_tokens_per_s")

    def median(fn, *args):
        return statistics.median(fn(r, *args) for r in rounds)

    def rate(fn) -> str:  # tokens/s: whole run (steady state)
        whole, steady = (median(fn, k) for k in keys)
        return f"{whole:,.0f} ({steady:,.0f})"

    def ratio(fn) -> str:
        whole, steady = (median(fn, k) for k in keys)
        return f"{whole:.2f}x ({steady:.2f}x)"

    def row(c: str) -> str:
        cells = [rate(lambda r, k, n=n: r[f"{c}@{n}"][k]) for n in procs]
        if procs == [1, 2]:
            cells.append(ratio(lambda r, k: r[f"{c}@2"][k] / r[f"{c}@1"][k]))
        cells += [ratio(lambda r, k, n=n: r[f"{c}@{n}"][k] / r[f"forward@{n}"][k]) for n in procs]
        cells.append(" / ".join(f"{median(lambda r, n=n: max(r[f'{c}@{n}']['peak_rss_mib'])):,.0f}" for n in procs))
        if gpu:
            cells.append(" / ".join(f"{median(lambda r, n=n: r[f'{c}@{n}']['peak_gpu_mib']):,.0f}" for n in procs))
        return f"| {c} | " + " | ".join(cells) + " |"

    vocab, gpu = rounds[0][f"forward@{procs[0]}"]["vocab_size"], a["device"] == "cuda"
    teacher = "demo teacher" if a["teacher"] == "demo" else f"a random {a['teacher']}-shaped teacher"
    command = (
        f"`python bench/capture_scale.py --tokens {a['tokens']} --seq-len {a['seq_len']} --batch-size "
        f"{a['batch_size']} --rounds {a['rounds']}"
        + "".join(f" --{k} {a[k]}" for k in ("teacher", "device", "dtype") if a[k] != DEFAULTS[k])
        + (f" --procs {','.join(map(str, procs))}" if procs != [1, 2] else "")
        + "`"
    )
    where = torch.cuda.get_device_name() if gpu else f"{platform.machine()}, {os.cpu_count()} cores"
    head = ["config"] + [f"tokens/s {n} proc (steady)" for n in procs] + (["2 / 1 (steady)"] if procs == [1, 2] else [])
    head += [f"vs forward, {n} proc (steady)" for n in procs] + ["peak RSS per process, MiB"]
    head += ["peak GPU memory, MiB"] if gpu else []
    lines = [
        f"\n## Logit capture at {' and '.join(map(str, procs))} process{'es' * (procs != [1])} "
        f"({datetime.now(timezone.utc):%Y-%m-%d})\n",
        f"{command} on {where}, torch {torch.__version__}, {a['dtype']}, one thread per process; {teacher} "
        f"(V = {vocab:,}); medians over rounds.\n",
        "Whole run (from after loading) and steady state (after the first round: what each further token "
        "costs, without warm-up and the one-time logit check).\n",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += [row(c) for c in CONFIGS]
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
    parser.add_argument(
        "--teacher",
        default=DEFAULTS["teacher"],
        help="demo, or a shipped config (llama-3.2-1b: V = 128,256) built with random weights",
    )
    parser.add_argument("--device", default=DEFAULTS["device"], choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default=DEFAULTS["dtype"], choices=("float32", "bfloat16"))
    parser.add_argument(
        "--procs",
        type=lambda t: [int(n) for n in t.split(",")],
        default=[1, 2],
        help="process counts to run, comma-separated (one GPU: 1)",
    )
    args = parser.parse_args()
    if args.worker:
        return worker(args.config, args.worker_out, args)
    results = run(args)
    publish(report(results), results, args.json, args.dry)


if __name__ == "__main__":
    main()
