"""``whelp build``: the tiny recipe end to end, a no-op re-run, card and metrics; a changed-then-interrupted build
ships the new recipe's model; SIGKILL at every stage resumes exactly and leaves no temporaries."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import CliResult, assistant_of, load_weights, max_diff, run_whelp, whelp_process

from whelp import store

pytestmark = [pytest.mark.demo, pytest.mark.slow]
SETTINGS = ("--set", "distill.0.save_every=1")


def run_build(out: Path, *extra: str) -> CliResult:
    return run_whelp("build", "tiny", "--out", str(out), *SETTINGS, *extra)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, demo_dir):
    """The tiny build, made once per session: under pytest-xdist the first worker to ask makes it while the others
    wait (the lock whelp takes for its own shared caches); tests copy it before they change it."""
    root = tmp_path_factory.getbasetemp()
    out = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "tiny-build"
    with store.locked(out, "to build the tiny recipe"):
        if not (out / "final").is_dir():
            done = run_build(out)
            assert done.exit_code == 0, done.stderr[-2000:]
    return out


def test_final_directory_holds_student_card_metrics_and_report(finished):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    final = finished / "final"
    for name in (
        "config.json",
        "model.safetensors",
        "recipe.yaml",
        "metrics.json",
        "report.md",
        "report.png",
        "README.md",
        "tokenizer.json",
    ):
        assert (final / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 192
    metrics = json.loads((final / "metrics.json").read_text())
    eval_metrics = json.loads(next((finished / "stages").glob("*-eval-*/metrics.json")).read_text())
    assert metrics["models"] == eval_metrics["models"]
    assert [m["label"] for m in metrics["models"]] == ["teacher", "pruned", "distilled"]
    card = ModelCard.load(final / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    ppl = {r.dataset_name: r.metric_value for r in card.data.eval_results if r.metric_type == "perplexity"}
    assert ppl == {"pydoc:eval": round(metrics["models"][-1]["perplexity"]["pydoc:eval"]["ppl"], 4)}
    assert (final / "report.md").read_text().split("\n", 1)[1].strip() in card.text
    ppl_teacher = metrics["models"][0]["perplexity"]["pydoc:eval"]["ppl"]
    assert (
        f"- evaluation `pydoc:eval` (never trained on): perplexity {ppl['pydoc:eval']:,.2f}, teacher "
        f"{ppl_teacher:,.2f}" in card.text
    )
    assert (final / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "It keeps the teacher's chat template, special tokens and stop ids" in card.text


def test_the_pruned_and_distilled_stages_and_final_keep_the_teachers_assistant(finished, demo_dir):
    """The demo teacher's ChatML template, special tokens and stop ids (whelp/assistant.py) in every model the build
    writes, as stock transformers loads them."""
    want = assistant_of(demo_dir)
    stages = [next(p for p in (finished / "stages").glob(f"*-{s}-*") if not p.suffix) for s in ("prune", "distill")]
    for directory in (*stages, finished / "final"):
        assert assistant_of(directory) == want, directory


def test_rerun_of_a_finished_build_does_nothing(finished):
    final = finished / "final"
    before = ((final / "model.safetensors").stat().st_mtime_ns, (final / "whelp.json").read_text())
    again = run_build(finished)
    assert again.exit_code == 0, again.stderr[-2000:]
    assert "nothing to do" in again.stderr
    assert ((final / "model.safetensors").stat().st_mtime_ns, (final / "whelp.json").read_text()) == before


def hidden(root: Path) -> list[str]:
    """Every dot-named entry under ``root``: whelp's temporaries (the only hidden names it writes). A running
    build renames and deletes them while we look: a listing that races with it is simply taken again."""
    while True:
        try:
            return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))
        except FileNotFoundError:
            continue


def test_changed_then_interrupted_build_ships_the_new_recipe_model(finished, tmp_path):
    """Ctrl-C in the distil stage of a changed recipe, then the same command again."""
    out = tmp_path / "changed"
    shutil.copytree(finished, out, symlinks=True)
    changed = ("--set", "distill.0.lr=0.005", "--set", "eval.tasks=[]")  # lm-eval is not this test's subject
    args = ("build", "tiny", "--out", str(out), *SETTINGS, *changed)
    proc = whelp_process(*args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    old_checkpoints = set(out.glob("stages/03-*.distill/checkpoints/step-*"))
    assert next(line for line in proc.stderr if "> 03-distill" in line)  # prune and cache are reused
    deadline = time.time() + 300
    while (
        proc.poll() is None
        and time.time() < deadline
        and not set(out.glob("stages/03-*.distill/checkpoints/step-*")) - old_checkpoints
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.communicate()
    assert proc.returncode == 2, "the build finished before it could be interrupted"
    resumed = run_build(out, *changed)
    assert resumed.exit_code == 0, resumed.stderr[-2000:]
    assert "= 01-prune: up to date" in resumed.stderr and "> 03-distill" in resumed.stderr
    clean = tmp_path / "clean"  # the same change, uninterrupted
    shutil.copytree(finished, clean, symlinks=True)
    assert run_build(clean, *changed).exit_code == 0
    got, want, old = (load_weights(d / "final") for d in (out, clean, finished))
    assert max_diff(got, want) <= 1e-6
    assert max_diff(got, old) > 1e-3
    assert yaml.safe_load((out / "final" / "recipe.yaml").read_text())["distill"][0]["lr"] == 0.005
    report = json.loads((out / "final" / "distill_report.json").read_text())
    assert report["spec"]["lr"] == 0.005
    assert sorted(p.name for p in (out / "stages").iterdir()) == sorted(p.name for p in (clean / "stages").iterdir())
    assert hidden(out) == []


def test_sigkill_at_each_stage_resumes_to_the_same_student_and_leaves_no_temporaries(finished, tmp_path):
    out = tmp_path / "tiny"
    args = ("build", "tiny", "--out", str(out), *SETTINGS)
    stages, killed = ("01-prune", "02-cache-0", "03-distill", "04-eval"), []
    for i in range(len(stages)):
        left = set(hidden(out)) if out.exists() else set()  # the killed runs' leftovers so far
        proc = whelp_process(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:  # kill the moment a stage has a temporary open
            open_now = [name for name in set(hidden(out)) - left if any(stage in name for stage in stages[i:])]
            if open_now:
                proc.send_signal(signal.SIGKILL)
                killed.append(open_now)
                break
            time.sleep(0.005)
        proc.wait()
    assert len(killed) >= 3, f"too few kills landed inside a write: {killed}"
    resumed = run_build(out)
    assert resumed.exit_code == 0, resumed.stderr[-2000:]
    assert hidden(out) == [] and not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    assert max_diff(load_weights(finished / "final"), load_weights(out / "final")) <= 1e-6  # same keys, too


def test_only_the_builds_own_unused_stage_outputs_are_removed(tmp_path):
    from whelp import store
    from whelp.build import Stage, _remove_unused

    stages = tmp_path / "stages"
    stages.mkdir()
    kept = Stage("01-prune", "prune", "a" * 16, None)
    for name, kind in (
        (kept.dirname, "model"),
        ("01-prune-" + "b" * 16, "model"),
        ("02-eval-" + "c" * 16, "eval"),
        ("03-distill-" + "d" * 16 + ".distill", "run"),
        ("mymodel", "model"),
        ("01-prune-" + "e" * 16, "eval"),
    ):
        with store.atomic_dir(stages / name, kind=kind):
            pass
    (stages / ("04-prune-" + "f" * 16)).symlink_to(tmp_path / "stages" / "mymodel")
    _remove_unused(stages, [kept])
    assert sorted(p.name for p in stages.iterdir()) == sorted(
        [kept.dirname, "mymodel", "01-prune-" + "e" * 16, "04-prune-" + "f" * 16]
    )


def test_every_output_kind_loads_in_stock_transformers_with_a_config_that_matches_its_tensors(finished):
    """The pruned stage, the distilled stage and the final student: no missing, unexpected or mismatched keys, the
    config's shape and dtype are the tensors', and the only top-level safetensors are weights (pruning scores sit
    in scores/, where no loader globs)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from whelp import architecture

    stages = finished / "stages"
    outputs = {
        kind: next(p for p in stages.glob(f"*-{stage}-*") if not p.suffix)  # not the run's NN-distill-K.distill
        for kind, stage in (("pruned", "prune"), ("distilled", "distill"))
    } | {"final": finished / "final"}
    for kind, directory in outputs.items():
        model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True, dtype="auto")
        assert {k: v for k, v in info.items() if v} == {}, (kind, info)
        config = AutoConfig.from_pretrained(directory)
        assert (
            architecture.shape(model.config)
            == architecture.shape(config)
            == {
                "num_hidden_layers": 4,
                "hidden_size": 192,
                "intermediate_size": 256,
                "num_attention_heads": 3,
                "num_key_value_heads": 3,
                "head_dim": 64,
                "vocab_size": 49152,
                "tie_word_embeddings": True,
            }
        ), kind
        assert model.dtype == getattr(torch, str(config.dtype).replace("torch.", "")) == torch.float32, kind
        assert [p.name for p in directory.glob("*.safetensors")] == ["model.safetensors"], kind
        weights = load_weights(directory)
        layer = weights["model.layers.0.mlp.up_proj.weight"]
        assert layer.shape == (256, 192) and weights["model.embed_tokens.weight"].shape == (49152, 192), kind


