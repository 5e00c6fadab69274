"""The distillation loop under ``torchrun --nproc_per_node 2`` (gloo on CPU, FSDP2 student).

Asserts that two sharded processes follow the same loss curve and reach the same weights as one
process with the same global batch, and that a 2-process run interrupted by SIGINT resumes exactly: on 2
processes, and from its sharded checkpoint on 1 process (and a 1-process one on 2), grad_accum rescaled.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import LOOP_SPEC, fail_at, load_weights, make_models, max_diff

from whelp.distillation.api import distill_run as distill
from whelp.errors import WhelpError
from whelp.schema import to_dict
from whelp.specs import DistillSpec

pytestmark = pytest.mark.slow

DRIVER = """
import json, os, signal, sys
from pathlib import Path
from whelp.distillation import losses
from whelp.distillation.api import distill_run as distill
from whelp.specs import DistillSpec
from whelp.schema import from_dict
from whelp.errors import WhelpError

args = json.loads(sys.argv[1])
if args["sigint_at_call"]:
    real, count = losses.kd_loss, {"n": 0}
    def wrapped(*a, **k):
        count["n"] += 1
        if count["n"] == args["sigint_at_call"]:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)
    losses.kd_loss = wrapped
try:
    distill(args["student"], Path(args["out"]), from_dict(DistillSpec, args["spec"], "spec"),
            teachers=tuple(map(tuple, args["teachers"])), progress=False)
except WhelpError as exc:
    print("WhelpError:", exc, flush=True)
"""


def torchrun(tmp: Path, student: str, teachers, out: Path, spec: DistillSpec, sigint_at_call: int = 0) -> str:
    """Distil on 2 processes, SIGINT at the ``sigint_at_call``-th kd_loss call of each rank (one a micro-batch) if
    given; returns what it printed (stdout, then stderr). One process runs in this one (``distill``): the same
    code path, since torchrun with one process makes no process group either."""
    script = tmp / "driver.py"
    script.write_text(DRIVER)
    args = json.dumps(
        {
            "student": student,
            "teachers": teachers,
            "out": str(out),
            "spec": to_dict(spec),
            "sigint_at_call": sigint_at_call,
        }
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2", str(script), args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def losses_of(out: Path) -> list[float]:
    rows = (out.with_name(out.name + ".distill") / "metrics.jsonl").read_text().splitlines()
    return [json.loads(r)["loss"] for r in rows]


SPEC2 = replace(LOOP_SPEC, batch_size=2, grad_accum=2, ce_weight=0.2, schedule="linear:4")  # global batch 8, 2 ranks


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny models and one uninterrupted 2-process reference run, shared by the tests (each launch ~15-40 s)."""
    root = tmp_path_factory.mktemp("dist")
    teacher, teacher2, student = make_models(root)
    teachers = [[teacher, 0.0], [teacher2, 1.0]]
    torchrun(root, student, teachers, root / "two", SPEC2)
    return root, student, teachers


def test_fsdp2_two_processes_match_one_process(setup, tmp_path):
    root, student, teachers = setup
    one = replace(SPEC2, batch_size=4)  # the same 8 sequences per step on one process
    distill(student, tmp_path / "one", one, teachers=tuple(map(tuple, teachers)), progress=False)
    assert losses_of(root / "two") == pytest.approx(losses_of(tmp_path / "one"), abs=1e-5)
    # Adam divides by sqrt(v): reduction-order noise of 1e-7 in tiny gradients shows up as ~2e-5 in weights
    assert max_diff(load_weights(root / "two"), load_weights(tmp_path / "one")) <= 1e-4


@pytest.fixture(scope="module")
def cut(setup):
    """The run of ``setup`` on 2 processes interrupted by SIGINT in step 3: its run directory, to copy and resume."""
    root, student, teachers = setup
    printed = torchrun(root, student, teachers, root / "cut", SPEC2, sigint_at_call=2 * 3)
    assert "interrupted at step 3/6" in printed
    shards = sorted(p.name for p in (root / "cut.distill" / "checkpoints" / "step-00000003").glob("shard-*"))
    assert shards == [f"shard-0000{r}-model-00001-of-00001.safetensors" for r in (1, 2)]  # one file a rank
    assert not (root / "cut").exists()
    return root / "cut.distill"


