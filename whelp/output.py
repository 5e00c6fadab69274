"""Quiet, predictable output: whelp's own progress and one-line errors; third-party chatter only with ``--verbose``.

transformers prints a weight-loading bar for every model it loads and lm-eval logs warnings about model kwargs and
task metadata; interleaved with whelp's progress bars they bury what matters. ``configure(verbose)`` is called
once by the CLI (library users may call it too); ``quiet_loading()`` wraps each model load.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import sys
import textwrap
import time
import warnings

_STATE = {"verbose": False}
NOISY_LOGGERS = ("lm_eval", "lm-eval", "transformers", "datasets", "huggingface_hub", "accelerate", "torch.distributed")


def configure(verbose: bool = False) -> None:
    """Show (``verbose``) or silence third-party warnings, info logs and progress bars for this process."""
    _STATE["verbose"] = verbose
    level = logging.INFO if verbose else logging.ERROR
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    if not verbose:
        warnings.filterwarnings("ignore", module=r"(transformers|lm_eval|datasets|torch|accelerate)(\.|$)")


def verbose() -> bool:
    return _STATE["verbose"]


@contextlib.contextmanager
def quiet_loading():
    """transformers' loading bars and advisory logs off for the block (kept when verbose)."""
    if _STATE["verbose"]:
        yield
        return
    from transformers.utils import logging as hf_logging  # noqa: PLC0415 - start-up: every CLI command imports output; transformers only if loaded

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_streams():
    """Third-party progress bars and the stderr of the subprocesses they start (lm-eval's ``git describe``) off for
    the block, unless verbose. Errors still arrive: as exceptions, which this does not touch."""
    if _STATE["verbose"]:
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        with contextlib.redirect_stderr(io.StringIO()), quiet_loading():
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def size(nbytes: float) -> str:
    """Bytes for a person: B, KB, MB, GB or TB (powers of 1000) with three significant digits ("16.4 KB",
    "326 MB", "2.00 GB", "1,000 TB"); never scientific notation. ``--json`` keeps the raw byte counts."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale * 0.9995:
            value = nbytes / scale
            return f"{value:,.0f} {unit}" if value >= 99.95 else f"{value:#.3g} {unit}"
    return f"{nbytes:,.0f} B"


def duration(hours: float) -> str:
    """A time for a person, in the unit that suits it: hours from one hour ("1,981.6 h"), minutes below ("5.7 min"),
    seconds below a minute ("12 s"), and "under 1 s" below a second. ``--json`` keeps the raw hours."""
    if hours >= 1:
        return f"{hours:,.1f} h"
    if hours * 60 >= 1:
        return f"{hours * 60:.2g} min"
    return f"{hours * 3600:.2g} s" if hours * 3600 >= 1 else "under 1 s"


def width() -> int:
    """Columns to lay text out in: the terminal's (or $COLUMNS), 80 when not a terminal (a log, a pipe)."""
    return shutil.get_terminal_size((80, 24)).columns


def wrap(text: str, indent: str = "", first: str = "") -> list[str]:
    """``text`` as lines of at most ``width()`` characters: ``first`` before the first, ``indent`` before the rest."""
    return textwrap.wrap(
        text, max(width(), 40), initial_indent=first, subsequent_indent=indent, break_on_hyphens=False
    ) or [first.rstrip()]


def key_values(pairs, key_width: int = 12, indent: str = "  ") -> list[str]:
    """``key  value`` lines, the values in one column and wrapped under themselves: a layout that fits any width
    (a table's cells wrap at 80 columns, and a log is read at 80)."""
    pad = indent + " " * (key_width + 2)
    return [line for key, value in pairs for line in wrap(str(value), pad, f"{indent}{key:<{key_width}}  ")]


def columns(title: str, header, rows) -> list[str]:
    """A plain table (no box drawing) in ``width()`` columns: the rows too wide for it (widest first) are written
    as one ``key (column)  value`` line per value instead."""
    cells = [[f"{v:,}" if type(v) is int else str(v) for v in row] for row in rows]
    keep = list(range(len(cells)))

    def sizes():
        return [max([len(str(h))] + [len(cells[r][i]) for r in keep]) for i, h in enumerate(header)]

    while keep and sum(sizes()) + 2 * (len(header) - 1) > width():
        keep.remove(max(keep, key=lambda r: sum(map(len, cells[r]))))
    n = sizes()
    lines = [title, "  ".join(str(h).ljust(w) for h, w in zip(header, n)).rstrip()]
    for r, row in enumerate(cells):
        if r in keep:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, n)).rstrip())
        else:
            lines += [
                line
                for h, c in zip(header[1:], row[1:])
                for line in wrap(c, " " * (n[0] + 2), f"{row[0] + ' (' + str(h) + ')':<{n[0]}}  ")
            ]
    return lines


class Progress:
    """whelp's one progress display, on stderr: a rich bar on a terminal (removed when done), and on anything else
    (a log file, CI) a plain line every ``every`` seconds, so a short run prints nothing and a long one shows it is
    alive. ``total`` None shows no bar, only ``info``: free text (loss, tokens per second). ``start``: off a
    terminal the first update prints at once too, for work whose next one may be minutes away (a batch of long
    samples after a model loads).

        with Progress("calibrating", total=len(rows)) as bar:
            bar.update(advance=n, info="...")
    """

    def __init__(
        self,
        description: str,
        total: int | None = None,
        completed: int = 0,
        enabled: bool = True,
        every: float = 30.0,
        start: bool = False,
    ):
        self.description, self.total, self.completed, self.info = description, total, completed, ""
        self.enabled, self.every, self._bar = enabled, every, None
        self._last = time.monotonic() - (every if start else 0)
        if enabled and sys.stderr.isatty():
            from rich import progress as rp  # noqa: PLC0415 - start-up: every CLI command imports output; rich only for a progress bar

            counts = [rp.BarColumn(), rp.MofNCompleteColumn(), rp.TimeRemainingColumn()] if total else []
            self._bar = rp.Progress(
                rp.TextColumn(description), *counts, rp.TextColumn("{task.fields[info]}"), transient=True
            )
            self._task = self._bar.add_task(description, total=total, completed=completed, info="")
            self._bar.start()

    def update(self, completed: int | None = None, advance: int = 0, info: str | None = None) -> None:
        self.completed = (self.completed if completed is None else completed) + advance
        self.info = self.info if info is None else info
        if self._bar is not None:
            self._bar.update(self._task, completed=self.completed, info=self.info)
        elif self.enabled and time.monotonic() - self._last >= self.every:
            self._last = time.monotonic()
            count = f"{self.completed:,}/{self.total:,} " if self.total else ""
            print(f"{self.description}: {count}{self.info}".rstrip(), file=sys.stderr, flush=True)

    def advance(self, n: int = 1) -> None:
        self.update(advance=n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
