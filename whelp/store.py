"""The one room that touches disk for outputs: ``whelp_home``, whelp's own marker, sealed records, atomic writes.

Three rules keep a user's data safe whatever happens to a run (Ctrl-C, SIGKILL, a full disk, a bad flag):

* **whelp deletes only what it made.** Every directory whelp writes carries a marker, ``whelp.json``, a sealed
  record naming its kind (model, build, cache, run, eval) and, for a build's stages, the key of the inputs it
  was made from. ``--force`` replaces a directory only if it holds a valid marker of the same kind; a
  directory without one is never deleted, with or without ``--force``. An empty directory counts as absent.
* **Records are sealed.** A record (marker, cache manifest, run identity, checkpoint state, eval-cache
  entry) holds a sha256 over its own content; an edited or truncated record is refused on read, so a
  hand-edited manifest can never make whelp train on garbage.
* **Writes are atomic.** Files are written to a temporary sibling and renamed; a directory is filled as a
  temporary sibling and renamed into place, the old one renamed aside first and deleted last. Temporaries
  carry the host and PID of their writer, so the next run of the same output removes those whose writer is
  dead (and puts back an old output that a kill caught between the two renames).

One module on purpose: it is the one room that touches disk for outputs, so every write rule lives in one place.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from whelp import __version__
from whelp.errors import WhelpError, io_fault
from whelp.writers import claim, claimed, drop_if_free, release, writer  # noqa: F401 - the verbs take them from here, with the rest of the write rules

MARKER = "whelp.json"
KINDS = ("model", "build", "cache", "run", "eval", "checkpoint", "store", "search")
SEAL = "record_sha256"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def whelp_home() -> Path:
    """User cache for converted registered models, scores and eval results: ``$WHELP_HOME``, default
    ``~/.cache/whelp``."""
    return Path(os.environ.get("WHELP_HOME", Path.home() / ".cache" / "whelp")).expanduser()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def shard_problem(path: Path, shard: dict, full: bool = True) -> str | None:
    """Why a file recorded in a manifest as ``{"file", "bytes", "sha256"}`` under ``path`` cannot be used (missing,
    truncated, corrupted), or None if it is intact; ``full=False`` checks only its size (no read)."""
    file = Path(path) / shard["file"]
    if not file.is_file():
        return "is missing"
    if file.stat().st_size != shard["bytes"]:
        return f"is truncated or altered ({file.stat().st_size} of {shard['bytes']} bytes)"
    if full and sha256_file(file) != shard["sha256"]:
        return "is corrupted (its sha256 differs from the manifest)"
    return None


def content_id(obj) -> str:
    """sha256 of a JSON-able object (sorted keys): the one content identity of specs, records and keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def check_name(name: str, what: str) -> str:
    """A name that becomes a path must be one plain path component: letters, digits, ``. _ -``, not starting
    with a dot or a dash (no ``/``, ``..``, empty or hidden names)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise WhelpError(
            f"{what}: {name!r} cannot name a directory: use 1-128 letters, digits, '.', '_' or '-', "
            "not starting with '.' or '-' (no '/' or '..')"
        )
    return name


def inside(parent: Path, child: Path, what: str) -> Path:
    """``child`` resolved; WhelpError unless it lies inside ``parent`` (symlinks followed)."""
    resolved, root = child.expanduser().resolve(), parent.expanduser().resolve()
    if resolved == root or root not in resolved.parents:
        raise WhelpError(f"{what} {child} resolves to {resolved}, outside {root}; choose a path inside it")
    return resolved


# --- atomic files and sealed records -------------------------------------------------------------------------


def tag() -> str:
    """Host and PID of this process, in temporary names, so a later run can tell a dead writer's leftovers."""
    return f"{socket.gethostname().replace('-', '_')}-{os.getpid()}"


