"""Which lever keeps the demo student an assistant? Chat data, response-only KD, on-policy on chat, CE alone.

The demo teacher (SmolLM2-135M-Instruct) is pruned to the demo's shape (its recipe's ``prune.target``), calibrated on
the demo's calibration mixture (the chat store in place of its generated data), and distilled at the demo's budget
(its steps, batch, length, lr) by ``whelp build`` itself, one recipe per variant, all in one build directory so the
variants share the prune stage (and the teacher's scores, from the eval cache):

  (a) the demo recipe before chat data: a quarter the teacher's text sampled from BOS, three quarters pydoc
  (b) (a) with self-instructed chat data (``whelp generate --chat``, Magpie) in the mixture, response-only KD
  (c) response-only KD on the chat data alone
  (d) (b), the last quarter of the steps on-policy at F = 0.25 and F = 0.5 (the student answers the chat prompts,
      the teacher scores its answers)
  (e) CE alone (no KD term) on the chat data of (c): sequence-level KD / SFT on the teacher's answers

Scores: behaviour on ``chat:general`` (prompts written for whelp, none of them trained on: the chat data is the
teacher's own requests) through the teacher's template, greedy, 64 new tokens (share looping, share ending its
turn, accuracy on checkable answers, format instructions followed, the teacher's NLL of the answers, ROUGE-L to the
teacher's answers); perplexity on pydoc:eval (the training domain, held out) and on general English no run trains
on: the built-in ``licenses`` and vim's user manual (Debian's vim runtime, when present; its first 16K tokens);
wall time of the build.

    python bench/chat_distill.py [--only NAME,...] [--json FILE] [--dry] [--chat-tokens N]

Cost: generation is O(conversations x length) with the KV cache (the chat store is made once and shared); each
variant is one distillation (O(steps)) and one evaluation (O(models x prompts x new tokens)); on-policy
micro-batches add up to ``gen_tokens`` cached decode steps of the student each.
"""

from __future__ import annotations

import argparse
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
from generalize import vim_manual
from publish import publish

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "results" / "chat_distill"
WHELP = [sys.executable, "-m", "whelp"]
PPL_TOKENS = 16384  # per perplexity source: all of pydoc:eval and the licences, the first 16K of the vim manual


def whelp(*args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([*WHELP, *args], check=True, env=env, cwd=ROOT)


def stores(chat_tokens: int) -> dict[str, str]:
    """The two generated stores every variant reads: the demo's teacher text and the self-instructed chat data."""
    demo = yaml.safe_load((ROOT / "recipes" / "smollm2-demo.yaml").read_text())
    text, chat = WORK / "text-store", WORK / "chat-store"
    gen = demo["generate"][0]  # the chat step (the second samples from BOS, as the text store below)
    if "chat" not in gen or not gen["chat"]:
        raise SystemExit("the demo recipe's generate stage is expected to be chat data")
    whelp("generate", "smollm2-135m", "--out", str(text), "--max-tokens", "8192", "--batch-size", "64")
    whelp(
        "generate",
        "smollm2-135m",
        "--out",
        str(chat),
        "--chat",
        "--max-tokens",
        str(chat_tokens),
        *sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in gen.items() if k not in ("chat", "max_tokens")), []),
    )
    return {"text": str(text), "chat": str(chat)}


def variants(data: dict[str, str]) -> dict[str, dict]:
    """Recipe overrides per variant (``data.train`` and ``distill`` keys)."""
    text, chat = data["text"], data["chat"]
    before = [{"source": text, "weight": 0.25}, {"source": "pydoc:train", "weight": 0.75}]
    mixed = [
        {"source": chat, "weight": 0.5},
        {"source": text, "weight": 0.125},
        {"source": "pydoc:train", "weight": 0.375},
    ]
    return {
        "(a) text + pydoc (before)": {"train": before, "distill": {}},
        "(b) + chat data": {"train": mixed, "distill": {}},
        "(c) chat data alone": {"train": chat, "distill": {}},
        "(d) (b) + on-policy 0.25, last quarter": {
            "train": mixed,
            "distill": {"on_policy": 0.25, "on_policy_from": 24},
        },
        "(d) (b) + on-policy 0.5, last quarter": {"train": mixed, "distill": {"on_policy": 0.5, "on_policy_from": 24}},
        "(e) CE only on chat data": {"train": chat, "distill": {"ce_weight": 1.0}},
    }


