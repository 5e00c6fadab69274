"""``whelp search``: the best student shape of a teacher for a parameter, memory or latency budget.

Minitron (Muralidharan et al. 2024) found that which shape is best flips after distillation (depth pruning looks
fine one-shot and loses after retraining); ModelOpt's search scores the top K subnets of a budget and keeps the
best, and DarwinLM (2025) ranks candidates after short training. whelp does both, in order:

1. enumerate every shape on the grid within the size budget (``space.enumerate_shapes``: exact counts, nothing
   missed) and draw a pool diverse over the depth/width trade-off (``space.proxy_pool``);
2. one calibration pass of the teacher (the importance scores, cached by teacher + data like ``whelp prune``'s);
3. prune every pool shape from those scores and score it one-shot: KL(teacher || candidate) in nats per token on
   held-out blocks; with a latency budget, measure each pool shape's decode speed (random weights, the eval
   harness's speed code, cached per shape and device) and drop those over it;
4. distil the best K one-shot candidates for S steps each from the teacher on the same tokens, and rank by held-out
   KL after that short training (perplexity beside it); the winner is the best. Spearman between the one-shot and
   post-training rankings says how far the zero-shot ranking misled.

Every candidate is a stage: the one-shot scores and each trained candidate are written atomically to ``OUT.search/``
as they finish, keyed by the search's identity (teacher files, spec, data), so a killed search resumes where it
stopped and ends exactly where an uninterrupted one does. ``OUT`` (leaderboard, plot, winner, target.json) is
written atomically at the end (report.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from whelp import data, models, store
from whelp.data import data_identity, source_identity
from whelp.distillation import inprocess
from whelp.errors import WhelpError
from whelp.evals.speed import shape_speed
from whelp.output import Progress
from whelp.pruning import arch, importance, surgery
from whelp.pruning import scores as saved
from whelp.pruning.api import calibrate_scores, calibration_tokens, kl_to_teacher, log_probs
from whelp.pruning.targets import first_keep
from whelp.search import space
from whelp.search.budget import Budget, parse_budget
from whelp.search.report import report, write_outputs
from whelp.specs import DistillSpec, LoadPolicy, PruneSpec, SearchSpec, SpeedSpec, record

WORK = ".search"
PROXY = "proxy.json"


def work_dir(out: Path) -> Path:
    return out.with_name(out.name + WORK)


def _space(config, spec: SearchSpec) -> tuple[list[dict], list[dict], Budget, space.Counter]:
    """``(every shape within budget, the one-shot pool, the budget, the counter)``: configs only, no weights."""
    counter = space.Counter(config)
    budget = parse_budget(spec.budget, counter.teacher, counter, spec.context)
    shapes = space.enumerate_shapes(
        config, budget, space.parse_axes(spec.axes), spec.tolerance, spec.multiple, spec.context
    )
    return shapes, space.proxy_pool(shapes, spec.pool), budget, counter


def cost(config, spec: SearchSpec, pool: list[dict], counter: space.Counter) -> dict:
    """FLOPs of the search (2 N per forward token, 6 N per trained one: Kaplan et al. 2020): calibration, the pool's
    one-shot scores (teacher once + each candidate), and K short distillations (each step a teacher forward and a
    student forward + backward); K is charged at the pool's largest candidates, an upper bound. N is the parameters
    a token runs through: all of them, or an MoE's active ones."""
    teacher = counter.active(counter.teacher)
    held_out_tokens = spec.eval_blocks * spec.seq_len
    sizes = sorted((counter.active(s) for s in pool), reverse=True)
    trained = spec.score_steps * spec.batch_size * spec.seq_len
    parts = {
        "calibration": 2 * teacher * spec.calib_samples * spec.seq_len,
        "one_shot": 2 * held_out_tokens * (teacher + sum(sizes)),
        "distillation": sum((6 * n + 2 * teacher) * trained for n in sizes[: spec.candidates]),
    }
    return {**parts, "total": sum(parts.values()), "distillation_tokens_per_candidate": trained}


def plan_search(teacher_config, spec: SearchSpec) -> dict:
    """What a search would try and cost, from the config alone (``--dry-run``, ``whelp plan``)."""
    shapes, pool, _, counter = _space(teacher_config, spec)
    return {
        "candidates": len(shapes),
        "shapes": shapes,
        "pool": pool,
        "largest": shapes[0],
        "cost": cost(teacher_config, spec, pool, counter),
    }


def _identity(teacher_dir: Path, spec: SearchSpec) -> str:
    return store.content_id(
        [
            source_identity(str(teacher_dir)),
            record(spec),
            data_identity(spec.calib),
            data_identity(spec.data),
            data_identity(spec.eval_data),
        ]
    )


