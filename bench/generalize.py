"""Which lever keeps a distilled student's general English? Matched tokens and matched wall time on the demo.

The demo teacher (SmolLM2-135M) is pruned to the demo shape, ``smollm2-half`` (half its non-embedding parameters),
and distilled with the demo recipe's batch, length, lr and loss, the same number of steps in every run, by:

  (a) the demo recipe today: calibration and training on pydoc (the Python reference)
  (b) teacher-generated text (``whelp generate`` from BOS: what the teacher itself says; sequence-level KD)
  (c) on-policy distillation on pydoc prompts, F = 0.5 and F = 1.0 (the student samples, the teacher scores)
  (d) the mixtures: teacher text + pydoc, 25/75 and 50/50, for calibration and training
  (e) CE only (no teacher) on the same mixture

Every run is scored every ``--eval-every`` steps on pydoc:eval (the training domain, held out) and on general
English that no run trains on: the built-in ``licenses`` corpus and vim's user manual (``usr_*.txt`` of Debian's vim
runtime, when present). Matched tokens: every run's last score. Matched wall time: every run's score at the last
evaluation within the wall time of the cheapest run, counting the generation that (b), (d) and (e) need.

    python bench/generalize.py [--steps 16] [--gen-tokens 32768] [--json FILE] [--dry]
    python bench/generalize.py --only "(d) mixture 25" --merge FILE --json FILE   # add runs to a saved result
    python bench/generalize.py --only - --merge FILE --dry                        # only print a saved result

Cost: generation is O(tokens x length) (KV cache), training O(steps); on-policy micro-batches add ``G`` cached decode
steps of the student per micro-batch. Memory is one teacher and one student (the loop is the product's).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from publish import publish

VIM = Path("/usr/share/vim")
WORK = Path(__file__).resolve().parent / "results" / "generalize"


def vim_manual(work: Path) -> str | None:
    """A directory holding vim's user manual (usr_*.txt), copied so the source is plain text files."""
    found = sorted(VIM.glob("vim*/doc/usr_*.txt"))
    if not found:
        return None
    out = work / "vim-manual"
    out.mkdir(parents=True, exist_ok=True)
    for path in found:
        shutil.copy2(path, out / path.name)
    return str(out)


def configs(gen: str, args) -> dict[str, dict]:
    """name -> (pruned student's calibration key, DistillSpec changes, with a teacher?)."""
    mix = f"{gen}:0.5,pydoc:train:0.5"
    return {
        "(a) pydoc (today)": dict(calib="pydoc", data="pydoc:train"),
        "(d) mixture 25/75": dict(calib="mix25", data=f"{gen}:0.25,pydoc:train:0.75"),
        "(b) teacher text": dict(calib="pydoc", data=gen),
        "(c) on-policy F=0.5": dict(calib="pydoc", data="pydoc:train", on_policy=0.5, gen_tokens=args.gen_len),
        "(c) on-policy F=1.0": dict(calib="pydoc", data="pydoc:train", on_policy=1.0, gen_tokens=args.gen_len),
        "(d) mixture 50/50": dict(calib="mix", data=mix),
        "(e) CE only, mixture 50/50": dict(calib="mix", data=mix, ce_weight=1.0, teacher=False),
    }


def scores(model, texts: dict[str, torch.Tensor], seq_len: int) -> dict[str, float]:
    from whelp.evals.perplexity import perplexity

    with torch.no_grad():
        out = {name: perplexity(model, ids, seq_len, batch_size=8).ppl for name, ids in texts.items()}
    return out


