"""A distillation run's state beside its output, ``OUT.distill/``: identity, resume rules, changed settings.

``run.json`` (a sealed record) holds the run's identity: student, teachers, caches, every setting, world size,
and the history of settings changed on resume. A re-run resumes from the newest checkpoint when the identity
matches; settings that only steer the optimiser and the bookkeeping (ADJUSTABLE: lower ``lr`` after a NaN stop)
may differ, the change is recorded; any other difference is refused, naming it. A run without checkpoints holds
nothing to lose, so the next command starts it afresh: a command corrected after a failed start is never
blocked. Only rank 0 touches the directory; every rank learns its verdict.
"""

from __future__ import annotations

from pathlib import Path

from whelp import store
from whelp.distillation import checkpoint, parallel
from whelp.errors import WhelpError


def run_dir(out: Path) -> Path:
    return out.with_name(out.name + ".distill")


# Settings that may change when a run resumes (after a NaN stop, to lower --lr): they steer the optimiser and
# the bookkeeping, not which tokens each step reads or what the loss is, so the run stays one well-defined run.
ADJUSTABLE = ("lr", "warmup", "weight_decay", "max_grad_norm", "eval_every", "eval_data", "eval_tokens", "save_every",
              "keep_last", "tensorboard", "chunk_size", "grad_checkpointing", "dtype")
RUN_FILE = "run.json"


def _changes(old: dict, new: dict) -> tuple[dict, dict]:
    """``(adjustable, fixed)`` differences between two run identities, as {name: [old, new]}."""
    flat_old = {**{k: v for k, v in old.items() if k not in ("spec", "history")}, **old["spec"]}
    flat_new = {**{k: v for k, v in new.items() if k not in ("spec", "history")}, **new["spec"]}
    diff = {k: [flat_old.get(k), flat_new.get(k)] for k in flat_new if flat_old.get(k) != flat_new.get(k)}
    return ({k: v for k, v in diff.items() if k in ADJUSTABLE}, {k: v for k, v in diff.items() if k not in ADJUSTABLE})


def _prepare(out: Path, identity: dict, force: bool, resume: bool) -> tuple[Path, dict]:
    """Create or reopen ``OUT.distill`` (rank 0); returns it and the settings that changed since its last start.

    A run with checkpoints resumes when only ADJUSTABLE settings differ (the change is recorded in run.json);
    other differences are refused unless ``force``. A run without checkpoints holds nothing to lose and is
    started afresh, so a command corrected after a failed start is never blocked by it.
    """
    rdir = store.check_writable(run_dir(out), True, "run")  # whelp's own run state only, never a user's dir
    saved = rdir / RUN_FILE
    found = checkpoint.list_checkpoints(rdir / "checkpoints") if saved.exists() and not force else []
    if resume and not found:
        raise WhelpError(f"--resume: no checkpoint to resume in {rdir}; drop --resume to start the run")
    if not found:  # born whole, marker included: a kill can never leave a run directory whelp disowns
        with store.atomic_dir(rdir, force=True, kind="run") as tmp:
            (tmp / "checkpoints").mkdir()
            store.write_record(tmp / RUN_FILE, {**identity, "history": []})
        return rdir, {}
    old = store.read_record(saved, f"pass --force to start the run in {rdir} over")
    adjustable, fixed = _changes(old, identity)
    if fixed:
        shown = "; ".join("the student, teacher, cache or data files changed since it started" if k == "inputs"
                          else f"{k}: {a!r} there, {b!r} now" for k, (a, b) in fixed.items())
        raise WhelpError(f"{rdir} holds a run with other settings ({shown}) at {found[-1].name}; re-run with its "
                         "settings to resume it, or pass --force to start over")
    if adjustable:
        history = old["history"] + [{"from_step": int(found[-1].name.removeprefix(checkpoint.PREFIX)),
                                     "changed": adjustable}]
        store.write_record(saved, {**identity, "history": history})
    return rdir, adjustable


def prepare(out: Path, identity: dict, force: bool, resume: bool, world) -> tuple[Path, dict]:
    """``_prepare`` on rank 0 alone (the others only learn whether it refused): returns the run directory and
    the settings changed since the run's last start (empty on the other ranks)."""
    prepared = parallel.main_first(world, lambda: _prepare(out, identity, force, resume) if world.main else None)
    return prepared if world.main else (run_dir(out), {})


def adjusted_scheduler(optimizer, spec, steps: int, start: int):
    """The scheduler of a resumed optimiser: lr, warmup and weight decay as given now, at position ``start`` of
    the warmup + cosine schedule. With unchanged settings this is exactly the restored scheduler (LambdaLR sets
    lr = base_lr * lambda(step) afresh each step), so an unchanged resume stays bit-identical."""
    from transformers import get_cosine_schedule_with_warmup

    for group in optimizer.param_groups:
        group.update(initial_lr=spec.lr, weight_decay=spec.weight_decay)
    return get_cosine_schedule_with_warmup(optimizer, spec.warmup, steps, last_epoch=start - 1)


def history(rdir: Path) -> list:
    """The settings changes this run resumed under (run.json's history), for the report's provenance."""
    return store.read_record(rdir / RUN_FILE, f"pass --force to start the run in {rdir} over")["history"]
