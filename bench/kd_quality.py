"""Does distillation beat plain CE at matched tokens? The demo teacher pruned to ~50% parameters, then trained.

1. Prune SmolLM2-135M to the demo recipe's shape, ``smollm2-half`` (24 layers, MLP 768: half the non-embedding
   parameters), with the demo's settings (activation importance, 32 x 256 calibration tokens).
2. "Teacher correction" (Minitron, Sreenivas et al. 2024): fine-tune the teacher briefly on the train split
   (a CE-only ``distill`` run of the teacher itself) to get a second teacher.
3. Train the pruned student at the same token budget with (a) CE only, (b) KD from the teacher,
   (c) KD from both teachers (weights 0.5 / 0.5).
4. Held-out perplexity of every model on ``pydoc:eval`` and on the GPL-3 licence text.

    python bench/kd_quality.py [--steps 32] [--batch-size 8] [--seq-len 256] [--eval-tokens 8192]

The defaults are the demo recipe's training budget (32 x 8 x 256 = 65,536 tokens, lr 4e-4, warmup 4): about
35 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

GPL = "/usr/share/common-licenses/GPL-3"
TARGET = "smollm2-half"


def heldout(model_dir: str, texts: dict[str, torch.Tensor], seq_len: int) -> dict[str, float]:
    """Perplexity of a saved model on each held-out token stream (fp32, windows of seq_len)."""
    from whelp.evals.perplexity import perplexity
    from whelp.models import load_model

    model, _ = load_model(model_dir)
    return {name: perplexity(model, ids, seq_len).ppl for name, ids in texts.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--teacher-steps", type=int, default=16)
    parser.add_argument("--teacher-lr", type=float, default=5e-5)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--dry", action="store_true", help="print, do not append to bench/RESULTS.md")
    args = parser.parse_args()

    from whelp.data import read_documents, token_stream
    from whelp.distill.loop import DistillSpec, distill
    from whelp.models import load_tokenizer, registered_dir
    from whelp.prune.api import PruneSpec, prune_checkpoint

    t_start = time.perf_counter()
    teacher = str(registered_dir("smollm2-135m"))
    tokenizer = load_tokenizer(teacher)
    texts = {"pydoc:eval": token_stream(read_documents("pydoc:eval"), tokenizer, args.eval_tokens),
             "GPL-3": token_stream([Path(GPL).read_text()], tokenizer, args.eval_tokens)}
    spec = DistillSpec(data="pydoc:train", steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                       lr=args.lr, warmup=args.warmup, eval_tokens=2048, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pruned = prune_checkpoint(teacher, TARGET, root / "pruned", PruneSpec(calib_samples=32, seq_len=256))
        corrected = root / "teacher_ft"
        distill(teacher, corrected, replace(spec, steps=args.teacher_steps, ce_weight=1.0, lr=args.teacher_lr, seed=1),
                progress=False)
        runs = {"CE only": dict(spec=replace(spec, ce_weight=1.0)),
                "KD teacher": dict(spec=spec, teachers=((teacher, 1.0),)),
                "KD teacher + corrected teacher": dict(spec=spec, teachers=((teacher, 0.5), (str(corrected), 0.5)))}
        timings = {}
        for name, kwargs in runs.items():
            t0 = time.perf_counter()
            distill(str(root / "pruned"), root / name.replace(" ", "_"), progress=False, **kwargs)
            timings[name] = time.perf_counter() - t0
        models = {"teacher": teacher, "corrected teacher": str(corrected), "pruned (no training)": str(root / "pruned"),
                  **{name: str(root / name.replace(" ", "_")) for name in runs}}
        ppl = {name: heldout(path, texts, args.seq_len) for name, path in models.items()}
    record(ppl, timings, pruned["params"], args, time.perf_counter() - t_start)


def record(ppl: dict, timings: dict, params: dict, args, wall: float) -> None:
    tokens = args.steps * args.batch_size * args.seq_len
    rows = "\n".join(f"| {name} | {v['pydoc:eval']:.2f} | {v['GPL-3']:.2f} | {timings.get(name, float('nan')):.0f} |"
                     for name, v in ppl.items())
    text = f"""
## KD vs CE at matched tokens on the pruned demo teacher (bench/kd_quality.py)

`python bench/kd_quality.py --steps {args.steps} --batch-size {args.batch_size} --seq-len {args.seq_len} --lr {args.lr} \
--warmup {args.warmup} --teacher-steps {args.teacher_steps} --teacher-lr {args.teacher_lr} --eval-tokens {args.eval_tokens}` on {platform.machine()} (shared 2 cores),
{datetime.now(timezone.utc):%Y-%m-%d}, torch {torch.__version__}, total {wall / 60:.1f} min.
SmolLM2-135M pruned to `{TARGET}` ({params['after']:,} of {params['before']:,} params,
{params['after'] / params['before']:.0%}; activation importance, 32 x 256 calibration tokens), then
{tokens:,} training tokens of pydoc:train for every student (dtype auto = fp32 on CPU, AdamW lr {args.lr}, warmup {args.warmup} +
cosine). Second teacher: the teacher fine-tuned with CE for {args.teacher_steps} steps (lr {args.teacher_lr}). Perplexity over
the first {args.eval_tokens} tokens of each text, windows of {args.seq_len}, fp32.

| model | ppl pydoc:eval | ppl GPL-3 | train s |
|---|---|---|---|
{rows}
"""
    print(text)
    print(json.dumps(ppl))
    if not args.dry:
        with open(Path(__file__).with_name("RESULTS.md"), "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
