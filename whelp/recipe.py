"""Recipes: one YAML file describing a whole student build, loaded strictly into frozen data.

Sections: ``teacher``, ``data`` (defaults for every stage), ``generate`` (teacher text: one step or a list, each
read as the data source its ``name`` says, ``generated`` by default), ``prune`` and ``distill`` (one mapping each,
or lists of equal length to chain steps as Minitron's iterative 8B -> ~3B -> 1B: prune[0], distill[0],
prune[1], distill[1], ...; the first prune step's target may be ``{search: {...}}``, a shape search the build runs
from the teacher first: ``SearchTarget``), ``eval``, ``seed``, ``out``. Loaded with ``yaml.safe_load``; every
unknown key, wrong type or bad value raises with its key path (``whelp.schema``). ``--set a.b=c`` overrides are
applied to the raw mapping first. Stage options a recipe leaves out are filled from ``data`` and
``seed``, so the resolved recipe (``whelp show``) states every value a build used. ``license`` and ``language``
(optional) go into the model card's metadata, over what the teacher's card says (``whelp.card``).

One module: the Recipe dataclasses, their defaults and the YAML loading are the recipe's one schema.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import yaml

from whelp.errors import WhelpError
from whelp.schema import apply_overrides, from_dict, load_yaml, to_dict
from whelp.specs import (
    BUILTIN,
    TEACHER,
    CacheSpec,
    DistillSpec,
    EvalSpec,
    GenerateSpec,
    Mixture,
    OnPolicySpec,
    PruneSpec,
    SearchSpec,
    as_mixtures,
    check_mixture,
    check_on_policy,
    check_teacher_weights,
)
from whelp.store import check_name

RECIPES_DIR = Path(__file__).parent / "recipes"
GENERATED = "generated"  # in a recipe's data: the token store of teacher text a generate step makes (its default name)
GENERATE_NAME = re.compile(r"[a-z][a-z0-9_]*")  # no ':', '/' or '.': not pydoc:*, hf:*, a hub id or a nested path
# (a bare name such as ``bos`` is read as the step's store even where ./bos exists: the recipe's names come first)
LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]*")  # the shape of every Hub licence id: apache-2.0, llama3.1, other
LANGUAGE_CODE = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*")  # ISO 639-1/3, optionally with a region: en, pt-BR


@dataclass(frozen=True)
class TeacherSection:
    model: str  # model directory, registered name or hub id
    config: str | None = None  # config.json path or shipped name (llama-3.1-8b) to plan without the weights
    dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass(frozen=True)
class DataSection:
    calib: Mixture = Mixture.parse("pydoc:calib")
    train: Mixture = Mixture.parse("pydoc:train")
    eval: Mixture = Mixture.parse("pydoc:eval")
    seq_len: int = 512

    def __post_init__(self):
        as_mixtures(self, ("calib", "train", "eval"))
        if self.seq_len < 2:
            raise WhelpError(f"seq_len must be at least 2, got {self.seq_len}")


@dataclass(frozen=True)
class GenerateStep:
    """Teacher text the build samples first (``whelp generate``), read wherever the recipe's data names it
    (``name``): sequence-level KD data (Kim & Rush 2016) that covers what the teacher knows, not one corpus. Several
    steps make several stores, e.g. chat answers to train on and text sampled from BOS to calibrate the prune on
    (self-calibration, Williams et al. 2024, arXiv 2410.17170), each weighted on its own in a mixture."""

    options: GenerateSpec = field(metadata={"flatten": True})  # max_tokens is required
    model: str = TEACHER  # the recipe's teacher, or another model directory / registered name
    name: str = GENERATED  # the data source the recipe's mixtures read it as

    def __post_init__(self):
        if not GENERATE_NAME.fullmatch(self.name) or self.name in BUILTIN:
            raise WhelpError(
                f"name {self.name!r} cannot name teacher text; use lower-case letters, digits and '_' (bos, "
                f"chat_answers), not a built-in source ({', '.join(sorted(BUILTIN))}) nor a path with ':', '/' or '.'"
            )

    def identity(self) -> dict:
        """Its settings as its stage key reads them: without ``name``, which says only how mixtures refer to it
        (renaming a step keeps its store)."""
        return {k: v for k, v in to_dict(self).items() if k != "name"}


@dataclass(frozen=True)
class SearchTarget:
    """A prune target found by ``whelp search``: the build searches first (from the teacher), then prunes the
    teacher to the winner's shape. Its options the recipe leaves out are the prune step's (calibration, importance,
    seq_len, seed) and the data section's (``train`` as ``data``, ``eval`` as ``eval_data``)."""

    search: SearchSpec

    def __str__(self) -> str:  # what reports and the model card call the target
        s = self.search
        return f"the winner of a shape search ({s.budget}; best {s.candidates} of {s.pool}, {s.score_steps} steps each)"


