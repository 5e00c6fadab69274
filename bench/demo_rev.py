"""A stage of the demo as an earlier commit ran it and as this tree runs it, side by side.

``--stage generate``: the demo recipe's chat generation (Magpie self-instruct, its sampling settings) by the teacher.
``--stage prune``: the demo recipe's prune (its target, importance, calibration mixture and size, span refit with
OBS selection), read from the recipe through whelp's own loader, over the chat store of a demo build. ``--stage
eval``: one pruned student evaluated as the recipe's eval stage evaluates each model (perplexity on its texts, its
lm-eval task, its chat requests answered greedily, speed), the student its own reference, in a fresh
``$WHELP_HOME`` so that nothing is read from the eval cache; ``--chat-batch-size`` is passed to a code that has it
(commits before da41089 decoded ``--batch-size`` requests together).

The earlier commit (``--before``, default ``HEAD``) is exported with ``git archive`` and put first on ``PYTHONPATH``
(each process starts outside the checkout), so each configuration is one ``whelp`` process of its own code; ``--rounds``
rounds, interleaved (the machine is shared), the ratio taken within a round and the median reported. The check column
must agree: the generated stores' bytes; the prune's largest weight difference and whether it kept the same MLP
neurons; the eval's answers, which must be the same text, and its perplexities.

Cost: generation grows with the tokens asked for (a step per new token of each batch; each step a forward of the
batch and the sampling over the vocabulary); the prune grows linearly with calibration tokens and layers (a fixed
number of layer passes each, plus one float64 Gram of the layer's MLP width per calibration batch); the eval grows
with its texts' tokens and requests, greedy decoding paying a fixed overhead per step, so its time falls with the
batch until the batch's compute dominates.

    python bench/demo_rev.py --stage generate|prune|eval [--build runs/smollm2-demo] [--before REV] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from demo_speedups import stage
from publish import publish
from safetensors.torch import load_file

from whelp import recipe, store
from whelp.build import plan_stages

ROOT = Path(__file__).resolve().parents[1]


def generated(demo, build_dir: Path) -> dict[str, str]:
    """``{generate step name: its store}`` in ``build_dir`` (the build's own stage directories, by their keys)."""
    stages, _ = plan_stages(demo, build_dir)
    dirs = [build_dir / "stages" / s.dirname for s in stages if s.kind == "generate"]
    if not all(d.is_dir() for d in dirs):
        sys.exit(f"{build_dir} lacks the demo's generate stages: run `bash scripts/demo.sh {build_dir}` first")
    return {step.name: str(d) for step, d in zip(demo.generate, dirs, strict=True)}


def arguments(args, out: Path, chat_batch: bool) -> list[str]:
    demo = recipe.load("smollm2-demo")
    if args.stage == "generate":
        g = demo.generate[0].options  # the chat store
        cli = [
            "generate",
            "smollm2-135m",
            "--chat",
            "--max-tokens",
            str(g.max_tokens),
            "--batch-size",
            str(g.batch_size),
        ]
        cli += ["--new-tokens", str(g.new_tokens), "--request-tokens", str(g.request_tokens), "--seed", str(g.seed)]
        cli += ["--temperature", str(g.temperature), "--top-p", str(g.top_p)]
        return [*cli, "--out", str(out)]
    if args.stage == "prune":
        step, p = demo.prune[0], demo.prune[0].options
        stores = generated(demo, args.build)
        mix = ",".join(f"{stores.get(s.name, s.name)}:{s.weight}" for s in p.calib.sources)
        cli = ["prune", "smollm2-135m", "--target", step.target, "--importance", p.importance]
        cli += ["--layer-importance", p.layer_importance, "--calib", mix, "--calib-samples", str(p.calib_samples)]
        cli += ["--seq-len", str(p.seq_len), "--reconstruct", p.reconstruct, "--select", p.select]
        return [*cli, "--force", "--out", str(out)]
    e = demo.eval
    cli = ["eval", f"pruned={stage(args.build, 'prune')}", "--seq-len", str(demo.data.seq_len)]
    cli += [arg for source in e.ppl for arg in ("--ppl", str(source))]
    cli += ["--tasks", ",".join(e.tasks), "--limit", str(e.limit)]
    cli += ["--chat", e.chat[0], "--chat-limit", str(e.chat_limit), "--batch-size", str(e.batch_size)]
    cli += ["--chat-batch-size", str(e.chat_batch_size)] if chat_batch else []
    return [*cli, "--out", str(out)]


def check(args, out: Path, reference: Path) -> str:
    """What must agree between the two codes: the stores, the weights and kept neurons, or the answers and
    perplexities."""
    if args.stage == "generate":
        same = all((out / f.name).read_bytes() == f.read_bytes() for f in sorted(reference.glob("*.bin")))
        return "the same store" if same else "the stores differ"
    if args.stage == "eval":
        answers, theirs = (
            [json.loads(line)["answers"]["pruned"]["answer"] for line in (d / "answers.jsonl").read_text().splitlines()]
            for d in (out, reference)
        )
        ppl = [json.loads((d / "metrics.json").read_text())["models"][0]["perplexity"] for d in (out, reference)]
        ppls = ", ".join(f"{k} {ppl[1][k]['ppl']:.4f} / {ppl[0][k]['ppl']:.4f}" for k in ppl[0])
        return f"{sum(a == b for a, b in zip(answers, theirs))}/{len(answers)} answers equal; ppl {ppls}"
    mine, theirs = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    diff = max(float((mine[k] - theirs[k]).abs().max()) for k in mine)
    kept = [json.loads((d / "prune_report.json").read_text())["kept"]["mlp"] for d in (out, reference)]
    return f"largest weight difference {diff:.1e}, kept neurons {'equal' if kept[0] == kept[1] else 'differ'}"


def run(code: Path | None, args, out: Path, home: Path) -> float:
    chat_batch = code is None or "chat_batch_size" in (code / "whelp" / "specs" / "evals.py").read_text()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["WHELP_HOME"] = str(home)
    if code is not None:
        env["PYTHONPATH"] = str(code)
    t = time.perf_counter()
    subprocess.run(  # run outside the checkout: ``-m`` puts the working directory first on the path
        [sys.executable, "-m", "whelp", *arguments(args, out, chat_batch)],
        check=True,
        capture_output=True,
        env=env,
        cwd=home,
    )
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", choices=("generate", "prune", "eval"), required=True)
    parser.add_argument("--build", type=Path, default=Path("runs/smollm2-demo"))
    parser.add_argument("--before", default="HEAD", help="the commit to compare with (git rev)")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    rev = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=ROOT, capture_output=True, text=True)
    rev = rev.stdout.strip() or sys.exit(f"--before {args.before}: not a commit of {ROOT}")
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "before"
        old.mkdir()
        archive = subprocess.run(["git", "archive", rev, "whelp"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
        homes = {}
        for name in ("before", "after"):  # the teacher from the cache, no eval results
            homes[name] = Path(tmp) / f"home-{name}"
            homes[name].mkdir()
            (homes[name] / "models").symlink_to(store.whelp_home() / "models")
        env = {**os.environ, "PYTHONPATH": str(old)}
        where = subprocess.run(
            [sys.executable, "-c", "import whelp; print(whelp.__file__)"],
            env=env,
            cwd=tmp,
            capture_output=True,
            text=True,
        ).stdout
        assert where.startswith(str(old)), f"the earlier commit's code is not the one imported: {where}"
        for r in range(args.rounds):
            outs = {name: Path(tmp) / f"{r}-{name}" for name in ("before", "after")}
            walls = {name: run(old if name == "before" else None, args, outs[name], homes[name]) for name in outs}
            for home in homes.values():
                subprocess.run(["rm", "-rf", str(home / "eval-cache")], check=True)
            rounds.append((walls["before"], walls["after"], check(args, outs["after"], outs["before"])))
    ratio = statistics.median(a / b for a, b, _ in rounds)
    lines = [
        f"\n## The demo's {args.stage}: {rev} against this tree (bench/demo_rev.py, "
        f"{datetime.now(timezone.utc):%Y-%m-%d}, {platform.machine()}, {torch.get_num_threads()} threads)\n",
        f"`python bench/demo_rev.py --stage {args.stage} --before {args.before} --rounds {args.rounds}`: wall time of "
        "one `whelp` process each (loading and saving included; the docstring says what each runs).\n",
        f"| round | {rev}: s | this tree: s | check |",
        "|---|---|---|---|",
    ]
    lines += [f"| {i} | {a:.1f} | {b:.1f} | {c} |" for i, (a, b, c) in enumerate(rounds)]
    lines.append(f"\nMedian speed-up {ratio:.2f}x.\n")
    publish("\n".join(lines), {"rounds": [list(r) for r in rounds], "ratio": ratio}, None, dry=False)


if __name__ == "__main__":
    main()