def resumed(tmp_path: Path, cut: Path, name: str) -> Path:
    """An OUT whose run directory is a copy of the interrupted run's."""
    shutil.copytree(cut, tmp_path / f"{name}.distill")
    return tmp_path / name


def test_two_process_run_resumes_exactly_after_sigint(setup, cut, tmp_path):
    root, student, teachers = setup
    out = resumed(tmp_path, cut, "cut")
    torchrun(tmp_path, student, teachers, out, SPEC2)
    assert max_diff(load_weights(out), load_weights(root / "two")) <= 1e-6
    assert losses_of(out) == pytest.approx(losses_of(root / "two"), abs=1e-6)


def test_a_two_process_checkpoint_resumes_on_one_process(setup, cut, tmp_path, capsys):
    """The same command on 1 process: grad_accum 2 -> 4 keeps the 8 sequences of each step, the sharded
    checkpoint is read whole, and the run ends where the uninterrupted 2-process one does."""
    root, student, teachers = setup
    out = resumed(tmp_path, cut, "one")
    distill(student, out, SPEC2, teachers=tuple(map(tuple, teachers)), progress=False)
    assert (
        "world_size 2 -> 1, grad_accum 2 -> 4; grad_accum rescaled to keep the global batch of 8 sequences per step"
    ) in " ".join(capsys.readouterr().err.split())
    assert losses_of(out) == pytest.approx(losses_of(root / "two"), abs=1e-6)
    # steps 4-6 reduce over another world size: Adam's reduction-order noise, as in the 1-vs-2 test above
    assert max_diff(load_weights(out), load_weights(root / "two")) <= 1e-4


def test_a_one_process_checkpoint_resumes_on_two_processes(setup, tmp_path, monkeypatch):
    """The reverse: 1 process x grad_accum 4 interrupted, the same command on 2 processes (grad_accum 2 each)."""
    root, student, teachers = setup
    spec = replace(SPEC2, grad_accum=4)  # the 8 sequences of a step of `two`, on one process
    fail_at(monkeypatch, 4 * 3, lambda result: os.kill(os.getpid(), signal.SIGINT) or result)
    with pytest.raises(WhelpError, match="interrupted at step 3/6"):
        distill(student, tmp_path / "out", spec, teachers=tuple(map(tuple, teachers)), progress=False)
    monkeypatch.undo()
    printed = torchrun(tmp_path, student, teachers, tmp_path / "out", spec)
    assert "world_size 1 -> 2, grad_accum 4 -> 2; grad_accum rescaled" in " ".join(printed.split())
    assert losses_of(tmp_path / "out") == pytest.approx(losses_of(root / "two"), abs=1e-6)
    # steps 1-3 ran on one process: the same reduction-order bound (7e-5 on one machine, 4e-8 on another)
    assert max_diff(load_weights(tmp_path / "out"), load_weights(root / "two")) <= 1e-4


def test_fsdp2_on_policy_samples_through_the_sharded_student(setup, tmp_path):
    """Student sampling runs inside the FSDP2 root's forward; 2 ranks x 2 micro-batches draw exactly what one
    process drawing 4 micro-batches does (the sampling RNG follows the global micro-batch index)."""
    root, student, teachers = setup
    spec = replace(SPEC2, on_policy=1.0, gen_tokens=8, save_every=0)
    torchrun(tmp_path, student, teachers, tmp_path / "two", spec)
    distill(
        student, tmp_path / "one", replace(spec, grad_accum=4), teachers=tuple(map(tuple, teachers)), progress=False
    )
    assert losses_of(tmp_path / "two") == pytest.approx(losses_of(tmp_path / "one"), abs=1e-5)
    assert max_diff(load_weights(tmp_path / "two"), load_weights(tmp_path / "one")) <= 1e-4


def test_sharded_teachers_give_the_losses_of_replicated_ones(setup, tmp_path):
    """--shard-teachers: each rank holds half of every teacher layer and gathers it for the forward; the teachers
    compute what their full copies do, so the run follows the replicated one."""
    root, student, teachers = setup
    torchrun(tmp_path, student, teachers, tmp_path / "sharded", replace(SPEC2, shard_teachers=True))
    assert losses_of(tmp_path / "sharded") == pytest.approx(losses_of(root / "two"), abs=1e-5)
    assert max_diff(load_weights(tmp_path / "sharded"), load_weights(root / "two")) <= 1e-5
