"""What `whelp eval` pays to measure speed and peak memory of N model directories: one SpeedProcess (imports torch
once, forks a child per model) against one fresh process per model (the previous design), side by side.

Rounds alternate the two ways; each way measures the same N directories, so the speed and peak numbers must agree
(they come from the same kind of child) and only the wall time may differ. Appends a section to bench/RESULTS.md.

    python bench/speed_process.py [--model smollm2-135m] [--models 3] [--rounds 3] [--write]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

from whelp.evals.speed import SpeedProcess
from whelp.models import locate
from whelp.specs import EvalSpec, SpeedSpec

SPEC = EvalSpec(speed=SpeedSpec(prompt_len=16, new_tokens=4, repeats=1))


def shared(names: list[str]) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    with SpeedProcess() as process:
        results = [process.measure(name, SPEC) for name in names]
    return time.perf_counter() - start, results


def fresh(names: list[str]) -> tuple[float, list[dict]]:
    start, results = time.perf_counter(), []
    for name in names:
        with SpeedProcess() as process:
            results.append(process.measure(name, SPEC))
    return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--models", type=int, default=3, help="directories per evaluation (a build's eval has 3)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    names = [locate(args.model)] * args.models
    walls, peaks = {"shared": [], "fresh": []}, {"shared": [], "fresh": []}
    for _ in range(args.rounds):
        for way, run in (("shared", shared), ("fresh", fresh)):
            wall, results = run(names)
            walls[way].append(wall)
            peaks[way] += [r["peak_memory_bytes"] / 2**20 for r in results]
    med = {way: statistics.median(w) for way, w in walls.items()}
    lines = [
        f"\n## Speed measurement of {args.models} model directories ({datetime.date.today()}, "
        f"{platform.machine()}, {os.cpu_count()} cores)",
        "",
        f"`python bench/speed_process.py --model {args.model} --models {args.models} --rounds {args.rounds}`: "
        f"median wall of {args.rounds} alternating rounds (prompt 16, 4 decode steps, 1 repeat).",
        "",
        "| way | median wall s | per model s | peak MiB (min-max over models) | vs fresh |",
        "|---|---|---|---|---|",
    ]
    for way in ("fresh", "shared"):
        lines.append(
            f"| {way} | {med[way]:.2f} | {med[way] / args.models:.2f} | "
            f"{min(peaks[way]):.0f}-{max(peaks[way]):.0f} | {med['fresh'] / med[way]:.2f}x |"
        )
    print("\n".join(lines))
    if args.write:
        with open("bench/RESULTS.md", "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
