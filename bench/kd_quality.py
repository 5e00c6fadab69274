"""Does distillation beat plain CE at matched tokens? The demo teacher pruned to ~50% parameters, then trained.

1. Prune SmolLM2-135M to the demo recipe's shape, ``smollm2-half`` (24 layers, MLP 768: half the non-embedding
   parameters), with the demo's settings (activation importance, 32 x 256 calibration tokens).
2. "Teacher correction" (Minitron, Sreenivas et al. 2024, arXiv:2408.11796): fine-tune the teacher briefly on the
   train split (a CE-only ``distill`` run of the teacher itself) to get a second teacher.
3. At every budget in ``--steps``, train the pruned student on the same tokens with (a) CE only, (b) KD from the
   teacher, (c) KD from both teachers (``--corrected-weight`` on the corrected one), (d) KD from the corrected
   teacher alone.
4. Held-out perplexity of every model on ``pydoc:eval`` and on the GPL-3 licence text (out of domain: tells
   whether training on pydoc forgot general text).

    python bench/kd_quality.py [--steps 32 128] [--seed 0] [--json FILE]     # one seed: ~5 min on one H100
    python bench/kd_quality.py --summarize FILE [FILE ...]                    # statistics over seeds

Defaults are the configuration bench/RESULTS.md reports: the demo recipe's batch, length and lr at its budget
(32 x 8 x 256 = 65,536 tokens, 0.85 epochs of pydoc:train) and at 4x that; the teacher corrected for 128 steps at
lr 1e-4; KD runs mix 0.5 CE into the loss (Hinton et al. 2015). On a 2-core CPU one seed takes about 3 hours.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from publish import publish

GPL = "/usr/share/common-licenses/GPL-3"
TARGET = "smollm2-half"
TEXTS = ("pydoc:eval", "GPL-3")
CE = "(a) CE only"


def heldout(model_dir: str, texts: dict[str, torch.Tensor], seq_len: int) -> dict[str, float]:
    """Perplexity of a saved model on each held-out token stream (fp32, windows of seq_len)."""
    from whelp.evals.perplexity import perplexity
    from whelp.models import load_model

    model, _ = load_model(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    return {name: perplexity(model, ids, seq_len).ppl for name, ids in texts.items()}


def students(teacher: str, corrected: str, w: float, kd: dict) -> dict[str, dict]:
    """The four ways to spend the same tokens: keyword arguments of ``distill`` for each."""
    return {
        CE: dict(ce_weight=1.0, teachers=()),
        "(b) KD teacher": dict(kd, teachers=((teacher, 1.0),)),
        "(c) KD teacher + corrected": dict(kd, teachers=((teacher, 1 - w), (corrected, w))),
        "(d) KD corrected teacher": dict(kd, teachers=((corrected, 1.0),)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, nargs="+", default=[32, 128], help="one or more budgets, in steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--teacher-steps", type=int, default=128)
    parser.add_argument("--teacher-lr", type=float, default=1e-4)
    parser.add_argument("--temperature", type=float, default=1.0, help="KD temperature of (b)-(d)")
    parser.add_argument("--kd-ce-weight", type=float, default=0.5, help="CE weight mixed into (b)-(d)")
    parser.add_argument("--corrected-weight", type=float, default=0.5, help="weight of the corrected teacher in (c)")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0, help="data order of every run (the correction uses seed + 1)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--dry", action="store_true", help="print, do not append to bench/RESULTS.md")
    parser.add_argument("--summarize", type=Path, nargs="+", help="only print seed statistics of saved --json files")
    args = parser.parse_args()
    if args.summarize:
        print(summarize([json.loads(path.read_text()) for path in args.summarize]))
        return

    from whelp.data import read_documents, token_stream
    from whelp.distillation.inprocess import distill
    from whelp.models import load_tokenizer, registered_dir
    from whelp.pruning.api import PruneSpec, prune_checkpoint
    from whelp.specs import DistillSpec

    t_start = time.perf_counter()
    teacher = str(registered_dir("smollm2-135m"))
    tokenizer = load_tokenizer(teacher)
    texts = {
        "pydoc:eval": token_stream(read_documents("pydoc:eval"), tokenizer, args.eval_tokens),
        "GPL-3": token_stream([Path(GPL).read_text()], tokenizer, args.eval_tokens),
    }
    spec = DistillSpec(
        data="pydoc:train",
        steps=args.steps[0],
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup=args.warmup,
        eval_tokens=2048,
        seed=args.seed,
    )
    kd = dict(temperature=args.temperature, ce_weight=args.kd_ce_weight)
    results = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "budgets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pruned = prune_checkpoint(teacher, TARGET, root / "pruned", PruneSpec(calib_samples=32, seq_len=256))
        corrected = root / "teacher_ft"
        correction = replace(spec, steps=args.teacher_steps, ce_weight=1.0, lr=args.teacher_lr, seed=args.seed + 1)
        distill(teacher, corrected, correction, progress=False)
        results["params"] = pruned["params"]
        results["references"] = {
            name: heldout(path, texts, args.seq_len)
            for name, path in {
                "teacher": teacher,
                "corrected teacher": str(corrected),
                "pruned (no training)": str(root / "pruned"),
            }.items()
        }
        for steps in args.steps:
            rows = {}
            for name, kwargs in students(teacher, str(corrected), args.corrected_weight, kd).items():
                out, t0 = root / "student", time.perf_counter()
                teachers = kwargs.pop("teachers")
                distill(
                    str(root / "pruned"), out, replace(spec, steps=steps, **kwargs), teachers=teachers, progress=False
                )
                rows[name] = dict(heldout(str(out), texts, args.seq_len), train_s=time.perf_counter() - t0)
                shutil.rmtree(out)
                shutil.rmtree(out.with_name(out.name + ".distill"), ignore_errors=True)
            results["budgets"][steps] = rows
            print(json.dumps({steps: rows}), flush=True)
    results["wall_min"] = (time.perf_counter() - t_start) / 60
    record(results, args)


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (bf16 autocast)"
    return f"{platform.machine()} CPU (fp32)"


def verdict(rows: dict) -> str:
    """Which KD runs beat CE on each text (lower perplexity)."""
    ce = rows[CE]
    wins = {text: [name[:3] for name, v in rows.items() if name != CE and v[text] < ce[text]] for text in TEXTS}
    return "; ".join(f"{text}: {', '.join(w) or 'none'} beat CE" for text, w in wins.items())


def summarize(runs: list[dict]) -> str:
    """Markdown table over runs that differ only in ``seed``: per budget and student, the mean (min-max)
    perplexity of each text and on how many seeds it beat that seed's CE run."""
    configs = {
        json.dumps({k: v for k, v in r["args"].items() if k not in ("seed", "json", "dry", "steps")}, sort_keys=True)
        for r in runs
    }
    if len(configs) != 1:
        raise SystemExit(f"--summarize takes runs of one configuration (seeds apart), got {len(configs)}")
    lines = [
        "| training steps | student | " + " | ".join(f"ppl {t} mean (min-max) | beats CE" for t in TEXTS) + " |",
        "|---|---|" + "---|---|" * len(TEXTS),
    ]
    for steps in sorted({s for r in runs for s in r["budgets"]}, key=int):
        seeds = [r["budgets"][steps] for r in runs if steps in r["budgets"]]
        for name in seeds[0]:
            cells = []
            for text in TEXTS:
                v = [rows[name][text] for rows in seeds]
                wins = sum(rows[name][text] < rows[CE][text] for rows in seeds)
                cells.append(
                    f"{sum(v) / len(v):.2f} ({min(v):.2f}-{max(v):.2f}) | "
                    + ("-" if name == CE else f"{wins}/{len(v)}")
                )
            lines.append(f"| {steps} | {name} | " + " | ".join(cells) + " |")
    return f"{next(iter(configs))}, seeds {sorted(r['args'].get('seed', 0) for r in runs)}\n\n" + "\n".join(lines)