def _work(out: Path, key: str, force: bool) -> Path:
    """``OUT.search/`` of this search: made, or reopened when its key matches; another search's is refused."""
    work = work_dir(out)
    mark = store.marker(work) if work.exists() else None
    if mark is not None and mark.get("stage_key") != key:
        if not force and _worth_keeping(work):
            raise WhelpError(
                f"{work} holds a search with other settings or inputs; pass --force to start over, "
                "or choose another --out"
            )
        work = store.check_writable(work, True, "run")
        mark = None
    if mark is None:
        with store.atomic_dir(work, force=True, kind="run", stage_key=key) as tmp:
            (tmp / "candidates").mkdir()
    return work


def _worth_keeping(work: Path) -> bool:
    """Whether a search's work holds what took long (one-shot scores, trained candidates): a start that failed
    before them (an impossible budget, a typo) leaves nothing that should make the corrected command ask for
    ``--force``."""
    return (work / PROXY).exists() or any((work / "candidates").glob("*/result.json"))


def _latency(config, shape: dict, device: str) -> float:
    """Decode milliseconds per token of ``shape`` (random weights), measured once per shape and device."""
    speed = shape_speed(surgery.target_config(config, first_keep(config, shape)), device, SpeedSpec())
    return 1000.0 / speed["decode_tokens_per_s"]


def _fitting(config, pool: list[dict], budget: Budget, device: str, progress: bool) -> dict[int, float]:
    """Decode ms/token of each pool shape (by index) that meets ``budget.latency_ms``, measured on random weights
    before the teacher's are loaded, so an impossible budget fails in seconds, not after calibration; WhelpError
    if none does."""
    if budget.latency_ms is None:
        return {i: None for i in range(len(pool))}
    times = []
    with Progress("search: decode speed of the pool", len(pool), enabled=progress) as bar:
        for shape in pool:
            times.append(_latency(config, shape, device))
            bar.update(advance=1)
    fitting = {i: ms for i, ms in enumerate(times) if ms <= budget.latency_ms}
    if not fitting:
        raise WhelpError(
            f"no pool shape decodes within {budget.latency_ms:g} ms/token on this device (the fastest "
            f"takes {min(times):.2f} ms); raise latency= or lower the size budget"
        )
    return fitting


@dataclass
class Trial:
    """What every candidate is tried against: the teacher (``source``: its checkpoint, whose tokenizer files and
    generation config each candidate carries) and its scores, the held-out blocks and the teacher's log-probs on
    them [n, L, V], the short runs' blocks, and where results go."""

    spec: SearchSpec
    work: Path
    source: str
    teacher: object
    tokenizer: object
    scores: dict
    counter: space.Counter
    held: torch.Tensor
    teacher_logp: torch.Tensor
    train_blocks: object
    progress: bool = True

    def prune(self, shape: dict):
        cfg = self.teacher.config
        keep = importance.select(self.scores, cfg, shape, self.spec.layer_importance, "embedding")
        return surgery.prune_model(self.teacher, keep, arch.family_of(cfg), surgery.target_config(cfg, keep))

    def score(self, model) -> dict:
        return kl_to_teacher(self.teacher_logp, model, self.held, self.spec.batch_size)


def _one_shot(t: Trial, pool: list[dict], latency: dict[int, float]) -> list[dict]:
    """Each pool shape that meets the latency budget (``_fitting``) pruned and scored one-shot; recorded as each
    finishes."""
    path = t.work / PROXY
    done = store.read_record(path, f"delete {path} to score the pool again")["rows"] if path.exists() else []
    todo = [(pool[i], ms) for i, ms in latency.items()]
    with Progress("search: one-shot KL of the pool", len(todo), completed=len(done), enabled=t.progress) as bar:
        for shape, ms in todo[len(done) :]:
            row = {"shape": shape, "params": list(t.counter.params(shape)), "one_shot": t.score(t.prune(shape))}
            if ms is not None:
                row["latency_ms"] = ms
            done.append(row)
            store.write_record(path, {"rows": done})
            bar.update(advance=1)
    return done


def _carried(cls, spec: SearchSpec, names: tuple[str, ...], **more):
    """The ``cls`` spec (DistillSpec, PruneSpec) a search stage runs: the search spec's fields ``names``, and ``more``."""
    return cls(**{name: getattr(spec, name) for name in names}, **more)


