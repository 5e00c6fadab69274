"""The model card (``README.md``) of a built student: Hub metadata + lineage, shapes, data, teachers, licence,
the evaluation table and chart, and versions.

The YAML header is produced by ``huggingface_hub.ModelCardData``, so ``ModelCard.load`` reads it back and the Hub
renders it. Choices the Hub leaves open, made once here:

* ``license``: ``license_of`` decides it (recipe, else the teacher's card or registry entry; transformers configs
  carry no licence). A build that learns from a gated model must name one; otherwise a teacher whose licence is
  nowhere to be found gets the Hub's ``unknown``, which says exactly that (the body names the fix), not a guess.
* ``base_model_relation``: the Hub knows ``adapter``, ``merge``, ``quantized`` and ``finetune`` only (no ``pruned``
  or ``distilled``); a student is the teacher's weights cut and trained further, so ``finetune``, with the tags
  ``pruned`` / ``distilled`` saying how.
* ``datasets`` and ``model-index``: only ``hf:`` sources are Hub datasets. A local source (``pydoc:eval``,
  ``licenses``, a file) is named ``whelp:SOURCE`` in ``model-index``, which no Hub id can be (they have no ``:``),
  and lm-eval tasks ``lm-eval:TASK``; ``datasets`` lists the Hub ids the build trains on (none: no key).
* ``language``: the recipe's, else the teacher's card or registry entry; unknown: no key.

Every section of the card reads the same build record, and the card is one file written at once; the lineage's
prose (what each stage ran, in words) is ``whelp.lineage``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData, try_to_load_from_cache

from whelp import architecture, models
from whelp.errors import WhelpError
from whelp.evals.report import SIZE_SPEED, flat_metrics
from whelp.lineage import lineage_lines
from whelp.recipe import Recipe
from whelp.registry import REGISTRY, Registered

GATED_PREFIXES = ("meta-llama/",)  # hub namespaces whose models are gated behind a licence agreement
LICENSE_FIX = "set license: in the recipe (a Hub licence id: https://huggingface.co/docs/hub/repositories-licenses)"


@dataclass(frozen=True)
class License:
    """The student's licence: its Hub id, where it was found (for the card body), and the Hub's ``license_name`` /
    ``license_link`` that go with an ``other`` licence when the teacher's card gives them."""

    id: str
    source: str
    name: str | None = None
    link: str | None = None


def _is_hub_id(model: str) -> bool:
    return model.count("/") == 1 and not Path(model).expanduser().exists()


def _registered(model: str) -> Registered | None:
    """The registry entry of a registered name, or of a directory whelp converted one into (``whelp_source.json``)."""
    if model in REGISTRY:
        return REGISTRY[model]
    source = Path(model).expanduser() / "whelp_source.json"
    if not source.is_file():
        return None
    try:
        return REGISTRY.get(json.loads(source.read_text()).get("registered"))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise WhelpError(
            f"{source} is not whelp's record of a registered model ({exc}); delete the directory to convert it again"
        ) from None


def _card_of(model: str):
    """The ``ModelCardData`` a model carries offline: its directory's README.md, or a hub id's if the hub cache
    holds it (nothing is downloaded); None without one."""
    path = Path(model).expanduser() / "README.md"
    if not path.is_file() and _is_hub_id(model):
        cached = try_to_load_from_cache(model, "README.md")
        path = Path(cached) if isinstance(cached, str) else path
    if not path.is_file():
        return None
    try:
        return ModelCard.load(path).data
    except Exception as exc:  # huggingface_hub raises ValueError, yaml errors, ...: the file is at fault
        raise WhelpError(f"{path}: not a readable model card ({str(exc).splitlines()[0]}); fix or remove it") from None


def hub_id(model: str) -> str | None:
    """Where a model lives on the Hub: a registered model's original, a hub id itself, a directory's card's
    ``base_model`` (a directory without one: None; it has no Hub id whelp can know)."""
    entry = _registered(model)
    if entry is not None:
        return entry.hub_id
    if _is_hub_id(model):
        return model
    card = _card_of(model)
    return card.base_model if card is not None and isinstance(card.base_model, str) else None


