"""One writer per output: a process claims each output it writes (an advisory lock beside it) before it reads or
writes anything, and a second process is refused at once, naming the holder.

Without it two ``whelp distill`` on one ``--out`` both train into its run state and interleave their logs, and
two builds fail only at their last rename, with a message suggesting the ``--force`` that would destroy the other's
work. ``whelp.store.check_writable`` claims; ``writer`` lets a verb's claims go when it returns.
"""

from __future__ import annotations

import atexit
import fcntl
import functools
import os
import socket
from pathlib import Path

from whelp.errors import WhelpError

_CLAIMS: dict[Path, object] = {}  # outputs this process writes -> the open lock file that holds each


def writer(verb):
    """Decorate a verb that writes outputs: the claims it takes are let go when it returns or fails (a shared
    cache it made, a token store, is free for the next process at once; a build's own directory stays claimed by the
    build), so a notebook that pruned into ``OUT`` does not lock ``OUT`` against a later process. Claims taken
    outside any verb last as long as the process."""

    @functools.wraps(verb)
    def run(*args, **kwargs):
        held = set(_CLAIMS)
        try:
            return verb(*args, **kwargs)
        finally:
            for out in set(_CLAIMS) - held:
                release(out)

    return run


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.writer"  # not ``locked``'s ``.NAME.lock``: a store's maker holds both


def claim(out: Path) -> None:
    """One writer per output: hold an exclusive lock on ``out`` (a build, model, run, cache, search, eval or GGUF
    path) until ``release``, or refuse at once, naming the holder. Taken by ``check_writable`` (every verb's first
    look at its ``--out``) before anything is read or written, so a second process never trains into the first's run
    state or replaces its output, and is not told to ``--force``. An advisory ``flock`` of ``.NAME.writer`` beside
    ``out``, removed on release; the kernel drops the lock when its holder dies, so a killed writer's is taken over.
    Under torchrun only rank 0 takes it (its ranks are one writer; another job's rank 0 is refused)."""
    out = _key(out)
    if out in _CLAIMS or os.environ.get("RANK", "0") != "0":
        return
    path = _lock_path(out)
    while True:
        lock = open(path, "a+")  # noqa: SIM115 - held open until release
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another whelp process"
            lock.close()
            raise WhelpError(
                f"{out} is being written by {holder}; wait for it to finish (or stop it), or choose another --out"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        lock.close()  # its holder released (and removed) the file between our open and lock: lock the new one
    lock.seek(0)
    lock.truncate()
    lock.write(f"whelp (host {socket.gethostname()}, PID {os.getpid()})")
    lock.flush()
    _CLAIMS[out] = lock


def claimed(out: Path) -> bool:
    """Whether this process holds ``out``."""
    return _key(out) in _CLAIMS


def _key(out: Path) -> Path:
    return Path(os.path.abspath(Path(out).expanduser()))


def release(out: Path) -> None:
    """Let go of ``claim(out)``: the lock file is removed while still locked, so a waiting claimer locks a new one."""
    out = _key(out)
    lock = _CLAIMS.pop(out, None)
    if lock is not None:
        _lock_path(out).unlink(missing_ok=True)
        lock.close()


@atexit.register
def _release_all() -> None:
    for out in list(_CLAIMS):
        release(out)


def drop_if_free(lock_file: Path) -> None:
    """Remove a ``.NAME.writer`` that no live process holds (its writer was killed): a claimer racing this finds
    the file gone after locking it and locks a new one (``claim``)."""
    try:
        lock = open(lock_file, "r+")  # noqa: SIM115 - closed below
    except (FileNotFoundError, IsADirectoryError):
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        lock_file.unlink(missing_ok=True)
