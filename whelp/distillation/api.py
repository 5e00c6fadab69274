"""``distill_run`` and ``cache_teacher``: the directory verbs of ``whelp distill`` and ``whelp cache-logits``.

``distill_run`` is a thin wrapper over ``whelp.distillation.loop``.

It validates every input before loading a model (data sources, tokenizers of every teacher and cache against the
student's, each cache's temperature and blocks), then loads the models, resumes from the newest checkpoint in
``OUT.distill/checkpoints`` (run state: ``whelp.distillation.run``), trains, and writes the final student atomically to
``OUT`` as a vanilla HF checkpoint with ``distill_report.json``. SIGINT/SIGTERM checkpoint at the end of the current
step; a NaN/inf loss or a divergence (``whelp.distillation.guard``) stops before the update, keeping the last good
checkpoint; re-running with a lower ``lr`` (or another ``run.ADJUSTABLE`` setting) resumes from it. One module: both
verbs share the input checks, the teacher loading and the atomic write of their output.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoModelForCausalLM

from whelp import models, store
from whelp.architecture import check_positions
from whelp.data import check_data, data_identity, open_blocks, source_identity, stream_tokens
from whelp.data.tokenstore import tokenizer_hash
from whelp.distillation import checkpoint, guard, loop, parallel, state
from whelp.distillation import metrics as metrics_log
from whelp.distillation import run as run_state
from whelp.distillation.cache import claim, open_cache
from whelp.distillation.capture import Teacher, check_k, write_cache
from whelp.distillation.interpolate import average_with_start
from whelp.errors import WhelpError
from whelp.models import load_config, load_tokenizer, save_model
from whelp.output import Progress
from whelp.specs import (
    CacheSpec,
    DistillSpec,
    LoadPolicy,
    Mixture,
    SaveSpec,
    check_local,
    check_mixture,
    check_on_policy,
    check_teacher_weights,
)
from whelp.weights import save_dtype


def _inputs(student: str, teachers, caches, spec: DistillSpec) -> str:
    """Identity of the files the run trains from (student, teachers, caches, training data): a run whose inputs
    changed on disk is a different run, never resumed."""
    return store.content_id(
        [
            source_identity(student),
            [source_identity(t) for t, _ in teachers],
            [source_identity(c) for c, _ in caches],
            data_identity(spec.data),
        ]
    )


def check_inputs(student: str, teachers, caches, spec: DistillSpec, policy: LoadPolicy):
    """Everything that needs no model, before any is loaded: data sources, that every teacher shares the student's
    tokenizer (same ids, not only the same size), that no checkpoint contradicts itself, and each cache's tokenizer,
    vocabulary and temperature.
    Returns ``(tokenizer, opened caches)``."""
    check_teacher_weights([w for _, w in teachers] + [w for _, w in caches], spec)
    check_on_policy([w for _, w in teachers], spec)
    check_mixture(len(teachers), len(caches), len(spec.data.sources), spec)
    check_local(len(teachers), len(caches), spec)
    for source in (spec.data, spec.eval_data):
        check_data(source)
    tokenizer = load_tokenizer(student, policy)
    mine = tokenizer_hash(tokenizer)
    for name, _ in teachers:
        theirs = load_tokenizer(name, policy)
        if tokenizer_hash(theirs) != mine:
            raise WhelpError(
                f"teacher {name} has another tokenizer than the student {student} ({len(theirs):,} vs "
                f"{len(tokenizer):,} tokens{', other ids' if len(theirs) == len(tokenizer) else ''}): "
                "token-level distillation needs the same token ids; use a teacher of the student's family"
            )
    for name in [student, *(name for name, _ in teachers)]:
        models.check_checkpoint(name, policy)
    config = load_config(student, policy)
    check_positions(config, spec.seq_len, "--seq-len")
    vocab = config.get_text_config().vocab_size
    opened = []
    for path, _ in caches:
        cache = open_cache(path, student_vocab_size=vocab, tokenizer=tokenizer)
        if not math.isclose(cache.manifest["temperature"], spec.kd.temperature):
            raise WhelpError(
                f"cache {path} was made at temperature {cache.manifest['temperature']} but the loss "
                f"uses {spec.kd.temperature}; pass --temperature {cache.manifest['temperature']} or rebuild"
            )
        if cache.manifest["mode"] == "sample" and spec.kd.name != "forward_kl":
            raise WhelpError(
                f"cache {path} holds teacher samples, which estimate only forward_kl without bias "
                f"(Anshumann et al. 2025), not {spec.kd.name}; use --loss forward_kl or a top-k cache"
            )
        opened.append(cache)
    return tokenizer, opened


@store.writer
def distill_run(
    student: str,
    out: Path,
    spec: DistillSpec,
    teachers: tuple[tuple[str, float], ...] = (),
    caches: tuple[tuple[str, float], ...] = (),
    force: bool = False,
    resume: bool = False,
    progress: bool = True,
    stage_key: str | None = None,
    policy: LoadPolicy = LoadPolicy(),
) -> dict:
    """Distil ``student`` from weighted live ``teachers`` and/or teacher-logit ``caches``; returns the report.
    ``stage_key`` (a build's key of this step's inputs) is recorded in ``out``'s marker."""
    out = store.check_writable(out, force, "model")
    _apart(out, [student] + [t for t, _ in teachers] + [c for c, _ in caches])
    tokenizer, opened = check_inputs(student, teachers, caches, spec, policy)
    world = parallel.init_world()
    try:
        identity = {
            "student": student,
            "teachers": [list(t) for t in teachers],
            "caches": [list(c) for c in caches],
            "spec": spec.flat(),
            "world_size": world.size,
            "inputs": _inputs(student, teachers, caches, spec),
        }
        rdir, changed, spec = run_state.prepare(out, identity, force, resume, world, spec)  # grad_accum for world
        blocks = parallel.main_first(
            world, lambda: open_blocks(spec.data, tokenizer, spec.seq_len, max_tokens=spec.max_tokens)
        )
        for cache in opened:
            cache.check_blocks(blocks)
        eval_ids = parallel.main_first(
            world, lambda: stream_tokens(spec.eval_data, tokenizer, spec.monitor.eval_tokens)
        )
        torch.manual_seed(spec.seed)
        dtype = str(state.compute_dtype(spec.compute.dtype, world.device)).replace("torch.", "")
        lm = models.load_model(student, device=str(world.device), policy=policy)[0]
        kept = kept_record(student)  # carried on to the report whatever this run's teacher
        live = [_load_teacher(name, dtype, world, spec.compute.shard_teachers, policy) for name, _ in teachers]
        t = state.setup(
            lm,
            live,
            opened,
            [w for _, w in teachers] + [w for _, w in caches],
            [n for n, _ in teachers] + [p for p, _ in caches],
            blocks,
            spec,
            world,
            eval_ids,
            len(tokenizer),
            kept if _pruned_from(kept, teachers) else None,
        )
        start, last_good = _resume(t, rdir, changed)
        report = _train(t, rdir, start, last_good, progress)
        report.update(
            student=student,
            teachers=identity["teachers"],
            caches=identity["caches"],
            spec=spec.flat(),
            world_size=world.size,
            run_dir=str(rdir),
            history=run_state.history(rdir) if world.main else [],
            kept=kept,
        )
        source = models.locate(teachers[0][0] if teachers else student)  # whose tokenizer and stop ids it carries
        _save_student(t.model, lm, source, out, force, report, world, stage_key, student, spec.save)
        return report
    finally:
        parallel.close_world(world)


