"""Generic width pruning through torch-pruning (whelp/pruning/generic.py) on non-Llama layouts.

OPT: learned positions, LayerNorm with biases, ReLU MLP (fc1/fc2), head_dim tied to hidden_size.
Ministral (``GQA``): RoPE, GQA, gated MLP, tied embeddings, explicit head_dim (all three axes prunable); Gemma
played this part until it joined the family table (tests/test_prune_families.py).
Both also through the user path: targets (key=value, config.json) and ``whelp prune`` on a saved checkpoint.
"""

from __future__ import annotations

import copy
import importlib
import json
import sys

import pytest
import torch
from conftest import logits, run_cli, save_tiny, tiny_config, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from whelp.architecture import count_params, shape
from whelp.errors import WhelpError
from whelp.pruning.generic import prune_generic, select_heads
from whelp.pruning.targets import parse_target, plan_target

TOKENS = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(1))


OPT = dict(ffn_dim=128, word_embed_proj_dim=64, intermediate_size=None, num_key_value_heads=None, head_dim=None)
GQA = "ministral"  # a Llama-like decoder outside the family table
TIED = dict(tie_word_embeddings=True)


def opt():
    return tiny_model("opt", **OPT)


def gqa():
    return tiny_model(GQA, **TIED)


def round_trip(model, tmp_path):
    """Save, then stock from_pretrained (same attention kernel, so logits can be compared bit for bit)."""
    model.save_pretrained(tmp_path, safe_serialization=True)
    return AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation=model.config._attn_implementation
    ).eval()


def test_opt_mlp_equals_zeroed_neurons_and_round_trips(tmp_path):
    teacher = opt()
    zeroed = copy.deepcopy(teacher)
    pruned, keep = prune_generic(copy.deepcopy(teacher), {"intermediate_size": 48}, "activation", TOKENS)
    assert pruned.config.ffn_dim == 48 and pruned.config.hidden_size == 64
    for i, layer in enumerate(pruned.model.decoder.layers):
        assert layer.fc1.weight.shape == (48, 64) and layer.fc2.weight.shape == (64, 48)
        dropped = torch.ones(128, dtype=torch.bool)
        dropped[keep.mlp[i]] = False
        zeroed.model.decoder.layers[i].fc2.weight.data[:, dropped] = 0
    torch.testing.assert_close(logits(pruned, TOKENS), logits(zeroed, TOKENS), rtol=1e-5, atol=1e-5)
    reloaded = round_trip(pruned, tmp_path)
    assert torch.equal(logits(reloaded, TOKENS), logits(pruned, TOKENS))


def test_opt_refuses_hidden_pruning_it_cannot_express():
    with pytest.raises(WhelpError, match="cannot express this pruned shape"):
        prune_generic(opt(), {"hidden_size": 48}, "magnitude")


