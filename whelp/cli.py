"""The ``whelp`` command line: a thin index of library verbs.

Each command parses flags, calls one library function and prints the result. Heavy libraries
(torch, transformers) are imported inside the commands so that ``whelp --help`` starts fast.
"""

from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer

from whelp.errors import WhelpError


class _App(typer.Typer):
    """Typer app whose user-facing errors print as one line, not a traceback."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except WhelpError as exc:
            typer.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(2)


app = _App(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
           help="Build small language models from big ones: prune, distill, evaluate.")


@app.callback()
def _main(version: bool = typer.Option(False, "--version", help="Print the version and exit")):
    """Build small language models from big ones: prune, distill, evaluate."""
    if version:
        from whelp import __version__

        typer.echo(__version__)
        raise typer.Exit()


def _console():
    from rich.console import Console

    return Console()


def _print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2))


@app.command()
def inspect(model: str = typer.Argument(..., help="Model directory, registered name (smollm2-135m), hub id or config.json"),
            as_json: bool = typer.Option(False, "--json", help="Print one JSON object")):
    """Shape (HF config names), parameters, stored dtype and bytes on disk of a model; no weights loaded."""
    from whelp import models

    info = models.inspect(model)
    if as_json:
        return _print_json(info)
    from rich.table import Table

    table = Table(title=model, show_header=False)
    for key, value in info.items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value))
    _console().print(table)