def kept_record(student: str) -> dict | None:
    """The pruning's record of what ``student`` kept of its teacher (``kept`` of prune_report.json with the pruned
    ``teacher``'s path, carried on by each distill_report.json), or None for a student whelp did not prune."""
    for name in ("prune_report.json", "distill_report.json"):  # whelp.pruning.api.REPORT_FILE, this module's
        path = Path(models.locate(student)) / name
        if not path.is_file():
            continue
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise WhelpError(f"{path} is not readable JSON ({exc}); restore it or prune the student again") from exc
        kept = report.get("kept")
        if kept and name == "prune_report.json":
            kept = {**kept, "teacher": report.get("source")}
        return kept or None
    return None


def _pruned_from(kept: dict | None, teachers) -> bool:
    """Whether ``kept`` records a pruning of the first live teacher: only then do its indices map the student's
    layers and channels to that teacher's (not after a chained build's second pruning, nor for another teacher)."""
    if not kept or not teachers or kept.get("teacher") is None:
        return False
    try:
        return Path(models.locate(kept["teacher"])).resolve() == Path(models.locate(teachers[0][0])).resolve()
    except WhelpError:  # a teacher no longer where it was pruned from
        return False


def _load_teacher(name: str, dtype: str, world, shard: bool, policy: LoadPolicy):
    """A frozen live teacher, stored in the compute dtype (half the memory in bf16). With ``shard`` its
    decoder layers are FSDP2-sharded; it is read through host memory (safetensors pages the node's ranks share)
    so that only this rank's shard reaches the device."""
    if not shard:
        return models.load_model(name, dtype=dtype, device=str(world.device), policy=policy)[0].requires_grad_(False)
    model = models.load_model(name, dtype=dtype, device="cpu", policy=policy)[0].requires_grad_(False)
    return parallel.shard_teacher(model, world).to(world.device)


