"""The Python API: models in, models out, and the directory verbs are thin wrappers giving the same numbers."""

from __future__ import annotations

import importlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import load_weights, max_diff, save_tiny, tiny_tokenizer

import whelp
from whelp.data import TensorBlocks, read_documents, token_stream

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny teacher saved to disk, its tokenizer, and blocks of real text [8, 32]."""
    root = tmp_path_factory.mktemp("api")
    tok = tiny_tokenizer()
    teacher = save_tiny(root / "teacher", tok, seed=1)
    ids = token_stream(read_documents("pydoc:train")[:40], tok)
    return root, teacher, tok, ids[: 8 * 32].view(8, 32)


def test_api_exports_the_verbs_and_torch_free_specs():
    for name in (
        "load_model",
        "blocks",
        "prune",
        "distill",
        "evaluate",
        "prune_checkpoint",
        "distill_run",
        "evaluate_to",
        "generate_store",
        "PruneSpec",
        "DistillSpec",
        "EvalSpec",
        "LossSpec",
        "LoadPolicy",
        "GenerateSpec",
    ):
        assert callable(getattr(whelp, name)), name
    for module in ("whelp.distillation.cache", "whelp.pruning.api"):  # importing subpackages must not shadow verbs
        importlib.import_module(module)

    assert callable(whelp.prune) and callable(whelp.distill)


def test_prune_in_memory_equals_the_directory_verb_and_leaves_the_teacher(pair, tmp_path):
    root, teacher, tok, blocks = pair
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    spec = whelp.PruneSpec(calib_samples=4, seq_len=32, batch_size=2)
    student = whelp.prune(teacher, "intermediate_size=64,num_hidden_layers=1", blocks, spec)
    assert student.config.intermediate_size == 64 and student.config.num_hidden_layers == 1
    assert len(student.whelp_kept["mlp"][0]) == 64 and len(student.whelp_kept["layers"]) == 1
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    # the verb calibrates on the first rows of its source: give the in-memory prune the same rows
    text = root / "calib.txt"
    text.write_text("\n\n".join(read_documents("pydoc:train")[:40]))
    rows = whelp.blocks(str(text), tok, 32, n=4)
    in_memory = whelp.prune(teacher, "intermediate_size=64,num_hidden_layers=1", rows, spec)
    whelp.prune_checkpoint(
        str(root / "teacher"),
        "intermediate_size=64,num_hidden_layers=1",
        tmp_path / "p",
        whelp.PruneSpec(calib=str(text), calib_samples=4, seq_len=32, batch_size=2),
    )
    # equal up to the float noise the reconstruction's solves see from the two loads' attention kernels
    assert max_diff(load_weights(tmp_path / "p"), in_memory.state_dict()) < 1e-5


def test_distill_in_memory_equals_the_directory_verb(pair, tmp_path):
    root, teacher, tok, blocks = pair
    spec = whelp.DistillSpec(
        steps=3,
        batch_size=2,
        grad_accum=2,
        seq_len=32,
        lr=3e-3,
        warmup=1,
        loss="jsd",
        beta=0.3,
        ce_weight=0.2,
        t2_scale=True,
        temperature=1.5,
    )
    student_dir = root / "student"
    student = save_tiny(student_dir, tok, seed=2, intermediate_size=64)
    trained = whelp.distill(student, [teacher], TensorBlocks(blocks), spec, progress=False)
    assert trained is student and len(trained.whelp_distill["log"]) == 3
    store = root / "train-store"
    from whelp.data import tokenstore

    text = root / "train.txt"
    text.write_text("\n\n".join(read_documents("pydoc:train")[:40]))
    tokenstore.tokenize(str(text), tok, store, num_proc=1)
    rows = whelp.blocks(str(store), tok, 32)
    loaded = [whelp.load_model(str(d))[0] for d in (student_dir, root / "teacher")]  # the verb's attention kernel
    again = whelp.distill(loaded[0], [(loaded[1], 1.0)], rows, spec, progress=False)
    report = whelp.distill_run(
        str(student_dir),
        tmp_path / "out",
        replace(spec, data=str(store)),
        teachers=((str(root / "teacher"), 1.0),),
        progress=False,
    )
    assert max_diff(load_weights(tmp_path / "out"), again.state_dict()) == 0.0
    assert report["final"]["loss"] == pytest.approx(again.whelp_distill["log"][-1]["loss"], abs=0)


def test_evaluate_in_memory_matches_the_directory_and_speaks_markdown(pair, tmp_path):
    root, teacher, tok, _ = pair
    spec = whelp.EvalSpec(
        ppl=("pydoc:eval",), max_tokens=512, seq_len=32, speed=whelp.SpeedSpec(prompt_len=8, new_tokens=2, repeats=1)
    )
    result = whelp.evaluate({"mem": teacher}, tok, spec)
    disk = whelp.evaluate({"disk": str(root / "teacher")}, spec=spec)
    a, b = (r.to_dict()["models"][0]["perplexity"]["pydoc:eval"]["ppl"] for r in (result, disk))
    assert a == pytest.approx(b, rel=1e-6)
    assert "| ppl:pydoc:eval |" in result.markdown() and "mem (reference)" in result.markdown()
    assert json.loads(json.dumps(result.to_dict()))["reference"] == "mem"
    with pytest.raises(whelp.WhelpError, match="pass its tokenizer"):
        whelp.evaluate({"mem": teacher}, None, spec)


@pytest.mark.demo
@pytest.mark.slow
def test_the_readme_notebook_runs_as_written(capsys):
    """The five lines of README.md's Python section, executed verbatim."""
    readme = (ROOT / "README.md").read_text()
    code = readme.split("## Python", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    teacher, student = scope["teacher"], scope["student"]
    assert student.config.intermediate_size == 768 and teacher.config.intermediate_size == 1536
    assert len(student.whelp_distill["log"]) == 2
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| ppl:pydoc:eval |"))
    teacher_ppl, student_ppl = (float(cell.split()[0].replace(",", "")) for cell in row.split("|")[3:5])
    assert teacher_ppl < student_ppl < 1e4