def test_gqa_heads_equal_zeroed_heads_and_rope_is_restored():
    teacher = gqa()
    module = importlib.import_module(type(teacher).__module__)
    rope = module.apply_rotary_pos_emb
    pruned, keep = prune_generic(copy.deepcopy(teacher), {"num_attention_heads": 2}, "activation", TOKENS)
    assert module.apply_rotary_pos_emb is rope and pruned.config._attn_implementation == "eager"
    zeroed = copy.deepcopy(teacher)
    for i, kept in enumerate(keep.heads):
        assert [int(h) // 2 for h in kept] == [0, 1]  # one query head kept in each of the 2 KV groups
        attn = pruned.model.layers[i].self_attn
        assert attn.q_proj.weight.shape == (32, 64) and attn.k_proj.weight.shape == (32, 64)
        assert attn.o_proj.weight.shape == (64, 32)
        for head in set(range(4)) - {int(h) for h in kept}:
            zeroed.model.layers[i].self_attn.o_proj.weight.data[:, head * 16 : (head + 1) * 16] = 0
    torch.testing.assert_close(logits(pruned, TOKENS), logits(zeroed, TOKENS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("importance", ["magnitude", "taylor", "random"])
def test_gqa_all_axes_config_matches_and_round_trips(importance, tmp_path):
    target = {"hidden_size": 48, "intermediate_size": 64, "num_attention_heads": 2}
    pruned, keep = prune_generic(gqa(), target, importance, TOKENS)
    got = shape(pruned.config)
    assert {k: got[k] for k in target} == target and got["num_key_value_heads"] == 2 and got["head_dim"] == 16
    assert got["tie_word_embeddings"] and pruned.lm_head.weight is pruned.model.embed_tokens.weight
    assert [len(k) for k in keep.mlp] == [64, 64] and len(keep.hidden) == 48
    reloaded = round_trip(pruned, tmp_path)
    assert shape(reloaded.config) == got
    assert torch.equal(logits(reloaded, TOKENS), logits(pruned, TOKENS))


def test_gqa_hidden_keeps_exactly_the_selected_channels_of_every_tensor():
    """RMSNorm changes with the width, so hidden pruning is not
    function-preserving; what must hold is that every residual-stream tensor is the teacher's slice."""
    teacher = gqa()
    pruned, keep = prune_generic(copy.deepcopy(teacher), {"hidden_size": 40}, "activation", TOKENS)
    h = keep.hidden
    assert len(h) == 40 and torch.equal(h, h.sort().values)
    src, dst = teacher.state_dict(), pruned.state_dict()
    assert src.keys() == dst.keys()
    for name, tensor in src.items():
        expected = tensor
        for dim, size in enumerate(tensor.shape):
            if (
                size == 64
                and not (name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")) and dim == 0)
                and not (name.endswith("o_proj.weight") and dim == 1)
            ):
                expected = expected.index_select(dim, h)
        assert torch.equal(dst[name], expected), name


def test_select_heads_ranks_within_kv_groups():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.8, 0.7, 0.2])  # 2 KV groups of 3 query heads
    assert select_heads(scores, n_kv=2, keep=4).tolist() == [1, 2, 3, 4]
    assert select_heads(scores, n_kv=6, keep=2).tolist() == [1, 3]  # MHA: global ranking
    with pytest.raises(WhelpError, match="multiple of num_key_value_heads"):
        select_heads(scores, n_kv=2, keep=3)


def test_refuses_non_width_axes_and_unknown_importance():
    with pytest.raises(WhelpError, match="changes only"):
        prune_generic(gqa(), {"num_hidden_layers": 1}, "magnitude")
    with pytest.raises(WhelpError, match="must be in"):
        prune_generic(gqa(), {"intermediate_size": 512}, "magnitude")
    with pytest.raises(WhelpError, match="unknown importance"):
        prune_generic(gqa(), {"intermediate_size": 64}, "weights")
    with pytest.raises(WhelpError, match="calibration tokens"):
        prune_generic(gqa(), {"intermediate_size": 64}, "activation")


def test_tracing_error_restores_rope_and_attention(monkeypatch):
    """The RoPE / attention swap of tracing is undone when graph building raises (no global patch outlives it)."""
    import torch_pruning as tp

    teacher = tiny_model(GQA, attn_implementation="sdpa", **TIED)
    module = importlib.import_module(type(teacher).__module__)
    rope, seen = module.apply_rotary_pos_emb, {}

    def broken(self, model, **kwargs):
        seen.update(rope_swapped=module.apply_rotary_pos_emb is not rope, attn=model.config._attn_implementation)
        raise RuntimeError("tracing failed")

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", broken)
    with pytest.raises(WhelpError, match="torch-pruning could not trace .*RuntimeError in its dependency graph"):
        prune_generic(teacher, {"intermediate_size": 64}, "magnitude")  # one line, not torch-pruning's traceback
    assert seen == {"rope_swapped": True, "attn": "eager"}
    assert module.apply_rotary_pos_emb is rope and teacher.config._attn_implementation == "sdpa"


def test_targets_of_opt_and_gqa_configs(tmp_path):
    """key=value and config.json targets use architecture.shape's vocabulary (OPT's ffn_dim is intermediate_size)."""
    opt_cfg, gqa_cfg = tiny_config("opt", **OPT), tiny_config(GQA, **TIED)
    assert parse_target(opt_cfg, "intermediate_size=48").shape == {**shape(opt_cfg), "intermediate_size": 48}
    plan = plan_target(opt_cfg, "intermediate_size=48")["target"]  # counted on a config with ffn_dim=48
    assert plan["intermediate_size"] == 48
    assert plan["params"] == count_params(tiny_config("opt", **{**OPT, "ffn_dim": 48}))[0] < count_params(opt_cfg)[0]
    # MHA: the KV heads follow the query heads; OPT ties head_dim to hidden / heads, so both must shrink together
    assert parse_target(opt_cfg, "hidden_size=32,num_attention_heads=2").shape["num_key_value_heads"] == 2
    with pytest.raises(WhelpError, match=r"opt cannot express this pruned shape: .*head_dim=12 \(not 16\)"):
        parse_target(opt_cfg, "hidden_size=48")
    tiny_config("opt", **{**OPT, "ffn_dim": 48}).save_pretrained(tmp_path / "opt")
    assert parse_target(opt_cfg, str(tmp_path / "opt" / "config.json")).shape["intermediate_size"] == 48
    tiny_config(GQA, **TIED, intermediate_size=64, num_attention_heads=2).save_pretrained(tmp_path / "gqa")
    target = parse_target(gqa_cfg, str(tmp_path / "gqa" / "config.json")).shape
    assert target == {**shape(gqa_cfg), "intermediate_size": 64, "num_attention_heads": 2}


@pytest.mark.parametrize(
    "family, spec, axis",
    [
        ("opt", "num_hidden_layers=1", "num_hidden_layers=1"),
        ("opt", "num_key_value_heads=2", "num_key_value_heads=2"),
        ("opt", "head_dim=8", "head_dim=8"),
        (GQA, "num_key_value_heads=1", "num_key_value_heads=1"),
        (GQA, "llama-3.2-1b", "num_hidden_layers=16"),
        (GQA, "tie_word_embeddings=false", "tie_word_embeddings"),
    ],
)
def test_targets_outside_the_generic_path_name_the_axis(family, spec, axis):
    cfg = tiny_config(family, **(OPT if family == "opt" else TIED))
    with pytest.raises(
        WhelpError,
        match=rf"cannot prune .*{axis}.*: {family} is outside whelp's family table; its "
        r"generic pruning path changes only hidden_size, intermediate_size, "
        r"num_attention_heads",
    ) as err:
        parse_target(cfg, spec)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny OPT and Ministral checkpoints on disk (weights + tokenizer) and their in-memory models."""
    root = tmp_path_factory.mktemp("generic")
    return {
        family: (root / family, save_tiny(root / family, tiny_tokenizer(), family, **overrides))
        for family, overrides in (("opt", OPT), (GQA, TIED))
    }


def prune_cli(src, target: str, out):
    return run_cli(
        "prune",
        str(src),
        "--target",
        target,
        "--out",
        str(out),
        "--calib",
        "pydoc:calib",
        "--calib-samples",
        "2",
        "--seq-len",
        "16",
    )


def test_cli_prunes_opt_mlp_to_a_stock_checkpoint(saved, tmp_path, monkeypatch):
    monkeypatch.setenv("WHELP_HOME", str(tmp_path / "home"))
    src, teacher = saved["opt"]
    result = prune_cli(src, "intermediate_size=48", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    assert report["path"] == "generic" and report["shape"]["target"]["intermediate_size"] == 48
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert pruned.config.ffn_dim == 48 and pruned.model.decoder.layers[0].fc1.weight.shape == (48, 64)
    zeroed = copy.deepcopy(teacher)  # the teacher with the dropped neurons zeroed computes the same function
    for i, kept in enumerate(report["kept"]["mlp"]):
        zeroed.model.decoder.layers[i].fc2.weight.data[:, sorted(set(range(128)) - set(kept))] = 0
    torch.testing.assert_close(logits(pruned, TOKENS), logits(zeroed, TOKENS), rtol=1e-5, atol=1e-5)
    from whelp.data import open_blocks  # the same calibration rows in memory select the same neurons

    calib = open_blocks("pydoc:calib", AutoTokenizer.from_pretrained(src), 16, seed=0).head(2)
    reference, keep = prune_generic(copy.deepcopy(teacher), {"intermediate_size": 48}, "activation", calib)
    assert [k.tolist() for k in keep.mlp] == report["kept"]["mlp"]
    torch.testing.assert_close(logits(pruned, TOKENS), logits(reference, TOKENS), rtol=1e-5, atol=1e-5)


def test_cli_prunes_gqa_heads_and_mlp_to_a_config_json_target(saved, tmp_path, monkeypatch):
    monkeypatch.setenv("WHELP_HOME", str(tmp_path / "home"))
    src, teacher = saved[GQA]
    tiny_config(GQA, **TIED, intermediate_size=64, num_attention_heads=2).save_pretrained(tmp_path / "target")
    result = prune_cli(src, str(tmp_path / "target" / "config.json"), tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert shape(pruned.config) == {**shape(teacher.config), "intermediate_size": 64, "num_attention_heads": 2}
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight
    zeroed = copy.deepcopy(teacher)  # dropped MLP neurons and query heads zeroed: the same function
    for i, (neurons, heads) in enumerate(zip(report["kept"]["mlp"], report["kept"]["heads"])):
        layer = zeroed.model.layers[i]
        layer.mlp.down_proj.weight.data[:, sorted(set(range(128)) - set(neurons))] = 0
        for head in set(range(4)) - set(heads):
            layer.self_attn.o_proj.weight.data[:, head * 16 : (head + 1) * 16] = 0
    torch.testing.assert_close(logits(pruned, TOKENS), logits(zeroed, TOKENS), rtol=1e-5, atol=1e-5)


def test_cli_refusals_are_one_line(saved, tmp_path, monkeypatch):
    """An axis the generic path cannot prune, and a missing torch-pruning, each end in one error line."""
    monkeypatch.setenv("WHELP_HOME", str(tmp_path / "home"))
    src, _ = saved["opt"]
    result = prune_cli(src, "num_hidden_layers=1", tmp_path / "layers")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: cannot prune num_hidden_layers=1: opt is outside whelp's family table")
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import torch_pruning now raises ImportError
    result = prune_cli(src, "intermediate_size=48", tmp_path / "missing")
    assert result.exit_code == 2 and not (tmp_path / "missing").exists()
    assert result.stderr == (
        "error: pruning a opt model (outside whelp's family table) needs torch-pruning: pip install 'whelp[generic]'\n"
    )
