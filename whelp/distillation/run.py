"""A distillation run's state beside its output, ``OUT.distill/``: identity, resume rules, changed settings.

``run.json`` (a sealed record) holds the run's identity: student, teachers, caches, every setting, world size,
and the history of settings changed on resume. A re-run resumes from the newest checkpoint when the identity
matches; settings that only steer the optimiser and the bookkeeping (ADJUSTABLE: lower ``lr`` after a NaN stop)
may differ, the change is recorded; any other difference is refused, naming it. A run without checkpoints holds
nothing to lose, so the next command starts it afresh: a command corrected after a failed start is never
blocked. Only rank 0 touches the directory; every rank learns its verdict.

The number of processes may change too: what fixes the tokens a step reads is its global micro-batches,
``grad_accum x world_size`` (``loop.optimizer_step`` splits them as (grad_accum, world, batch_size)), so a run
resumed on another number of processes keeps that product by rescaling ``grad_accum`` (``rescale_grad_accum``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from transformers import get_cosine_schedule_with_warmup

from whelp import store
from whelp.distillation import checkpoint, parallel
from whelp.errors import WhelpError
from whelp.specs import DistillSpec, OptimSpec


def run_dir(out: Path) -> Path:
    return out.with_name(out.name + ".distill")


# Settings that may change when a run resumes (after a NaN stop, to lower --lr): they steer the optimiser and
# the bookkeeping, not which tokens each step reads or what the loss is, so the run stays one well-defined run.
# world_size and grad_accum split a step's micro-batches; their product, micro_batches_per_step, is fixed.
ADJUSTABLE = (
    "lr",
    "warmup",
    "weight_decay",
    "max_grad_norm",
    "eval_every",
    "eval_data",
    "eval_tokens",
    "save_every",
    "keep_last",
    "interpolate",
    "tensorboard",
    "chunk_size",
    "grad_checkpointing",
    "dtype",
    "shard_teachers",
    "world_size",
    "grad_accum",
)
RUN_FILE = "run.json"


def _settings(identity: dict) -> dict:
    """A run identity's settings in one dict, with its global micro-batches per step."""
    flat = {**{k: v for k, v in identity.items() if k not in ("spec", "history")}, **identity["spec"]}
    return {**flat, "micro_batches_per_step": flat["grad_accum"] * flat["world_size"]}


def _changes(old: dict, new: dict) -> tuple[dict, dict]:
    """``(adjustable, fixed)`` differences between two run identities, as {name: [old, new]}. A setting the old run
    did not record (one whelp added since) had its default then: a run started before it resumes."""
    flat_old, flat_new = {**DistillSpec(steps=1).flat(), **_settings(old)}, _settings(new)
    diff = {k: [flat_old.get(k), flat_new.get(k)] for k in flat_new if flat_old.get(k) != flat_new.get(k)}
    return ({k: v for k, v in diff.items() if k in ADJUSTABLE}, {k: v for k, v in diff.items() if k not in ADJUSTABLE})


def rescale_grad_accum(grad_accum: int, old_world: int, world: int, on_policy: float) -> int:
    """The ``grad_accum`` that keeps a run's global batch, ``grad_accum x old_world`` micro-batches per step, on
    ``world`` processes. Refused when ``world`` does not divide them, and for on-policy runs (which micro-batches
    sample, and their generators, follow the accumulation index: ``whelp.distillation.onpolicy``)."""
    if world == old_world:
        return grad_accum
    micro = grad_accum * old_world
    if on_policy:
        raise WhelpError(
            f"this run samples on-policy (on_policy={on_policy}), and which micro-batches sample follows "
            f"--grad-accum, so it cannot resume on {world} processes: relaunch it on {old_world} "
            f"(torchrun --nproc_per_node {old_world}) as it started"
        )
    if micro % world:
        raise WhelpError(
            f"this run's steps hold {micro} micro-batches (--grad-accum {grad_accum} x {old_world} "
            f"processes), which {world} processes cannot split evenly: relaunch it on {old_world} "
            f"processes (or another divisor of {micro}) to keep its global batch"
        )
    return micro // world


def _reshaped(old: dict, identity: dict) -> dict:
    """``identity`` with the ``grad_accum`` that keeps ``old``'s global batch on its number of processes, when the
    command repeats the old --grad-accum; another one is the user's choice, left for ``_changes`` to judge."""
    spec = identity["spec"]
    grad_accum = rescale_grad_accum(
        old["spec"]["grad_accum"], old["world_size"], identity["world_size"], old["spec"].get("on_policy", 0.0)
    )
    if spec["grad_accum"] != old["spec"]["grad_accum"]:
        return identity
    return {**identity, "spec": {**spec, "grad_accum": grad_accum}}


def _prepare(out: Path, identity: dict, force: bool, resume: bool) -> tuple[Path, dict, int]:
    """Create or reopen ``OUT.distill`` (rank 0); returns it, the settings that changed since its last start and
    the run's ``grad_accum`` on this number of processes.

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
        return rdir, {}, identity["spec"]["grad_accum"]
    old = store.read_record(saved, f"pass --force to start the run in {rdir} over")
    identity = _reshaped(old, identity)
    adjustable, fixed = _changes(old, identity)
    if fixed:
        shown = "; ".join(
            "the student, teacher, cache or data files changed since it started"
            if k == "inputs"
            else f"{k}: {a!r} there, {b!r} now"
            for k, (a, b) in fixed.items()
        )
        raise WhelpError(
            f"{rdir} holds a run with other settings ({shown}) at {found[-1].name}; re-run with its "
            "settings to resume it, or pass --force to start over"
        )
    if adjustable:
        history = old["history"] + [
            {"from_step": int(found[-1].name.removeprefix(checkpoint.PREFIX)), "changed": adjustable}
        ]
        store.write_record(saved, {**identity, "history": history})
    return rdir, adjustable, identity["spec"]["grad_accum"]


def prepare(
    out: Path, identity: dict, force: bool, resume: bool, world, spec: DistillSpec
) -> tuple[Path, dict, DistillSpec]:
    """``_prepare`` on rank 0 alone (the others learn whether it refused, and the grad_accum): returns the run
    directory, the settings changed since the run's last start (empty on the other ranks) and ``spec`` with the
    run's grad_accum on this number of processes."""
    prepared = parallel.main_first(world, lambda: _prepare(out, identity, force, resume) if world.main else None)
    rdir, changed, grad_accum = prepared if world.main else (run_dir(out), {}, 0)
    grad_accum = parallel.all_sum(world, torch.tensor([float(grad_accum)], dtype=torch.float64))  # rank 0's alone
    return rdir, changed, replace(spec, grad_accum=int(grad_accum.item()))


def adjusted_scheduler(optimizer, spec: OptimSpec, steps: int, start: int):
    """The scheduler of a resumed optimiser: lr, warmup and weight decay as given now, at position ``start`` of
    the warmup + cosine schedule. With unchanged settings this is exactly the restored scheduler (LambdaLR sets
    lr = base_lr * lambda(step) afresh each step), so an unchanged resume stays bit-identical."""
    for group in optimizer.param_groups:
        group.update(initial_lr=spec.lr, weight_decay=spec.weight_decay)
    return get_cosine_schedule_with_warmup(optimizer, spec.warmup, steps, last_epoch=start - 1)


def history(rdir: Path) -> list:
    """The settings changes this run resumed under (run.json's history), for the report's provenance."""
    return store.read_record(rdir / RUN_FILE, f"pass --force to start the run in {rdir} over")["history"]
