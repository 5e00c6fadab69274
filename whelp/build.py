"""``whelp build RECIPE``: (generate) -> (search) -> prune -> (cache) -> distill -> ... -> eval -> final, resumable
by stage.

Layout of OUT: ``whelp.json`` (the build's marker), ``stages/NN-kind-KEY/`` (each stage's output, e.g. a pruned
checkpoint; a search stage's is ``whelp search``'s directory, whose ``target.json`` the prune after it reads),
``final/`` (the student checkpoint, the resolved ``recipe.yaml``, ``metrics.json``,
``report.md``/``report.png`` and a ``README.md`` model card).

Each stage has a key: a hash of its resolved options, of the identity of the files it reads (teacher, data:
``whelp.data.source_identity``) and
of the keys of the stages it reads. The key is part of the stage's directory name and is sealed into the
marker its verb writes last, inside the same atomic commit as the output. So a stage is done exactly when its
directory holds a complete output whose marker carries its key: an output made from other inputs (an earlier
recipe, a changed data file) is never reused, an interrupted stage resumes in its own directory (distillation
from its last checkpoint, a cache from its last shard), and ``final/`` is rewritten whenever its key (the eval
stage's key and the resolved recipe) changes. Stages that the finished recipe no longer uses are removed at
the end, so a changed recipe keeps the old outputs only until the new ones are complete.

One module: the stage table, the stage keys and the resume rules are one contract with the on-disk ``stages/NN-kind-
KEY`` directories.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console

from whelp import store
from whelp.assistant import carry_assistant
from whelp.card import license_of, model_card
from whelp.data import data_identity, source_identity
from whelp.data.generate import generate_store
from whelp.data.tokenstore import is_store, open_store
from whelp.distillation.api import cache_teacher, distill_run
from whelp.distillation.cache import MANIFEST
from whelp.errors import WhelpError
from whelp.evals.api import evaluate_to
from whelp.evals.behaviour import set_identity
from whelp.models import check_written
from whelp.pruning.api import prune_checkpoint
from whelp.recipe import SEARCH_DATA, GenerateStep, Recipe, SearchTarget, dump
from whelp.schema import to_dict
from whelp.search.run import search_run
from whelp.specs import LoadPolicy, Mixture

SEARCH_TARGET = "target.json"  # in a search stage's directory: the winner's config, the next prune's target


@dataclass(frozen=True)
class Stage:
    name: str  # e.g. "03-distill"
    kind: str  # generate | search | prune | cache | distill | eval
    key: str
    run: object  # callable(out_dir: Path, force: bool) -> object; writes out_dir with marker stage_key=key

    @property
    def dirname(self) -> str:
        return f"{self.name}-{self.key}"


def _key(*parts) -> str:
    return store.content_id(parts)[:16]


def _console():
    return Console(stderr=True)


@dataclass
class Generated:
    """Where the recipe's teacher text lives: ``{data source name: (token store directory, generate stage key)}``."""

    stores: dict[str, tuple[str, str]] = field(default_factory=dict)

    def resolve(self, mixture: Mixture) -> Mixture:
        """``mixture`` with each generated source read from its store's directory (what the verbs read)."""
        for name in set(mixture.names) & set(self.stores):
            mixture = mixture.with_source(name, self.stores[name][0])
        return mixture

    def identity(self, mixture: Mixture) -> list:
        """``data_identity`` in which a generated source is its generate stage's key: known before the store exists,
        and independent of where the build directory is."""
        return [
            [self.stores[source][1] if source in self.stores else source_identity(source), w]
            for source, w in mixture.sources
        ]


def _generate_stage(step: GenerateStep, recipe: Recipe, key_in: str, n: int, policy: LoadPolicy) -> Stage:
    teacher = recipe.model_path(step.model)
    prompts = data_identity(step.options.prompts) if step.options.prompts else None
    key = _key("generate", step.identity(), source_identity(teacher), prompts, key_in)
    return Stage(
        f"{n:02d}-generate",
        "generate",
        key,
        lambda out, force: generate_store(teacher, out, step.options, force=force, policy=policy),
    )


