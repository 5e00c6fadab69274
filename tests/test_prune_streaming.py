"""Streaming pruning (whelp/pruning/streaming.py) against in-memory pruning, and its failure modes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file

from whelp.errors import WhelpError
from whelp.models import save_model
from whelp.pruning import shards, streaming
from whelp.pruning.arch import family_of
from whelp.pruning.importance import calibrate, select
from whelp.pruning.surgery import prune_model, target_config
from whelp.pruning.targets import parse_target
from whelp.specs import PruneSpec

# depth 4 -> 3, hidden 64 -> 48, MLP 128 -> 96, KV groups 2 -> 1 with 1 of 2 query heads, head_dim 16 -> 8, tied
TARGET = (
    "num_hidden_layers=3,hidden_size=48,intermediate_size=96,num_attention_heads=1,"
    "num_key_value_heads=1,head_dim=8,tie_word_embeddings=true"
)


def tensors(model_dir) -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint, read back from its shards."""
    out = {}
    for path in sorted(set(shards.weight_map(model_dir).values())):
        out.update(load_file(path))
    return out


@pytest.fixture
def sharded(tmp_path):
    """A tiny random 4-layer model saved as several safetensors shards, and calibration tokens [6, 32]."""

    def make(family="llama", max_shard_size="60KB"):
        model = tiny_model(family, num_hidden_layers=4)
        model.save_pretrained(tmp_path / "src", max_shard_size=max_shard_size)
        tokens = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(1))
        return model, tmp_path / "src", tokens

    return make


def in_memory(src, tokens, method, out, tie="mean", batch_size=8):
    """The in-memory path on the teacher as loaded from disk (attention implementation as streaming's)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src).eval()
    family = family_of(model.config)
    target = parse_target(model.config, TARGET)
    scores = calibrate(model, family, tokens, method=method, batch_size=batch_size)
    keep = select(scores, model.config, target.shape, tie=tie)
    cfg = target_config(model.config, keep, None)
    save_model(prune_model(model, keep, family, cfg), None, out)
    return keep, scores


@pytest.mark.parametrize("family,method", [("llama", "activation"), ("llama", "magnitude"), ("qwen3", "activation")])
def test_streaming_equals_in_memory(sharded, tmp_path, family, method):
    model, src, tokens = sharded(family)
    assert len(list(src.glob("*.safetensors"))) > 3
    keep_mem, scores_mem = in_memory(src, tokens, method, tmp_path / "mem")
    target = parse_target(model.config, TARGET)
    keep, _, scores, _ = streaming.prune_streaming(
        src,
        tmp_path / "stream",
        target,
        PruneSpec(importance=method, tie="mean", batch_size=8, reconstruct="none"),
        tokens,
        shard_bytes=20_000,
    )
    assert scores.keys() == scores_mem.keys()
    assert [k for k in scores if not torch.equal(scores[k], scores_mem[k])] == []
    assert keep.layers == keep_mem.layers and len(keep.layers) == 3
    assert len(list((tmp_path / "stream").glob("*.safetensors"))) > 1
    got, want = tensors(tmp_path / "stream"), tensors(tmp_path / "mem")
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    config = json.loads((tmp_path / "stream" / "config.json").read_text())
    assert config == json.loads((tmp_path / "mem" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["head_dim"]) == (3, 48, 8)


@pytest.mark.parametrize("max_shard_size", ["60KB", "1GB"])
def test_streaming_output_loads_in_stock_transformers(sharded, tmp_path, max_shard_size):
    """Sharded or single-file source: the streamed checkpoint loads strictly, logits equal in-memory pruning's."""
    from transformers import AutoModelForCausalLM

    model, src, tokens = sharded(max_shard_size=max_shard_size)
    assert (src / shards.SINGLE).exists() == (max_shard_size == "1GB")
    family = family_of(model.config)
    target = parse_target(model.config, TARGET)
    spec = PruneSpec(batch_size=8, reconstruct="none")  # the slicing alone: reconstruction is test_reconstruct.py
    keep, cfg, _, _ = streaming.prune_streaming(src, tmp_path / "out", target, spec, tokens)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        want = prune_model(model, keep, family, cfg)(tokens).logits
        assert torch.equal(loaded(tokens).logits, want)


def test_multi_batch_calibration_matches_in_memory_to_rounding(sharded):
    """Per-layer scores are summed in the in-memory order; the cross-layer hidden score to fp32 rounding."""
    model, src, tokens = sharded()
    family = family_of(model.config)
    want = calibrate(model, family, tokens, batch_size=4)
    got = streaming.calibrate_streaming(src, model.config, family, tokens, batch_size=4)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=0)
        if key != "hidden":
            assert torch.equal(got[key], want[key]), key