def run(name: str, cfg: dict, student_dir: Path, teacher, texts, spec, offset_s: float) -> dict:
    """One distillation in process, scored every ``eval_every`` steps; wall time excludes the scoring."""
    from whelp.data import open_blocks
    from whelp.distillation import loop, parallel, state
    from whelp.models import load_model

    cfg = dict(cfg)
    with_teacher = cfg.pop("teacher", True)
    cfg.pop("calib")
    spec = replace(spec, **cfg)
    lm, tokenizer = load_model(str(student_dir))
    blocks = open_blocks(spec.data, tokenizer, spec.seq_len, seed=spec.seed)
    world = parallel.World(0, 1, torch.device("cpu"), owns_group=False)
    torch.manual_seed(spec.seed)
    teachers = [teacher] if with_teacher else []
    t = state.setup(lm, teachers, [], [1.0] * len(teachers), ["teacher"] * len(teachers), blocks, spec, world)
    curve = [{"step": 0, "wall_s": offset_s, **scores(t.model, texts, spec.seq_len)}]
    t.model.train()
    clock = {"train": 0.0, "mark": time.perf_counter()}

    def on_step(row: dict) -> None:
        clock["train"] += time.perf_counter() - clock["mark"]
        if row["step"] % spec.monitor.eval_every == 0 or row["step"] == t.steps:
            curve.append(
                {"step": row["step"], "wall_s": offset_s + clock["train"], **scores(t.model, texts, spec.seq_len)}
            )
            t.model.train()
            print(json.dumps({name: curve[-1]}), flush=True)
        clock["mark"] = time.perf_counter()

    loop.train(t, on_step=on_step)
    return {"curve": curve, "train_s": clock["train"], "final": curve[-1]}


def matched_wall(results: dict, generation: bool) -> float:
    return min(_wall(r, r["final"], generation) for r in results.values())


def _wall(result: dict, point: dict, generation: bool) -> float:
    """Seconds to reach ``point``, with or without the generation its data needed (the curve's first wall)."""
    return point["wall_s"] - (0.0 if generation else result["curve"][0]["wall_s"])


def at_wall(result: dict, wall: float, generation: bool) -> dict | None:
    """The run's last evaluation within ``wall`` seconds (None: its generation alone took longer)."""
    within = [point for point in result["curve"] if _wall(result, point, generation) <= wall + 1e-6]
    return within[-1] if within else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--gen-tokens", type=int, default=32768, help="teacher-generated tokens for (b), (d), (e)")
    parser.add_argument("--gen-len", type=int, default=64, help="on-policy: tokens the student samples per row")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", nargs="+", help="run only these configurations (their letters and words, as named)")
    parser.add_argument(
        "--merge",
        type=Path,
        help="add the runs to the results in this --json file (same settings; its teacher text is reused)",
    )
    parser.add_argument("--dry", action="store_true", help="print, do not append to bench/RESULTS.md")
    args = parser.parse_args()

    from whelp.data import stream_tokens
    from whelp.data.generate import generate_store
    from whelp.models import load_model, registered_dir
    from whelp.pruning.api import prune_checkpoint
    from whelp.specs import DistillSpec, GenerateSpec, PruneSpec

    t_start = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    teacher_dir = str(registered_dir("smollm2-135m"))
    teacher, tokenizer = load_model(teacher_dir)
    teacher.requires_grad_(False)
    texts = {
        "pydoc:eval": stream_tokens("pydoc:eval", tokenizer, args.eval_tokens),
        "licenses": stream_tokens("licenses", tokenizer, args.eval_tokens),
    }
    vim = vim_manual(WORK)
    if vim:
        texts["vim manual"] = stream_tokens(vim, tokenizer, args.eval_tokens)
    gen = WORK / "teacher-text"
    previous = json.loads(args.merge.read_text()) if args.merge else None
    t0 = time.perf_counter()
    if previous is None:
        generate_store(
            teacher_dir, gen, GenerateSpec(max_tokens=args.gen_tokens, batch_size=64, new_tokens=256), force=True
        )
    gen_s = previous["generate_s"] if previous else time.perf_counter() - t0
    chosen = {
        name: cfg
        for name, cfg in configs(str(gen), args).items()
        if not args.only or any(name.startswith(prefix) for prefix in args.only)
    }
    pruned, prune_s = {}, {}
    calibs = {"pydoc": "pydoc:calib", "mix": f"{gen}:0.5,pydoc:calib:0.5", "mix25": f"{gen}:0.25,pydoc:calib:0.75"}
    for key, calib in calibs.items():
        if key not in {cfg["calib"] for cfg in chosen.values()}:
            continue
        t0 = time.perf_counter()
        report = prune_checkpoint(
            teacher_dir,
            "smollm2-half",
            WORK / f"pruned-{key}",
            PruneSpec(calib=calib, calib_samples=32, seq_len=args.seq_len),
            force=True,
        )
        pruned[key], prune_s[key] = WORK / f"pruned-{key}", time.perf_counter() - t0
    spec = DistillSpec(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup=args.warmup,
        eval_every=args.eval_every,
        dtype="float32",
    )
    results = previous or {
        "teacher": scores(teacher, texts, args.seq_len),
        "params": report["params"],
        "generate_s": gen_s,
        "prune_s": {},
        "runs": {},
        "wall_min": 0.0,
    }
    results["prune_s"].update(prune_s)
    for name, cfg in chosen.items():
        offset = gen_s if str(gen) in cfg["data"] else 0.0
        results["runs"][name] = run(name, cfg, pruned[cfg["calib"]], teacher, texts, spec, offset)
    results["runs"] = {name: results["runs"][name] for name in configs(str(gen), args) if name in results["runs"]}
    results["wall_min"] += (time.perf_counter() - t_start) / 60
    record(results, args, list(texts))


