"""Targets: presets, config files, key=value overrides, validation messages, plan numbers, `whelp plan`."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import run_cli

from whelp import architecture, models
from whelp.errors import WhelpError
from whelp.models import CONFIGS_DIR
from whelp.pruning.keep import rope_exact_dims
from whelp.pruning.surgery import target_config
from whelp.pruning.targets import PRESETS, first_keep, parse_target, plan_target


def reference(name: str) -> str:
    """Path of a shipped reference config (whelp/configs/NAME.json, docs/design.md section 2)."""
    return str(CONFIGS_DIR / f"{name}.json")


@pytest.fixture(scope="module")
def llama8b():
    return models.load_config(reference("llama-3.1-8b"))


@pytest.mark.parametrize("preset,params", [("llama-3.2-1b", 1_235_814_400), ("llama-3.2-3b", 3_212_749_824)])
def test_plan_llama_presets_match_published_counts(llama8b, preset, params):
    result = plan_target(llama8b, preset)
    assert result["source"]["params"] == 8_030_261_248
    assert result["target"]["params"] == params
    published = architecture.shape(models.load_config(reference(preset)))
    assert {k: result["target"][k] for k in architecture.SHAPE_KEYS} == published


def test_config_file_target_equals_preset(llama8b):
    from_file = parse_target(llama8b, reference("llama-3.2-3b"))
    assert from_file.shape == PRESETS["llama-3.2-3b"][0]
    assert from_file.rope_parameters["factor"] == 32.0


def test_rope_policy_teacher_keeps_factor_8_target_takes_32(llama8b):
    parsed = parse_target(llama8b, "llama-3.2-1b")
    keep = first_keep(llama8b, parsed.shape)
    assert target_config(llama8b, keep).rope_parameters["factor"] == 8.0
    assert target_config(llama8b, keep, parsed.rope_parameters).rope_parameters["factor"] == 32.0


@pytest.mark.demo
def test_demo_presets_halve_and_quarter_non_embedding_params(demo_dir):
    source = models.load_config(str(demo_dir))
    _, non_embedding = architecture.count_params(source)
    for preset, fraction in (("smollm2-half", 0.5), ("smollm2-quarter", 0.25)):
        target = plan_target(source, preset)["target"]
        assert abs(target["non_embedding_params"] / non_embedding - fraction) < 0.002


def test_overrides_change_only_named_axes(llama8b):
    parsed = parse_target(llama8b, "intermediate_size=768, num_hidden_layers=24,tie_word_embeddings=true")
    expected = {
        **architecture.shape(llama8b),
        "intermediate_size": 768,
        "num_hidden_layers": 24,
        "tie_word_embeddings": True,
    }
    assert parsed.shape == expected and parsed.rope_parameters is None


@pytest.mark.parametrize(
    "spec,message",
    [
        ("hidden_size=5000", "hidden_size=5000 is out of range: must be an integer in 1..4096"),
        ("num_hidden_layers=0", "num_hidden_layers=0 is out of range"),
        ("num_attention_heads=30", "num_attention_heads=30 is not divisible by num_key_value_heads=8"),
        ("num_key_value_heads=4", "keeps 8 query heads per KV group but the teacher has 4"),
        ("head_dim=96", "head_dim 128 -> 96 is not RoPE-exact"),
        ("head_dim=1", "head_dim 128 -> 1 is not RoPE-exact"),
        ("hidden_size=4090", "is not a valid llama config: The hidden size (4090) is not a multiple of the number"),
        ("vocab_size=1000", "does not prune the vocabulary"),
        ("rope_theta=10", "unknown target key 'rope_theta'; valid keys: hidden_size, num_hidden_layers"),
        ("intermediate_size=768,num_hidden_layers", "item 'num_hidden_layers' is not key=value"),
        ("intermediate_size=big", "intermediate_size=big: expected a positive integer"),
        ("tie_word_embeddings=maybe", "write true or false"),
        ("llama-9b", "unknown target 'llama-9b'"),
        ("/nonexistent/config.json", "does not exist"),
    ],
)
def test_validation_names_key_and_range(llama8b, spec, message):
    with pytest.raises(WhelpError, match=re.escape(message)):
        parse_target(llama8b, spec)


def test_untying_a_tied_teacher_is_refused():
    tied = models.load_config(reference("llama-3.2-3b"))
    with pytest.raises(WhelpError, match="tie_word_embeddings=false but the teacher is tied"):
        parse_target(tied, "tie_word_embeddings=false")


def test_rope_exact_dims_keep_every_s_th_frequency_pair():
    assert rope_exact_dims(8, 4).tolist() == [0, 2, 4, 6]
    assert rope_exact_dims(128, 64).tolist() == list(range(0, 64, 2)) + list(range(64, 128, 2))
    assert torch.equal(rope_exact_dims(16, 16), torch.arange(16))


def test_cli_plan_json(tmp_path):
    result = run_cli("plan", reference("llama-3.1-8b"), "--target", "llama-3.2-1b", "--json")
    assert result.exit_code == 0 and result.stderr == "", result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"source", "target"}
    assert set(architecture.SHAPE_KEYS) | {"params"} <= set(data["target"])
    assert data["target"]["params"] == 1_235_814_400 and data["target"]["head_dim"] == 64


def test_cli_plan_reports_validation_error_in_one_line():
    done = run_cli("plan", reference("llama-3.1-8b"), "--target", "hidden_size=9999")
    assert done.exit_code == 2 and done.stdout == ""
    err = done.stderr
    assert err.count("\n") == 1 and "hidden_size=9999 is out of range: must be an integer in 1..4096" in err