def _search_stage(recipe: Recipe, key_in: str, n: int, gen: Generated, policy: LoadPolicy) -> Stage:
    """``whelp search`` from the teacher into the stage directory; its ``target.json`` is prune[0]'s target."""
    spec, teacher = recipe.search(), recipe.teacher.model
    data = [gen.identity(getattr(spec, name)) for name in SEARCH_DATA]
    key = _key("search", to_dict(spec), source_identity(teacher), data, key_in)
    options = replace(spec, **{name: gen.resolve(getattr(spec, name)) for name in SEARCH_DATA})
    return Stage(
        f"{n:02d}-search",
        "search",
        key,
        lambda out, force: search_run(teacher, options, out, force=force, stage_key=key, policy=policy),
    )


def _prune_stage(
    step, source: str, key_in, n: int, gen: Generated, policy: LoadPolicy, target: str | None = None
) -> Stage:
    """``whelp prune`` of ``source`` to the step's target, or to ``target`` (a search stage's target.json)."""
    key = _key("prune", to_dict(step), gen.identity(step.options.calib), key_in)
    options = replace(step.options, calib=gen.resolve(step.options.calib))
    target = step.target if target is None else target
    return Stage(
        f"{n:02d}-prune",
        "prune",
        key,
        lambda out, force: prune_checkpoint(source, target, out, options, force=force, stage_key=key, policy=policy),
    )


def _cache_stage(ref, recipe: Recipe, step, key_in: str, n: int, j: int, gen: Generated, policy: LoadPolicy) -> Stage:
    teacher = recipe.model_path(ref.model)
    spec = replace(ref.spec(step.options), dtype=recipe.teacher.dtype)
    key = _key("cache", to_dict(ref), source_identity(teacher), gen.identity(step.options.data), to_dict(spec), key_in)
    return Stage(
        f"{n:02d}-cache-{j}",
        "cache",
        key,
        lambda out, force: cache_teacher(
            teacher, gen.resolve(step.options.data), out, spec, force=force, stage_key=key, policy=policy
        ),
    )


def _local_stage(step, student: str, recipe: Recipe, key_in: str, n: int, gen: Generated, policy: LoadPolicy) -> Stage:
    """``whelp distill --local`` of ``student`` from the step's first live teacher (its ``local:`` stage)."""
    teacher = recipe.model_path(step.teachers[0].model)
    spec = step.local.options(step.options)
    data = [gen.identity(spec.data), gen.identity(spec.eval_data)]
    key = _key("local", to_dict(step.local), spec.flat(), source_identity(teacher), data, key_in)
    options = replace(spec, data=gen.resolve(spec.data), eval_data=gen.resolve(spec.eval_data))
    return Stage(
        f"{n:02d}-local",
        "distill",
        key,
        lambda out, force: distill_run(
            student, out, options, teachers=((teacher, 1.0),), force=force, stage_key=key, policy=policy
        ),
    )


def _distill_stage(
    step, student: str, recipe: Recipe, caches: list[Path], keys: list[str], n: int, gen: Generated, policy: LoadPolicy
) -> Stage:
    teachers = tuple((recipe.model_path(t.model), t.weight) for t in step.teachers)
    cached = tuple((str(path), ref.weight) for path, ref in zip(caches, step.caches))
    data = [gen.identity(step.options.data), gen.identity(step.options.eval_data)]
    key = _key("distill", to_dict(step), [(source_identity(t), w) for t, w in teachers], data, keys)
    options = replace(step.options, data=gen.resolve(step.options.data), eval_data=gen.resolve(step.options.eval_data))
    return Stage(
        f"{n:02d}-distill",
        "distill",
        key,
        lambda out, force: distill_run(
            student, out, options, teachers=teachers, caches=cached, force=force, stage_key=key, policy=policy
        ),
    )


