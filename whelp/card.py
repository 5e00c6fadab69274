"""The model card (``README.md``) of a built student: Hugging Face card metadata + lineage, shapes,
data, teachers, the evaluation table and chart, and versions.

The YAML header is produced by ``huggingface_hub.ModelCardData`` (``model-index`` with the student's
perplexities), so ``huggingface_hub.ModelCard.load`` reads it back and the hub renders it.
"""

from __future__ import annotations

import json
from pathlib import Path

from whelp import models
from whelp.recipe import Recipe
from whelp.registry import REGISTRY


def _hub_id(model: str) -> str | None:
    if model in REGISTRY:
        return REGISTRY[model].hub_id
    return model if model.count("/") == 1 and not Path(model).exists() else None


def _card_data(recipe: Recipe, metrics: dict, student: dict):
    from huggingface_hub import EvalResult, ModelCardData

    results = [EvalResult(task_type="text-generation", dataset_type=source, dataset_name=source,
                          metric_type="perplexity", metric_value=round(value["ppl"], 4))
               for source, value in student["perplexity"].items()]
    entry = REGISTRY.get(recipe.teacher.model)
    return ModelCardData(model_name=recipe.name, library_name="transformers", pipeline_tag="text-generation",
                         license=entry.license.lower() if entry else None, base_model=_hub_id(recipe.teacher.model),
                         tags=["whelp", "pruning", "knowledge-distillation"], eval_results=results or None)


def _shapes_table(lineage: list[dict], final_dir: Path) -> list[str]:
    teacher_cfg = models.load_config(lineage[0]["path"])
    student_cfg = models.load_config(str(final_dir / "config.json"))
    rows = ["| | teacher | student |", "|---|---|---|"]
    for key in models.SHAPE_KEYS:
        rows.append(f"| {key} | {models.shape(teacher_cfg)[key]} | {models.shape(student_cfg)[key]} |")
    counts = [models.count_params(c) for c in (teacher_cfg, student_cfg)]
    rows.append(f"| params | {counts[0][0]:,} | {counts[1][0]:,} |")
    rows.append(f"| non-embedding params | {counts[0][1]:,} | {counts[1][1]:,} |")
    return rows


def _lineage(recipe: Recipe) -> list[str]:
    lines = [f"1. **teacher**: `{recipe.teacher.model}`"]
    if recipe.generate is not None:
        g = recipe.generate.options
        prompts = f"the first {g.prompt_tokens} tokens of `{g.prompts}` documents" if g.prompts else "BOS alone"
        lines.append(f"1. **teacher text** (the data source `generated`): {g.max_tokens:,} tokens sampled from "
                     f"`{recipe.model_path(recipe.generate.model)}` "
                     f"after {prompts}, T={g.temperature:g}, top-p {g.top_p:g}, "
                     f"up to {g.new_tokens} tokens a sequence, seed {g.seed}")
    for ref in recipe.stages():
        step = ref.step
        if ref.kind == "prune":
            lines.append(f"1. **{ref.label}**: pruned to `{step.target}` with {step.options.importance} "
                         f"importance ({step.options.layer_importance} for depth), calibrated on "
                         f"`{step.options.calib}` ({step.options.calib_samples} x {step.options.seq_len} tokens)")
        else:
            teachers = ", ".join(f"`{t.model}` (w={t.weight:g})" for t in step.teachers)
            caches = ", ".join(f"`{c.model}` cached {c.mode}-{c.k} (w={c.weight:g})" for c in step.caches)
            budget = f"{step.options.steps} steps" if step.options.steps else f"{step.options.max_tokens:,} tokens"
            lines.append(f"1. **{ref.label}**: distilled on `{step.options.data}` for {budget} with "
                         f"{step.options.loss} (T={step.options.temperature:g}) from {', '.join(filter(None, [teachers, caches]))}")
    return lines


def _domains(recipe: Recipe, metrics: dict) -> list[str]:
    """One line per perplexity source: the student against the teacher, and whether the build trained on it (a
    student is judged on the text it never saw as much as on its training domain)."""
    from whelp.specs import parse_mixture

    trained = {source for ref in recipe.stages()
               for source, _ in parse_mixture(ref.step.options.data if ref.kind == "distill" else ref.step.options.calib)}
    if recipe.generate is not None and recipe.generate.options.prompts:  # the teacher text starts with them
        trained.add(recipe.generate.options.prompts)
    for ref in recipe.stages():  # a shape search calibrates and distils its candidates too
        search = getattr(ref.step.target, "search", None) if ref.kind == "prune" else None
        if search is not None:
            trained.update(source for data in (search.calib, search.data) for source, _ in parse_mixture(data))
    teacher, student = metrics["models"][0], metrics["models"][-1]
    lines = []
    for source in metrics["settings"]["ppl"]:
        t, s = teacher["perplexity"][source]["ppl"], student["perplexity"][source]["ppl"]
        seen = "a training source" if source in trained else "never trained on"
        lines.append(f"- evaluation `{source}` ({seen}): perplexity {s:,.2f}, teacher {t:,.2f} ({s / t:.2f}x)")
    return lines


def model_card(recipe: Recipe, metrics: dict, lineage: list[dict], final_dir: Path) -> str:
    """README.md text for ``final_dir`` (which already holds config.json, report.md and report.png)."""
    from huggingface_hub import ModelCard

    student = metrics["models"][-1]
    report = (final_dir / "report.md").read_text().split("\n", 1)[1].strip()
    versions = metrics.get("versions", {})
    body = [f"# {recipe.name}", "", recipe.description or "A student model built with whelp.", "",
            "Built with whelp (structured pruning + knowledge distillation) from the resolved recipe in "
            "`recipe.yaml`; `whelp build recipe.yaml` reproduces it.", "",
            "## Lineage", "", *_lineage(recipe), "",
            "## Shapes", "", *_shapes_table(lineage, final_dir), "",
            "## Data", "", f"- calibration: `{recipe.data.calib}`", f"- training: `{recipe.data.train}`",
            *_domains(recipe, metrics), f"- sequence length: {recipe.data.seq_len}", "",
            "## Evaluation", "", report, "", "![report](report.png)", "",
            "## Versions", "", "```json", json.dumps(versions, indent=1, sort_keys=True), "```", ""]
    card = ModelCard(f"---\n{_card_data(recipe, metrics, student).to_yaml()}\n---\n\n" + "\n".join(body))
    return str(card)