@dataclass(frozen=True)
class PruneStep:
    target: str | SearchTarget  # preset, config.json path, key=value overrides (whelp plan --target), or {search: ...}
    options: PruneSpec = field(default=PruneSpec(), metadata={"flatten": True})


@dataclass(frozen=True)
class TeacherRef:
    model: str = TEACHER
    weight: float = 1.0
    config: str | None = None  # config.json path or shipped name, to plan without the weights

    def __post_init__(self):
        if not 0 <= self.weight < float("inf"):
            raise WhelpError(f"weight must be a finite number >= 0, got {self.weight}")


@dataclass(frozen=True)
class CacheRef:
    """A teacher whose logits are cached offline before the distill step (e.g. a 70B)."""

    model: str = TEACHER
    weight: float = 1.0
    mode: Literal["topk", "sample"] = "topk"
    k: int = 64  # top-k size, or number of samples S
    temperature: float = 1.0
    config: str | None = None  # config.json path or shipped name (llama-3.1-70b), to plan without the weights
    tp_size: int = 1  # under torchrun: processes sharing one tensor-parallel teacher (one larger than a GPU)

    def __post_init__(self):
        if not 0 <= self.weight < float("inf"):
            raise WhelpError(f"weight must be a finite number >= 0, got {self.weight}")
        self.spec(DistillSpec(steps=1))

    def spec(self, step: DistillSpec) -> CacheSpec:
        """What ``whelp cache-logits`` makes for this teacher on ``step``'s data (the one range check of k, T)."""
        return CacheSpec(self.mode, self.k, self.temperature, step.seq_len, step.max_tokens, tp_size=self.tp_size)


@dataclass(frozen=True)
class LocalStep:
    """A block-local stage before a distill step's global KD (``whelp distill --local``): each student block learns
    the teacher span it replaces from the teacher's hidden states. It reads the step's data, seq_len, batch, seed and
    first teacher; its own are the budget (exactly one of ``steps`` / ``max_tokens``), the learning rate and warmup."""

    steps: int | None = None
    max_tokens: int | None = None
    lr: float = 1e-3
    warmup: int = 0

    def __post_init__(self):
        if (self.steps is None) == (self.max_tokens is None):
            raise WhelpError("distill.local: give exactly one budget for the block-local stage, steps or max_tokens")
        DistillSpec(steps=self.steps, max_tokens=self.max_tokens, lr=self.lr, warmup=self.warmup)  # their ranges

    def options(self, step: DistillSpec) -> DistillSpec:
        """The stage's ``DistillSpec``: ``step``'s, with this budget and AdamW, the block-local loss and no logit
        term (KD, CE and on-policy belong to the global stage after it). The budget is given as tokens, which also
        bound what it reads of a hub dataset (as ``steps`` alone would not: the step's data is read whole)."""
        per_step = step.batch_size * step.grad_accum * step.seq_len  # one process: the stage does not shard
        return replace(
            step,
            steps=None,
            max_tokens=self.max_tokens or self.steps * per_step,
            optim=replace(step.optim, lr=self.lr, warmup=self.warmup),
            kd=replace(step.kd, ce_weight=0.0, chat_loss="kd"),
            gkd=OnPolicySpec(),  # none: its options without on-policy micro-batches would be refused
            hidden=replace(step.hidden, local=True, weight=0.0),
        )


