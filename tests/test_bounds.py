"""Every size a user passes is checked against what it implies before work starts (issue 31): one line naming the
flag, the limit and the fix, before any weights load where the config suffices (``models.load_model`` refuses to
run here), in the verbs and in ``whelp plan``/``validate`` for a recipe."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import run_cli, save_tiny, tiny_tokenizer, whelp_process

from whelp import models, plan, recipe
from whelp.data import generate as gen
from whelp.errors import WhelpError
from whelp.specs import DistillSpec, GenerateSpec


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny teacher directory: 256 positions, a 512-token vocabulary."""
    path = tmp_path_factory.mktemp("bounds") / "tiny"
    save_tiny(path, tiny_tokenizer())
    return path


@pytest.fixture
def no_weights(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("weights were loaded before a size the config bounds was checked")

    monkeypatch.setattr(models, "load_model", refuse)


def _refused(*args) -> str:
    """The one error line of ``whelp ARGS``, asserted to be one line with exit status 2."""
    result = run_cli(*args)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ("--max-tokens", "512", "--new-tokens", "100000"),
            "--new-tokens 100,000 makes a sequence of up to 100,002 tokens (with its prompt and EOS), more than "
            "--max-tokens 512, the whole store; use --new-tokens from 1 to 510 or --max-tokens of at least 100,002",
        ),
        (
            ("--max-tokens", "100000", "--new-tokens", "1000"),
            "prompt tokens (up to 1) + --new-tokens 1,000 = 1001 is longer than the model's 256 positions",
        ),
        (
            ("--max-tokens", "100000", "--new-tokens", "250", "--prompts", "pydoc:train", "--prompt-tokens", "10"),
            "prompt tokens (up to 10) + --new-tokens 250 = 260 is longer than the model's 256 positions",
        ),
        (
            ("--max-tokens", "1000", "--new-tokens", "8", "--top-k", "100000"),
            "--top-k 100,000 is more than the teacher's 512-token vocabulary; use --top-k from 0 (all) to 512",
        ),
    ],
)
def test_generate_sizes_are_refused_before_the_teacher_loads(tiny, tmp_path, no_weights, args, message):
    assert message in _refused("generate", str(tiny), "--out", str(tmp_path / "s"), *args)
    assert not (tmp_path / "s").exists()


def test_generate_shows_progress_before_the_first_batch_finishes(tiny, tmp_path, monkeypatch, capsys):
    """Off a terminal a line appears as the teacher starts loading, not 30 s after the first batch ends."""
    shown, real = [], gen.sample
    monkeypatch.setattr(gen, "sample", lambda *a: shown.append(capsys.readouterr().err) or real(*a))
    gen.generate_store(str(tiny), tmp_path / "s", GenerateSpec(max_tokens=64, new_tokens=8, batch_size=2))
    assert shown[0] == f"generating (tokens): 0/64 loading {tiny}\n"


def test_cache_logits_sizes_are_refused_before_the_teacher_loads(tiny, tmp_path, no_weights):
    base = ("cache-logits", str(tiny), "--data", "pydoc:train", "--out", str(tmp_path / "c"))
    assert "--topk 100000 exceeds the teacher's 512-token vocabulary; use at most 512" in _refused(
        *base, "--topk", "100000", "--seq-len", "16"
    )
    assert "--seq-len 100000 is longer than the model's 256 positions" in _refused(
        *base, "--topk", "8", "--seq-len", "100000"
    )


def test_eval_lengths_are_checked_before_data_is_read_or_weights_load(tiny, tmp_path, no_weights, monkeypatch):
    from whelp.evals import api

    monkeypatch.setattr(api, "_ppl_tokens", lambda *_: pytest.fail("perplexity data read before the positions"))
    args = ("eval", str(tiny), "--out", str(tmp_path / "e"), "--seq-len", "16", "--max-length", "100000")
    refused = _refused(*args)
    assert (
        "--max-length 100000 is longer than the model's 256 positions (max_position_embeddings); use at most 256"
        in refused
    )


def test_export_refuses_a_fifo_at_once_and_names_a_file_above_out(tiny, tmp_path):
    """Reading a FIFO's magic bytes would block for ever: a real process with a timeout, so a regression fails."""
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    proc = whelp_process("export", str(tiny), "--gguf", str(fifo), "--force", stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("whelp export blocked on a FIFO at --gguf")
    assert proc.returncode == 2 and f"--gguf {fifo} is a named pipe (FIFO), not a regular file" in err, err
    (tmp_path / "notes").write_text("mine")
    below = tmp_path / "notes" / "m.gguf"
    assert f"--gguf {below} is below {tmp_path / 'notes'}, which is a file" in _refused(
        "export", str(tiny), "--gguf", str(below)
    )


def test_distill_refuses_on_policy_options_without_on_policy(tmp_path):
    assert "on-policy options given with on_policy 0 (no on-policy micro-batches): gen_tokens=8" in _refused(
        "distill", str(tmp_path), "--out", str(tmp_path / "o"), "--steps", "1", "--gen-tokens", "8"
    )
    with pytest.raises(WhelpError, match="prompt_tokens=4, on_policy_loss=jsd; give --on-policy F in"):
        DistillSpec(steps=1, prompt_tokens=4, on_policy_loss="jsd")


BASE = """
name: t
teacher: {model: llama-3.1-8b}
prune: {target: llama-3.2-1b}
distill: {steps: 2%s}
"""


@pytest.mark.parametrize(
    "extra, overrides, message",
    [
        ("", ("distill.steps=100000000000000000000000",), "steps must be from 1 to 1,000,000,000, got 1000000"),
        (
            "",
            ("distill.steps=1e23",),
            "steps: expected an integer, got '1e23' (a number with a point or an exponent is not one: write its digits)",
        ),
        (", lr: 0", (), "recipe.distill[0]: lr must be > 0 (0 trains nothing), got 0.0"),
        (", local: {steps: 100000000000000000000000}", (), "local: steps must be from 1 to 1,000,000,000"),
        (
            ", gen_tokens: 16",
            (),
            "on-policy options given with on_policy 0 (no on-policy micro-batches): gen_tokens=16",
        ),
        ("", ("distill.steps=3", "distill.steps=4"), "--set distill.steps is given twice; give each key once"),
        (
            "}\ngenerate: {max_tokens: 1000000, new_tokens: 200000}\ndata: {train: generated",
            (),
            "recipe.generate[0]: prompt tokens (up to 1) + --new-tokens 200,000 = 200001 is longer than the model's "
            "131072 positions",
        ),
        (
            "}\ngenerate: {max_tokens: 1000, new_tokens: 8, top_k: 200000}\ndata: {train: generated",
            (),
            "recipe.generate[0]: --top-k 200,000 is more than the teacher's 128,256-token vocabulary",
        ),
        (
            ", caches: [{k: 200000}]",
            (),
            "recipe.distill[0].caches[0].k: --topk 200000 exceeds the teacher's 128256-token vocabulary",
        ),
        ("}\neval: {max_length: 1000000", (), "recipe.eval: --max-length 1000000 is longer than the model's 131072"),
    ],
)
def test_a_recipe_size_is_refused_by_validate_and_plan(tmp_path, extra, overrides, message):
    path = tmp_path / "r.yaml"
    path.write_text(BASE % extra)
    with pytest.raises(WhelpError) as err:
        plan.plan_recipe(recipe.load(str(path), overrides))
    assert message in str(err.value) and "\n" not in str(err.value)
    refused = _refused("validate", str(path), *(x for o in overrides for x in ("--set", o)))
    assert message in refused
