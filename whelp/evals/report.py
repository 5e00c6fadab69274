"""Teacher-vs-student report: ``metrics.json``, ``report.md`` (one table, and a few chat answers side by side),
``report.png`` (a chart of the table) and, with chat prompts, ``answers.jsonl`` (every model's answers).

**% recovered** (quality rows) is the share of the reference's quality a model keeps, measured in loss so that it is
linear in what a model learns: ``ref NLL / model NLL`` for perplexity-type metrics (= ``ln ref_ppl / ln model_ppl``
= the bits-per-byte ratio on the same text), ``ref / model`` for bits per byte, ``model / ref`` for accuracy-type
metrics (higher is better). 100% means as good as the reference; above 100% means better. Size and speed rows show
``model / ref`` as a plain % of the reference. Chat behaviour rows (``chat:SET/METRIC``, ``whelp.evals.chat``):
``ref_nll`` and ``fact_nll`` are NLLs (``ref / model``); ``loop`` and ``empty``, shares where lower is better,
compare the shares of good answers, ``(1 - model) / (1 - ref)``; the other shares (``kept`` among them) and
``rouge_l`` are ``model / ref``.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from whelp.evals.chat import LOWER_IS_BETTER, METRICS, SHARES
from whelp.store import atomic_dir

SIZE_SPEED = (
    "params",
    "non_embedding_params",
    "memory_bytes",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "peak_memory_bytes",
)
SAMPLES, SAMPLE_CHARS = 3, 240  # report.md shows the first SAMPLES answers of each chat set, cut to SAMPLE_CHARS


def flat_metrics(result: dict) -> dict[str, float]:
    """The table's numbers of one model result: size, speed, ``ppl:SOURCE`` / ``bpb:SOURCE``, lm-eval scores
    (stderrs and sample counts stay in metrics.json only), ``chat:SET/METRIC`` (those measured)."""
    flat = {**result["size"], **{k: v for k, v in result["speed"].items() if k in SIZE_SPEED and v is not None}}
    for source, ppl in result["perplexity"].items():
        flat[f"ppl:{source}"] = ppl["ppl"]
        flat[f"bpb:{source}"] = ppl["bits_per_byte"]
    flat.update(
        {
            k: v
            for k, v in result["lm_eval"]["scores"].items()
            if not k.endswith(("_stderr", "/sample_len")) and "_stderr," not in k
        }
    )
    for name, chat in result.get("behaviour", {}).items():
        flat.update({f"{name}/{k}": chat["metrics"][k] for k in METRICS if chat["metrics"].get(k) is not None})
    return flat


def direction(name: str, higher_is_better: dict[str, bool]) -> str:
    """How a metric is compared: ``size`` (plain ratio), ``log`` (perplexity: NLL ratio), ``lower``, ``higher``,
    ``share_lower`` (a share of bad answers: compared as the share of good ones)."""
    if name in SIZE_SPEED:
        return "size"
    if name.startswith("chat:"):
        metric = name.rsplit("/", 1)[1]
        lower = metric in LOWER_IS_BETTER
        return ("share_lower" if metric in SHARES else "lower") if lower else "higher"
    if name.startswith("ppl:") or name.endswith("perplexity"):
        return "log"
    if name.startswith("bpb:") or not higher_is_better.get(name, True):
        return "lower"
    return "higher"


def percent(kind: str, ref: float, value: float) -> float:
    """% recovered (quality) or % of the reference (size and speed); see the module docstring."""
    if kind == "log":
        return 100 * math.log(ref) / math.log(value) if value > 1 and ref > 1 else float("nan")
    if kind == "lower":
        return 100 * ref / value if value else float("nan")
    if kind == "share_lower":
        return 100 * (1 - value) / (1 - ref) if ref < 1 else float("nan")
    return 100 * value / ref if ref else float("nan")


def _fmt(value: float) -> str:
    if isinstance(value, int) or (abs(value) >= 1000 and float(value).is_integer()):
        return f"{int(value):,}"
    return f"{value:,.4g}" if abs(value) < 1e5 else f"{value:,.0f}"


def _same_tokenizer(ref: dict, model: dict) -> bool:
    """Whether two results' perplexities count the same tokens (results from before the hash was kept: assumed)."""
    return ref.get("tokenizer_sha256") == model.get("tokenizer_sha256")


