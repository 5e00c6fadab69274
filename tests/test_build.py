"""``whelp build``: the tiny recipe end to end, exact resume after a kill, a no-op re-run, card and metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = [pytest.mark.demo, pytest.mark.slow]
SETTINGS = ("--set", "distill.0.save_every=1")


def run_build(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "whelp", "build", "tiny", "--out", str(out), *SETTINGS, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def finished(tmp_path_factory, demo_dir):
    out = tmp_path_factory.mktemp("build") / "tiny"
    done = run_build(out)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_final_directory_holds_student_card_metrics_and_report(finished):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    final = finished / "final"
    for name in ("config.json", "model.safetensors", "recipe.yaml", "metrics.json", "report.md", "report.png",
                 "README.md", "tokenizer.json"):
        assert (final / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 192
    metrics = json.loads((final / "metrics.json").read_text())
    eval_metrics = json.loads(next((finished / "stages").glob("*-eval/metrics.json")).read_text())
    assert metrics["models"] == eval_metrics["models"]
    assert [m["label"] for m in metrics["models"]] == ["teacher", "pruned", "distilled"]
    card = ModelCard.load(final / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    ppl = {r.dataset_name: r.metric_value for r in card.data.eval_results}
    assert ppl == {"pydoc:eval": round(metrics["models"][-1]["perplexity"]["pydoc:eval"]["ppl"], 4)}
    assert (final / "report.md").read_text().split("\n", 1)[1].strip() in card.text
    assert (final / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_of_a_finished_build_does_nothing(finished):
    final = finished / "final" / "model.safetensors"
    before = (final.stat().st_mtime_ns, (finished / "state.json").read_text())
    again = run_build(finished)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "nothing to do" in again.stderr
    assert (final.stat().st_mtime_ns, (finished / "state.json").read_text()) == before


def test_stage_killed_after_its_output_but_before_state_is_not_redone(finished):
    state_file = finished / "state.json"
    state = json.loads(state_file.read_text())
    for name in ("02-cache-0", "03-distill"):  # as if killed between the atomic output and the state update
        state["stages"][name]["done"] = False
    state_file.write_text(json.dumps(state))
    again = run_build(finished)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "nothing to do" in again.stderr and "> 03-distill" not in again.stderr
    assert all(record["done"] for record in json.loads(state_file.read_text())["stages"].values())


def test_killed_build_resumes_to_the_same_student(finished, tmp_path):
    out = tmp_path / "tiny"
    cmd = [sys.executable, "-m", "whelp", "build", "tiny", "--out", str(out), *SETTINGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    checkpoints = out / "stages" / "03-distill.distill" / "checkpoints"
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline and not any(checkpoints.glob("step-*")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads((out / "state.json").read_text())["stages"]
    assert state["03-distill"]["done"] is False, "the build finished before it could be killed"
    resumed = run_build(out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "01-prune: up to date" in resumed.stderr
    a = load_file(finished / "final" / "model.safetensors")
    b = load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