def record(results: dict, args, names: list[str]) -> None:
    teacher = results["teacher"]

    def cells(point: dict) -> str:
        return " | ".join(f"{point[n]:.1f} ({point[n] / teacher[n]:.2f}x)" for n in names)

    header = "| run | " + " | ".join(f"ppl {n} (x teacher)" for n in names) + " | wall s |"
    rule = "|---|" + "---|" * (len(names) + 1)
    tokens = [header, rule, f"| teacher | {cells(teacher)} | - |"]
    for name, r in results["runs"].items():
        if name.startswith(("(a)", "(d)")):
            calib = "pydoc" if name.startswith("(a)") else f"the {name.split()[-1]} mixture"
            tokens.append(f"| pruned, calibrated on {calib} | {cells(r['curve'][0])} | - |")
        tokens.append(f"| {name} | {cells(r['final'])} | {r['final']['wall_s']:.0f} |")
    walls = {}
    for generation in (True, False):
        wall = matched_wall(results["runs"], generation)
        rows = [header, rule]
        for name, r in results["runs"].items():
            point = at_wall(r, wall, generation)
            if point is None:
                rows.append(
                    f"| {name} | "
                    + " | ".join(["not started: generating its data took longer"] * len(names))
                    + " | - |"
                )
            else:
                rows.append(f"| {name} (step {point['step']}) | {cells(point)} | {_wall(r, point, generation):.0f} |")
        walls[generation] = (wall, "\n".join(rows))
    text = f"""
## Generalization: which lever keeps general English (bench/generalize.py)

`python bench/generalize.py --steps {args.steps} --gen-tokens {args.gen_tokens} --gen-len {args.gen_len} \
--eval-tokens {args.eval_tokens}` on {platform.machine()} CPU (fp32), {datetime.now(timezone.utc):%Y-%m-%d}, torch \
{torch.__version__}, total {results["wall_min"]:.1f} min. SmolLM2-135M pruned to `smollm2-half` \
({results["params"]["after"]:,} of {results["params"]["before"]:,} params), {args.steps} steps of {args.batch_size} \
x {args.seq_len} tokens each run (AdamW lr {args.lr}, warmup {args.warmup} + cosine, forward KL on data, reverse KL \
on the student's samples, G = {args.gen_len}). Teacher text: {args.gen_tokens:,} tokens sampled from BOS at T = 1 \
in {results["generate_s"]:.0f} s (counted in the wall time of the runs that train on it). Perplexity over the first \
{args.eval_tokens} tokens of each text; licenses and the vim manual are general English no run trains on.

Matched training tokens ({args.steps * args.batch_size * args.seq_len:,} each):

{chr(10).join(tokens)}

Matched wall time, generation counted ({walls[True][0]:.0f} s, the cheapest run's; each run at its last
evaluation within it):

{walls[True][1]}

Matched training wall time, generation not counted (a one-off that every run on the same text reuses;
{walls[False][0]:.0f} s):

{walls[False][1]}
"""
    publish(text, results, args.json, args.dry)


if __name__ == "__main__":
    main()