def test_a_build_reads_calibration_training_and_eval_data_at_paths_with_commas(tmp_path):
    """An existing file is one source, whole, whatever its name holds: calibration, training (in the list form of
    a mixture) and eval data at a path with ',' build, into a build directory with ',' in its path."""
    from whelp.data import read_documents

    corpus = tmp_path / "corpus, v1" / "a,b.txt"
    corpus.parent.mkdir()
    corpus.write_text("\n\n".join(read_documents("pydoc:eval"))[:200_000])
    out = tmp_path / "build, 2"
    train = f"[{{source: '{corpus}', weight: 0.5}}, {{source: pydoc:train, weight: 0.5}}]"
    lean = ("--set", "distill.0.caches=[]", "--set", "eval.tasks=[]")  # the data paths are the subject here
    done = run_build(
        out, "--set", f"data.calib='{corpus}'", "--set", f"data.train={train}", "--set", f"data.eval='{corpus}'", *lean
    )
    assert done.exit_code == 0, done.stderr[-2000:]
    resolved = yaml.safe_load((out / "final" / "recipe.yaml").read_text())
    assert resolved["prune"][0]["calib"] == resolved["eval"]["ppl"][0] == [{"source": str(corpus), "weight": 1.0}]
    assert resolved["distill"][0]["data"] == [
        {"source": str(corpus), "weight": 0.5},
        {"source": "pydoc:train", "weight": 0.5},
    ]
    assert str(corpus) in json.loads((out / "final" / "metrics.json").read_text())["models"][0]["perplexity"]
