"""The ``whelp`` typer app: its global options (the safety opt-ins become one ``LoadPolicy`` per process), its
error handling (a ``WhelpError``, a usage error, an interrupt or a full disk print one line) and the helpers
every verb prints with. The verbs themselves live in the modules above this one (``whelp.cli``)."""

from __future__ import annotations

import json
import os
import signal
import sys

import typer

try:  # typer >= 0.26 vendors click as typer._click; older typer raises click's own
    from typer._click.exceptions import UsageError
except ImportError:
    from click.exceptions import UsageError

from whelp import __version__, output
from whelp.errors import Interrupted, WhelpError, io_fault
from whelp.specs import LoadPolicy


class _App(typer.Typer):
    """Typer app whose user-facing errors print as one line, not a traceback or a usage box."""

    def __call__(self, *args, **kwargs):
        try:
            code = super().__call__(*args, standalone_mode=False, **kwargs)
        except UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `whelp` or `whelp VERB`: the help, as asked
                exc.show()
                sys.exit(0)
            where = exc.ctx.command_path if exc.ctx else "whelp"
            _fail(f"{exc.format_message()} (see `{where} --help`)")
        except typer.Abort:  # Ctrl-C outside a training loop
            _fail(INTERRUPTED, 130)
        except WhelpError as exc:
            _fail(str(exc), 130 if isinstance(exc, Interrupted) else 2)
        except OSError as exc:  # a full disk, a read-only --out, a path below a regular file
            where = f" ({exc.filename})" if exc.filename else ""
            _fail(
                f"{exc.strerror or exc}{where}; nothing half-written was kept: free space or choose another path, "
                "then re-run"
            )
        except BaseException as exc:  # a library's own report of a disk fault (safetensors, torch DCP)
            fault = io_fault(exc)
            if fault is None and _peer_lost(exc):
                _fail(
                    "another process of this torchrun job stopped (its own error is above, or it was killed); "
                    "re-run the same command to resume from the last checkpoint"
                )
            if fault is None:
                raise
            _fail(
                f"a write failed: {fault}; nothing half-written was kept: free space or choose another path, then "
                "re-run the same command (runs, caches and builds resume)"
            )
        if code == 130:  # typer turns a KeyboardInterrupt into exit code 130
            _fail(INTERRUPTED, 130)
        if isinstance(code, int) and code:
            sys.exit(code)
        return code


def _peer_lost(exc: BaseException) -> bool:
    """Whether a collective failed because another rank of a torchrun job died (gloo's "Connection closed by
    peer", NCCL's watchdog): the survivor's traceback says nothing the user can act on."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if type(exc).__name__ in ("DistBackendError", "DistNetworkError"):
        return True
    return any(s in str(exc) for s in ("Connection closed by peer", "Connection reset by peer"))


INTERRUPTED = (
    "interrupted; outputs are written atomically, so nothing half-written was kept. Re-run the same "
    "command to continue (distil runs, caches and builds resume)"
)


def _fail(message: str, code: int = 2):
    typer.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


app = _App(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Build small language models from big ones: prune, distill, evaluate.",
)
POLICY = {"policy": LoadPolicy()}  # set once per process by the callback below, read by every command


def _terminate(*_):
    raise KeyboardInterrupt  # SIGTERM (a scheduler, `kill`): the same clean stop and message as Ctrl-C


@app.callback(invoke_without_command=True)
def _main(
    version: bool = typer.Option(False, "--version", help="Print the version and exit"),
    allow_pickle: bool = typer.Option(
        False,
        "--allow-pickle",
        help="Load pickle (.bin/.pt) checkpoints: only for files you trust, pickle can run arbitrary code",
    ),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Run model code shipped with a checkpoint (off by default)"
    ),
    verbose: bool = typer.Option(False, "--verbose", help="Show third-party warnings and loading bars"),
):
    """Build small language models from big ones: prune, distill, evaluate."""
    signal.signal(signal.SIGTERM, _terminate)
    output.configure(verbose)
    POLICY["policy"] = LoadPolicy(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if version:
        typer.echo(__version__)
        raise typer.Exit()


def load_policy() -> LoadPolicy:
    """The process's ``LoadPolicy`` (``--allow-pickle``, ``--trust-remote-code``), handed to every verb that loads."""
    return POLICY["policy"]


def _console():
    from rich.console import Console  # noqa: PLC0415 - start-up: only a printed table needs rich

    return Console(emoji=False)  # ":train:" in pydoc:train is data, not an emoji


def say(line: str) -> None:
    """A closing line, once: under torchrun only rank 0 prints it."""
    if os.environ.get("RANK", "0") == "0":
        typer.echo(line)


def print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2))


def table(title: str, rows, columns=None) -> None:
    from rich.table import Table  # noqa: PLC0415 - start-up: only a printed table needs rich

    table = Table(title=title, show_header=columns is not None)
    for column in columns or ("", ""):
        table.add_column(column)
    for row in rows:
        table.add_row(*(f"{v:,}" if type(v) is int else str(v) for v in row))
    _console().print(table)