def test_existing_output_refused_and_untouched(sharded, tmp_path):
    model, src, tokens = sharded()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(WhelpError, match="--force"):
        streaming.prune_streaming(src, out, parse_target(model.config, TARGET), PruneSpec(), tokens)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def _index(src):
    return json.loads((src / shards.INDEX).read_text())


def test_missing_tensor_is_a_clear_error(sharded, tmp_path):
    model, src, tokens = sharded()
    index = _index(src)
    del index["weight_map"]["model.layers.2.mlp.up_proj.weight"]
    (src / shards.INDEX).write_text(json.dumps(index))
    with pytest.raises(WhelpError, match=r"\(missing: model.layers.2.mlp.up_proj.weight\)"):
        streaming.prune_streaming(src, tmp_path / "out", parse_target(model.config, TARGET), PruneSpec(), tokens)
    assert not (tmp_path / "out").exists()


def test_index_pointing_at_wrong_shard_is_a_clear_error(sharded, tmp_path):
    model, src, tokens = sharded()
    index = _index(src)
    name = "model.layers.1.self_attn.q_proj.weight"
    index["weight_map"][name] = next(f for f in set(index["weight_map"].values()) if f != index["weight_map"][name])
    (src / shards.INDEX).write_text(json.dumps(index))
    with pytest.raises(WhelpError, match="does not hold it"):
        streaming.prune_streaming(src, tmp_path / "out", parse_target(model.config, TARGET), PruneSpec(), tokens)


def test_truncated_or_missing_shard_is_a_clear_error(sharded, tmp_path):
    model, src, tokens = sharded()
    shard = src / _index(src)["weight_map"]["model.layers.3.mlp.down_proj.weight"]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(WhelpError, match=rf"{shard.name} is truncated \(1,000 "):
        streaming.prune_streaming(src, tmp_path / "out", parse_target(model.config, TARGET), PruneSpec(), tokens)
    shard.unlink()
    with pytest.raises(WhelpError, match=f"missing.*{shard.name}"):
        streaming.prune_streaming(src, tmp_path / "out", parse_target(model.config, TARGET), PruneSpec(), tokens)
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_methods_that_cannot_stream_are_refused(sharded, tmp_path):
    model, src, tokens = sharded()
    target = parse_target(model.config, TARGET)
    with pytest.raises(WhelpError, match="taylor"):
        streaming.prune_streaming(src, tmp_path / "out", target, PruneSpec(importance="taylor"), tokens)
    with pytest.raises(WhelpError, match="layer importance 'loss'"):
        streaming.prune_streaming(src, tmp_path / "out", target, PruneSpec(layer_importance="loss"), tokens)


def test_should_stream_compares_weights_with_available_memory(sharded, monkeypatch):
    model, src, _ = sharded()
    n_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    monkeypatch.setattr(streaming, "available_memory", lambda: int(n_bytes * streaming.MEMORY_FACTOR) + 1)
    assert not streaming.should_stream(src, torch.float32)
    monkeypatch.setattr(streaming, "available_memory", lambda: int(n_bytes * streaming.MEMORY_FACTOR) - 1)
    assert streaming.should_stream(src, torch.float32)
    assert not streaming.should_stream(src, torch.bfloat16)
    assert not streaming.should_stream(src / "no-such-dir", torch.float32)  # a hub id: loaded in memory


@pytest.mark.demo
def test_prune_checkpoint_stream_and_in_memory_write_the_same_checkpoint(tmp_path, demo_tokenizer, monkeypatch):
    """The user-level path (api.prune_checkpoint) with --stream and without, on the same calibration blocks."""
    from whelp.pruning.api import PruneSpec, prune_checkpoint

    monkeypatch.setenv("WHELP_HOME", str(tmp_path / "home"))  # a fresh score cache: both runs calibrate
    model = tiny_model(num_hidden_layers=4, vocab_size=len(demo_tokenizer))
    model.save_pretrained(tmp_path / "src", max_shard_size="400KB")
    demo_tokenizer.save_pretrained(tmp_path / "src")
    reports = {}
    for stream in (True, False):
        spec = PruneSpec(calib_samples=4, seq_len=32, batch_size=4, tie="mean", stream=stream)
        reports[stream] = prune_checkpoint(str(tmp_path / "src"), TARGET, tmp_path / f"out-{stream}", spec)
        shutil.rmtree(tmp_path / "home" / "scores")
    assert reports[True]["path"] == "streaming" and reports[False]["path"] == "in-memory"
    assert reports[True]["kept"] == reports[False]["kept"]
    got, want = tensors(tmp_path / "out-True"), tensors(tmp_path / "out-False")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    configs = [json.loads((tmp_path / f"out-{s}" / "config.json").read_text()) for s in (True, False)]
    assert configs[0] == configs[1]
