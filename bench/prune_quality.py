"""One-shot (no training) perplexity of the demo teacher pruned to fixed shapes, per importance method.

Rows: whelp's family-table path (prune.importance.calibrate/select + prune.surgery.prune_model) with
activation (Minitron), magnitude, Taylor and random importance, and torch-pruning's own group L2
magnitude and Taylor importance through whelp's generic path (prune.generic). Columns: MLP-only 50%,
heads 1/3 (one of the 3 query heads per KV group), hidden 25%, and a combined shape with 50% of the
non-embedding parameters. Appends a markdown table to bench/RESULTS.md.

    python bench/prune_quality.py [--seq-len 256] [--calib-blocks 32] [--eval-tokens 4096]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

from whelp.data import open_blocks, read_documents, token_stream
from whelp.evals.perplexity import perplexity
from whelp.models import count_params, load_model, shape
from whelp.pruning.arch import family_of
from whelp.pruning.generic import apply_generic, generic_scores, select_generic
from whelp.pruning.importance import calibrate, select
from whelp.pruning.surgery import prune_model, target_config

SHAPES = {
    "mlp 50%": {"intermediate_size": 768},
    "heads 1/3": {"num_attention_heads": 6},
    "hidden 25%": {"hidden_size": 432},
    "combined 50%": {"hidden_size": 504, "intermediate_size": 768, "num_attention_heads": 6},
}
WHELP = ("activation", "magnitude", "taylor", "random")
TORCH_PRUNING = ("magnitude", "taylor")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib-blocks", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    args = parser.parse_args()
    start = time.time()
    teacher, tokenizer = load_model(args.model)
    calib = open_blocks("pydoc:calib", tokenizer, args.seq_len).head(args.calib_blocks)
    eval_ids = token_stream(read_documents("pydoc:eval"), tokenizer, args.eval_tokens)
    source = shape(teacher.config)

    def ppl(model) -> float:
        return perplexity(model, eval_ids, seq_len=args.seq_len).ppl

    base = ppl(teacher)
    params = {name: count_params(type(teacher.config).from_dict({**teacher.config.to_dict(), **overrides}))[1]
              for name, overrides in SHAPES.items()}
    rows: dict[str, dict[str, float]] = {}
    family = family_of(teacher.config)
    for method in WHELP:
        scores = calibrate(teacher, family, calib, method)
        rows[f"whelp {method}"] = {}
        for name, overrides in SHAPES.items():
            keep = select(scores, teacher.config, {**source, **overrides})
            rows[f"whelp {method}"][name] = ppl(prune_model(teacher, keep, family, target_config(teacher.config, keep)))
            print(f"whelp {method:10s} {name:13s} {rows[f'whelp {method}'][name]:10.2f}", file=sys.stderr)
    for method in TORCH_PRUNING:
        scores = generic_scores(teacher, method, calib)
        rows[f"torch-pruning {method}"] = {}
        for name, overrides in SHAPES.items():
            keep = select_generic(scores, teacher.config, overrides)
            rows[f"torch-pruning {method}"][name] = ppl(apply_generic(copy.deepcopy(teacher), keep))
            print(f"tp {method:10s} {name:13s} {rows[f'torch-pruning {method}'][name]:10.2f}", file=sys.stderr)
    report(args, base, params, rows, time.time() - start)


def report(args, base: float, params: dict, rows: dict, seconds: float) -> None:
    header = "| importance | " + " | ".join(f"{n} ({params[n] / 1e6:.1f}M)" for n in SHAPES) + " |"
    lines = [header, "|" + "---|" * (len(SHAPES) + 1)]
    lines += [f"| {row} | " + " | ".join(f"{vals[n]:.1f}" for n in SHAPES) + " |" for row, vals in rows.items()]
    act = rows["whelp activation"]
    wins = {n: act[n] < min(rows["whelp magnitude"][n], rows["whelp random"][n]) for n in SHAPES}
    text = "\n".join([
        f"\n## Pruning quality: one-shot perplexity on pydoc:eval ({datetime.date.today()})\n",
        f"`python bench/prune_quality.py --seq-len {args.seq_len} --calib-blocks {args.calib_blocks} "
        f"--eval-tokens {args.eval_tokens}` on {platform.node()} ({platform.machine()}, CPU, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads); {args.model}, fp32, no training after "
        f"pruning. Calibration: {args.calib_blocks} x {args.seq_len} tokens of pydoc:calib; eval: first "
        f"{args.eval_tokens} tokens of pydoc:eval in windows of {args.seq_len}. Teacher ppl {base:.2f}. Column "
        f"headers give non-embedding params (teacher 106.2M). Wall time {seconds / 60:.1f} min.\n",
        *lines,
        "",
        "Activation beats magnitude and random: " + ", ".join(f"{n}: {'yes' if w else 'NO'}" for n, w in wins.items()),
        "",
    ])
    print(text)
    with open(args.results, "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
