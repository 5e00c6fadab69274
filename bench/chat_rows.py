"""Distillation throughput when chat rows train by CE alone: the live teacher on every row (as before) against the
text rows only (``whelp.distillation.loop.teacher_rows``).

Runs the demo build's own distillation (its pruned student, its chat store and pydoc:train, 75% / 25%, ``chat_loss``
"ce", forward KL + 0.5 CE on text) for ``--steps`` steps with ``whelp distill``, each configuration in its own
process, in ``--rounds`` interleaved rounds (the machine is shared): the ratio is taken within a round, the median
over rounds is reported, with the held-out perplexity at the end (the two must train the same model). The saving
grows with the chat share of the mixture and the teacher's size relative to the student: the teacher's backbone
forward (2 N_teacher FLOPs a token) is skipped on every chat row, against the student's forward and backward on it.

    python bench/chat_rows.py [--build runs/smollm2-demo] [--steps 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

# the loop as it ran before: live teachers on every row
EVERY_ROW = "import sys, whelp.distillation.loop as L; L.teacher_rows = lambda *a: None; from whelp.cli import app; "
EVERY_ROW += "sys.argv[0] = 'whelp'; app(prog_name='whelp')"


def stage(build: Path, kind: str) -> Path:
    found = sorted(build.glob(f"stages/*-{kind}-*[0-9a-f]"))
    if not found:
        sys.exit(f"{build} has no {kind} stage: run `bash scripts/demo.sh {build}` first")
    return found[0]


def run(config: str, args, out: Path) -> dict:
    data = f"{stage(args.build, 'generate')}:0.75,pydoc:train:0.25"
    cli = [str(stage(args.build, "prune")), "--teacher", "smollm2-135m", "--data", data, "--steps", str(args.steps)]
    cli += ["--batch-size", "8", "--seq-len", "256", "--lr", "4e-4", "--warmup", "4", "--ce-weight", "0.5"]
    cli += ["--chat-loss", "ce", "--eval-tokens", "1024", "--force", "--out", str(out)]
    head = ["-c", EVERY_ROW] if config == "every row" else ["-m", "whelp"]
    subprocess.run([sys.executable, *head, "distill", *cli], check=True, capture_output=True)
    report = json.loads((out / "distill_report.json").read_text())
    return {"wall_s": report["wall_s"], "tok_s": report["tokens"] / report["wall_s"], "ppl": report["eval_end"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--build", type=Path, default=Path("runs/smollm2-demo"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            rounds.append({c: run(c, args, Path(tmp) / f"{r}-{c[:4]}") for c in ("every row", "text rows")})
    ratio = statistics.median(r["every row"]["wall_s"] / r["text rows"]["wall_s"] for r in rounds)
    lines = [
        f"\n## Chat rows by CE alone: no teacher forward on them (bench/chat_rows.py, "
        f"{datetime.now(timezone.utc):%Y-%m-%d}, {platform.machine()}, 2 cores)\n",
        f"`python bench/chat_rows.py --steps {args.steps} --rounds {args.rounds}`: the demo's distillation, "
        f"{args.steps} steps x 8 x 256 tokens (75% chat rows), wall time of `whelp distill` (model load and the "
        "two held-out evaluations included).\n",
        "| round | teacher on every row: s (tok/s) | text rows only: s (tok/s) | held-out ppl (every / text) |",
        "|---|---|---|---|",
    ]
    for i, r in enumerate(rounds):
        a, b = r["every row"], r["text rows"]
        lines.append(
            f"| {i} | {a['wall_s']:.1f} ({a['tok_s']:.0f}) | {b['wall_s']:.1f} ({b['tok_s']:.0f}) | "
            f"{a['ppl']['eval_ppl']:.4f} / {b['ppl']['eval_ppl']:.4f} |"
        )
    lines.append(f"\nMedian speed-up {ratio:.2f}x.\n")
    text = "\n".join(lines)
    print(text)
    with open(Path(__file__).parent / "RESULTS.md", "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
