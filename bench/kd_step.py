"""Training-step throughput of the distillation loop: CE-only vs KD from a live teacher vs KD from a cache.

Same student (the demo teacher's shape cut to ~50% parameters: 15 layers, MLP 1024), same token
blocks, same optimizer, each configuration a full ``whelp.distillation.inprocess.distill`` run in its own
process (so its peak RSS is its own). The teacher forward (to its logits, as a teacher is used) is
timed alone on the same blocks. The machine is shared, so the four configurations run in ``--rounds``
interleaved rounds; ratios are taken within a round and the median over rounds is reported.
Targets: live KD step <= 1.15 x (CE step + teacher forward); cached KD step <= 1.10 x CE step.

    python bench/kd_step.py [--steps 6] [--batch-size 2] [--seq-len 256] [--dtype auto] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
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

CONFIGS = ("ce", "kd_live", "kd_cache", "teacher_forward")


def prepare(root: Path, args) -> None:
    """Student (demo shape cut to 15 layers / MLP 1024, random init) and a top-64 cache of the teacher."""
    from transformers import AutoModelForCausalLM

    from whelp.data import open_blocks
    from whelp.distillation.capture import Teacher, write_cache
    from whelp.models import load_model, registered_dir
    from whelp.specs import CacheSpec

    teacher, tokenizer = load_model(str(registered_dir("smollm2-135m")))
    config = teacher.config.__class__.from_dict(
        {**teacher.config.to_dict(), "num_hidden_layers": 15, "intermediate_size": 1024}
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "student")
    tokenizer.save_pretrained(root / "student")
    blocks = open_blocks("pydoc:train", tokenizer, args.seq_len, max_tokens=budget(args))
    write_cache(Teacher(teacher, tokenizer, "smollm2-135m"), blocks, root / "cache", CacheSpec("topk", 64, 1.0))


def budget(args) -> int:
    return args.steps * args.batch_size * args.seq_len


def worker(root: Path, config: str, args) -> dict:
    """One configuration in this process: median seconds per optimizer step (first step excluded)."""
    from whelp.distillation.inprocess import distill
    from whelp.distillation.state import compute_dtype
    from whelp.models import registered_dir
    from whelp.specs import DistillSpec

    teacher = str(registered_dir("smollm2-135m"))
    if config == "teacher_forward":
        return {"step_s": teacher_forward(root, teacher, args)}
    spec = DistillSpec(
        data="pydoc:train",
        max_tokens=budget(args),
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=1e-4,
        eval_tokens=args.seq_len,
        dtype=args.dtype,
        ce_weight=1.0 if config == "ce" else 0.0,
    )
    kwargs = {
        "ce": {},
        "kd_live": {"teachers": ((teacher, 1.0),)},
        "kd_cache": {"caches": ((str(root / "cache"), 1.0),)},
    }[config]
    distill(str(root / "student"), root / f"out-{config}", spec, force=True, progress=False, **kwargs)
    rows = [json.loads(line) for line in (root / f"out-{config}.distill" / "metrics.jsonl").read_text().splitlines()]
    return {
        "step_s": statistics.median(r["step_s"] for r in rows[1:]),
        "dtype": str(compute_dtype(args.dtype, torch.device("cpu"))).replace("torch.", ""),
    }


def teacher_forward(root: Path, teacher: str, args) -> float:
    from whelp.data import open_blocks
    from whelp.distillation.state import compute_dtype
    from whelp.models import load_model

    model, tokenizer = load_model(teacher)
    blocks = open_blocks("pydoc:train", tokenizer, args.seq_len, max_tokens=budget(args)).head()
    dtype = compute_dtype(args.dtype, torch.device("cpu"))
    times = []
    for start in range(0, len(blocks), args.batch_size):
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            model(input_ids=blocks[start : start + args.batch_size])
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", choices=CONFIGS)
    parser.add_argument("--root")
    parser.add_argument("--dry", action="store_true", help="print, do not append to bench/RESULTS.md")
    args = parser.parse_args()
    if args.worker:
        result = worker(Path(args.root), args.worker, args)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root, args)
        rounds = []
        for r in range(args.rounds):
            rounds.append({config: run_worker(tmp, config, args) for config in CONFIGS})
            print(f"round {r + 1}:", {c: round(v["step_s"], 3) for c, v in rounds[-1].items()}, flush=True)
    report(rounds, args)


def run_worker(tmp: str, config: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        config,
        "--root",
        tmp,
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--dtype",
        args.dtype,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        sys.exit(f"{config} failed:\n{done.stderr[-3000:]}")
    return json.loads(line[0][7:])


def report(rounds: list[dict], args) -> None:
    def ratios_of(r: dict) -> dict:
        ce, live, cache, fwd = (r[c]["step_s"] for c in CONFIGS)
        return {"live_over_ce_plus_teacher": live / (ce + fwd), "cache_over_ce": cache / ce}

    per_round = [ratios_of(r) for r in rounds]
    ratios = {key: statistics.median(x[key] for x in per_round) for key in per_round[0]}
    ratios["rounds"] = per_round
    med = {c: statistics.median(r[c]["step_s"] for r in rounds) for c in CONFIGS}
    rss = {c: max(r[c]["peak_rss_mb"] for r in rounds) for c in CONFIGS}
    tokens = args.batch_size * args.seq_len
    rows = "\n".join(f"| {c} | {med[c]:.3f} | {tokens / med[c]:.0f} | {rss[c]:.0f} |" for c in CONFIGS)
    spread = ", ".join(f"{x['live_over_ce_plus_teacher']:.3f} / {x['cache_over_ce']:.3f}" for x in per_round)
    text = f"""
## Distillation step throughput (bench/kd_step.py)

`python bench/kd_step.py --steps {args.steps} --batch-size {args.batch_size} --seq-len {args.seq_len} --dtype {args.dtype} --rounds {args.rounds}`
on {platform.machine()} ({torch.get_num_threads()} threads, shared, noisy), {datetime.now(timezone.utc):%Y-%m-%d},
torch {torch.__version__}, compute dtype {rounds[0]["ce"]["dtype"]}. Student: SmolLM2-135M shape cut to 15 layers /
MLP 1024 (~68M params); teacher: SmolLM2-135M; cache: top-64 + tail. Step time: median over steps 2..N of a
run, then median over {args.rounds} interleaved rounds; each run a separate process (peak RSS is the largest of
its runs); teacher forward = the full forward to logits. Ratios: median over rounds of the in-round ratio
(per round, live / cached: {spread}).

| config | s / step | tokens / s | peak RSS MB |
|---|---|---|---|
{rows}

live KD / (CE + teacher forward) = **{ratios["live_over_ce_plus_teacher"]:.3f}** (target <= 1.15);
cached KD / CE = **{ratios["cache_over_ce"]:.3f}** (target <= 1.10).
"""
    print(text)
    print(json.dumps(ratios))
    if args.dry:
        return
    with open(Path(__file__).with_name("RESULTS.md"), "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