@dataclass(frozen=True)
class DistillStep:
    options: DistillSpec = field(metadata={"flatten": True})  # steps or max_tokens is required
    teachers: tuple[TeacherRef, ...] = (TeacherRef(),)
    caches: tuple[CacheRef, ...] = ()
    local: LocalStep | None = None  # a block-local stage before this step (whelp distill --local)

    def __post_init__(self):
        """What ``whelp distill`` would refuse after the stages before it ran: caught by ``validate``."""
        check_teacher_weights([t.weight for t in self.teachers] + [c.weight for c in self.caches], self.options)
        check_on_policy([t.weight for t in self.teachers], self.options)
        check_mixture(len(self.teachers), len(self.caches), len(self.options.data.sources), self.options)
        if self.local is not None:
            if not self.teachers:
                raise WhelpError("distill.local: the block-local stage needs a live teacher in distill.teachers")
            self.local.options(self.options)  # its budget and ranges, checked by DistillSpec
        for i, cache in enumerate(self.caches):
            if cache.temperature != self.options.kd.temperature:
                raise WhelpError(
                    f"caches[{i}].temperature {cache.temperature} differs from the loss temperature "
                    f"{self.options.kd.temperature}; cache at the temperature the step distils at"
                )


@dataclass(frozen=True)
class Recipe:
    name: str
    teacher: TeacherSection
    data: DataSection = DataSection()
    generate: tuple[GenerateStep, ...] = ()
    prune: tuple[PruneStep, ...] = ()
    distill: tuple[DistillStep, ...] = ()
    eval: EvalSpec = EvalSpec()
    seed: int = 0
    out: str | None = None
    description: str = ""
    license: str | None = None  # Hub licence id of the student; wins over the teacher's (whelp.card.license_of)
    language: tuple[str, ...] = ()  # the card's languages; empty: the teacher's card or registry entry says

    def __post_init__(self):
        check_name(self.name, "recipe.name")  # it becomes the directory runs/NAME
        if self.license is not None and not LICENSE_ID.fullmatch(self.license):
            raise WhelpError(
                f"recipe.license: {self.license!r} is not a Hub licence id; write one of "
                "https://huggingface.co/docs/hub/repositories-licenses (apache-2.0, mit, llama3.1, other)"
            )
        for i, code in enumerate(self.language):
            if not LANGUAGE_CODE.fullmatch(code):
                raise WhelpError(f"recipe.language[{i}]: {code!r} is not an ISO 639 language code (en, fr, pt-BR)")
        if not self.prune:
            raise WhelpError("prune: a recipe needs at least one prune step (the student starts as a pruned teacher)")
        if self.distill and len(self.distill) != len(self.prune):
            raise WhelpError(
                f"distill: {len(self.distill)} steps for {len(self.prune)} prune steps; give one distill "
                "step per prune step (they alternate), or none"
            )
        for i, step in enumerate(self.prune[1:], 1):
            if isinstance(step.target, SearchTarget):
                raise WhelpError(
                    f"recipe.prune[{i}].target: a search runs from the teacher, so only prune[0] may "
                    "search; give this step a preset, config.json or key=value target"
                )
        self._check_generated()

    def search(self) -> SearchSpec | None:
        """The shape search the build runs before prune[0], if its target is one."""
        target = self.prune[0].target
        return target.search if isinstance(target, SearchTarget) else None

    def model_path(self, model: str) -> str:
        """A stage's ``model`` field as a path or name: ``teacher`` is the recipe's teacher."""
        return self.teacher.model if model == TEACHER else model

    def data_keys(self) -> list[tuple[str, Mixture]]:
        """``(recipe key, mixture)`` of every source a stage reads."""
        out = [(f"prune[{i}].calib", step.options.calib) for i, step in enumerate(self.prune)]
        if self.search() is not None:
            out += [(f"prune[0].target.search.{key}", getattr(self.search(), key)) for key in SEARCH_DATA]
        for i, step in enumerate(self.distill):
            out += [(f"distill[{i}].data", step.options.data), (f"distill[{i}].eval_data", step.options.eval_data)]
        return out + [(f"eval.ppl[{i}]", source) for i, source in enumerate(self.eval.ppl)]

    def generated(self) -> dict[str, GenerateStep]:
        """``{data source name: generate step}``."""
        return {step.name: step for step in self.generate}

    def _check_generated(self) -> None:
        """Each generate step has its own name and some stage reads it; ``generated`` is read only where a step
        makes it; no held-out text is teacher text the build trains on."""
        read, generated = set(), self.generated()
        for i, step in enumerate(self.generate):
            first = next(j for j, other in enumerate(self.generate) if other.name == step.name)
            if first != i:
                raise WhelpError(
                    f"recipe.generate[{i}].name: '{step.name}' also names generate[{first}]; give each step its "
                    "own name (the data source the mixtures read it as)"
                )
        for where, mixture in self.data_keys():
            for name in set(mixture.names) & (set(generated) | {GENERATED}):
                read.add(name)
                if where.startswith("eval."):
                    raise WhelpError(
                        f"recipe.{where}: '{name}' is teacher text the build makes to train on, not held-out "
                        "text; evaluate on sources no stage trains on (pydoc:eval, licenses, a file)"
                    )
                if name not in generated:
                    raise WhelpError(
                        f"recipe.{where}: '{name}' names no generate step; read one of "
                        f"{', '.join(generated)}, or name a step '{name}'"
                        if generated
                        else f"recipe.{where}: '{name}' reads the teacher text of the recipe's generate section, "
                        "which is missing; add generate: {max_tokens: N} (whelp generate's options)"
                    )
        for i, step in enumerate(self.generate):
            if step.options.prompts and set(step.options.prompts.names) & set(generated):
                raise WhelpError(
                    f"recipe.generate[{i}].prompts: {step.options.prompts} is teacher text this recipe generates; "
                    "a generate step prompts from data on disk (a file, a store, pydoc:*), not from another step"
                )
            if step.name not in read:
                raise WhelpError(
                    f"recipe.generate[{i}]: no stage reads its teacher text '{step.name}'; name it in data (calib, "
                    "train) or a step's calib / data, or remove the step"
                )

    def stages(self) -> list[StageRef]:
        """The prune and distill steps in the order they run (prune[0], distill[0], prune[1], ...), each with its
        recipe key and the label its model has in reports (``pruned``, ``distilled``; ``pruned-2`` when chained)."""
        out: list[StageRef] = []
        for i, prune in enumerate(self.prune):
            out.append(StageRef("prune", i, _label("pruned", i, len(self.prune)), prune))
            if self.distill:
                out.append(StageRef("distill", i, _label("distilled", i, len(self.distill)), self.distill[i]))
        return out


