"""Recover more per token, part two: the distillation levers at matched FLOPs on the demo.

The demo recipe (SmolLM2-135M-Instruct pruned to its shape with the span reconstruction, distilled on its
self-instructed chat data and pydoc) built by ``whelp build`` itself, one recipe per variant, all in one build
directory so they share the generate and prune stages (and the teacher's and pruned student's answers, from the eval
cache). Each variant spends the FLOPs of the demo's distillation (``whelp plan``'s per-token FLOPs: student
training + live teacher):

  (a) logit-only KD               the demo's distill step (forward KL + 0.5 CE)
  (b) + hidden states             (a) + ``hidden_weight`` x normalised MSE between each student layer and the end of
                                  the teacher span it replaces (Minitron; the extra term costs no matmul)
  (c) local, then global          a block-local stage (``distill.local``: each block maps the teacher's state at its
                                  span's start to the state at its end; no lm_head) of L steps, then global KD for
                                  the steps its FLOPs leave
  (d) dynamic mixture             (a) with ``--mixture dynamic`` (Sheared-LLaMA's rule, the teacher as reference)
  (e) all three                   (c) with the global stage of (b) and (d)

Scores: behaviour on ``chat:general`` (all its requests, none trained on), greedy, 64 new tokens (looping, ending
the turn, accuracy on checkable requests and how many of those the teacher gets right the student keeps); perplexity
on pydoc:eval (the training domain, held out) and on general English no stage trains on: the licences and vim's user
manual (first 16K tokens each); the distill stages' wall time. Two seeds of the data order (``--seeds``).

    python bench/recover_kd.py [--seeds 0 1] [--only (a),(b)] [--local-steps 12] [--json FILE] [--dry]

Cost: every variant is O(steps x batch x seq_len) tokens through the student (forward + backward) and the live
teacher (forward), the same FLOPs by construction; a local step skips the lm_head (V x H of each model) and the
vocabulary softmax, which at the demo's 49K vocabulary is 30% of the student's and 21% of the teacher's FLOPs a token.
The dynamic mixture adds one forward of the dev blocks per source every K steps (about 1%). Memory is the demo's.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml
from chat_distill import _cell, flat, kept
from generalize import vim_manual
from publish import publish

from whelp import recipe as recipes
from whelp.plan.stages import plan_recipe

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "results" / "recover_kd"
PPL_TOKENS = 16384
HIDDEN_WEIGHT = 1.0


def base_recipe(ppl: list[str]) -> dict:
    base = yaml.safe_load((ROOT / "whelp" / "recipes" / "smollm2-demo.yaml").read_text())
    base["name"] = "recover-kd"
    base["eval"] = {"ppl": ppl, "chat": ["chat:general"], "tasks": [], "max_tokens": PPL_TOKENS}
    return base


def write(name: str, raw: dict) -> Path:
    path = WORK / "recipes" / f"{hashlib.sha256(name.encode()).hexdigest()[:12]}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def per_token_flops(path: Path) -> dict[str, float]:
    """``whelp plan``'s FLOPs per token of each student stage (``distill[0]``, ``local[0]``)."""
    stages = plan_recipe(recipes.load(str(path)))["stages"]
    return {
        s["stage"]: s["flops_per_token"]["student_train"] + s["flops_per_token"]["live_teachers"]
        for s in stages
        if s["kind"] == "distill"
    }


def variants(base: dict, local_steps: int) -> dict[str, dict]:
    """The recipe of every variant; (c)'s global steps are the demo's less the local stage's FLOPs."""
    steps = base["distill"]["steps"]
    probe = copy.deepcopy(base)
    probe["distill"]["local"] = {"steps": local_steps, "lr": 0.001}
    flops = per_token_flops(write("probe", probe))
    global_steps = round(steps - local_steps * flops["local[0]"] / flops["distill[0]"])
    local = copy.deepcopy(probe)
    local["distill"]["steps"] = global_steps
    local["distill"]["warmup"] = min(base["distill"]["warmup"], global_steps - 1)
    hidden, dynamic = copy.deepcopy(base), copy.deepcopy(base)
    hidden["distill"]["hidden_weight"] = HIDDEN_WEIGHT
    dynamic["distill"]["mixture"] = "dynamic"
    combined = copy.deepcopy(local)
    combined["distill"].update(hidden_weight=HIDDEN_WEIGHT, mixture="dynamic")
    return {
        "(a) logit-only KD": base,
        f"(b) + hidden states (weight {HIDDEN_WEIGHT:g})": hidden,
        f"(c) local {local_steps} steps, then global {global_steps}": local,
        "(d) dynamic mixture": dynamic,
        "(e) (c) + (b) + (d)": combined,
    }


