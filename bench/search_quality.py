"""Does ``whelp search`` pick a better student shape than a hand-picked, a depth-only and a width-only one?

On the demo teacher (SmolLM2-135M) at 50% of its non-embedding parameters (exactly: ``smollm2-half``'s 53,112,384): the searched winner, the hand-picked
``smollm2-half`` (24 layers, MLP 768), the largest depth-only shape (layers alone) and the largest width-only shape
(hidden, MLP, heads, KV heads, head_dim; all 30 layers) within the budget are each pruned (activation importance,
32 pydoc:calib blocks) and distilled with the demo recipe's distillation budget (32 steps of 8 x 256 tokens, lr
4e-4, warmup 4, forward KL + 0.5 CE) on the same pydoc:train tokens, then scored by perplexity on pydoc:eval (the
training domain, held out) and on general English that nothing here trains on: the built-in ``licenses`` corpus
and vim's user manual (when present). Target: the winner is the best or within 2% of the best on both.
Also reported: Spearman of one-shot vs post-training rank (within the search, and over the four shapes), and the
search's cost against K x (S-step distillation) + one calibration.

    python bench/search_quality.py [--pool 8] [--candidates 4] [--score-steps 8] [--steps 32] [--json F] [--dry]

Cost grows with pool x held-out tokens (one-shot forwards) + K x S training steps; memory is the teacher, one
candidate and the teacher's held-out log-probs [eval_blocks, seq_len, V] (8 x 256 x 49,152 fp32 = 0.4 GB).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from generalize import vim_manual
from publish import publish

WORK = Path(__file__).resolve().parent / "results" / "search_quality"


def shapes(search: dict, teacher_cfg, spec) -> dict[str, dict]:
    from whelp.pruning.targets import PRESETS
    from whelp.search import space
    from whelp.search.budget import parse_budget

    counter = space.Counter(teacher_cfg)
    budget = parse_budget(spec.budget, counter.teacher, counter, spec.context)

    def largest(axes: str) -> dict:
        return space.enumerate_shapes(
            teacher_cfg, budget, space.parse_axes(axes), spec.tolerance, spec.multiple, spec.context
        )[0]

    return {
        "searched winner": search["winner"]["shape"],
        "smollm2-half (hand-picked)": dict(PRESETS["smollm2-half"][0]),
        "depth only": largest("layers"),
        "width only": largest("hidden,mlp,heads,kv_heads,head_dim"),
    }


def target_text(shape: dict) -> str:
    keys = (
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
    )
    return ",".join(f"{k}={shape[k]}" for k in keys)


def train_and_score(name: str, shape: dict, teacher, teacher_dir: str, texts: dict, args) -> dict:
    from whelp.architecture import count_params
    from whelp.data import open_blocks
    from whelp.distillation.inprocess import distill
    from whelp.evals.perplexity import perplexity
    from whelp.models import load_model
    from whelp.pruning.api import prune_checkpoint
    from whelp.specs import DistillSpec, PruneSpec

    out = WORK / name.split()[0].replace("(", "")
    prune_checkpoint(teacher_dir, target_text(shape), out, PruneSpec(calib_samples=32, seq_len=256), force=True)
    student, tokenizer = load_model(str(out))
    spec = DistillSpec(
        steps=args.steps,
        batch_size=8,
        seq_len=256,
        lr=4e-4,
        warmup=4,
        ce_weight=0.5,
        data="pydoc:train",
        dtype="float32",
    )
    with torch.no_grad():
        one_shot = perplexity(student, texts["pydoc:eval"], 256, batch_size=8).ppl
    t0 = time.perf_counter()
    blocks = open_blocks(spec.data, tokenizer, spec.seq_len, seed=spec.seed)
    torch.manual_seed(spec.seed)
    student = distill(student, [teacher], blocks, spec, progress=False)
    with torch.no_grad():
        ppl = {text: perplexity(student, ids, 256, batch_size=8).ppl for text, ids in texts.items()}
    result = {
        "shape": shape,
        "non_embedding": count_params(student.config)[1],
        "train_s": time.perf_counter() - t0,
        "one_shot_ppl": one_shot,
        "ppl": ppl,
    }
    print(json.dumps({name: result}), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--score-steps", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument(
        "--reuse-search",
        action="store_true",
        help="take the search from an earlier run's "
        "results/search_quality/search (its own timings; the wall time is then their sum)",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dry", action="store_true", help="print, do not append to RESULTS.md")
    args = parser.parse_args()

    from whelp.data import stream_tokens
    from whelp.models import load_config, load_model, registered_dir
    from whelp.pruning.targets import PRESETS
    from whelp.search import space
    from whelp.search.run import search_run
    from whelp.specs import SearchSpec

    WORK.mkdir(parents=True, exist_ok=True)
    teacher_dir = str(registered_dir("smollm2-135m"))
    # the budget: the hand-picked shape's own size (50.01% of the teacher's non-embedding parameters), so that it
    # and the 15-layer depth-only shape (50.0003%: the final norm's 576 params tip it over an exact 50%) compete
    half = space.Counter(load_config(teacher_dir)).params(dict(PRESETS["smollm2-half"][0]))[1]
    spec = SearchSpec(
        budget=f"non_embedding={half}",
        pool=args.pool,
        candidates=args.candidates,
        score_steps=args.score_steps,
        calib_samples=32,
        batch_size=8,
        lr=4e-4,
    )
    saved = WORK / "search" / "search.json"
    if args.reuse_search and saved.is_file():  # the search of an earlier run of this benchmark, with its timings
        search, search_s = json.loads(saved.read_text()), None
        assert search["spec"]["budget"] == spec.budget, "the saved search had another budget: run without --reuse"
    else:
        t0 = time.perf_counter()
        search = search_run(teacher_dir, spec, WORK / "search", force=True, progress=False)
        search_s = time.perf_counter() - t0
    teacher, tokenizer = load_model(teacher_dir)
    teacher.requires_grad_(False)
    texts = {
        "pydoc:eval": stream_tokens("pydoc:eval", tokenizer, 4096),
        "licenses": stream_tokens("licenses", tokenizer, 4096),
    }
    vim = vim_manual(WORK)
    if vim:
        texts["vim manual"] = stream_tokens(vim, tokenizer, 4096)
    compared: dict[str, dict] = {}
    for name, shape in shapes(search, load_config(teacher_dir), spec).items():
        same = next((c for c in compared.values() if c["shape"] == shape), None)  # the search found a named shape
        compared[name] = dict(same) if same else train_and_score(name, shape, teacher, teacher_dir, texts, args)
    results = {
        "search": search,
        "search_s": search_s,
        "compared": compared,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "spearman_four": space.spearman(
            [c["one_shot_ppl"] for c in compared.values()], [c["ppl"]["pydoc:eval"] for c in compared.values()]
        ),
    }
    publish(report(results, list(texts)), results, args.json, args.dry)


def report(results: dict, texts: list[str]) -> str:
    search, compared = results["search"], results["compared"]
    best = {t: min(c["ppl"][t] for c in compared.values()) for t in texts}
    winner = compared["searched winner"]["ppl"]
    within = all(winner[t] <= 1.02 * best[t] for t in ("pydoc:eval", "licenses"))
    timings = search["timings"]
    budget = sum(c["train_s"] for c in search["leaderboard"]) + timings["calibrate_s"]
    wall = results["search_s"] or budget + timings["one_shot_s"]  # reused: its calibration, pool and training
    a = results["args"]
    lines = [
        f"\n## Shape search on the demo teacher at 50% of its non-embedding parameters ({search['spec']['budget']}) "
        f"({datetime.now(timezone.utc):%Y-%m-%d})\n",
        f"`python bench/search_quality.py --pool {a['pool']} --candidates {a['candidates']} --score-steps "
        f"{a['score_steps']} --steps {a['steps']}` on {platform.machine()}, torch {torch.__version__}. Each shape "
        f"pruned (activation, 32 pydoc:calib blocks) and distilled {a['steps']} steps (8 x 256 tokens, forward KL "
        "+ 0.5 CE) on the same pydoc:train tokens; perplexity on 4,096 held-out tokens of each text.\n",
        "| shape | dims | non-embedding | one-shot ppl pydoc:eval | " + " | ".join(f"ppl {t}" for t in texts) + " |",
        "|---|---|---|---|" + "---|" * len(texts),
    ]
    for name, c in compared.items():
        s = c["shape"]
        dims = (
            f"L{s['num_hidden_layers']} H{s['hidden_size']} I{s['intermediate_size']} "
            f"{s['num_attention_heads']}/{s['num_key_value_heads']}x{s['head_dim']}"
        )
        lines.append(
            f"| {name} | {dims} | {c['non_embedding']:,} | {c['one_shot_ppl']:.1f} | "
            + " | ".join(f"{c['ppl'][t]:.2f}" + (" **best**" if c["ppl"][t] == best[t] else "") for t in texts)
            + " |"
        )
    lines += [
        "",
        f"Target (winner best or within 2% of the best on pydoc:eval and licences): "
        f"**{'met' if within else 'missed'}**. Search: {search['enumerated']:,} shapes in budget, "
        f"{len(search['pool'])} pruned one-shot, {len(search['leaderboard'])} distilled "
        f"{search['spec']['score_steps']} steps; Spearman(one-shot, post-training) within the search = "
        f"{search['spearman_one_shot_vs_trained']:.2f}, over the four shapes above (one-shot vs trained "
        f"pydoc:eval ppl) = {results['spearman_four']:.2f}. Search {'wall' if results['search_s'] else 'compute'} "
        f"{wall:.0f} s vs K x S-step distillation + one calibration = {budget:.0f} s ({wall / budget:.2f}x; the "
        f"rest is the one-shot pool, {timings['one_shot_s']:.0f} s{', and loading' if results['search_s'] else ''})."
        "\n",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