def _train(t: Trial, index: int, row: dict) -> dict:
    """Candidate ``index``: its S-step distillation from the teacher (a stage of its own), scored on held-out."""
    stage = t.work / "candidates" / f"{index:02d}"
    if (stage / "result.json").is_file():
        return json.loads((stage / "result.json").read_text())
    spec = t.spec
    dspec = _carried(DistillSpec, spec, ("batch_size", "seq_len", "lr", "data", "seed"), steps=spec.score_steps)
    torch.manual_seed(spec.seed)
    start = time.perf_counter()
    student = inprocess.distill(
        t.prune(row["shape"]), [t.teacher], t.train_blocks, dspec, tokenizer=t.tokenizer, progress=False
    )
    result = {**row, "train_s": time.perf_counter() - start, "trained": t.score(student)}
    with store.atomic_dir(stage, force=True, kind="model") as tmp:
        models.write_model(student, None, tmp / "model", source=t.source)
        (tmp / "result.json").write_text(json.dumps(result, indent=2))
    return result


def _scores(teacher, teacher_dir: Path, tokenizer, spec: SearchSpec):
    """The importance scores of one calibration pass, from ``whelp prune``'s cache when it holds them."""
    rows = data.open_blocks(spec.calib, tokenizer, spec.seq_len, seed=spec.seed)
    tokens = calibration_tokens(rows, spec.calib_samples)
    meta = saved.scores_meta(teacher_dir, store.content_id([rows.fingerprint, len(tokens)]), spec.importance)
    cached = saved.cache_path(meta)
    found = saved.load_scores(cached, meta) if cached.is_file() else None
    carried = ("importance", "layer_importance", "calib", "calib_samples", "seq_len", "batch_size", "seed")
    prune = _carried(PruneSpec, spec, carried)
    scores = calibrate_scores(teacher, arch.family_of(teacher.config), tokens, prune, found)
    if found is None:
        saved.save_scores(cached, scores, meta)
    return scores


@store.writer
def search_run(
    teacher: str,
    spec: SearchSpec,
    out: Path,
    force: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    stage_key: str | None = None,
    policy: LoadPolicy = LoadPolicy(),
) -> dict:
    """Search ``teacher``'s shapes for ``spec.budget`` into ``out`` (see the module docstring); returns the report
    (``search.json``). ``dry_run``: the candidates and the cost, from the config alone (no weights, nothing written).
    """
    teacher_dir = Path(models.locate(teacher))
    config = models.load_config(str(teacher_dir), policy)
    if arch.family_of(config) is None:
        raise WhelpError(f"whelp search prunes the families {', '.join(arch.FAMILIES)}, not '{config.model_type}'")
    shapes, pool, budget, counter = _space(config, spec)
    out = store.check_writable(out, force, "search")  # every check of the real run, --dry-run included
    store.check_apart(out, [teacher_dir])
    for source in (spec.calib, spec.data, spec.eval_data):
        data.check_data(source)
    if dry_run:
        return {
            "candidates": shapes,
            "pool": [{"shape": s, "params": list(counter.params(s))} for s in pool],
            "cost": cost(config, spec, pool, counter),
        }
    work = _work(out, _identity(teacher_dir, spec), force)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    latency = _fitting(config, pool, budget, device, progress)
    model, tokenizer = models.load_model(str(teacher_dir), device=device, policy=policy)
    model.requires_grad_(False)
    held = data.open_blocks(spec.eval_data, tokenizer, spec.seq_len, seed=spec.seed).head(spec.eval_blocks)
    held = held.to(device)
    start = time.perf_counter()
    scores = _scores(model, teacher_dir, tokenizer, spec)
    timings = {"calibrate_s": time.perf_counter() - start}
    t = Trial(
        spec,
        work,
        str(teacher_dir),
        model,
        tokenizer,
        scores,
        counter,
        held,
        log_probs(model, held, spec.batch_size),
        data.open_blocks(
            spec.data,
            tokenizer,
            spec.seq_len,
            seed=spec.seed,
            max_tokens=spec.score_steps * spec.batch_size * spec.seq_len,
        ),
        progress,
    )
    start = time.perf_counter()
    rows = _one_shot(t, pool, latency)
    timings["one_shot_s"] = time.perf_counter() - start
    best = sorted(rows, key=lambda r: r["one_shot"]["kl"])[: spec.candidates]
    trained = []
    with Progress("search: distilling candidates", len(best), enabled=progress) as bar:
        for i, row in enumerate(best):
            trained.append(_train(t, i, row))
            bar.update(advance=1, info=f"candidate {i + 1}: KL {trained[-1]['trained']['kl']:.3f}")
    result = {**report(teacher, spec, shapes, rows, trained), "timings": timings}
    write_outputs(result, work, out, force, stage_key)
    return result
