"""Recover more per token, part one: one-shot perplexity of the demo shape by reconstruction and by published baselines.

The demo teacher (SmolLM2-135M-Instruct) pruned to the demo shape (the shipped demo recipe's prune target: 27 of 30
layers, MLP 1536 -> 854, 60% of the non-embedding parameters; before 2026-12-06 24 layers, MLP 1024, the same count),
calibrated on the same blocks of ``--calib`` (pydoc:calib), without training:

  activation + none | lsq | span | bias   whelp's Minitron importance, then each reconstruction (whelp prune
                                          --reconstruct --select importance; "none" is the sliced weights)
  OBS-selected + lsq | span | span_attn   the MLP neurons chosen layer by layer for the refit by structured OBS
                                          (whelp prune --select obs; ZipLM), then the same refit
  magnitude + none, taylor + none         weight magnitude; first-order Taylor (LLM-Pruner's element-wise criterion)
                                          on whelp's family path at the same shape
  depth only (ShortGPT) + none | span     the same parameter count by layers alone (18 layers, block influence)
  torch-pruning Taylor, width only        LLM-Pruner-style group pruning through torch-pruning's dependency graph
                                          (whelp's generic path): MLP 1536 -> 704 in every layer, the same count

Perplexity on pydoc:eval (the calibration domain, held out) and on general English that calibration never sees: the
built-in licences and vim's user manual (Debian's vim runtime), the first ``--eval-tokens`` of each; each row's wall
time (calibration + surgery + reconstruction). ``--seeds 0 1`` calibrates on two different draws of blocks.

    python bench/recover.py [--calib pydoc:calib] [--calib-blocks 32] [--eval-tokens 16384] [--seeds 0 1]
        [--json FILE] [--dry]

Cost: calibration and reconstruction are O(blocks x layers) forwards (span: the teacher's layers too) plus one
k x k solve per map and layer (k = kept MLP width or head outputs), so they grow with the calibration set and the
model, not with any training corpus; memory is the teacher, the student and the calibration hidden states.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch
from generalize import vim_manual
from publish import publish

from whelp import recipe as recipes
from whelp.architecture import count_params
from whelp.data import Mixture, check_data
from whelp.data.blocks import blocks
from whelp.errors import WhelpError
from whelp.evals.perplexity import perplexity
from whelp.models import load_model
from whelp.pruning import api
from whelp.pruning.generic import prune_generic
from whelp.specs import PruneSpec

WORK = Path(__file__).resolve().parent / "results" / "recover"
DEMO = recipes.load("smollm2-demo").prune[0].target
DEPTH = "num_hidden_layers=18"
WIDTH = {"intermediate_size": 704}
ROWS = {  # name -> (target, PruneSpec changes); None target: torch-pruning's generic path
    "activation + none": (DEMO, dict(reconstruct="none")),
    "activation + lsq": (DEMO, dict(reconstruct="lsq", select="importance")),
    "activation + span": (DEMO, dict(reconstruct="span", select="importance")),
    "activation + bias (FLAP)": (DEMO, dict(reconstruct="bias")),
    "activation, OBS-selected + lsq": (DEMO, dict(reconstruct="lsq", select="obs")),
    "activation, OBS-selected + span": (DEMO, dict(reconstruct="span", select="obs")),
    "activation, OBS-selected + span_attn": (DEMO, dict(reconstruct="span_attn", select="obs")),
    "magnitude + none": (DEMO, dict(importance="magnitude", reconstruct="none")),
    "taylor + none": (DEMO, dict(importance="taylor", reconstruct="none")),
    "depth only (ShortGPT) + none": (DEPTH, dict(reconstruct="none")),
    "depth only (ShortGPT) + span": (DEPTH, dict(reconstruct="span")),
    "torch-pruning taylor, width only (LLM-Pruner-style)": (None, {}),
}


def held_out(tokenizer, n_tokens: int) -> dict[str, torch.Tensor]:
    sources = {"pydoc:eval": "pydoc:eval", "licences": "licenses"}
    vim = vim_manual(WORK)
    if vim:
        sources["vim manual"] = vim
    out = {}
    for name, source in sources.items():
        rows = blocks(source, tokenizer, 512, max_tokens=n_tokens)
        out[name] = rows.head(len(rows)).flatten()[:n_tokens]
    return out


def run_row(teacher, target, changes, calib, n_blocks, seed) -> tuple[object, float]:
    start = time.perf_counter()
    if target is None:
        student, _ = prune_generic(load_model("smollm2-135m")[0], WIDTH, "taylor", calib[:n_blocks], seed)
    else:
        spec = PruneSpec(calib_samples=n_blocks, seed=seed, **changes)
        student = api.prune(teacher, target, calib, spec)
    return student, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-blocks", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--only", nargs="+", default=[""], help="run only the rows whose name contains one of these")
    parser.add_argument(
        "--target",
        default=DEMO,
        help="the shape of the rows pruned to the demo's (the depth and width baselines are sized for the demo's "
        "parameter count and run only there); num_hidden_layers=24,intermediate_size=768 is smollm2-half, the demo "
        "shape issue 30 was filed at",
    )
    parser.add_argument(
        "--calib",
        default="pydoc:calib",
        help="calibration data: a source, store or mixture (a:0.5,b:0.5), e.g. text the teacher sampled itself "
        "(whelp generate TEACHER --out STORE: self-calibration)",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dry", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    try:
        check_data(Mixture.of(args.calib))
    except WhelpError as error:
        parser.error(f"--calib: {error}")
    WORK.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    teacher, tokenizer = load_model("smollm2-135m")
    texts = held_out(tokenizer, args.eval_tokens)

    def ppl(model):
        return {name: perplexity(model, ids, 256, batch_size=8).ppl for name, ids in texts.items()}

    results = {"teacher": {"ppl": ppl(teacher), "params": count_params(teacher.config)[0]}}
    for seed in args.seeds:
        calib = blocks(args.calib, tokenizer, 256, n=args.calib_blocks, seed=seed).head(args.calib_blocks)
        for name, (target, changes) in ROWS.items():
            if not any(part in name for part in args.only) or (args.target != DEMO and target != DEMO):
                continue
            target = args.target if target == DEMO else target
            student, seconds = run_row(teacher, target, changes, calib, args.calib_blocks, seed)
            row = results.setdefault(name, {"seeds": {}, "params": sum(p.numel() for p in student.parameters())})
            row["seeds"][seed] = {"ppl": ppl(student), "seconds": seconds}
            print(f"seed {seed} {name:55s} {row['seeds'][seed]}", file=sys.stderr, flush=True)
    publish(report(results, args), results, args.json, args.dry)


def report(results: dict, args) -> str:
    teacher = results["teacher"]["ppl"]
    names = list(teacher)
    date = datetime.date.today().isoformat()
    lines = [
        f"\n## Reconstruction and one-shot baselines at {'the demo shape' if args.target == DEMO else args.target} "
        f"(bench/recover.py, {date}, {platform.machine()}, {torch.get_num_threads()} threads)\n",
        f"SmolLM2-135M-Instruct -> {args.target}, {args.calib_blocks} blocks x 256 tokens of "
        f"{args.calib}, seeds {' and '.join(map(str, args.seeds))} (calibration draws); perplexity on the first "
        f"{args.eval_tokens:,} tokens of each text (median over seeds, the lower of two; x: multiple of the "
        "teacher's); wall time "
        "of calibration + surgery + reconstruction.\n",
        "| one-shot | params | " + " | ".join(names) + " | x teacher (general English) | s |",
        "|---|---|" + "---|" * (len(names) + 2),
        "| teacher | "
        + f"{results['teacher']['params']:,} | "
        + " | ".join(f"{teacher[n]:.1f}" for n in names)
        + " | 1.00 | - |",
    ]
    for name, row in results.items():
        if name == "teacher":
            continue
        runs = list(row["seeds"].values())
        med = {n: float(torch.tensor([r["ppl"][n] for r in runs]).median()) for n in names}
        general = [med[n] / teacher[n] for n in names if n != "pydoc:eval"]
        seconds = float(torch.tensor([r["seconds"] for r in runs]).median())
        lines.append(
            f"| {name} | {row['params']:,} | "
            + " | ".join(f"{med[n]:.1f}" for n in names)
            + f" | {' / '.join(f'{g:.2f}' for g in general)} | {seconds:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