def _apart(out: Path, inputs: list[str]) -> None:
    """``--out`` and its run state apart from every local input: the student, teachers, caches."""
    for path in (out, run_state.run_dir(out)):
        store.check_apart(path, inputs)


def _resume(t: state.Training, rdir: Path, changed: dict) -> tuple[int, Path | None]:
    """Restore the newest checkpoint (model, optimizer, scheduler, RNG, counters): ``(start step, its path)``."""
    found = checkpoint.list_checkpoints(rdir / "checkpoints")
    if not found:
        return 0, None
    meta = checkpoint.load_checkpoint(found[-1], t.model, t.optimizer, t.scheduler)
    t.tokens_seen = meta["tokens_seen"]
    if t.mixing is not None:  # --mixture dynamic: the weights and streams where the checkpoint left them
        t.mixing.restore(meta["mixture"])
    if "guard" in meta:  # what the divergence guard had seen (a checkpoint from before the guard: it starts here)
        t.seen = guard.History.of(meta["guard"])
    t.scheduler = run_state.adjusted_scheduler(t.optimizer, t.spec.optim, t.steps, meta["step"])  # same lr as unbroken
    if changed:
        shown = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        kept = (
            f"; grad_accum rescaled to keep the global batch of {t.per_step} sequences per step"
            if "world_size" in changed
            else ""
        )
        metrics_log.note(
            f"resuming {rdir} from step {meta['step']} with changed settings: {shown}{kept} "
            f"(recorded in {run_state.RUN_FILE})"
        )
    return meta["step"], found[-1]


def _train(t: state.Training, rdir: Path, start: int, last_good: Path | None, progress: bool) -> dict:
    """The loop with checkpoints, metrics.jsonl, TensorBoard and a progress bar (rank 0 logs)."""
    metrics = rdir / "metrics.jsonl"
    main = t.world.main
    if main:
        metrics_log.trim(metrics, start)
    writer = metrics_log.tensorboard(rdir) if t.spec.monitor.tensorboard and main else None
    bar = Progress("distill", t.steps, start, enabled=progress and main)

    def save(step: int) -> Path:
        return checkpoint.save_checkpoint(
            rdir / "checkpoints",
            step,
            t.model,
            t.optimizer,
            t.scheduler,
            {
                "tokens_seen": t.tokens_seen,
                "data_position": step * t.per_step,
                "guard": t.seen.state(),
                **({} if t.mixing is None else {"mixture": t.mixing.state()}),
            },
            t.spec.save.keep_last,
        )

    def on_step(row: dict) -> None:
        if main:
            metrics_log.log(metrics, writer, row)
            metrics_log.show(bar, row)

    t0 = time.perf_counter()
    first_eval = loop.held_out(t) if start == 0 else None
    try:
        with bar:
            last = loop.train(t, start, save=save, on_step=on_step, last_good=last_good)
    except guard.Diverged as stop:  # a checkpoint saved from the weights the guard condemned is not the last good
        raise stop.resuming_from(checkpoint.discard_from(rdir / "checkpoints", stop.bad_from)) from None
    finally:
        if writer is not None:
            writer.close()
    return {
        "steps": t.steps,
        "tokens": t.tokens_seen,
        "compute_dtype": str(t.dtype).replace("torch.", ""),
        "final": last,
        "eval_start": first_eval,
        "eval_end": loop.held_out(t),
        "wall_s": time.perf_counter() - t0,
    }


