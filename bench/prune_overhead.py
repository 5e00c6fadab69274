"""Calibration overhead of activation importance: time of ``importance.calibrate`` / time of a plain
forward over the same tokens, in the same batches, on the demo teacher (target <= 1.3).

Runs are interleaved (forward, calibrate, forward, ...) and the median of the per-pair ratios is
reported, since this machine is shared. Appends a section to bench/RESULTS.md.

    OMP_NUM_THREADS=2 .venv/bin/python bench/prune_overhead.py [--blocks 8] [--seq-len 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from whelp import data, models
from whelp.pruning import arch, importance


@torch.no_grad()
def plain_forward(model, tokens: torch.Tensor, batch_size: int) -> None:
    for i in range(0, len(tokens), batch_size):
        model(input_ids=tokens[i : i + batch_size])


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model, tokenizer = models.load_model("smollm2-135m")
    family = arch.family_of(model.config)
    tokens = data.open_blocks("pydoc:calib", tokenizer, args.seq_len).head(args.blocks)
    plain_forward(model, tokens[: args.batch_size], args.batch_size)  # warm-up
    forward_s, calib_s = [], []
    for _ in range(args.repeats):
        forward_s.append(timed(lambda: plain_forward(model, tokens, args.batch_size)))
        calib_s.append(timed(lambda: importance.calibrate(model, family, tokens, "activation", args.batch_size)))
    ratios = [c / f for c, f in zip(calib_s, forward_s)]
    ratio = statistics.median(ratios)
    n_tokens = tokens.numel()
    lines = [
        "",
        f"## prune calibration overhead ({datetime.date.today().isoformat()})",
        "",
        f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')} python {' '.join(sys.argv)}` on "
        f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs (shared), torch {torch.__version__}, fp32.",
        f"Demo teacher smollm2-135m, {args.blocks} blocks x {args.seq_len} tokens = {n_tokens:,} tokens, "
        f"batch {args.batch_size}, {args.repeats} interleaved repeats.",
        "",
        "| run | plain forward (s) | activation calibration (s) | ratio |",
        "|---|---|---|---|",
        *(f"| {i + 1} | {f:.2f} | {c:.2f} | {c / f:.3f} |" for i, (f, c) in enumerate(zip(forward_s, calib_s))),
        "",
        f"Median ratio calibration / forward: **{ratio:.3f}** (target <= 1.3): {'met' if ratio <= 1.3 else 'NOT met'}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(Path(__file__).parent / "RESULTS.md", "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
