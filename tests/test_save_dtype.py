"""The dtype of written weights (``save_dtype``): by default what the source model stores, so a bf16 teacher gives
bf16 pruned and distilled students; any of float32 / bfloat16 / float16 on request. Every output loads in stock
transformers with a config whose dtype is its tensors'."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import LOOP_SPEC, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from whelp import weights
from whelp.distillation.api import distill_run
from whelp.errors import WhelpError
from whelp.pruning.api import prune_checkpoint
from whelp.schema import from_dict
from whelp.specs import DistillSpec, PruneSpec

PRUNE = PruneSpec(calib_samples=2, seq_len=16)


@pytest.fixture(scope="module")
def bf16_teacher(tmp_path_factory):
    """A tiny Llama stored in bf16 (1-layer student shape, so it can be distilled from itself too)."""
    path = tmp_path_factory.mktemp("bf16") / "teacher"
    tiny_model().to(torch.bfloat16).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def stored(directory) -> set[str]:
    """The dtypes of every stored tensor (from the safetensors headers) and the config's dtype."""
    from safetensors import safe_open

    dtypes = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            dtypes |= {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    config = json.loads((directory / "config.json").read_text())
    return dtypes | {f"config:{config['dtype']}"}


@pytest.mark.parametrize("stream", [False, True])
def test_a_bf16_teacher_prunes_to_a_bf16_student_unless_told_otherwise(bf16_teacher, tmp_path, stream):
    spec = replace(PRUNE, stream=stream)
    prune_checkpoint(str(bf16_teacher), "intermediate_size=64", tmp_path / "auto", spec)
    assert stored(tmp_path / "auto") == {"BF16", "config:bfloat16"}
    prune_checkpoint(str(bf16_teacher), "intermediate_size=64", tmp_path / "f32", replace(spec, save_dtype="float32"))
    assert stored(tmp_path / "f32") == {"F32", "config:float32"}
    size = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("auto", "f32")}
    assert size["auto"] < 0.51 * size["f32"]  # half the bytes, plus the header
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "auto", dtype="auto")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "f32", dtype="auto")
    assert (a.dtype, b.dtype) == (torch.bfloat16, torch.float32)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):  # the same weights, rounded
        assert torch.equal(x, y.to(torch.bfloat16)), name


def test_a_distilled_student_keeps_the_dtype_its_start_stores(bf16_teacher, tmp_path):
    spec = replace(LOOP_SPEC, steps=1, warmup=0, save_every=0, eval_tokens=64)
    distill_run(str(bf16_teacher), tmp_path / "auto", spec, teachers=((str(bf16_teacher), 1.0),), progress=False)
    assert stored(tmp_path / "auto") == {"BF16", "config:bfloat16"}
    distill_run(
        str(bf16_teacher),
        tmp_path / "f16",
        replace(spec, save_dtype="float16"),
        teachers=((str(bf16_teacher), 1.0),),
        progress=False,
    )
    assert stored(tmp_path / "f16") == {"F16", "config:float16"}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "f16", dtype="auto").dtype == torch.float16


def test_auto_is_refused_when_the_source_names_no_float_dtype(tmp_path):
    config = tiny_model().config
    config.dtype = None
    with pytest.raises(WhelpError, match=r"cannot tell the dtype of .* pass --save-dtype float32\|bfloat16\|float16"):
        weights.save_dtype("auto", tmp_path, config)
    assert weights.save_dtype("bfloat16", tmp_path, config) == "bfloat16"
    for cls in (PruneSpec, DistillSpec):
        with pytest.raises(WhelpError, match="save_dtype"):
            from_dict(cls, {"save_dtype": "int8", **({"steps": 1} if cls is DistillSpec else {})}, "spec")
