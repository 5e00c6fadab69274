"""The one exception type the CLI turns into a single clear line (no traceback), and how a failed write is told
apart as a fault of the disk (full, read-only, no permission) rather than of whelp.

Libraries report a full disk in their own ways: Python's ``OSError`` (errno 28), safetensors' "I/O error: No space
left on device (os error 28)", torch.save's "unexpected pos 576 vs 534" (nothing about the disk at all), and
torch.distributed.checkpoint wraps whichever it got, per rank, in a ``CheckpointException``. ``io_fault`` reads the
errno or the text where there is one, and otherwise asks the file system that was being written.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

_CAUSES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file is too large for the file system",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EIO: "an input/output error (a failing disk or network file system)",
}
_SAID = {  # what libraries that drop the errno say instead
    "No space left on device": errno.ENOSPC,
    "os error 28": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "Read-only file system": errno.EROFS,
    "os error 30": errno.EROFS,
}
WRITERS_ERRORS = ("SafetensorError", "CheckpointException")  # safetensors' and torch DCP's (a BaseException)
NEARLY_FULL = 16 << 20  # bytes free under which a failed write is taken to be the disk's fault


class WhelpError(Exception):
    """A user-facing failure: the message names the problem and the fix."""


class Interrupted(WhelpError):
    """A run stopped by Ctrl-C or SIGTERM after saving what it had: exit status 130, as every interrupt."""


def _chain(exc: BaseException):
    """``exc``, what it was raised from or during, and what a distributed checkpoint's ranks raised."""
    seen = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():  # CheckpointException: rank -> (exc, frames)
            todo.append(failure[0] if isinstance(failure, tuple) else failure)


def io_fault(exc: BaseException, path: Path | None = None) -> str | None:
    """Why a write failed, if the disk is to blame ("the disk is full", ...), else None (a bug keeps its traceback).
    ``path``: what was being written; a failure that names no cause is the disk's when its file system is
    read-only or has less than ``NEARLY_FULL`` bytes left (asked before the partial output is removed)."""
    if isinstance(exc, (WhelpError, KeyboardInterrupt, SystemExit)):
        return None
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _CAUSES:
            return _CAUSES[e.errno]
        said = next((code for text, code in _SAID.items() if text in str(e)), None)
        if said is not None:
            return _CAUSES[said]
    written = isinstance(exc, (OSError, RuntimeError)) or type(exc).__name__ in WRITERS_ERRORS
    if path is None or not written:
        return None
    where = next((p for p in (Path(path), *Path(path).parents) if p.exists()), None)
    if where is None:
        return None
    disk = os.statvfs(where)
    if disk.f_flag & os.ST_RDONLY:
        return _CAUSES[errno.EROFS]
    return _CAUSES[errno.ENOSPC] if disk.f_bavail * disk.f_frsize < NEARLY_FULL else None