def _learned_from(recipe: Recipe) -> dict[str, str | None]:
    """``{model: its shipped config name or None}`` of every model whose weights or outputs the student learns
    from: the teacher, the teacher-text model, live teachers and cached ones."""
    out = {recipe.teacher.model: recipe.teacher.config}
    for step in recipe.generate:
        out.setdefault(recipe.model_path(step.model), None)
    for step in recipe.distill:
        for ref in (*step.teachers, *step.caches):
            out.setdefault(recipe.model_path(ref.model), ref.config)
    return out


def _gated(model: str, config: str | None) -> bool:
    """Whether a model is gated on the Hub (its licence binds a student): registry flag, a gated namespace, gating
    keys in its card, or planned with a shipped Llama reference config."""
    entry = _registered(model)
    card = None if entry is not None else _card_of(model)
    return (
        (entry is not None and entry.gated)
        or (hub_id(model) or "").startswith(GATED_PREFIXES)
        or (card is not None and any(key.startswith("extra_gated") for key in card.to_dict()))
        or (config or "").startswith("llama-")
    )


def _teacher_license(model: str) -> License | None:
    entry = _registered(model)
    if entry is not None:
        return License(entry.license, f"the licence of {entry.hub_id}, from whelp's registry")
    card = _card_of(model)
    if card is None or not card.license:
        return None
    return License(card.license, f"from the model card of the teacher `{model}`", card.license_name, card.license_link)


def license_of(recipe: Recipe) -> License:
    """The student's licence, decided here once (the build asks before its first stage, so a card it could not
    write fails in seconds, not after training). The recipe's ``license`` wins; else the teacher's. A gated model
    other than the teacher, or a gated teacher whose licence is not found, needs the recipe to name it: publishing
    a Llama derivative without its licence is the failure this refuses."""
    if recipe.license is not None:
        return License(recipe.license, "set by the recipe")
    gated = [model for model, config in _learned_from(recipe).items() if _gated(model, config)]
    others = [model for model in gated if model != recipe.teacher.model]
    if others:
        raise WhelpError(
            f"the student learns from {', '.join(others)}, gated on the Hub, whose licence terms may "
            f"bind it; {LICENSE_FIX}"
        )
    found = _teacher_license(recipe.teacher.model)
    if found is None and gated:
        raise WhelpError(
            f"the teacher {recipe.teacher.model} is gated on the Hub and its licence is not in its model "
            f"card or whelp's registry, so the model card would publish without it; {LICENSE_FIX}"
        )
    return found or License("unknown", f"the teacher's licence was not found (no model card); {LICENSE_FIX}")


def _language(recipe: Recipe) -> list[str] | None:
    if recipe.language:
        return list(recipe.language)
    entry = _registered(recipe.teacher.model)
    if entry is not None:
        return list(entry.language) or None
    card = _card_of(recipe.teacher.model)
    found = card.language if card is not None else None
    return [found] if isinstance(found, str) else (list(found) if found else None)


def _hub_dataset(source: str) -> tuple[str, str | None, str] | None:
    """``(id, config, split)`` of an ``hf:NAME[:CONFIG]:SPLIT[:COLUMN]`` source; None for a local one."""
    if not source.startswith("hf:"):
        return None
    parts = source.split(":")[1:]
    name, config, split = (parts[0], "", parts[1]) if len(parts) == 2 else parts[:3]
    return name, config or None, split


def _dataset(source: str) -> dict:
    """The ``EvalResult`` dataset fields of a data source: a Hub dataset's id, config and split, or ``whelp:SOURCE``
    for a local one (a ``:`` no Hub id has: it never poses as one)."""
    hub = _hub_dataset(source)
    if hub is None:
        return {"dataset_type": f"whelp:{source}", "dataset_name": source}
    return {"dataset_type": hub[0], "dataset_name": source, "dataset_config": hub[1], "dataset_split": hub[2]}