def table(metrics: dict) -> tuple[list[str], list[str], list[list[str]], dict[str, list[float]]]:
    """``(names, labels, cells, percents)``: one row per metric, one column per model; non-reference cells read
    ``value (delta, pct%)``. ``percents[name]`` holds each model's % (the reference is 100)."""
    models = metrics["models"]
    flats = [flat_metrics(m) for m in models]
    higher = {k: v for m in models for k, v in m["lm_eval"]["higher_is_better"].items()}
    names = [n for n in flats[0] if all(n in f for f in flats)]
    cells, percents = [], {}
    for name in names:
        kind, ref = direction(name, higher), flats[0][name]
        row, pcts = [_fmt(ref)], [100.0]
        for model, flat in zip(models[1:], flats[1:]):
            if kind == "log" and not _same_tokenizer(models[0], model):
                pcts.append(float("nan"))
                row.append(f"{_fmt(flat[name])} (other tokenizer)")
                continue
            pct = percent(kind, ref, flat[name])
            pcts.append(pct)
            row.append(
                f"{_fmt(flat[name])} ({'+' if flat[name] >= ref else '-'}{_fmt(abs(flat[name] - ref))}, {pct:.1f}%)"
            )
        cells.append(row)
        percents[name] = pcts
    return names, [m["label"] for m in models], cells, percents


