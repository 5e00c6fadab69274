"""Start-up time of the commands that need no model: ``whelp --help``, ``whelp show``, ``whelp validate``.

Each command runs in a fresh process, alternating with ``whelp --help`` so both see the same machine load; the
median of N runs and the ratio to ``--help`` are printed (and appended to bench/RESULTS.md with --write). ``show``
reads a recipe and imports only the torch-free specs, so it should cost about what ``--help`` costs; ``validate``
also counts parameters on the meta device and checks data sources and task names, so it imports torch and
transformers. The cost does not grow with the corpus or the model: nothing is read but configs and the recipe.

    python bench/cli_startup.py --runs 10 [--write]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "help": ["--help"],
    "show tiny": ["show", "tiny"],
    "show llama-3.2-3b": ["show", "llama-3.2-3b"],
    "validate llama-3.2-3b": ["validate", "llama-3.2-3b"],
}


def seconds(args: list[str]) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "whelp", *args], capture_output=True, env=env)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"whelp {' '.join(args)} failed: {done.stderr.decode()[-500:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    seconds(["validate", "llama-3.2-3b"])  # warm the caches (lm-eval's task index) once
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.runs):
        for name, cmd in COMMANDS.items():  # alternating: every command sees the same load
            times[name].append(seconds(cmd))
    help_median = statistics.median(times["help"])
    rows = [
        f"| `whelp {' '.join(COMMANDS[n])}` | {statistics.median(t):.2f} | {statistics.median(t) / help_median:.2f}x |"
        for n, t in times.items()
    ]
    table = "\n".join(["| command | median s | vs --help |", "|---|---|---|", *rows])
    print(table)
    if args.write:
        stamp = datetime.date.today().isoformat()
        text = (
            f"\n## CLI start-up ({stamp}, {platform.machine()}, {os.cpu_count()} cores)\n\n"
            f"`python bench/cli_startup.py --runs {args.runs} --write`: median of {args.runs} alternating fresh "
            f"processes each.\n\n{table}\n"
        )
        with open(Path(__file__).parent / "RESULTS.md", "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