def _eval_result(name: str, value: float):
    """One ``model-index`` entry from a report metric: ``ppl:SOURCE``, ``bpb:SOURCE``, lm-eval's
    ``TASK/METRIC[,FILTER]`` or whelp's chat behaviour ``chat:SET/METRIC``."""
    if name.startswith(("ppl:", "bpb:")):
        kind, source = name.split(":", 1)
        metric = {"ppl": "perplexity", "bpb": "bits_per_byte"}[kind]
        return EvalResult(
            task_type="text-generation",
            task_name=metric,
            metric_type=metric,
            metric_name=f"{metric} ({source})",
            metric_value=round(value, 4),
            **_dataset(source),
        )
    task, _, metric = name.partition("/")
    metric, _, flt = metric.partition(",")
    return EvalResult(
        task_type="text-generation",
        task_name=task,
        dataset_type=f"{'whelp' if task.startswith('chat:') else 'lm-eval'}:{task}",  # chat:SET: whelp's prompts
        dataset_name=task,
        metric_type=metric,
        metric_name=name,
        metric_config=flt or None,
        metric_value=round(value, 4),
    )


def _card_data(recipe: Recipe, student: dict, found: License):
    """The card's metadata: every quality metric of the report (size and speed stay in the body's table)."""
    results = [_eval_result(name, value) for name, value in flat_metrics(student).items() if name not in SIZE_SPEED]
    base, tags = hub_id(recipe.teacher.model), ["whelp", "pruned", *(["distilled"] if recipe.distill else [])]
    datasets = sorted({hub[0] for hub in map(_hub_dataset, _trained(recipe)) if hub is not None})
    return ModelCardData(
        model_name=recipe.name,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=found.id,
        license_name=found.name,
        license_link=found.link,
        base_model=base,
        base_model_relation="finetune" if base else None,
        datasets=datasets or None,
        language=_language(recipe),
        tags=tags,
        eval_results=results or None,
    )


def _shapes_table(lineage: list[dict], final_dir: Path) -> list[str]:
    teacher_cfg = models.load_config(lineage[0]["path"])
    student_cfg = models.load_config(str(final_dir / "config.json"))
    rows = ["| | teacher | student |", "|---|---|---|"]
    for key in architecture.SHAPE_KEYS:
        rows.append(f"| {key} | {architecture.shape(teacher_cfg)[key]} | {architecture.shape(student_cfg)[key]} |")
    counts = [architecture.count_params(c) for c in (teacher_cfg, student_cfg)]
    rows.append(f"| params | {counts[0][0]:,} | {counts[1][0]:,} |")
    rows.append(f"| non-embedding params | {counts[0][1]:,} | {counts[1][1]:,} |")
    return rows


def _trained(recipe: Recipe) -> set[str]:
    """Every data source a stage calibrates or trains on (the card's ``datasets`` and its never-seen marks)."""
    trained = {
        source
        for ref in recipe.stages()
        for source in (ref.step.options.data if ref.kind == "distill" else ref.step.options.calib).names
    }
    for step in recipe.generate:  # the teacher text starts with its prompts
        trained.update(step.options.prompts.names if step.options.prompts else ())
    for ref in recipe.stages():  # a shape search calibrates and distils its candidates too
        search = getattr(ref.step.target, "search", None) if ref.kind == "prune" else None
        if search is not None:
            trained.update(source for mixture in (search.calib, search.data) for source in mixture.names)
    return trained


def _domains(recipe: Recipe, metrics: dict) -> list[str]:
    """One line per perplexity source: the student against the teacher, and whether the build trained on it (a
    student is judged on the text it never saw as much as on its training domain)."""
    trained = _trained(recipe)
    teacher, student = metrics["models"][0], metrics["models"][-1]
    lines = []
    for mixture in recipe.eval.ppl:  # keyed in the metrics by its text, as whelp.evals reads it
        source = str(mixture)
        t, s = teacher["perplexity"][source]["ppl"], student["perplexity"][source]["ppl"]
        seen = "a training source" if mixture.name in trained else "never trained on"
        lines.append(f"- evaluation `{source}` ({seen}): perplexity {s:,.2f}, teacher {t:,.2f} ({s / t:.2f}x)")
    return lines