def recipe(name: str, change: dict, data: dict[str, str], ppl: list[str]) -> Path:
    base = yaml.safe_load((ROOT / "recipes" / "smollm2-demo.yaml").read_text())
    base.pop("generate", None)
    base["name"] = "chat-bench"
    base["data"]["calib"] = [  # the demo's BOS step read as this bench's BOS text (8K tokens sampled at batch 64)
        {**part, "source": {"generated": data["chat"], "bos": data["text"]}.get(part["source"], part["source"])}
        for part in base["data"]["calib"]
    ]
    base["data"]["train"] = change["train"]
    base["distill"].update(change["distill"])
    if "on_policy" in change["distill"]:
        base["distill"]["gen_tokens"] = 64
    base["eval"] = {"ppl": ppl, "chat": ["chat:general"], "tasks": [], "max_tokens": PPL_TOKENS}
    path = WORK / "recipes" / f"{hashlib.sha256(name.encode()).hexdigest()[:12]}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


def run(name: str, path: Path) -> dict:
    """One variant's build: its wall time, its final ``metrics.json`` and, from ``answers.jsonl``, which checkable
    requests each model answers correctly."""
    t0 = time.perf_counter()
    whelp("build", str(path), "--out", str(WORK / "build"))
    wall = time.perf_counter() - t0
    final = WORK / "build" / "final"
    rows = [json.loads(line) for line in (final / "answers.jsonl").read_text().splitlines()]
    correct = {label: [r["index"] for r in rows if r["answers"][label]["correct"]] for label in rows[0]["answers"]}
    return {"wall_s": wall, "metrics": json.loads((final / "metrics.json").read_text()), "correct": correct}


COLUMNS = [
    ("chat:general/loop", "loop", "{:.0%}"),
    ("chat:general/ended", "ended", "{:.0%}"),
    ("chat:general/accuracy", "correct", "{:.0%}"),
    ("chat:general/format", "format", "{:.0%}"),
    ("chat:general/ref_nll", "teacher NLL", "{:.2f}"),
    ("chat:general/rouge_l", "ROUGE-L", "{:.2f}"),
    ("ppl:pydoc:eval", "ppl pydoc:eval", "{:.2f}"),
    ("ppl:licenses", "ppl licences", "{:.1f}"),
]


def flat(model: dict) -> dict:
    """One model's entry of ``metrics.json`` as ``ppl:SOURCE`` and ``SET/METRIC`` keys."""
    row = {f"ppl:{source}": v["ppl"] for source, v in model["perplexity"].items()}
    for name, b in model.get("behaviour", {}).items():
        row.update({f"{name}/{k}": v for k, v in b["metrics"].items()})
    return row


def kept(correct: dict, label: str) -> str:
    """Of the checkable requests the teacher answers correctly, how many ``label`` also does (issue 29's target)."""
    right = set(correct["teacher"])
    return f"{len(right & set(correct[label]))}/{len(right)}"


def table(results: dict, vim: str | None) -> str:
    cols = COLUMNS + ([(f"ppl:{vim}", "ppl vim manual", "{:.1f}")] if vim else [])
    head = "| model | " + " | ".join(c[1] for c in cols) + " | teacher-right kept | build wall |"
    lines = [head, "|---" * (len(cols) + 3) + "|"]
    first = next(iter(results.values()))
    for model in first["metrics"]["models"][:2]:  # the teacher and the one-shot pruned student, in every run
        row, label = flat(model), model["label"]
        lines.append(f"| {label} | " + " | ".join(_cell(row, k, f) for k, _, f in cols) + " | - | - |")
    for name, r in results.items():
        model = r["metrics"]["models"][-1]
        cells = " | ".join(_cell(flat(model), k, f) for k, _, f in cols)
        lines.append(f"| {name} | {cells} | {kept(r['correct'], model['label'])} | {r['wall_s'] / 60:.1f} min |")
    return "\n".join(lines)


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="comma-separated variant prefixes, e.g. '(a),(c)'")
    parser.add_argument("--chat-tokens", type=int, default=16384)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--dry", action="store_true", help="print, do not append to RESULTS.md")
    args = parser.parse_args()
    data = stores(args.chat_tokens)
    vim = vim_manual(WORK)
    ppl = ["pydoc:eval", "licenses"] + ([vim] if vim else [])
    chosen = variants(data)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if any(k.startswith(p) for p in args.only.split(","))}
    results = {name: run(name, recipe(name, change, data, ppl)) for name, change in chosen.items()}
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    text = (
        f"\n## Chat distillation: which lever keeps the demo student an assistant (bench/chat_distill.py, {stamp}, "
        f"{platform.machine()}, {os.cpu_count()} cores)\n\n"
        f"The demo's shape and budget; {args.chat_tokens:,} tokens of self-instructed chat data; behaviour on "
        "chat:general (held out), greedy, 64 new tokens, through the teacher's template.\n\n"
        + table(results, vim)
        + "\n"
    )
    publish(text, results, args.json, args.dry)


if __name__ == "__main__":
    main()
