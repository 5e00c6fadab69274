"""The command line: help, inspect, and bad input as one clear line (no traceback). ``whelp --help`` and the quiet
happy path run as real ``python -m whelp`` processes: the entry point's start-up, and the output of a fresh
interpreter (warnings shown once per process, third-party logging untouched by earlier tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import make_models, run_cli, run_whelp


def test_help_lists_the_verbs():
    out = run_whelp("--help")
    assert out.exit_code == 0
    for verb in ("inspect", "plan", "prune", "cache-logits", "distill", "eval", "build", "validate", "show"):
        assert f" {verb} " in out.stdout, verb


def test_inspect_json_of_a_config_file(tmp_path):
    from conftest import tiny_config, tiny_model

    tiny_config().save_pretrained(tmp_path)
    out = run_cli("inspect", str(tmp_path / "config.json"), "--json")
    info = json.loads(out.stdout)
    assert info["hidden_size"] == 64 and info["bytes"] is None
    assert info["params"] == sum(p.numel() for p in tiny_model().parameters())  # stock transformers' count


@pytest.mark.parametrize(
    "make_bad, message",
    [
        (lambda p: str(p / "nope"), "no such model directory"),
        (lambda p: (p / "cfg").mkdir() or str(p / "cfg"), "no config.json"),
    ],
)
def test_bad_model_path_is_one_clear_line(tmp_path, make_bad, message):
    out = run_cli("inspect", make_bad(tmp_path))
    assert out.exit_code == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_ctrl_c_outside_a_training_loop_is_one_line_saying_what_to_do(monkeypatch):
    import whelp.models

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(whelp.models, "inspect", interrupted)
    out = run_cli("inspect", "smollm2-135m")
    assert out.exit_code == 130
    assert out.stderr.strip().startswith("error: interrupted") and "Re-run the same command" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_the_happy_path_is_quiet_and_verbose_shows_the_third_party_output(tmp_path):
    """No loading bars, lm-eval progress bars or warnings around whelp's own output; ``--verbose`` brings them
    back (here: lm-eval's request bars)."""
    from conftest import save_tiny, tiny_tokenizer

    save_tiny(tmp_path / "tiny", tiny_tokenizer())
    args = [
        "eval",
        str(tmp_path / "tiny"),
        "--tasks",
        "whelp_pydoc_next",
        "--limit",
        "2",
        "--max-tokens",
        "128",
        "--seq-len",
        "64",
        "--speed-prompt-len",
        "4",
        "--speed-new-tokens",
        "1",
        "--speed-repeats",
        "1",
    ]
    quiet = run_whelp(*args, "--out", str(tmp_path / "a"))
    assert quiet.exit_code == 0, quiet.stderr
    assert quiet.stderr == "" and quiet.stdout.startswith("# whelp eval")
    import shutil

    shutil.copytree(tmp_path / "tiny", tmp_path / "again")  # another directory: not served from the eval cache
    loud = run_whelp(
        "--verbose", *[str(tmp_path / "again") if a == args[1] else a for a in args], "--out", str(tmp_path / "b")
    )
    assert loud.exit_code == 0 and "it/s" in loud.stderr


def test_progress_off_a_terminal_is_silent_for_short_work_and_a_line_per_interval_for_long(capsys):
    from whelp.output import Progress

    with Progress("work", total=10, every=3600) as bar:
        bar.advance(5)
    with Progress("work", total=10, every=0, enabled=False) as bar:
        bar.advance(5)
    assert capsys.readouterr().err == ""
    with Progress("work", total=10, every=0) as bar:
        bar.update(advance=4, info="1,000 tok/s")
        bar.update(completed=9)
    with Progress("tokenizing", every=0) as bar:
        bar.update(info="12 tokens")
    assert capsys.readouterr().err == "work: 4/10 1,000 tok/s\nwork: 9/10 1,000 tok/s\ntokenizing: 12 tokens\n"


def test_progress_on_a_terminal_is_a_bar_that_is_gone_when_done():
    import os
    import pty

    code = (
        "import time; from whelp.output import Progress\n"
        "with Progress('work', total=4) as bar:\n"
        "    for _ in range(4):\n"
        "        bar.update(advance=1, info='busy'); time.sleep(0.3)\n"
        "print('after')\n"
    )
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-c", code])
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert "work" in text and "busy" in text and "━" in text  # a rich bar was drawn
    assert text.rstrip().endswith("after") and "\x1b[2K" in text  # and erased (transient) before the next line


def _parsed(cls, *args: str):
    """The spec a command decorated with ``with_spec`` receives for ``args``."""
    import typer
    from typer.testing import CliRunner

    from whelp.flags import with_spec

    app, seen = typer.Typer(), {}

    @app.command()
    @with_spec("spec", cls)
    def command(spec=None):
        seen["spec"] = spec

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return seen["spec"]


def test_every_option_is_a_spec_field_with_the_specs_defaults():
    from whelp.specs import DistillSpec, EvalSpec, PruneSpec, Schedule, SpeedSpec

    assert _parsed(PruneSpec) == PruneSpec()
    assert _parsed(PruneSpec, "--no-stream").stream is False and _parsed(PruneSpec, "--stream").stream is True
    assert _parsed(DistillSpec, "--steps", "3") == DistillSpec(steps=3)
    got = _parsed(DistillSpec, "--max-tokens", "64", "--schedule", "cosine:5", "--beta", "0.25", "--t2-scale")
    assert got == DistillSpec(max_tokens=64, schedule=Schedule("cosine", 5), beta=0.25, t2_scale=True)
    got = _parsed(
        EvalSpec, "--tasks", "a, b", "--ppl", "x", "--ppl", "y", "--include-path", "d", "--speed-repeats", "5"
    )
    assert got == EvalSpec(tasks=("a", "b"), ppl=("x", "y"), include_paths=("d",), speed=SpeedSpec(repeats=5))


def test_data_options_take_a_path_with_a_comma_whole(tmp_path):
    """A DATA option that names an existing file or directory is that one source, commas included: parsed into the
    spec's ``Mixture`` once (in-process), and read as such by a real ``whelp eval --ppl``."""
    from conftest import save_tiny, tiny_tokenizer

    from whelp.specs import Mixture, PruneSpec

    path = tmp_path / "held out, v2" / "a,b.txt"
    path.parent.mkdir()
    path.write_text("The quick brown fox jumps over the lazy dog.\n" * 40)
    assert _parsed(PruneSpec, "--calib", str(path)).calib == Mixture.parse(str(path))
    assert _parsed(PruneSpec, "--calib", str(path)).calib.names == (str(path),)
    assert _parsed(PruneSpec, "--calib", "a:0.7,b:0.3").calib.names == ("a", "b")
    save_tiny(tmp_path / "tiny", tiny_tokenizer())
    speed = ("--speed-prompt-len", "4", "--speed-new-tokens", "1", "--speed-repeats", "1")
    args = ("eval", str(tmp_path / "tiny"), "--ppl", str(path), "--max-tokens", "256", "--seq-len", "32", *speed)
    done = run_whelp(*args, "--out", str(tmp_path / "report"))
    assert done.exit_code == 0, done.stderr
    assert str(path) in json.loads((tmp_path / "report" / "metrics.json").read_text())["models"][0]["perplexity"]
    bad = run_whelp("eval", str(tmp_path / "tiny"), "--ppl", "a:0.5,b:0.5", "--out", str(tmp_path / "r2"))
    assert bad.exit_code == 2 and bad.stderr.strip().endswith("give 'a:0.5,b:0.5' as separate sources")


def test_an_interrupted_distil_exits_130_like_every_interrupt_and_its_resume_reports_no_nan(tmp_path):
    teacher, _, student = make_models(tmp_path / "models")
    out = tmp_path / "out"
    args = ["distill", student, "--teacher", teacher, "--out", str(out), "--steps", "30", "--save-every", "1"]
    args += ["--seq-len", "16", "--batch-size", "4", "--eval-tokens", "64"]
    run = subprocess.Popen(
        [sys.executable, "-m", "whelp", *args], env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while not list((tmp_path / "out.distill" / "checkpoints").glob("step-*")):
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    said = run.communicate(timeout=120)[1].decode()
    assert run.returncode == 130 and "interrupted at step" in said, said
    resumed = run_cli(*args)
    assert resumed.exit_code == 0, resumed.stderr
    assert "held-out ppl" in resumed.stdout and "nan" not in resumed.stdout, resumed.stdout


def test_a_lost_torchrun_peer_is_one_line_on_the_survivor(monkeypatch, tmp_path):
    from whelp import models

    def lost(*_, **__):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [::1]:1")

    monkeypatch.setattr(models, "inspect", lost)
    monkeypatch.setenv("WORLD_SIZE", "2")
    done = run_cli("inspect", str(tmp_path))
    assert done.exit_code == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "another process of this torchrun job stopped" in done.stderr and "resume" in done.stderr
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: a bug keeps its traceback
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        run_cli("inspect", str(tmp_path))
