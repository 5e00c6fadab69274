"""A checkpoint that contradicts itself is refused by every verb that reads one, in one line, before any work: a
config.json describing another model than its tensors (wider, fewer or more layers, another vocabulary), a truncated
or padded safetensors file, a sharded index that disagrees with its shards. Valid checkpoints of every family (tied
embeddings, the layouts transformers converts on load or ignores in part) pass, and a model that fails the check as
it is written is never committed."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import run_cli, save_tiny, tiny_model, tiny_tokenizer
from safetensors.torch import save_file
from test_families import FAMILIES, config
from transformers import AutoModelForCausalLM

from whelp import models, weights
from whelp.errors import WhelpError


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A tiny Llama (2 layers, MLP 128, vocab 512) with its tokenizer: a checkpoint every verb runs on."""
    path = tmp_path_factory.mktemp("good") / "tiny"
    save_tiny(path, tiny_tokenizer())
    return path


def copy_with(good, tmp_path, **config_changes):
    """A copy of ``good`` whose config.json has ``config_changes``."""
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    data = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**data, **config_changes}))
    return bad


def verbs(model, good, out) -> dict[str, tuple[str, ...]]:
    """Each verb that reads ``model``, run as small as it goes."""
    small = ("--seq-len", "16", "--batch-size", "2", "--steps", "1", "--eval-tokens", "32")
    return {
        "inspect": ("inspect", str(model)),
        "export": ("export", str(model), "--gguf", str(out / "m.gguf")),
        "prune": ("prune", str(model), "--target", "intermediate_size=64", "--out", str(out / "p"), "--seq-len", "16"),
        "distill": ("distill", str(model), "--teacher", str(good), "--out", str(out / "d"), *small),
        "distill --teacher": ("distill", str(good), "--teacher", str(model), "--out", str(out / "t"), *small),
        "eval": (
            "eval",
            str(model),
            "--tasks",
            "whelp_pydoc_next",
            "--limit",
            "2",
            "--seq-len",
            "16",
            "--out",
            str(out / "e"),
        ),
    }


def refused_by_every_verb(model, good, out, message: str) -> None:
    """Every verb exits 2 with one ``error:`` line holding ``message``, and writes nothing."""
    for verb, args in verbs(model, good, out).items():
        done = run_cli(*args)
        lines = done.stderr.strip().splitlines()
        assert done.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (verb, done.stderr)
        assert message in lines[0] and "Traceback" not in done.stderr, (verb, lines[0])
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"intermediate_size": 512}, "says intermediate_size 512 but model.layers.0.mlp.down_proj.weight is [64, 128]"),
        (
            {"num_hidden_layers": 1},
            "says num_hidden_layers 1 but the weights hold 2 layers (unexpected: model.layers.1.",
        ),
        ({"num_hidden_layers": 3}, "says num_hidden_layers 3 but the weights hold 2 layers (missing: model.layers.2."),
        ({"vocab_size": 600}, "says vocab_size 600 but lm_head.weight is [512, 64]"),
    ],
    ids=["wider", "fewer layers", "more layers", "another vocabulary"],
)
def test_every_verb_refuses_a_config_that_contradicts_the_tensors(good, tmp_path, changes, message):
    bad = copy_with(good, tmp_path, **changes)
    refused_by_every_verb(bad, good, tmp_path / "out", f"error: {bad}'s config.json {message}")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda data: data[:-100], "model.safetensors is truncated ("),
        (lambda data: data + bytes(7), "model.safetensors has 7 bytes after its last tensor ("),
    ],
    ids=["truncated", "padded"],
)
def test_every_verb_refuses_a_safetensors_file_of_another_length_than_its_header_says(good, tmp_path, edit, message):
    bad = copy_with(good, tmp_path)
    weights = bad / "model.safetensors"
    weights.write_bytes(edit(weights.read_bytes()))
    refused_by_every_verb(bad, good, tmp_path / "out", message)


