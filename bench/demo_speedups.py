"""The demo build's two stages, each before and after the work nothing read was dropped, side by side.

``--stage distill``: its distillation (its pruned student, its chat store and pydoc:train, 75% / 25%, ``chat_loss``
"ce", forward KL + 0.5 CE on text) for ``--steps`` steps with the live teacher on every row (as before) against the
text rows only (``DistillSpec.teacher_skips_chat_rows``), with the held-out perplexity at the end (the two must train
the same model). The saving grows with the chat share of the mixture and the teacher's size against the student's:
the teacher's backbone forward (2 N_teacher FLOPs a token) is skipped on every chat row.

``--stage prune``: its prune (L24 I1024, span, OBS, 64 x 256 calibration tokens) with the down_proj refit running the
layer again over the kept neurons (as before) against reading the sub-block of the selection's moments
(``obs.kept_moments``), with the refit's relative calibration error (the two must agree). Per layer the saving is one
student-layer forward and one k x k float64 Gram over the calibration tokens: linear in calibration tokens and layers,
like the rest of the prune.

Each configuration is one ``whelp`` process, in ``--rounds`` interleaved rounds (the machine is shared); the ratio is
taken within a round and the median reported. Wall times include loading and saving.

    python bench/demo_speedups.py --stage distill|prune [--build runs/smollm2-demo] [--steps 8] [--rounds 2]
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

from publish import publish

APP = "from whelp.cli import app; sys.argv[0] = 'whelp'; app(prog_name='whelp')"
BEFORE = {  # the code as it ran before, patched in for one process
    "distill": "import sys; from whelp.specs import DistillSpec; "
    "DistillSpec.teacher_skips_chat_rows = property(lambda self: False); " + APP,
    "prune": "import sys, whelp.pruning.reconstruct as R; c = R.select_mlp; "
    "R.select_mlp = lambda *a, **k: (c(*a, **k)[0], None); " + APP,
}
TITLES = {
    "distill": "Chat rows by CE alone: no teacher forward on them",
    "prune": "Prune: the refit reads the OBS selection's moments",
}


def stage(build: Path, kind: str) -> Path:
    found = sorted(build.glob(f"stages/*-{kind}-*[0-9a-f]"))
    if not found:
        sys.exit(f"{build} has no {kind} stage: run `bash scripts/demo.sh {build}` first")
    return found[0]


def arguments(args, out: Path) -> list[str]:
    chat = stage(args.build, "generate")
    if args.stage == "distill":
        cli = [str(stage(args.build, "prune")), "--teacher", "smollm2-135m", "--steps", str(args.steps)]
        cli += ["--data", f"{chat}:0.75,pydoc:train:0.25", "--batch-size", "8", "--seq-len", "256", "--lr", "4e-4"]
        cli += ["--warmup", "4", "--ce-weight", "0.5", "--chat-loss", "ce", "--eval-tokens", "1024"]
    else:
        cli = ["smollm2-135m", "--target", "num_hidden_layers=24,intermediate_size=1024", "--importance", "activation"]
        cli += ["--layer-importance", "block", "--calib", f"{chat}:0.25,pydoc:calib:0.75", "--calib-samples", "64"]
        cli += ["--seq-len", "256", "--reconstruct", "span", "--select", "obs"]
    return [args.stage, *cli, "--force", "--out", str(out)]


def run(before: bool, args, out: Path) -> dict:
    head = ["-c", BEFORE[args.stage]] if before else ["-m", "whelp"]
    t = time.perf_counter()
    subprocess.run([sys.executable, *head, *arguments(args, out)], check=True, capture_output=True)
    wall = time.perf_counter() - t
    if args.stage == "distill":
        report = json.loads((out / "distill_report.json").read_text())
        return {"wall_s": wall, "check": f"{report['eval_end']['eval_ppl']:.4f}"}
    report = json.loads((out / "prune_report.json").read_text())
    return {"wall_s": wall, "check": f"{report['reconstruct']['down_proj']['after']:.9f}"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", choices=sorted(BEFORE), required=True)
    parser.add_argument("--build", type=Path, default=Path("runs/smollm2-demo"))
    parser.add_argument("--steps", type=int, default=8, help="distillation steps (--stage distill)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            rounds.append([run(before, args, Path(tmp) / f"{r}-{before}") for before in (True, False)])
    ratio = statistics.median(a["wall_s"] / b["wall_s"] for a, b in rounds)
    check = "held-out ppl" if args.stage == "distill" else "down_proj relative error"
    lines = [
        f"\n## {TITLES[args.stage]} (bench/demo_speedups.py, {datetime.now(timezone.utc):%Y-%m-%d}, "
        f"{platform.machine()}, 2 cores)\n",
        f"`python bench/demo_speedups.py --stage {args.stage} --steps {args.steps} --rounds {args.rounds}`: wall time "
        "of the demo's stage, before and after (the docstring says what each runs).\n",
        f"| round | before: s | after: s | {check} (before / after) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {i} | {a['wall_s']:.1f} | {b['wall_s']:.1f} | {a['check']} / {b['check']} |"
        for i, (a, b) in enumerate(rounds)
    ]
    lines.append(f"\nMedian speed-up {ratio:.2f}x.\n")
    publish("\n".join(lines), {"rounds": rounds, "ratio": ratio}, None, dry=False)


if __name__ == "__main__":
    main()
