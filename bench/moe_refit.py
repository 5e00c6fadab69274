"""Reconstruction of MoE students (``whelp prune --reconstruct none|lsq|span`` on a mixture-of-experts teacher):
one-shot held-out perplexity per mode and target, over calibration seeds.

No real MoE checkpoint is on this machine, so the teacher is a small Qwen3-MoE (4 layers, hidden 128, 16 experts of
FFN 128, top-2, renormalised) trained from random init on pydoc:train with a 1,024-token BPE (bench/prune_quality.py's
``--moe`` teacher on 128-token blocks; far more steps memorise the training split); the held-out text is pydoc:eval
(the toy has seen no general English, so no general-English column would mean anything). Targets: half the experts; half the experts and half of each expert's
FFN; three quarters of the hidden channels with 12 experts. Each cell is the median over calibration draws of the
one-shot perplexity, and the wall time of the prune (calibration + surgery + refit).

    python bench/moe_refit.py [--steps 200] [--calib-blocks 64] [--seeds 0 1] [--json F] [--dry]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from prune_quality import _bpe, toy_moe
from publish import publish

from whelp.data import read_documents, token_stream
from whelp.evals.perplexity import perplexity
from whelp.pruning import api
from whelp.specs import PruneSpec

SEQ = 128
TARGETS = {
    "experts 16 -> 8": "num_experts=8",
    "experts 16 -> 8, FFN 128 -> 64": "num_experts=8,moe_intermediate_size=64",
    "hidden 128 -> 96, experts 16 -> 12": "hidden_size=96,num_experts=12",
}
MODES = ("none", "lsq", "span")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--calib-blocks", type=int, default=64)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dry", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    start = time.time()
    docs = read_documents("pydoc:train")
    tokenizer = _bpe(docs, 1024)
    model, blocks, _ = toy_moe(token_stream(docs, tokenizer), len(tokenizer), args.steps, SEQ)
    eval_ids = token_stream(read_documents("pydoc:eval"), tokenizer, args.eval_tokens)

    def ppl(m) -> float:
        return perplexity(m, eval_ids, seq_len=SEQ).ppl

    results = {"teacher": ppl(model), "rows": {}}
    for name, target in TARGETS.items():
        for mode in MODES:
            cell = results["rows"].setdefault(name, {}).setdefault(mode, {"ppl": [], "seconds": []})
            for seed in args.seeds:
                order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
                calib = blocks[order[: args.calib_blocks]]
                t = time.perf_counter()
                student = api.prune(model, target, calib, PruneSpec(calib_samples=args.calib_blocks, reconstruct=mode))
                cell["seconds"].append(time.perf_counter() - t)
                cell["ppl"].append(ppl(student))
                print(f"{name:40s} {mode:5s} seed {seed} {cell['ppl'][-1]:.2f}", file=sys.stderr, flush=True)
    results["minutes"] = (time.time() - start) / 60
    publish(report(results, args), results, args.json, args.dry)


def report(results: dict, args) -> str:
    head = "| target | " + " | ".join(f"{m}: ppl" for m in MODES) + " | " + " | ".join(f"{m}: s" for m in MODES)
    lines = [head + " |", "|---" * (1 + 2 * len(MODES)) + "|"]
    for name, cells in results["rows"].items():
        ppls = [f"{statistics.median(cells[m]['ppl']):.2f}" for m in MODES]
        secs = [f"{statistics.median(cells[m]['seconds']):.1f}" for m in MODES]
        lines.append(f"| {name} | " + " | ".join(ppls + secs) + " |")
    seeds = " ".join(map(str, args.seeds))
    return "\n".join(
        [
            "## Reconstruction of MoE students (bench/moe_refit.py)\n",
            f"`python bench/moe_refit.py --steps {args.steps} --calib-blocks {args.calib_blocks} --seeds {seeds}`: "
            f"a Qwen3-MoE of 4 layers, hidden 128, 16 experts of FFN 128, top-2 (renormalised), trained {args.steps} "
            f"steps of 16 x {SEQ} tokens of pydoc:train (teacher ppl {results['teacher']:.2f} on pydoc:eval); "
            f"calibration {args.calib_blocks} x {SEQ} tokens of pydoc:train per seed; one-shot perplexity on the "
            f"first {args.eval_tokens} tokens of pydoc:eval (median over seeds {seeds}); s: the prune's wall time. "
            f"{results['minutes']:.1f} min in all.\n",
            *lines,
            "",
        ]
    )


if __name__ == "__main__":
    main()