def markdown(metrics: dict) -> str:
    names, labels, cells, _ = table(metrics)
    higher = {k: v for m in metrics["models"] for k, v in m["lm_eval"]["higher_is_better"].items()}
    meaning = {
        "size": "% of ref",
        "log": "% recovered (NLL ratio)",
        "lower": "% recovered (ref/model)",
        "higher": "% recovered (model/ref)",
        "share_lower": "% recovered ((1-model)/(1-ref))",
    }
    head = ["metric", "%", f"{labels[0]} (reference)", *labels[1:]]
    lines = [
        f"# whelp eval: {', '.join(labels)}",
        "",
        f"Reference: **{labels[0]}**. Cells: value (delta vs reference, %). Settings: "
        f"`{json.dumps(metrics['settings'], sort_keys=True)}`.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, row in zip(names, cells):
        lines.append(f"| {name} | {meaning[direction(name, higher)]} | " + " | ".join(row) + " |")
    reused = [m["label"] for m in metrics["models"] if m.get("reused")]
    other = [m["label"] for m in metrics["models"][1:] if not _same_tokenizer(metrics["models"][0], m)]
    lines += [
        "",
        "% recovered is measured in loss: reference NLL / model NLL for perplexities (equivalently the "
        "bits-per-byte ratio), model / reference for accuracies; 100% = as good as the reference.",
    ]
    if other:
        lines.append(
            f"{', '.join(other)} tokenize differently from {labels[0]}: their perplexities count other tokens "
            "and get no %; compare them by bits per byte (bpb rows)."
        )
    shared = [f"{m['label']}'s are {m['speed']['same_as']}'s" for m in metrics["models"] if "same_as" in m["speed"]]
    timed = "; " + ", ".join(shared) + ", the same architecture" if shared else ""
    lines.append(
        f"Reused from the cache: {', '.join(reused) or 'none'} (speed and peak memory: measured in this run{timed})."
    )
    return "\n".join(lines + _samples(metrics)) + "\n"


def _cell(answer: dict) -> str:
    """One answer as a table cell: its text cut to ``SAMPLE_CHARS``, HTML-escaped, its line breaks as ``<br>``, and
    its flags."""
    text = "\n".join(" ".join(line.split()) for line in answer["answer"].strip().splitlines() if line.strip())
    text = (text[:SAMPLE_CHARS].rstrip() + " ...") if len(text) > SAMPLE_CHARS else text
    text = html.escape(text, quote=False).replace("\n", "<br>")
    flags = [
        f
        for f, bad in (
            ("loops", answer["loop"]),
            ("refuses", answer["refusal"]),
            ("no end of turn", not answer["ended"]),
        )
        if bad
    ]
    flags += [
        f"{'right' if ok else 'wrong'} {what}"
        for what, ok in (("answer", answer["correct"]), ("format", answer["followed"]))
        if ok is not None
    ]
    return (text.replace("|", "\\|") or "(empty)") + (f" _({', '.join(flags)})_" if flags else "")


def _samples(metrics: dict) -> list[str]:
    """The first ``SAMPLES`` answers of each chat set, every model's side by side (none when the metrics hold no
    answers, e.g. read back from metrics.json)."""
    models = metrics["models"]
    if not models[0].get("behaviour") or not all("answers" in b for m in models for b in m["behaviour"].values()):
        return []
    lines = ["", f"## Answers (the first {SAMPLES} of each set; every answer in answers.jsonl)"]
    for name in models[0]["behaviour"]:
        for i, first in enumerate(models[0]["behaviour"][name]["answers"][:SAMPLES]):
            lines += ["", f"**{name} #{i + 1}**: {' '.join(first['prompt'].split())[:SAMPLE_CHARS]}", ""]
            lines += ["| model | answer |", "|---|---|"]
            lines += [f"| {m['label']} | {_cell(m['behaviour'][name]['answers'][i])} |" for m in models]
    return lines


def answer_rows(metrics: dict) -> list[dict]:
    """answers.jsonl: one row per chat set and prompt, with every model's answer and its flags."""
    models, rows = metrics["models"], []
    for name in models[0].get("behaviour", {}):
        for i, first in enumerate(models[0]["behaviour"][name]["answers"]):
            answers = {m["label"]: m["behaviour"][name]["answers"][i] for m in models}
            rows.append(
                {
                    "set": name,
                    "index": i,
                    "prompt": first["prompt"],
                    "answers": {label: {k: v for k, v in a.items() if k != "prompt"} for label, a in answers.items()},
                }
            )
    return rows


def without_answers(metrics: dict) -> dict:
    """metrics.json: the metrics with each chat set's numbers only (its answers go to answers.jsonl)."""
    models = [
        {**m, "behaviour": {name: {"metrics": b["metrics"]} for name, b in m["behaviour"].items()}}
        if "behaviour" in m
        else m
        for m in metrics["models"]
    ]
    return {**metrics, "models": models}


def chart(metrics: dict, path: Path) -> None:
    """Grouped horizontal bars: each model's % of the reference per metric, with the 100% line."""
    import matplotlib  # noqa: PLC0415 - heavy: only the report plot needs matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - heavy: only the report plot needs matplotlib

    names, labels, _, percents = table(metrics)
    height = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.45 * len(names) * max(1, len(labels) / 2)))
    for j, label in enumerate(labels):
        values = [percents[n][j] for n in names]  # NaN (reference 0) draws no bar
        ax.barh([i + j * height for i in range(len(names))], values, height, label=label)
    ax.axvline(100, color="black", linewidth=0.8)
    ax.set_yticks([i + height * (len(labels) - 1) / 2 for i in range(len(names))], names)
    ax.invert_yaxis()
    ax.set_xlabel(f"% of reference ({labels[0]}): quality recovered, or size/speed ratio")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(metrics: dict, out: Path, force: bool = False, stage_key: str | None = None) -> Path:
    """Write metrics.json, report.md, report.png and (with chat answers) answers.jsonl into ``out`` atomically (temp
    dir + rename)."""
    rows = answer_rows(metrics)
    with atomic_dir(out, force, "eval", stage_key=stage_key) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(without_answers(metrics), indent=2))
        if rows:
            (tmp / "answers.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        (tmp / "report.md").write_text(markdown(metrics))
        chart(metrics, tmp / "report.png")
    return out