def test_a_sharded_index_must_agree_with_its_shards(tmp_path):
    sharded = tmp_path / "sharded"
    tiny_model().save_pretrained(sharded, max_shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    models.check_checkpoint(str(sharded))

    moved = copy_with(sharded, tmp_path / "moved")
    name = next(iter(index["weight_map"]))
    other = next(s for s in shards if s != index["weight_map"][name])
    (moved / "model.safetensors.index.json").write_text(
        json.dumps({**index, "weight_map": {**index["weight_map"], name: other}})
    )
    with pytest.raises(WhelpError, match=rf"places {name} in {other}, which does not hold it"):
        models.check_checkpoint(str(moved))

    lost = copy_with(sharded, tmp_path / "lost")
    (lost / shards[-1]).unlink()
    with pytest.raises(WhelpError, match=rf"lists shards missing from .* \({shards[-1]}\)"):
        models.check_checkpoint(str(lost))

    both = copy_with(sharded, tmp_path / "both")
    shutil.copy(sharded / shards[0], both / "model.safetensors")
    with pytest.raises(WhelpError, match="holds both model.safetensors and model.safetensors.index.json"):
        models.check_checkpoint(str(both))


def test_checkpoints_of_every_family_pass(tmp_path):
    """The files of every family as transformers saves them (MoE experts one tensor each, GPT-NeoX's ``embed_out``)
    and a tied Llama without an lm_head."""
    for family in FAMILIES:
        torch.manual_seed(0)
        models.save_model(AutoModelForCausalLM.from_config(config(family)), None, tmp_path / family)
        models.check_checkpoint(str(tmp_path / family))
    tied = models.save_model(tiny_model(tie_word_embeddings=True), None, tmp_path / "tied")
    assert "lm_head.weight" not in weights.read_header(tied / "model.safetensors")
    models.check_checkpoint(str(tied))


def test_layouts_transformers_reads_pass_and_load(tmp_path):
    """A hub GPT-2's files (names without ``transformer.``, the causal-mask buffers it ignores) and a Llama with the
    per-layer rotary ``inv_freq`` buffers of old checkpoints: no false alarm, and transformers loads them without an
    unexpected tensor."""
    gpt2 = AutoModelForCausalLM.from_config(config("gpt2", vocab_size=len(tiny_tokenizer())))
    state = {k.removeprefix("transformer."): v for k, v in gpt2.state_dict().items() if k != "lm_head.weight"}
    state |= {"h.0.attn.bias": torch.ones(1, 1, 256, 256), "lm_head.weight": gpt2.lm_head.weight.detach().clone()}
    llama = tiny_model(vocab_size=len(tiny_tokenizer()))
    old = {**llama.state_dict(), "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    for name, model, tensors in (("gpt2", gpt2, state), ("llama", llama, old)):
        model.config.save_pretrained(tmp_path / name)
        tiny_tokenizer().save_pretrained(tmp_path / name)
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / name / "model.safetensors")
        models.check_checkpoint(str(tmp_path / name))
        models.load_model(str(tmp_path / name))


@pytest.mark.demo
def test_the_demo_teacher_passes(demo_dir):
    models.check_checkpoint(str(demo_dir))


def test_tensors_transformers_left_unused_fail_a_load():
    with pytest.raises(WhelpError, match=r"hub/m holds tensors its config.json has no place for \(model.layers.1.x\)"):
        models.check_loaded("hub/m", {"missing_keys": set(), "unexpected_keys": {"model.layers.1.x"}})


def test_a_model_corrupted_as_it_is_written_is_not_committed(tmp_path, monkeypatch):
    write_legacy_fields = models.write_legacy_fields

    def and_truncate(directory):
        write_legacy_fields(directory)
        with open(directory / "model.safetensors", "r+b") as f:
            f.truncate(1000)

    monkeypatch.setattr(models, "write_legacy_fields", and_truncate)
    with pytest.raises(WhelpError, match=r"the model written is not kept, as it contradicts itself: .* is truncated"):
        models.save_model(tiny_model(), None, tmp_path / "m")
    assert not (tmp_path / "m").exists()