def plan_stages(recipe: Recipe, out: Path, policy: LoadPolicy = LoadPolicy()) -> tuple[list[Stage], dict[str, Path]]:
    """The stages in run order, and ``{label: directory}`` of every model the report compares."""
    stages_dir = out / "stages"
    models = {"teacher": Path(recipe.teacher.model)}
    current = recipe.teacher.model
    key = _key("teacher", source_identity(recipe.teacher.model), recipe.teacher.dtype)
    stages: list[Stage] = []
    gen = Generated()
    for step in recipe.generate:
        stages.append(_generate_stage(step, recipe, key, len(stages) + 1, policy))
        gen.stores[step.name] = (str(stages_dir / stages[-1].dirname), stages[-1].key)
    for ref in recipe.stages():
        if ref.kind == "prune" and isinstance(ref.step.target, SearchTarget):  # prune[0] only (Recipe checks)
            stages.append(_search_stage(recipe, key, len(stages) + 1, gen, policy))
            target = str(stages_dir / stages[-1].dirname / SEARCH_TARGET)
            stages.append(_prune_stage(ref.step, current, [key, stages[-1].key], len(stages) + 1, gen, policy, target))
        elif ref.kind == "prune":
            stages.append(_prune_stage(ref.step, current, key, len(stages) + 1, gen, policy))
        else:
            cache_key = key  # a teacher's logits do not depend on the student, nor on its local stage
            if ref.step.local is not None:  # the block-local stage, then global KD from its student
                stages.append(_local_stage(ref.step, current, recipe, key, len(stages) + 1, gen, policy))
                key, current = stages[-1].key, str(stages_dir / stages[-1].dirname)
            caches, keys = [], [key]
            for j, cache in enumerate(ref.step.caches):
                stages.append(_cache_stage(cache, recipe, ref.step, cache_key, len(stages) + 1, j, gen, policy))
                caches.append(stages_dir / stages[-1].dirname)
                keys.append(stages[-1].key)
            stages.append(_distill_stage(ref.step, current, recipe, caches, keys, len(stages) + 1, gen, policy))
        key, current = stages[-1].key, str(stages_dir / stages[-1].dirname)
        models[ref.label] = Path(current)
    return stages, models


def _eval_stage(recipe: Recipe, models: dict[str, Path], keys: list[str], n: int, policy: LoadPolicy) -> Stage:
    key = _key(
        "eval",
        to_dict(recipe.eval),
        [data_identity(s) for s in recipe.eval.ppl] + [set_identity(name) for name in recipe.eval.chat],
        keys,
        source_identity(recipe.teacher.model),
    )
    named = {label: str(path) for label, path in models.items()}
    return Stage(
        f"{n:02d}-eval",
        "eval",
        key,
        lambda out, force: evaluate_to(out, named, recipe.eval, force=force, stage_key=key, policy=policy),
    )


def _write_final(recipe: Recipe, out: Path, student: Path, eval_dir: Path, models, key: str) -> None:
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    lineage = [{"label": label, "path": str(path), "report": _stage_report(path)} for label, path in models.items()]
    with store.atomic_dir(out / "final", force=True, kind="model", stage_key=key) as tmp:
        for item in student.iterdir():
            if item.is_file() and item.name != store.MARKER:
                shutil.copy2(item, tmp / item.name)
        carry_assistant(str(student), tmp)  # with the named chat templates of its additional_chat_templates/
        for name in ("report.md", "report.png", "answers.jsonl"):
            if (eval_dir / name).exists():  # answers.jsonl: only with eval.chat
                shutil.copy2(eval_dir / name, tmp / name)
        (tmp / "recipe.yaml").write_text(dump(recipe))
        (tmp / "metrics.json").write_text(json.dumps({**metrics, "lineage": lineage}, indent=2))
        (tmp / "README.md").write_text(model_card(recipe, metrics, lineage, tmp))
        check_written(tmp)


def _stage_report(path: Path) -> dict | None:
    for name in ("distill_report.json", "prune_report.json"):
        if (path / name).exists():
            return json.loads((path / name).read_text())
    return None


def done(stage: Stage, stage_dir: Path) -> bool:
    """Whether ``stage_dir`` holds the complete output of exactly this stage's inputs (its marker's key; for the
    generate stage, whose settings and key its directory's name carries, a complete token store)."""
    if stage.kind == "generate":
        try:
            return is_store(stage_dir) and open_store(stage_dir) is not None
        except WhelpError:
            return False
    found = store.marker(stage_dir)
    if found is None or found.get("stage_key") != stage.key:
        return False
    if stage.kind != "cache":  # search, prune, distill and eval outputs are committed whole, marker included
        return True

    try:
        manifest = store.read_record(stage_dir / MANIFEST, "")
    except WhelpError:
        return False
    return manifest.get("complete", False) and all(
        (stage_dir / s["file"]).is_file() and (stage_dir / s["file"]).stat().st_size == s["bytes"]
        for s in manifest["shards"]
    )


def build_dir(recipe: Recipe, out: str | Path | None) -> Path:
    """The build directory: ``--out``, else the recipe's ``out``, else ``runs/NAME`` (which must stay in runs/)."""
    if out is not None or recipe.out is not None:
        return Path(out if out is not None else recipe.out).expanduser()
    return store.inside(Path("runs"), Path("runs") / store.check_name(recipe.name, "recipe name"), "runs/NAME")


