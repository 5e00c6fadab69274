"""One writer per output: a second process is refused at once, naming the holder; a dead holder's lock is taken
over; a verb lets go of its outputs when it returns."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_models, run_cli

from whelp import store
from whelp.errors import WhelpError

HOLD = "import sys; from pathlib import Path; from whelp import store; store.claim(Path(sys.argv[1])); print('held', flush=True); sys.stdin.read()"


def holder(out: Path) -> subprocess.Popen:
    """Another process that claims ``out`` and holds it until its stdin closes or it is killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    out = tmp_path / "student"
    proc = holder(out)
    try:
        for attempt in (lambda: store.claim(out), lambda: store.check_writable(out, True, "model")):
            with pytest.raises(WhelpError, match=rf"is being written by whelp \(host .*, PID {proc.pid}\)") as exc:
                attempt()
            assert "--force" not in str(exc.value)
    finally:
        proc.kill()
        proc.wait()
    assert (tmp_path / ".student.writer").exists()  # a killed holder cannot remove its file ...
    store.clean_stale(tmp_path)
    assert not (tmp_path / ".student.writer").exists()  # ... the next run's cleaning does: the kernel freed it
    store.claim(out)
    assert (tmp_path / ".student.writer").read_text() == f"whelp (host {os.uname().nodename}, PID {os.getpid()})"
    store.release(out)
    assert not (tmp_path / ".student.writer").exists()
    proc = holder(out)  # and another process can claim it again
    proc.stdin.close()
    proc.wait()


def test_a_verb_lets_go_of_what_it_claimed_when_it_returns_or_fails(tmp_path):
    seen = []

    @store.writer
    def inner(out):
        store.check_writable(out, False, "model")
        seen.append((tmp_path / f".{out.name}.writer").exists())

    @store.writer
    def outer():
        store.check_writable(tmp_path / "build", False, "build")
        inner(tmp_path / "store")
        seen.append((tmp_path / ".store.writer").exists())  # a shared cache it made: free for others at once
        seen.append((tmp_path / ".build.writer").exists())  # its own output: held to the end
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        outer()
    assert seen == [True, False, True] and not (tmp_path / ".build.writer").exists()
    proc = holder(tmp_path / "build")  # free for another process
    proc.stdin.close()
    proc.wait()


def test_a_second_distil_into_one_out_is_refused_at_once_and_the_first_finishes_untouched(tmp_path):
    teacher, _, student = make_models(tmp_path / "models")
    out = tmp_path / "out"
    args = ["distill", student, "--teacher", teacher, "--out", str(out), "--steps", "6", "--seq-len", "16"]
    args += ["--batch-size", "4", "--eval-tokens", "64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "whelp", *args], env=env, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".out.writer"
    deadline = time.monotonic() + 60
    while not (lock.exists() and f"PID {first.pid}" in lock.read_text()):
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.poll() else ""
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # the first writer is mid-run
    try:
        t0 = time.monotonic()
        second = run_cli(*args, "--force")
        assert second.exit_code == 2 and time.monotonic() - t0 < 10
        assert f"{out} is being written by whelp (host" in second.stderr and f"PID {first.pid}" in second.stderr
        assert "pass --force" not in second.stderr
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    report = json.loads((out / "distill_report.json").read_text())
    assert report["steps"] == 6 and report["final"]["step"] == 6 and report["tokens"] == 6 * 4 * 16
    assert store.marker(out)["kind"] == "model" and not lock.exists()