def write_bytes(path: Path, data: bytes) -> Path:
    """Write ``path`` atomically: a temporary sibling, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent, path.name)
    tmp = path.with_name(f".{path.name}.tmp-{tag()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        fault = io_fault(exc, tmp)
        tmp.unlink(missing_ok=True)
        if fault is None:
            raise
        raise WhelpError(could_not_write(path, fault)) from None
    return path


def could_not_write(path: Path, fault: str) -> str:
    """The one line for a write the disk refused: what, why, that nothing half-written stays, and the fix."""
    home = whelp_home().expanduser().resolve()
    cache = (
        " (whelp's cache: set WHELP_HOME to a directory on a disk with room)"
        if home in Path(path).resolve().parents
        else ""
    )
    return (
        f"could not write {path}: {fault}{cache}; nothing half-written was kept: free space or choose another "
        "path, then re-run the same command (runs, caches and builds resume)"
    )


def write_text(path: Path, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_record(path: Path, record: dict) -> Path:
    """Write a sealed JSON record atomically: ``record`` plus the sha256 of its content."""
    body = {k: v for k, v in record.items() if k != SEAL}
    return write_text(path, json.dumps({**body, SEAL: content_id(body)}, indent=1))


def read_record(path: Path, fix: str) -> dict:
    """A sealed record, verified; WhelpError naming the file and ``fix`` if it is missing, not JSON or edited."""
    path = Path(path)
    if not path.is_file():
        raise WhelpError(f"{path} is missing; {fix}")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise WhelpError(f"{path} is corrupted (not JSON); {fix}") from None
    if not isinstance(record, dict) or SEAL not in record:
        raise WhelpError(f"{path} is not a whelp record (no {SEAL}); {fix}")
    body = {k: v for k, v in record.items() if k != SEAL}
    if content_id(body) != record[SEAL]:
        raise WhelpError(
            f"{path} was edited or is corrupted (its content does not match its {SEAL}); whelp's "
            f"records are not edited by hand: {fix}"
        )
    return body


# --- whelp's marker and output directories ---------------------------------------------------------------------


def marker(path: Path) -> dict | None:
    """The marker of a directory whelp made, or None (no marker, or one that is not a valid record)."""
    try:
        record = read_record(Path(path) / MARKER, "")
    except WhelpError:
        return None
    return record if record.get("kind") in KINDS else None


def write_marker(path: Path, kind: str, **fields) -> None:
    write_record(Path(path) / MARKER, {"kind": kind, "whelp": __version__, **fields})


def check_writable(out_dir: str | Path, force: bool, kind: str) -> Path:
    """May a ``kind`` output be written at ``out_dir``? Returns the path; WhelpError if it would clobber anything.

    Absent or empty: yes. A whelp output of the same kind: only with ``force``. Anything else (a file, a
    directory whelp did not make, a whelp output of another kind): never, whatever ``force`` says.
    """
    out = Path(os.path.abspath(Path(out_dir).expanduser()))
    if out.is_symlink():
        raise WhelpError(
            f"--out {out} is a symbolic link; whelp writes real directories: pass the directory it "
            f"points to ({out.resolve()}) or another --out"
        )
    if out == Path.cwd() or out in Path.cwd().parents or out.parent == out:
        raise WhelpError(f"--out {out} is the current directory or holds it; choose another --out")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise WhelpError(f"--out {out} is below {blocking}, which is a file; choose another --out")
    writable = next(p for p in out.parents if p.exists())
    if not os.access(writable, os.W_OK | os.X_OK):
        raise WhelpError(f"--out {out}: cannot write in {writable} (permission denied); choose another --out")
    held = claimed(out)
    if out.parent.is_dir():
        claim(out)
    try:
        return _may_replace(out, force, kind)
    except WhelpError:
        if not held:  # refused: not ours to hold
            release(out)
        raise


def _may_replace(out: Path, force: bool, kind: str) -> Path:
    """``check_writable``'s verdict on what is at ``out`` now."""
    clean_stale(out.parent, out.name)
    if not out.exists():
        return out
    if not out.is_dir():
        raise WhelpError(f"--out {out} is a file, not a directory; choose another --out")
    if not any(out.iterdir()):
        return out
    found = marker(out)
    if found is None:
        raise WhelpError(
            f"--out {out} exists and was not made by whelp (no valid {MARKER}); whelp never deletes "
            "or overwrites it, with or without --force: choose another --out"
        )
    if found["kind"] != kind:
        raise WhelpError(
            f"--out {out} holds a whelp {found['kind']} output, not {_a(kind)} output; choose another --out"
        )
    if not force:
        raise WhelpError(
            f"--out {out} already holds a whelp {kind}; pass --force to replace it (the old one stays "
            "until the new one is complete) or choose another --out"
        )
    return out