def check_out(out: Path) -> bool:
    """Whether ``out`` is a build already (False: absent or empty); anything else (a file, a user's directory,
    another whelp output) is refused, since whelp never deletes or overwrites it."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    found = store.marker(out)
    if found is None or found["kind"] != "build":
        what = f"a whelp {found['kind']}" if found else f"not a whelp build (no valid {store.MARKER})"
        raise WhelpError(
            f"{out} exists and is {what}; whelp never deletes or overwrites it, with or without "
            "--force: choose another --out"
        )
    return True


def _claim(out: Path) -> None:
    """Make ``out`` a build directory, or reopen one, as its one writer (``store.claim``); a directory whelp did not
    build is never touched."""
    if check_out(out):
        store.claim(out)
    else:
        with store.atomic_dir(out, kind="build"):  # born whole, marker included
            pass


STAGE_DIR = re.compile(r"\d\d-(generate|search|prune|cache-\d+|distill|eval)-[0-9a-f]{16}(\.distill|\.search)?")
RUN_STATE = (".distill", ".search")  # a distil or search stage's resumable run state, beside its output
STAGE_KINDS = {
    "generate": "store",
    "search": "search",
    "prune": "model",
    "distill": "model",
    "eval": "eval",
    "cache": "cache",
}


def _remove_unused(stages_dir: Path, stages: list[Stage]) -> None:
    """Delete the stage outputs (and their run state) that this recipe no longer uses: only directories named as
    a build names its stages and marked by whelp as that stage's kind; anything else in stages/ is left alone."""
    keep = {s.dirname for s in stages} | {f"{s.dirname}{suffix}" for s in stages for suffix in RUN_STATE}
    for item in stages_dir.iterdir():
        match = STAGE_DIR.fullmatch(item.name)
        if item.name in keep or not match or item.is_symlink() or not item.is_dir():
            continue
        kind = "run" if match.group(2) else STAGE_KINDS[match.group(1).split("-")[0]]
        found = store.marker(item)
        if found is not None and found["kind"] == kind:
            shutil.rmtree(item)
    store.clean_stale(stages_dir)


@store.writer
def build(
    recipe: Recipe, out: str | Path | None = None, force: bool = False, policy: LoadPolicy = LoadPolicy()
) -> Path:
    """Run every stage not already done with the same inputs; return the ``final/`` directory.

    ``force`` runs every stage again; each output (only ever whelp's own) is replaced when its new version is
    complete.
    """
    license_of(recipe)  # a model card the build could not write (a gated teacher, no licence) fails now, not last
    out = build_dir(recipe, out)
    _claim(out)
    stages_dir = out / "stages"
    stages_dir.mkdir(exist_ok=True)
    store.inside(out, stages_dir, "the stages directory")
    stages, models = plan_stages(recipe, out, policy)
    stages.append(_eval_stage(recipe, models, [s.key for s in stages], len(stages) + 1, policy))
    final_key = _key("final", stages[-1].key, dump(recipe))
    console, ran = _console(), False
    for stage in stages:
        stage_dir = stages_dir / stage.dirname
        if not force and done(stage, stage_dir):
            console.print(f"[dim]= {stage.name}: up to date[/]")
            continue
        if stage_dir.exists() and any(stage_dir.iterdir()) and store.marker(stage_dir) is None:
            raise WhelpError(
                f"{stage.name}: {stage_dir} has a damaged or missing {store.MARKER}, so whelp cannot "
                "tell it is its own; delete that directory and re-run the build"
            )
        console.print(f"[bold]> {stage.name}[/] [dim]({stage_dir.name})[/]")
        try:
            stage.run(stage_dir, force)
        except WhelpError as exc:
            hint = " (then drop --force, or this stage starts over)" if force else ""
            raise WhelpError(f"{stage.name}: {exc}{hint}") from None
        ran = True
    final = out / "final"
    found = store.marker(final)
    if ran or force or found is None or found.get("stage_key") != final_key:
        _write_final(recipe, out, list(models.values())[-1], stages_dir / stages[-1].dirname, models, final_key)
        _remove_unused(stages_dir, stages)
        console.print(f"[green]done[/]: {final}")
    else:
        console.print(f"[green]nothing to do[/]: {final} is up to date")
    return final
