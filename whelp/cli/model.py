"""The model verbs: ``whelp inspect``, ``export``, ``prune`` and ``search``."""

from __future__ import annotations

from pathlib import Path

import typer

from whelp.cli.app import load_policy, print_json, table
from whelp.flags import with_spec
from whelp.specs import PruneSpec, SearchSpec


def inspect(
    model: str = typer.Argument(..., help="Model directory, registered name (smollm2-135m), hub id or config.json"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
):
    """Shape (HF config names), parameters, stored dtype and bytes on disk of a model; no weights loaded."""
    from whelp import models  # noqa: PLC0415 - start-up: --help and show load no verb module

    info = models.inspect(model, load_policy())
    if as_json:
        return print_json(info)
    table(model, info.items())


def export(
    model: str = typer.Argument(..., help="Model directory (HF checkpoint) or registered name"),
    gguf: str = typer.Option(..., "--gguf", help="GGUF file to write (llama.cpp, ollama, LM Studio)"),
    outtype: str = typer.Option(
        "auto",
        "--outtype",
        help="auto (llama.cpp's default: bf16 for a bf16 checkpoint, else f16) | f16 | bf16 | q8_0 | f32",
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing GGUF file at --gguf"),
):
    """Export a checkpoint to one GGUF file through llama.cpp's own converter (fetched once from PyPI)."""
    from whelp.export import LLAMA_CPP_PYTHON, export_gguf  # noqa: PLC0415 - start-up: --help and show load no verb module

    path = export_gguf(model, gguf, outtype, force=force, policy=load_policy())
    typer.echo(
        f"wrote {path} ({outtype}, {path.stat().st_size:,} bytes; llama.cpp's converter from "
        f"llama-cpp-python {LLAMA_CPP_PYTHON})"
    )


@with_spec("spec", PruneSpec)
def prune(
    model: str = typer.Argument(..., help="Teacher: model directory, registered name or hub id"),
    target: str = typer.Option(..., "--target", help="Preset, config.json, or key=value,... overrides"),
    out: str = typer.Option(..., "--out", help="Output directory (HF checkpoint + prune_report.json)"),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out directory"),
    spec: PruneSpec | None = None,
):  # built from the options by @with_spec
    """Prune a teacher to a target shape in one pass; write a vanilla HF checkpoint and prune_report.json."""
    from whelp.pruning.api import prune_checkpoint  # noqa: PLC0415 - start-up: --help and show load no verb module

    report = prune_checkpoint(model, target, out, spec, force=force, policy=load_policy())
    p = report["params"]
    typer.echo(
        f"wrote {out}: {p['before']:,} -> {p['after']:,} params ({report['path']}, {report['importance']}"
        f"{', scores reused' if report['scores_reused'] else ''})"
    )


@with_spec("spec", SearchSpec)
def search(
    teacher: str = typer.Argument(..., help="Teacher: model directory or registered name"),
    out: str = typer.Option(..., "--out", help="Output directory (leaderboard, plot, winner/, target.json)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the candidates and the cost; load no weights"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object"),
    force: bool = typer.Option(False, "--force", help="Start the search over and replace --out"),
    spec: SearchSpec | None = None,
):  # built from the options by @with_spec
    """Find the best student shape for a budget: enumerate, prune a pool one-shot, distil the best K, rank."""
    from whelp.search.run import search_run  # noqa: PLC0415 - start-up: --help and show load no verb module

    result = search_run(teacher, spec, Path(out), force=force, dry_run=dry_run, policy=load_policy())
    if as_json:
        return print_json(result)
    if dry_run:
        return _search_plan(result)
    w = result["winner"]
    typer.echo(
        f"wrote {out}: winner {_shape_text(w['shape'])} ({w['params'][1]:,} non-embedding params), KL "
        f"{w['one_shot']['kl']:.4f} one-shot -> {w['trained']['kl']:.4f} after {spec.score_steps} steps; "
        f"prune to it with --target {Path(out) / 'target.json'}"
    )


def _shape_text(shape: dict) -> str:
    return ",".join(
        f"{k}={shape[k]}"
        for k in (
            "num_hidden_layers",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        )
    )


def _search_plan(result: dict) -> None:
    keys = (
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
    )
    table(
        f"{len(result['candidates']):,} shapes meet the budget; the one-shot pool",
        [[row["shape"][k] for k in keys] + [row["params"][1]] for row in result["pool"]],
        ("layers", "hidden", "mlp", "heads", "kv heads", "head dim", "non-embedding"),
    )
    cost = result["cost"]
    typer.echo(
        f"cost: {cost['total']:.3g} FLOPs (calibration {cost['calibration']:.3g}, one-shot "
        f"{cost['one_shot']:.3g}, distillation {cost['distillation']:.3g} at most)"
    )
