"""Speed and peak memory of the demo teacher as `whelp eval` measures them, side by side per configuration.

Each configuration runs in its own process (a child of whelp.evals.speed.SpeedProcess, as in `whelp eval`), so
peak memory is that configuration's alone. Appends a section to bench/RESULTS.md.

    python bench/eval_speed.py [--model smollm2-135m] [--results bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform

from whelp.evals.speed import SpeedProcess
from whelp.specs import EvalSpec, SpeedSpec

CONFIGS = [("float32", 1), ("float32", 4), ("bfloat16", 1), ("bfloat16", 4)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--results", default="bench/RESULTS.md")
    args = parser.parse_args()
    rows = []
    with SpeedProcess() as process:
        for dtype, batch in CONFIGS:
            speed = SpeedSpec(batch_size=batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens)
            rows.append((dtype, batch, process.measure(args.model, EvalSpec(dtype=dtype, speed=speed))))
            print(rows[-1])
    base = rows[0][2]
    lines = [
        f"\n## Eval speed and peak memory ({datetime.date.today()}, {platform.machine()}, "
        f"{os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})",
        "",
        f"`python bench/eval_speed.py --model {args.model}` - prompt {args.prompt_len} tokens, "
        f"{args.new_tokens} greedy decode steps, median of 3 after a warm-up, one process of its own per row; "
        f"peak = {base['peak_memory_method']}. Shared machine: compare ratios.",
        "",
        "| dtype | batch | prefill tok/s | decode tok/s | peak MiB | prefill x fp32/b1 | decode x fp32/b1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for dtype, batch, r in rows:
        lines.append(
            f"| {dtype} | {batch} | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | "
            f"{r['peak_memory_bytes'] / 2**20:.0f} | "
            f"{r['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:.2f} | "
            f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f} |"
        )
    with open(args.results, "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