def _label(base: str, index: int, count: int) -> str:
    return base if count == 1 else f"{base}-{index + 1}"


@dataclass(frozen=True)
class StageRef:
    """One step of a recipe as it runs: ``kind`` prune | distill, its ``index`` among the steps of its kind."""

    kind: Literal["prune", "distill"]
    index: int
    label: str
    step: PruneStep | DistillStep

    @property
    def key(self) -> str:
        """Its key path in the recipe, ``prune[0]``, for messages and plans."""
        return f"{self.kind}[{self.index}]"


def find(name_or_path: str) -> Path:
    """A recipe file by path, or a shipped recipe by name (``smollm2-demo``)."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file() and "/" not in name_or_path:
        return shipped
    names = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    raise WhelpError(f"no recipe file {name_or_path}; pass a YAML path or a shipped recipe name ({names})")


def _as_list(value, key: str) -> list:
    if value is None:
        return []
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise WhelpError(f"recipe.{key}[{i}]: expected a mapping (a step's keys), got {item!r}")
        return value
    raise WhelpError(f"recipe.{key}: expected a mapping or a list of mappings, got {value!r}")


SEARCH_DATA = ("calib", "data", "eval_data")  # the data keys of a SearchSpec
SEARCH_FROM_STEP = ("importance", "layer_importance", "calib", "calib_samples", "seq_len", "batch_size", "seed")


@dataclass(frozen=True)
class SeedOnly:
    seed: int = 0


def _fill_defaults(raw: dict) -> dict:
    """Stage options the recipe leaves out take the ``data`` section's and the top-level ``seed``. The data section
    is built here, once (its mixtures parsed), and its ``Mixture``s are the stages' defaults."""
    raw["data"] = from_dict(DataSection, raw.get("data"), "recipe.data")  # its errors name recipe.data, not a stage
    data = {key: getattr(raw["data"], key) for key in ("calib", "train", "eval", "seq_len")}
    seed = from_dict(SeedOnly, {"seed": raw.get("seed", 0)}, "recipe").seed
    raw["prune"] = [
        _search_target(
            {"calib": data["calib"], "seq_len": data["seq_len"], "seed": seed, **(s or {})}, data, f"recipe.prune[{i}]"
        )
        for i, s in enumerate(raw["prune"])
    ]
    raw["generate"] = [{"seed": seed, **s} for s in raw["generate"]]
    raw["distill"] = [
        {"data": data["train"], "eval_data": data["eval"], "seq_len": data["seq_len"], "seed": seed, **(s or {})}
        for s in raw["distill"]
    ]
    if isinstance(raw.get("eval", {}), dict):
        raw["eval"] = {"ppl": [data["eval"]], "seq_len": data["seq_len"], **(raw.get("eval") or {})}
    return raw