def check_apart(out: Path, inputs, flag: str = "--out") -> None:
    """Refuse an ``--out`` that is, holds or lies inside one of the verb's local inputs (model or cache directories;
    names that are no path, such as registered models, are skipped): replacing it would destroy what is being read
    (``whelp prune TEACHER --out TEACHER --force``)."""
    out = Path(os.path.abspath(Path(out).expanduser()))
    for name in inputs:
        if not Path(name).expanduser().exists():
            continue
        path = Path(os.path.abspath(Path(name).expanduser()))
        if out == path or path in out.parents or out in path.parents:
            raise WhelpError(f"{flag} {out} would overwrite or nest in the input {path}; choose a separate {flag}")


def _a(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def commit_dir(tmp: Path, out: Path, kind: str, force: bool = True) -> None:
    """Move a fully written temporary directory into place; an old ``out`` is renamed aside, deleted last.
    ``out`` is checked again first: a directory that appeared there while whelp wrote (hours, for a large prune)
    is never replaced unless it is whelp's own of the same ``kind`` and ``force``."""
    check_writable(out, force, kind)
    old = out.with_name(f".{out.name}.old-{tag()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path, force: bool = False, kind: str = "model", **fields):
    """Yield a fresh temporary sibling of ``out_dir`` to fill; on success it gets whelp's marker (``kind`` and
    ``fields``, e.g. a build stage's key) and replaces ``out_dir`` in one rename; on any failure (Ctrl-C
    included) it is deleted and ``out_dir`` is left as it was."""
    owned = not claimed(out_dir)  # a verb that claimed ``out`` first keeps it; else it is ours for the write
    try:
        out = check_writable(out_dir, force, kind)
        out.parent.mkdir(parents=True, exist_ok=True)
        claim(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{tag()}-", dir=out.parent))
        os.chmod(tmp, 0o777 & ~_umask())
        try:
            yield tmp
            write_marker(tmp, kind, **fields)
            commit_dir(tmp, out, kind, force)
        except BaseException as exc:
            fault = io_fault(exc, tmp)  # asked before the partial output is removed: a full disk frees up
            shutil.rmtree(tmp, ignore_errors=True)
            if fault is None:
                raise
            raise WhelpError(could_not_write(out, fault)) from None
    finally:
        if owned:
            release(out_dir)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _dead(tag: str) -> bool:
    """Whether the writer named by a ``HOST-PID`` tag is gone (only this host's PIDs can be checked)."""
    host, _, pid = tag.rpartition("-")
    if host != socket.gethostname().replace("-", "_") or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def clean_stale(parent: Path, name: str | None = None) -> None:
    """Remove the temporaries and claims (``.NAME.writer``) that killed writers left in ``parent`` (of output
    ``name``, or of any output), and put back an output that a kill caught between the two renames of
    ``commit_dir``."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    names = re.escape(name) if name is not None else r"[^/]+?"
    pattern = re.compile(rf"\.({names})\.(tmp|old)-([^-]+-\d+)(-.*)?")
    claims = re.compile(rf"\.({names})\.writer")
    for item in parent.iterdir():
        if claims.fullmatch(item.name):
            drop_if_free(item)
            continue
        match = pattern.fullmatch(item.name)
        if not match or not _dead(match.group(3)):
            continue
        out = parent / match.group(1)
        if match.group(2) == "old" and not out.exists():
            item.rename(out)  # the new output never arrived: the old one is the good one
        elif item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)


SHARD_MANIFEST = "manifest.json"  # the sealed manifest of a sharded output (a logit cache, a token store)


def resume_shards(out: Path, identity: dict, force: bool, kind: str, what: str, read, intact, ignore=(), **fields):
    """``(work, manifest)``: where the shards of a resumable sharded output (a logit cache, a token store) go and
    the manifest to continue. ``read(path)`` gives the manifest at ``path`` (None: nothing worth keeping);
    ``intact(path, shards)`` the recorded shards that are kept; every key of ``identity`` but ``ignore`` must match.

    ``out`` itself when new or resumed (WhelpError if it holds ``what`` of other settings, or this one complete);
    with ``force`` on an existing output, a staging sibling ``.OUT.rebuild`` (resumed by the same forced command)
    that the caller renames over ``out`` (``commit_dir``) only when complete. A directory whelp did not make is
    never written into or deleted. A new work directory is born whole and marked (``kind``, ``fields``)."""
    work, manifest = out, None
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        check_writable(out, True, kind)
        if force:
            work = out.with_name(f".{out.name}.rebuild")
            if work.exists() and marker(work) is None:
                raise WhelpError(f"{work} is in the way of rebuilding {out} and was not made by whelp; move it away")
            try:
                found = _continued(work, identity, what, read, intact, ignore) if work.exists() else None
            except WhelpError:  # another rebuild's leftovers: ours to start again
                found = None
            if found is None:
                shutil.rmtree(work, ignore_errors=True)
            manifest = found and found[0]
        elif (found := _continued(out, identity, what, read, intact, ignore)) is not None:
            manifest, complete = found
            if complete:
                raise WhelpError(f"{out} already holds this complete {what}; pass --force to rebuild it")
    if manifest is None:
        manifest = {**identity, "shards": [], "complete": False}
        with atomic_dir(work, force=True, kind=kind, **fields) as tmp:
            write_record(tmp / SHARD_MANIFEST, manifest)
    return work, manifest


def _continued(path: Path, identity: dict, what: str, read, intact, ignore) -> tuple[dict, bool] | None:
    """The manifest to continue ``path`` with (its intact shards) and whether it was complete and intact."""
    old = read(path)
    if old is None:
        return None
    diff = [key for key in identity if key not in ignore and old.get(key) != identity[key]]
    if diff:
        raise WhelpError(
            f"{path} holds {_a(what)} of other settings ({first_change(old.get(diff[0]), identity[diff[0]], diff[0])}"
            "); pass --force to replace it or choose another --out"
        )
    clean_stale(path)
    shards = intact(path, old["shards"])
    return {**identity, "shards": shards, "complete": False}, bool(old.get("complete")) and shards == old["shards"]


_HASH = re.compile(r"[0-9a-f]{64}")


def first_change(old, new, name: str) -> str:
    """The first setting that differs between two records, for a person: ``generation.seed: 3 there, 4 now``
    (nested records are followed to the leaf that differs); an identity hash says what it stands for instead."""
    while isinstance(old, dict) and isinstance(new, dict):
        key = next(k for k in sorted({*old, *new}) if old.get(k) != new.get(k))
        name, old, new = f"{name}.{key}", old.get(key), new.get(key)
    if any(isinstance(v, str) and _HASH.fullmatch(v) for v in (old, new)) or "identity" in name:
        return f"{name}: the files it was made from changed since"
    return f"{name}: {old!r} there, {new!r} now"


@contextlib.contextmanager
def locked(path: Path, what: str):
    """Hold an exclusive lock on ``path``, a cache entry made on first use (a converted model, a token store), for
    the block: two whelp processes sharing ``$WHELP_HOME`` make it once, the second waiting, then finding it made.
    An advisory ``flock`` of ``.NAME.lock`` beside it, which the kernel releases when its holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"whelp: waiting for another whelp process {what}", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def path_identity(path: Path) -> list:
    """Identity of the files at ``path`` without reading them: (relative name, bytes, mtime ns) of each file,
    sorted; a changed, added or removed file changes it. Hidden files and folders (whelp's temporaries; data
    sources skip them too) are left out."""
    path = Path(path).expanduser()
    if path.is_file():
        return [[path.name, path.stat().st_size, path.stat().st_mtime_ns]]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    return [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