def run(name: str, raw: dict, seed: int) -> dict:
    """One variant's build at data-order ``seed``: its distill stages' wall time (from their reports), its final
    ``metrics.json`` and which checkable requests each model answers correctly."""
    raw = copy.deepcopy(raw)
    raw["distill"]["seed"] = seed
    path = write(f"{name}/{seed}", raw)
    t0 = time.perf_counter()
    build = WORK / "build"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([sys.executable, "-m", "whelp", "build", str(path), "--out", str(build)], check=True, env=env)
    wall = time.perf_counter() - t0
    stages = build / "stages"
    train_s = sum(
        json.loads(p.read_text())["wall_s"]
        for p in stages.glob("*/distill_report.json")
        if p.parent.name.split("-", 1)[1].startswith(("local", "distill"))
    )
    final = build / "final"
    rows = [json.loads(line) for line in (final / "answers.jsonl").read_text().splitlines()]
    correct = {label: [r["index"] for r in rows if r["answers"][label]["correct"]] for label in rows[0]["answers"]}
    metrics = json.loads((final / "metrics.json").read_text())
    return {"build_s": wall, "train_s": train_s, "metrics": metrics, "correct": correct}


COLUMNS = [
    ("chat:general/loop", "loop", "{:.0%}"),
    ("chat:general/ended", "ended", "{:.0%}"),
    ("chat:general/accuracy", "correct", "{:.0%}"),
    ("ppl:pydoc:eval", "ppl pydoc:eval", "{:.2f}"),
    ("ppl:licenses", "ppl licences", "{:.1f}"),
]


def table(results: dict, vim: str | None) -> str:
    cols = COLUMNS + ([(f"ppl:{vim}", "ppl vim manual", "{:.1f}")] if vim else [])
    head = "| model | seed | " + " | ".join(c[1] for c in cols) + " | teacher-right kept | train wall |"
    lines = [head, "|---" * (len(cols) + 4) + "|"]
    first = next(iter(results.values()))
    for model in first["metrics"]["models"][:2]:  # the teacher and the one-shot pruned student, in every run
        row = flat(model)
        lines.append(f"| {model['label']} | - | " + " | ".join(_cell(row, k, f) for k, _, f in cols) + " | - | - |")
    for key, r in results.items():
        name, seed = key.rsplit(" @", 1)
        model = r["metrics"]["models"][-1]
        cells = " | ".join(_cell(flat(model), k, f) for k, _, f in cols)
        lines.append(
            f"| {name} | {seed} | {cells} | {kept(r['correct'], model['label'])} | {r['train_s'] / 60:.1f} min |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--only", default=None, help="comma-separated variant prefixes, e.g. '(a),(c)'")
    parser.add_argument("--local-steps", type=int, default=12)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--dry", action="store_true", help="print, do not append to RESULTS.md")
    args = parser.parse_args()
    vim = vim_manual(WORK)
    base = base_recipe(["pydoc:eval", "licenses"] + ([vim] if vim else []))
    chosen = variants(base, args.local_steps)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if any(k.startswith(p) for p in args.only.split(","))}
    results = {}
    for seed in args.seeds:
        for name, raw in chosen.items():
            results[f"{name} @{seed}"] = run(name, raw, seed)
            if args.json:
                args.json.write_text(json.dumps(results, indent=2))
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    text = (
        f"\n## Distillation levers at matched FLOPs on the demo (bench/recover_kd.py, {stamp}, {platform.machine()}, "
        f"{os.cpu_count()} cores)\n\n"
        "The demo's shape, data and FLOPs; behaviour on all of chat:general (held out), greedy, 64 new tokens; "
        "perplexity on the held-out training domain and on general English no stage trains on.\n\n"
        + table(results, vim)
        + "\n"
    )
    publish(text, results, args.json, args.dry)


if __name__ == "__main__":
    main()
