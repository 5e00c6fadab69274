"""A disk that refuses a write (full, read-only) is one line naming the path and the fix in every verb that
writes, with nothing half-written left behind. Each case runs whelp on a small tmpfs mounted in a private mount
namespace (``unshare -rm``); skipped where one cannot be mounted."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_models

ROOT = Path(__file__).resolve().parent.parent


def _mountable(where: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    where.mkdir(parents=True, exist_ok=True)
    probe = ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(where))}"]
    return subprocess.run(probe, capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    """``run(size_kb, *whelp_args, ro=False, env=None)`` -> (exit code, stderr, files left on the disk): whelp on a
    fresh tmpfs of that size mounted at ``mnt``, gone when the command ends."""
    root = tmp_path_factory.mktemp("disk")
    mnt = root / "mnt"
    if not _mountable(mnt):
        pytest.skip("cannot mount a tmpfs here (unshare -rm)")
    teacher, _, student = make_models(root / "models")

    def run(size_kb: int, *args: str, ro: bool = False, env: dict | None = None):
        whelp = shlex.join([sys.executable, "-m", "whelp", *args])
        opts = f"size={size_kb}k" + (",ro" if ro else "")
        script = (
            f"mount -t tmpfs -o {opts} tmpfs {shlex.quote(str(mnt))} && {whelp} 2>&1 >/dev/null; code=$?; "
            f"echo; echo LEFT; find {shlex.quote(str(mnt))} -mindepth 1 -printf '%P\\n'; exit $code"
        )
        base = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        done = subprocess.run(
            ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, cwd=ROOT, env=base
        )
        said, _, left = done.stdout.partition("\nLEFT\n")
        return done.returncode, said.strip(), sorted(left.split())

    run.mnt, run.teacher, run.student = mnt, teacher, student
    return run


def one_line(said: str, path: Path, fault: str) -> None:
    assert said.count("\n") == 0 and "Traceback" not in said, said
    assert said.startswith(f"error: could not write {path}") and fault in said and "re-run" in said, said


def test_a_full_disk_during_a_prune_save_is_one_line_and_leaves_nothing(disk):
    args = ["prune", disk.teacher, "--target", "num_hidden_layers=1", "--calib-samples", "4", "--seq-len", "16"]
    code, said, left = disk(200, *args, "--out", str(disk.mnt / "p"))
    assert code == 2
    one_line(said, disk.mnt / "p", "the disk is full")
    assert left == []


def test_a_full_disk_during_a_distil_checkpoint_is_one_line_and_keeps_the_run(disk):
    args = ["distill", disk.student, "--teacher", disk.teacher, "--steps", "4", "--save-every", "1"]
    args += ["--seq-len", "16", "--batch-size", "4", "--eval-tokens", "64", "--out", str(disk.mnt / "d")]
    code, said, left = disk(500, *args)
    assert code == 2
    one_line(said, disk.mnt / "d.distill" / "checkpoints" / "step-00000001", "the disk is full")
    assert "d.distill/run.json" in left and not any(".tmp-" in name for name in left)


def test_a_full_whelp_home_is_named(disk, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("A sentence of plain English for a token store, said again and again. " * 400)
    args = ["eval", disk.student, "--ppl", str(text), "--seq-len", "16", "--max-tokens", "256"]
    code, said, left = disk(8, *args, "--out", str(tmp_path / "report"), env={"WHELP_HOME": str(disk.mnt)})
    assert code == 2 and said.count("\n") == 0 and "Traceback" not in said, said
    assert f"could not write {disk.mnt}" in said and "the disk is full" in said and "set WHELP_HOME" in said
    assert not any(".tmp-" in name for name in left)


def test_a_read_only_disk_is_one_line(disk):
    args = ["prune", disk.teacher, "--target", "num_hidden_layers=1", "--calib-samples", "4", "--seq-len", "16"]
    code, said, _ = disk(200, *args, "--out", str(disk.mnt / "p"), ro=True)
    assert code == 2 and said.count("\n") == 0 and "Traceback" not in said, said
    assert str(disk.mnt / "p") in said and ("read-only" in said or "permission denied" in said), said


def test_the_disk_is_named_whatever_library_reported_it():
    from torch.distributed.checkpoint.api import CheckpointException

    from whelp.errors import io_fault

    rust = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert io_fault(rust) == "the disk is full"
    assert io_fault(OSError(30, "Read-only file system")) == "the file system is read-only"
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as exc:
            raise RuntimeError("unexpected pos 576 vs 534") from exc
    except RuntimeError as exc:
        assert io_fault(exc) == "the disk is full"  # torch.save's message names nothing; its cause does
    wrapped = CheckpointException("save", {0: (OSError(28, "No space left on device"), [])})
    assert io_fault(wrapped) == "the disk is full"
    assert io_fault(ValueError("a bug")) is None and io_fault(RuntimeError("unexpected pos 1 vs 2")) is None
    assert io_fault(KeyboardInterrupt()) is None