def record(results: dict, args) -> None:
    refs = "\n".join(
        f"| {name} | - | {v['pydoc:eval']:.2f} | {v['GPL-3']:.2f} | - |" for name, v in results["references"].items()
    )
    lines = []
    for steps, rows in results["budgets"].items():
        tokens = steps * args.batch_size * args.seq_len
        lines += [
            f"| {name} | {tokens:,} | {v['pydoc:eval']:.2f} | {v['GPL-3']:.2f} | {v['train_s']:.0f} |"
            for name, v in rows.items()
        ]
    verdicts = "\n".join(f"- {steps} steps: {verdict(rows)}" for steps, rows in results["budgets"].items())
    params = results["params"]
    text = f"""
## KD vs CE at matched tokens on the pruned demo teacher (bench/kd_quality.py)

`python bench/kd_quality.py --steps {" ".join(map(str, args.steps))} --batch-size {args.batch_size} --seq-len \
{args.seq_len} --lr {args.lr} --warmup {args.warmup} --teacher-steps {args.teacher_steps} \
--teacher-lr {args.teacher_lr} --seed {args.seed} --temperature {args.temperature} --kd-ce-weight {args.kd_ce_weight} \
--corrected-weight {args.corrected_weight} \
--eval-tokens {args.eval_tokens}` on {machine()}, {datetime.now(timezone.utc):%Y-%m-%d}, torch {torch.__version__},
total {results["wall_min"]:.1f} min. SmolLM2-135M pruned to `{TARGET}` ({params["after"]:,} of {params["before"]:,}
params, {params["after"] / params["before"]:.0%}; activation importance, 32 x 256 calibration tokens); every
student trains on the same pydoc:train tokens (AdamW lr {args.lr}, warmup {args.warmup} + cosine). Second teacher:
the teacher fine-tuned with CE for {args.teacher_steps} steps (lr {args.teacher_lr}). Perplexity over the first
{args.eval_tokens} tokens of each text, windows of {args.seq_len}, fp32.

| model | training tokens | ppl pydoc:eval | ppl GPL-3 | train s |
|---|---|---|---|---|
{refs}
{chr(10).join(lines)}

{verdicts}
"""
    publish(text, results, args.json, args.dry)


if __name__ == "__main__":
    main()
