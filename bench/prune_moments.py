"""The demo's prune (span reconstruction, structured OBS selection) with the down_proj refit running the layer again
over the kept neurons (as before) against reading the sub-block of the selection's moments (``obs.kept_moments``).

Each configuration is one ``whelp prune`` process, in ``--rounds`` interleaved rounds on the demo build's calibration mixture (its chat store and pydoc:calib); the
ratio is taken within a round and the median reported, with the refit's relative calibration error (the two must
agree). Per layer the saving is one student-layer forward and one k x k float64 Gram over the calibration tokens,
so it grows linearly with the calibration tokens and the layers, like the rest of the prune.

    python bench/prune_moments.py [--build runs/smollm2-demo] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

# the refit as it ran before: the selection's moments dropped, so the layer runs again over the kept neurons
FRESH = "import sys, whelp.pruning.reconstruct as R; c = R.select_mlp; "
FRESH += "R.select_mlp = lambda *a, **k: (c(*a, **k)[0], None); from whelp.cli import app; sys.argv[0] = 'whelp'; "
FRESH += "app(prog_name='whelp')"


def run(config: str, args, out: Path) -> dict:
    store = sorted(args.build.glob("stages/*-generate-*[0-9a-f]"))
    if not store:
        sys.exit(f"{args.build} has no generate stage: run `bash scripts/demo.sh {args.build}` first")
    cli = ["smollm2-135m", "--target", "num_hidden_layers=24,intermediate_size=1024", "--importance", "activation"]
    cli += ["--layer-importance", "block", "--calib", f"{store[0]}:0.25,pydoc:calib:0.75", "--calib-samples", "64"]
    cli += ["--seq-len", "256", "--reconstruct", "span", "--select", "obs", "--force", "--out", str(out)]
    head = ["-c", FRESH] if config == "fresh pass" else ["-m", "whelp"]
    t = time.perf_counter()
    subprocess.run([sys.executable, *head, "prune", *cli], check=True, capture_output=True)
    wall = time.perf_counter() - t
    report = json.loads((out / "prune_report.json").read_text())
    return {"wall_s": wall, "error": report["reconstruct"]["down_proj"]["after"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--build", type=Path, default=Path("runs/smollm2-demo"))
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            rounds.append({c: run(c, args, Path(tmp) / f"{r}-{c[:5]}") for c in ("fresh pass", "shared")})
    ratio = statistics.median(r["fresh pass"]["wall_s"] / r["shared"]["wall_s"] for r in rounds)
    lines = [
        f"\n## Prune: the refit reads the OBS selection's moments (bench/prune_moments.py, "
        f"{datetime.now(timezone.utc):%Y-%m-%d}, {platform.machine()}, 2 cores)\n",
        f"`python bench/prune_moments.py --rounds {args.rounds}`: the demo's prune (L24 I1024, span, OBS, 64 x 256 "
        "calibration tokens), wall time of `whelp prune` (load and save included).\n",
        "| round | layer run again: s | selection's moments: s | down_proj relative error (again / shared) |",
        "|---|---|---|---|",
    ]
    for i, r in enumerate(rounds):
        a, b = r["fresh pass"], r["shared"]
        lines.append(f"| {i} | {a['wall_s']:.1f} | {b['wall_s']:.1f} | {a['error']:.9f} / {b['error']:.9f} |")
    lines.append(f"\nMedian speed-up {ratio:.2f}x.\n")
    text = "\n".join(lines)
    print(text)
    with open(Path(__file__).parent / "RESULTS.md", "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