def _provenance(recipe: Recipe) -> list[str]:
    """A section with one line per registered model the student learns from (none: no section): it is not the Hub
    original but whelp's fp32 dequantization of a 4-bit GGUF, whose quantization error the student inherits."""
    lines = []
    for model in _learned_from(recipe):
        entry = _registered(model)
        if entry is not None:
            lines.append(
                f"- `{model}` is not the original {entry.hub_id} checkpoint: whelp dequantized it to fp32 "
                f"from the {entry.gguf_type} GGUF {entry.origin} (sha256 `{entry.gguf_sha256}`), so it carries "
                "that quantization's error, and so does what the student learned from it"
            )
    return ["## Teacher weights", "", *lines, ""] if lines else []


def _chat_lines(final_dir: Path) -> list[str]:
    """One line when the student has a chat template (the teacher's, with its special tokens and stop ids, carried
    by whelp.assistant): it is prompted and stopped as the teacher is."""
    config = final_dir / "tokenizer_config.json"
    if not config.is_file() or "chat_template" not in json.loads(config.read_text()):
        return []
    return [
        "It keeps the teacher's chat template, special tokens and stop ids (`generation_config.json`): prompt it "
        "as the teacher.",
        "",
    ]


def _data_lines(recipe: Recipe) -> list[str]:
    """The sources the build trains on, split into Hub datasets (the metadata's ``datasets``) and the rest."""
    trained = sorted(_trained(recipe))
    hub = [s for s in trained if _hub_dataset(s) is not None]
    local = [s for s in trained if _hub_dataset(s) is None]
    return ([f"- Hub datasets: {', '.join(f'`{s}`' for s in hub)}"] if hub else []) + (
        [f"- not Hub datasets (so not in the metadata's `datasets`): {', '.join(f'`{s}`' for s in local)}"]
        if local
        else []
    )


def model_card(recipe: Recipe, metrics: dict, lineage: list[dict], final_dir: Path) -> str:
    """README.md text for ``final_dir`` (which already holds config.json, report.md and report.png)."""
    student, found = metrics["models"][-1], license_of(recipe)
    report = (final_dir / "report.md").read_text().split("\n", 1)[1].strip()
    versions = metrics.get("versions", {})
    body = [
        f"# {recipe.name}",
        "",
        recipe.description or "A student model built with whelp.",
        "",
        "Built with whelp (structured pruning + knowledge distillation) from the resolved recipe in "
        "`recipe.yaml`; `whelp build recipe.yaml` reproduces it.",
        "",
        "## Lineage",
        "",
        *lineage_lines(recipe, {step["label"]: step.get("report") for step in lineage}),
        "",
        *_chat_lines(final_dir),
        *_provenance(recipe),
        "## Licence",
        "",
        f"`{found.id}`: {found.source}" + (f" ({found.name}, {found.link})" if found.link else ""),
        "",
        "## Shapes",
        "",
        *_shapes_table(lineage, final_dir),
        "",
        "## Data",
        "",
        f"- calibration: `{recipe.data.calib}`",
        f"- training: `{recipe.data.train}`",
        *_data_lines(recipe),
        *_domains(recipe, metrics),
        f"- sequence length: {recipe.data.seq_len}",
        "",
        "## Evaluation",
        "",
        report,
        "",
        "![report](report.png)",
        "",
        "In the metadata's `model-index`, `whelp:SOURCE` names a whelp data source (not a Hub dataset) and "
        "`lm-eval:TASK` an lm-eval task.",
        "",
        "## Versions",
        "",
        "```json",
        json.dumps(versions, indent=1, sort_keys=True),
        "```",
        "",
    ]
    card = ModelCard(f"---\n{_card_data(recipe, student, found).to_yaml()}\n---\n\n" + "\n".join(body))
    return str(card)
