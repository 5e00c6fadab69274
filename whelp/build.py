"""``whelp build RECIPE``: prune -> (cache) -> distill -> ... -> eval -> final, resumable by stage.

Layout of OUT: ``state.json`` (what finished, with which inputs), ``stages/NN-kind/`` (each stage's
output, e.g. a pruned checkpoint), ``final/`` (the student checkpoint, the resolved ``recipe.yaml``,
``metrics.json``, ``report.md``/``report.png`` and a ``README.md`` model card).

Each stage has a key: a hash of its resolved options and the keys of the stages it reads. A stage
whose key is recorded as done is skipped; a stage that started but did not finish runs again with
the same key (distillation resumes from its last checkpoint); a stage whose key changed (the recipe
changed) starts over, and so does everything downstream, whose keys change with it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from whelp.errors import WhelpError
from whelp.recipe import TEACHER, Recipe, dump
from whelp.schema import to_dict

STATE = "state.json"


@dataclass(frozen=True)
class Stage:
    name: str  # directory name under stages/, e.g. "02-distill"
    kind: str  # prune | cache | distill | eval
    key: str
    run: object  # callable(out_dir: Path, force: bool) -> dict


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _console():
    from rich.console import Console

    return Console(stderr=True)


class _State:
    """``state.json``: {stage name: {"key": ..., "done": bool}}, rewritten atomically after every change."""

    def __init__(self, out: Path):
        self.path = out / STATE
        self.stages = json.loads(self.path.read_text())["stages"] if self.path.exists() else {}

    def mark(self, name: str, key: str, done: bool) -> None:
        self.stages[name] = {"key": key, "done": done}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"stages": self.stages}, indent=2))
        tmp.replace(self.path)

    def done(self, stage: Stage, out_dir: Path) -> bool:
        record = self.stages.get(stage.name)
        return bool(record and record["key"] == stage.key and record["done"] and out_dir.exists())

    def changed(self, stage: Stage) -> bool:
        record = self.stages.get(stage.name)
        return record is None or record["key"] != stage.key


def _teacher_path(model: str, recipe: Recipe) -> str:
    return recipe.teacher.model if model == TEACHER else model


def _prune_stage(step, source: str, key_in: str, n: int) -> Stage:
    from whelp.prune.api import prune_checkpoint

    key = _key("prune", to_dict(step), key_in)
    return Stage(f"{n:02d}-prune", "prune", key,
                 lambda out, force: prune_checkpoint(source, step.target, out, step.options, force=force))


def _cache_stage(ref, recipe: Recipe, step, key_in: str, n: int, j: int) -> Stage:
    from whelp.distill.cache import cache_teacher

    teacher = _teacher_path(ref.model, recipe)
    spec = step.options
    key = _key("cache", to_dict(ref), teacher, spec.data, spec.seq_len, spec.max_tokens, key_in)
    return Stage(f"{n:02d}-cache-{j}", "cache", key, lambda out, force: cache_teacher(
        teacher, spec.data, out, mode=ref.mode, k=ref.k, temperature=ref.temperature, seq_len=spec.seq_len,
        max_tokens=spec.max_tokens, dtype=recipe.teacher.dtype, force=force))


def _distill_stage(step, student: str, recipe: Recipe, caches: list[Path], keys: list[str], n: int) -> Stage:
    from whelp.distill.loop import distill

    teachers = tuple((_teacher_path(t.model, recipe), t.weight) for t in step.teachers)
    cached = tuple((str(path), ref.weight) for path, ref in zip(caches, step.caches))
    key = _key("distill", to_dict(step), teachers, keys)
    return Stage(f"{n:02d}-distill", "distill", key, lambda out, force: distill(
        student, out, step.options, teachers=teachers, caches=cached, force=force))


def plan_stages(recipe: Recipe, out: Path) -> tuple[list[Stage], list[tuple[str, Path]]]:
    """The stages in run order, and the ``(label, directory)`` of every model the report compares."""
    stages_dir = out / "stages"
    models = [("teacher", Path(recipe.teacher.model))]
    current, key, n = recipe.teacher.model, _key("teacher", recipe.teacher.model, recipe.teacher.dtype), 0
    counts = {"prune": len(recipe.prune), "distill": len(recipe.distill)}
    stages: list[Stage] = []
    for kind, step in recipe.stages():
        index = sum(1 for s in stages if s.kind == kind)
        label = "distilled" if kind == "distill" else "pruned"
        label = label if counts[kind] == 1 else f"{label}-{index + 1}"
        if kind == "prune":
            n += 1
            stages.append(_prune_stage(step, current, key, n))
        else:
            caches, keys = [], [key]
            for j, ref in enumerate(step.caches):
                n += 1
                stages.append(_cache_stage(ref, recipe, step, key, n, j))
                caches.append(stages_dir / stages[-1].name)
                keys.append(stages[-1].key)
            n += 1
            stages.append(_distill_stage(step, current, recipe, caches, keys, n))
        key, current = stages[-1].key, str(stages_dir / stages[-1].name)
        models.append((label, Path(current)))
    return stages, models


def _eval_stage(recipe: Recipe, models: list[tuple[str, Path]], keys: list[str], n: int) -> Stage:
    from whelp.evals.api import evaluate

    args = [f"{label}={path}" for label, path in models]
    key = _key("eval", to_dict(recipe.eval), keys, recipe.teacher.model)
    return Stage(f"{n:02d}-eval", "eval", key, lambda out, force: evaluate(args, out, recipe.eval, force=True))


def _write_final(recipe: Recipe, out: Path, student: Path, eval_dir: Path, models) -> None:
    from whelp.card import model_card
    from whelp.models import atomic_dir

    metrics = json.loads((eval_dir / "metrics.json").read_text())
    lineage = [{"label": label, "path": str(path), "report": _stage_report(path)} for label, path in models]
    with atomic_dir(out / "final", force=True) as tmp:
        for item in student.iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
        for name in ("report.md", "report.png"):
            shutil.copy2(eval_dir / name, tmp / name)
        (tmp / "recipe.yaml").write_text(dump(recipe))
        (tmp / "metrics.json").write_text(json.dumps({**metrics, "lineage": lineage}, indent=2))
        (tmp / "README.md").write_text(model_card(recipe, metrics, lineage, tmp))


def _stage_report(path: Path) -> dict | None:
    for name in ("distill_report.json", "prune_report.json"):
        if (path / name).exists():
            return json.loads((path / name).read_text())
    return None


def _finished_on_disk(stage: Stage, stage_dir: Path) -> bool:
    """Whether a resumable stage (cache, distill) already wrote its whole output (both write atomically)."""
    if stage.kind == "cache":
        manifest = stage_dir / "manifest.json"
        return manifest.exists() and json.loads(manifest.read_text()).get("complete", False)
    return stage.kind == "distill" and (stage_dir / "distill_report.json").exists()


def build(recipe: Recipe, out: str | Path | None = None, force: bool = False) -> Path:
    """Run every stage not already done with the same inputs; return the ``final/`` directory."""
    out = Path(out or recipe.out or Path("runs") / recipe.name).expanduser()
    if force and out.exists():
        shutil.rmtree(out)
    if out.exists() and not (out / STATE).exists():
        raise WhelpError(f"{out} exists but is not a whelp build (no {STATE}); choose another --out or pass --force")
    (out / "stages").mkdir(parents=True, exist_ok=True)
    state = _State(out)
    stages, models = plan_stages(recipe, out)
    stages.append(_eval_stage(recipe, models, [s.key for s in stages], len(stages) + 1))
    final_key = _key("final", stages[-1].key, dump(recipe))
    console, ran = _console(), False
    for stage in stages:
        stage_dir = out / "stages" / stage.name
        if state.done(stage, stage_dir):
            console.print(f"[dim]= {stage.name}: up to date[/]")
            continue
        force_stage = state.changed(stage) or stage.kind in ("prune", "eval")  # cache and distill resume
        if not force_stage and _finished_on_disk(stage, stage_dir):  # stopped after its output, before state.json
            state.mark(stage.name, stage.key, done=True)
            continue
        console.print(f"[bold]> {stage.name}[/]")
        state.mark(stage.name, stage.key, done=False)
        stage.run(stage_dir, force_stage)
        state.mark(stage.name, stage.key, done=True)
        ran = True
    final = out / "final"
    if ran or state.changed(Stage("final", "final", final_key, None)) or not final.exists():
        _write_final(recipe, out, models[-1][1], out / "stages" / stages[-1].name, models)
        state.mark("final", final_key, done=True)
        console.print(f"[green]done[/]: {final}")
    else:
        console.print(f"[green]nothing to do[/]: {final} is up to date")
    return final