def _search_target(step: dict, data: dict, path: str) -> dict:
    """A prune step whose target is a mapping, with that target built as a ``SearchTarget`` here, so an error inside
    it names its key path (``recipe.prune[0].target.search.budgett: unknown key``) where the ``str | SearchTarget``
    union could only say that neither fits. The search's options it leaves out are the step's and the data's."""
    target = step.get("target")
    if not isinstance(target, dict):
        return step
    search = target.get("search")
    if isinstance(search, dict):
        options = from_dict(PruneSpec, {k: step[k] for k in SEARCH_FROM_STEP if k in step}, path)
        inherited = {k: getattr(options, k) for k in SEARCH_FROM_STEP}
        search = {**inherited, "data": data["train"], "eval_data": data["eval"], **search}
        target = {**target, "search": search}
    return {**step, "target": from_dict(SearchTarget, target, f"{path}.target")}


def load(name_or_path: str, overrides: tuple[str, ...] = ()) -> Recipe:
    """Read, override (``a.b=c``), fill defaults and strictly validate a recipe."""
    path = find(name_or_path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise WhelpError(f"cannot read recipe {path}: {exc}") from None
    raw = load_yaml(text, str(path))
    if not isinstance(raw, dict):
        raise WhelpError(f"{path}: a recipe is a mapping with sections teacher, data, prune, distill, eval")
    raw = copy.deepcopy(raw)
    for key in ("prune", "distill", "generate"):  # one step or a list of steps: always a list, so --set indexes it
        if key in raw or key != "generate" or any(o.startswith("generate.0.") for o in overrides):
            raw[key] = _as_list(raw.get(key), key)  # absent, --set generate.max_tokens=N makes a mapping
    apply_overrides(raw, overrides)
    raw["generate"] = _as_list(raw.get("generate"), "generate")
    return from_dict(Recipe, _fill_defaults(raw), "recipe")


def dump(recipe: Recipe) -> str:
    """The resolved recipe as YAML (every value explicit); loading it gives the same Recipe."""
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)
