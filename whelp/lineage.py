"""The model card's lineage in words: what each stage of a built recipe ran (the teacher's generated text, each
prune and its refit, each distillation and its loss), so that a reader of the card knows how the student was made
without reading ``recipe.yaml``. Pure functions of the resolved recipe and the prunes' reports."""

from __future__ import annotations

from whelp.recipe import GenerateStep, Recipe


def lineage_lines(recipe: Recipe, reports: dict) -> list[str]:
    """The card's lineage, one numbered line per stage: the teacher, its generated text, each prune (with its refit,
    from ``reports``: a stage label's prune_report.json, or None) and each distillation."""
    lines = [f"1. **teacher**: `{recipe.teacher.model}`"]
    lines += [f"1. **teacher text** (the data source `{s.name}`): {_generated(recipe, s)}" for s in recipe.generate]
    for ref in recipe.stages():
        step = ref.step
        if ref.kind == "prune":
            o = step.options
            lines.append(
                f"1. **{ref.label}**: pruned to `{step.target}` with {o.importance} importance ({o.layer_importance} "
                f"for depth), calibrated on `{o.calib}` ({o.calib_samples} x {o.seq_len} tokens)"
                + _refit(reports.get(ref.label), o.refit_blocks, o.calib_samples)
            )
        else:
            teachers = ", ".join(f"`{t.model}` (w={t.weight:g})" for t in step.teachers)
            caches = ", ".join(f"`{c.model}` cached {c.mode}-{c.k} (w={c.weight:g})" for c in step.caches)
            budget = f"{step.options.steps} steps" if step.options.steps else f"{step.options.max_tokens:,} tokens"
            lines.append(
                f"1. **{ref.label}**: distilled on `{step.options.data}` for {budget} (lr {step.options.optim.lr:g}) "
                f"with {_losses(step.options)} from {', '.join(filter(None, [teachers, caches]))}"
            )
    return lines


def _generated(recipe: Recipe, step: GenerateStep) -> str:
    """What a generate stage sampled: plain text after BOS or document prefixes, or conversations."""
    g, teacher = step.options, f"`{recipe.model_path(step.model)}`"
    sampling = f"T={g.temperature:g}, top-p {g.top_p:g}" + (f", top-k {g.top_k}" if g.top_k else "")
    if not g.chat:
        prompts = f"the first {g.prompt_tokens} tokens of `{g.prompts}` documents" if g.prompts else "BOS alone"
        return (
            f"{g.max_tokens:,} tokens sampled from {teacher} after {prompts}, {sampling}, "
            f"up to {g.new_tokens} tokens a sequence, seed {g.seed}"
        )
    requests = (
        f"the requests of `{g.prompts}`"
        if g.prompts
        else f"requests of up to {g.request_tokens} tokens it wrote itself (Magpie self-instruct)"
    )
    best = f", the best of {g.samples_per_prompt} by its own score" if g.samples_per_prompt > 1 else ""
    drop = "answers that loop or refuse dropped" if g.drop_refusals else "answers that loop dropped"
    system = f' under the system turn "{g.system}" (not stored: context distillation)' if g.system else ""
    return (
        f"{g.max_tokens:,} tokens of conversations: {teacher} answered {requests} through its chat template"
        f"{system}, {sampling}, up to {g.new_tokens} tokens an answer{best}, {drop}, the loss on the answers only, "
        f"seed {g.seed}"
    )


def _refit(report: dict | None, blocks: int, calib_blocks: int) -> str:
    """The reconstruction a prune ran (its prune_report.json): mode, how the MLP neurons were chosen, its blocks."""
    mode = ((report or {}).get("reconstruct") or {}).get("mode", "none")
    if mode == "none":
        return ""
    select = report.get("select")
    chosen = f", MLP neurons chosen by {select}" if select else ""
    which = "those blocks" if blocks == calib_blocks else f"the first {blocks} of those blocks"
    return f"; kept weights refit ({mode}{chosen}) on {which}"


def _losses(o) -> str:
    """A distillation's loss in words: the divergence and CE, chat rows, hidden states, on-policy, mixture."""
    kd = o.kd
    parts = [f"{kd.name} (T={kd.temperature:g})" + (f" + {kd.ce_weight:g} CE" if kd.ce_weight else "")]
    if kd.chat_loss == "ce":
        parts.append("chat answers by CE alone")
    if o.hidden.local:
        parts.append(f"a block-local stage ({o.hidden.loss})")
    elif o.hidden.weight:
        parts.append(f"hidden states ({o.hidden.loss}, weight {o.hidden.weight:g})")
    if o.gkd.fraction:
        parts.append(f"on-policy on {o.gkd.fraction:g} of micro-batches ({o.gkd.loss}) from step {o.gkd.from_step}")
    if o.mix.kind != "static":
        parts.append(f"a {o.mix.kind} mixture")
    return "; ".join(parts)
