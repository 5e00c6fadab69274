"""The training and evaluation verbs: ``whelp distill`` and ``eval``."""

from __future__ import annotations

from pathlib import Path

import typer

from whelp.cli.app import load_policy, say
from whelp.flags import with_spec
from whelp.specs import DistillSpec, EvalSpec, parse_weighted


@with_spec("spec", EvalSpec)
def eval_(
    models: list[str] = typer.Argument(
        ..., help="MODEL or LABEL=MODEL (dir, registered name, hub id); the first is the reference"
    ),
    out: str = typer.Option(..., "--out", help="Report directory (metrics.json, report.md, report.png)"),
    baseline: str | None = typer.Option(None, "--baseline", help="Reference model (default: the first)"),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out directory"),
    spec: EvalSpec | None = None,
):  # built from the options by @with_spec
    """Score models on perplexity, lm-eval tasks, size and speed; write a report comparing them to the reference."""
    from whelp.evals.api import EvalResult, evaluate_to, labelled  # noqa: PLC0415 - start-up: --help and show load no verb module

    metrics = evaluate_to(out, labelled(models, baseline), spec, force=force, policy=load_policy())
    typer.echo(EvalResult(metrics).markdown() + f"\nwrote {out}/metrics.json, report.md, report.png")


@with_spec("spec", DistillSpec)
def distill(
    student: str = typer.Argument(..., help="Student model directory (e.g. a pruned checkpoint)"),
    out: str = typer.Option(..., "--out", help="Output directory of the distilled student"),
    teacher: list[str] = typer.Option([], "--teacher", help="Live teacher MODEL[:WEIGHT] (repeatable)"),
    cache: list[str] = typer.Option([], "--cache", help="Teacher-logit cache DIR[:WEIGHT] (repeatable)"),
    resume: bool = typer.Option(False, "--resume", help="Require a run to resume in OUT.distill"),
    force: bool = typer.Option(False, "--force", help="Start over and overwrite --out"),
    spec: DistillSpec | None = None,
):  # built from the options by @with_spec
    """Distil a student from live teachers and/or logit caches (resumes; works under torchrun with FSDP2)."""
    from whelp.distillation.api import distill_run  # noqa: PLC0415 - start-up: --help and show load no verb module

    report = distill_run(
        student,
        Path(out),
        spec,
        teachers=tuple(map(parse_weighted, teacher)),
        caches=tuple(map(parse_weighted, cache)),
        force=force,
        resume=resume,
        policy=load_policy(),
    )
    end = f"{report['eval_end']['eval_ppl']:.2f}"
    ppl = f"{report['eval_start']['eval_ppl']:.2f} -> {end}" if report["eval_start"] else end  # none on a resume
    say(f"distilled {report['tokens']:,} tokens in {report['steps']} steps -> {out} (held-out ppl {ppl})")
