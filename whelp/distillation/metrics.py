"""Run logging: ``metrics.jsonl`` (one JSON object per optimizer step), TensorBoard, the progress display."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from whelp.errors import WhelpError
from whelp.store import write_text


def tensorboard(rdir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - optional: only --tensorboard needs it
    except ImportError:
        raise WhelpError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(rdir / "tensorboard"))


def trim(metrics: Path, step: int) -> None:
    """Keep the rows of steps <= ``step`` (a resumed run logs the rest again); a damaged row is named."""
    kept = []
    for lineno, line in enumerate(metrics.read_text().splitlines() if metrics.exists() else [], 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise WhelpError(
                f"{metrics}:{lineno} is not JSON; delete that line (the log is rewritten from the "
                "checkpoint on) and re-run"
            ) from None
        if row["step"] <= step:
            kept.append(line)
    write_text(metrics, "".join(line + "\n" for line in kept))


def log(metrics: Path, writer, row: dict) -> None:
    """Append ``row`` to metrics.jsonl and mirror its float fields to TensorBoard."""
    with metrics.open("a") as f:
        f.write(json.dumps(row) + "\n")
    if writer is not None:
        for key, value in row.items():
            if isinstance(value, float):
                writer.add_scalar(key, value, row["step"])


def show(bar, row: dict) -> None:
    """The step's loss, per-teacher divergences (``kl:`` on the data, ``on:`` on the student's samples), CE, the
    hidden-state loss and throughput on the progress display (``whelp.output.Progress``)."""
    terms = [f"{k[:2]}:{Path(k[3:]).name}={v:.3f}" for k, v in row.items() if k.startswith(("kl/", "on/"))]
    terms += [f"{k}={row[k]:.3f}" for k in ("ce", "hidden") if k in row]
    bar.update(completed=row["step"], info=f"loss={row['loss']:.4f} {' '.join(terms)} {row['tokens_per_s']:.0f} tok/s")


def note(message: str) -> None:
    """One line for the user on stderr (a resumed run's changed settings), apart from the progress bar."""
    Console(stderr=True).print(f"[yellow]whelp[/]: {message}", markup=True, highlight=False, soft_wrap=True)