def _save_student(
    model, lm, source: str, out: Path, force: bool, report: dict, world, stage_key, student: str, spec: SaveSpec
) -> None:
    """Gather the full fp32 weights and write ``out`` from rank 0 as a plain (unsharded) HF model, in the
    ``save_dtype`` of ``spec`` (auto: the dtype the ``student`` it started from stores), averaged with the
    ``student``'s own weights when ``spec.interpolate`` < 1 (WiSE-FT, whelp.distillation.interpolate), with the
    tokenizer files and generation config of ``source``: the first live teacher, else the student
    (whelp.assistant)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if world.main:
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(lm.config)
        # the student alone: a hidden-state projection (KDStudent.hidden_proj) is training state, not the model
        # (popped: an average replaces each tensor, and the gathered one must not outlive it)
        state = {k.removeprefix("lm."): full.pop(k) for k in list(full) if k.startswith("lm.")}
        if spec.interpolate < 1:
            tied = bool(getattr(lm.config, "tie_word_embeddings", False))
            average_with_start(state, Path(models.locate(student)), spec.interpolate, tied)
        plain.load_state_dict(state, assign=True)
        plain.tie_weights()
        plain.config.use_cache = True
        dtype = getattr(torch, save_dtype(spec.save_dtype, student, lm.config))
        save_model(
            plain.eval().to(dtype),
            None,
            out,
            force=force,
            stage_key=stage_key,
            extra={"distill_report.json": json.dumps(report, indent=2)},
            source=source,
        )
    if world.size > 1:
        torch.distributed.barrier()


@store.writer
def cache_teacher(
    teacher: str,
    data: str | Mixture,
    out: Path,
    spec: CacheSpec,
    force: bool = False,
    stage_key: str | None = None,
    policy: LoadPolicy = LoadPolicy(),
) -> Path:
    """Load ``teacher``, read ``data`` exactly as ``whelp distill`` does (``open_blocks`` defaults) and cache it.
    Under torchrun every process captures its share of the blocks (``whelp.distillation.capture``); with
    ``spec.tp_size`` T > 1, groups of T processes share one tensor-parallel teacher. ``data`` given as text (the
    Python API's, ``a:0.7,b:0.3``) is parsed here, once."""

    def early() -> None:  # before minutes of loading: a user's directory, a bad source or size, at once
        claim(out, force)
        _apart(out, [teacher])
        check_data(data)
        config = load_config(teacher, policy)
        check_positions(config, spec.seq_len, "--seq-len")
        check_k(spec, min(config.vocab_size, len(load_tokenizer(teacher, policy))))

    data = Mixture.of(data)
    out = Path(out).expanduser()
    world = parallel.init_world()
    try:
        parallel.from_main(world, early)
        model, tokenizer = models.load_model(
            teacher,
            dtype=spec.dtype,
            device=str(world.device),
            policy=policy,
            tp_mesh=parallel.tp_mesh(world, spec.tp_size),
        )
        blocks = parallel.main_first(
            world, lambda: open_blocks(data, tokenizer, spec.seq_len, max_tokens=spec.max_tokens)
        )
        with Progress("caching teacher logits (blocks)", len(blocks), enabled=world.main) as bar:
            return write_cache(
                Teacher(model, tokenizer, teacher),
                blocks,
                out,
                spec,
                force=force,
                progress=bar.advance,
                stage_key=stage_key,
                world=world,
            )
    finally:
        parallel.close_world(world)
