"""``--interpolate A`` (WiSE-FT on save): the written student is (1 - A) x the one the run started from + A x the
trained one, tensor by tensor; A = 1 writes the trained weights; a start that is not the trained student, or a value
out of (0, 1], is one clear line."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import LOOP_SPEC, tiny_model, tiny_tokenizer
from safetensors.torch import load_file, save_file

from whelp.distillation.api import distill_run
from whelp.distillation.interpolate import average_with_start
from whelp.errors import WhelpError
from whelp.schema import from_dict
from whelp.specs import DistillSpec


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A tiny Llama with tied embeddings (no lm_head.weight in its file)."""
    return _saved(tmp_path_factory.mktemp("start") / "student", seed=0)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """Another of the same shape, so that distilling ``start`` from it moves its weights."""
    return _saved(tmp_path_factory.mktemp("teacher") / "teacher", seed=1)


def _saved(path, seed: int):
    tiny_model(seed=seed, tie_word_embeddings=True).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_the_average_is_its_closed_form_and_a_tied_head_is_left_to_the_tie(start):
    begin = load_file(start / "model.safetensors")
    assert "lm_head.weight" not in begin
    gen = torch.Generator().manual_seed(0)
    trained = {k: torch.randn(v.shape, generator=gen) for k, v in begin.items()}
    head = torch.randn(trained["model.embed_tokens.weight"].shape, generator=gen)
    state = {**{k: v.clone() for k, v in trained.items()}, "lm_head.weight": head}
    average_with_start(state, start, 0.25, tied=True)
    for name, value in begin.items():
        want = 0.75 * value.double() + 0.25 * trained[name].double()
        torch.testing.assert_close(state[name].double(), want, rtol=0, atol=1e-6)
    assert state["lm_head.weight"] is head  # tie_weights makes it the averaged embedding
    with pytest.raises(WhelpError, match=r"has no tensor lm_head.weight: it is not the student this run trained"):
        average_with_start(dict(state), start, 0.25, tied=False)


def test_only_the_checkpoint_files_are_read_not_a_stray_safetensors_beside_them(start, tmp_path):
    """A second ``*.safetensors`` in the start directory holding the same names is not the checkpoint: the average
    reads model.safetensors alone (reading both would average each tensor twice)."""
    begin = load_file(start / "model.safetensors")
    copy = tmp_path / "start"
    copy.mkdir()
    save_file(begin, copy / "model.safetensors")
    save_file({k: torch.full_like(v, 7.0) for k, v in begin.items()}, copy / "zz-stray.safetensors")
    state = {k: torch.ones_like(v) for k, v in begin.items()}
    average_with_start(state, copy, 0.5, tied=True)
    for name, value in begin.items():
        torch.testing.assert_close(state[name], 0.5 * value + 0.5, rtol=0, atol=1e-6)


def test_a_sharded_start_is_averaged_file_by_file(tmp_path):
    model = tiny_model(seed=2, tie_word_embeddings=True)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    begin = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state = {k: torch.ones_like(v) for k, v in begin.items()}
    average_with_start(state, tmp_path, 0.5, tied=True)
    for name, value in begin.items():
        torch.testing.assert_close(state[name], (value + 1) / 2, rtol=0, atol=1e-6)


def test_a_start_of_another_shape_or_without_safetensors_is_refused(start, tmp_path):
    state = {k: v.clone() for k, v in load_file(start / "model.safetensors").items()}
    name = "model.embed_tokens.weight"
    state[name] = torch.zeros(state[name].shape[0] + 1, state[name].shape[1])
    with pytest.raises(WhelpError, match=rf"{name} is \(\d+, \d+\), the trained student's \(\d+, \d+\)"):
        average_with_start(state, start, 0.5, tied=True)
    state = {k: torch.ones_like(v) for k, v in load_file(start / "model.safetensors").items()}
    state["model.norm.weight"] = torch.zeros(3)  # the last tensor of the model: every other one comes first
    before = {k: v.clone() for k, v in state.items()}
    with pytest.raises(WhelpError, match=r"model.norm.weight is \(\d+,\), the trained student's \(3,\)"):
        average_with_start(state, start, 0.5, tied=True)
    assert all(torch.equal(state[k], v) for k, v in before.items())  # refused from the headers, nothing replaced
    with pytest.raises(WhelpError, match="holds no safetensors weights; convert it to safetensors or omit"):
        average_with_start(state, tmp_path, 0.5, tied=True)


def test_a_distilled_student_written_at_a_half_is_the_average_of_its_two_ends(start, teacher, tmp_path):
    spec = replace(LOOP_SPEC, steps=2, warmup=0, save_every=0, eval_tokens=64)
    teachers = ((str(teacher), 1.0),)
    distill_run(str(start), tmp_path / "trained", spec, teachers=teachers, progress=False)
    report = distill_run(
        str(start), tmp_path / "half", replace(spec, interpolate=0.5), teachers=teachers, progress=False
    )
    assert report["spec"]["interpolate"] == 0.5
    begin, trained = load_file(start / "model.safetensors"), load_file(tmp_path / "trained" / "model.safetensors")
    half = load_file(tmp_path / "half" / "model.safetensors")
    assert half.keys() == trained.keys() == begin.keys()
    moved = 0.0
    for name, value in begin.items():
        want = (value.double() + trained[name].double()) / 2
        torch.testing.assert_close(half[name].double(), want, rtol=0, atol=1e-6)
        moved = max(moved, float((trained[name] - value).abs().max()))
    assert moved > 1e-3  # the training moved the weights, so the average is not the start


@pytest.mark.parametrize("value", [0, -0.5, 1.5])
def test_interpolate_out_of_range_is_one_line(value):
    with pytest.raises(WhelpError, match=r"interpolate must be in \(0, 1\] \(1 writes the trained weights\), got"):
        from_dict(DistillSpec, {"steps": 1, "interpolate": value}, "spec")
    assert DistillSpec(steps=1, interpolate=1).save.interpolate == 1
