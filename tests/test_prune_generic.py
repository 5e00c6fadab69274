"""Generic width pruning through torch-pruning (whelp/prune/generic.py) on non-Llama layouts.

OPT: learned positions, LayerNorm with biases, ReLU MLP (fc1/fc2), head_dim tied to hidden_size.
Gemma: RoPE, GQA, gated GeLU MLP, tied embeddings, explicit head_dim (all three axes prunable).
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

from whelp.errors import WhelpError
from whelp.models import shape
from whelp.prune.generic import prune_generic, select_heads

TOKENS = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(1))


def opt():
    return tiny_model("opt", ffn_dim=128, word_embed_proj_dim=64, intermediate_size=None, num_key_value_heads=None,
                      head_dim=None)


def gemma():
    return tiny_model("gemma", tie_word_embeddings=True)


def logits(model, ids=TOKENS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def round_trip(model, tmp_path):
    """Save, then stock from_pretrained (same attention kernel, so logits can be compared bit for bit)."""
    model.save_pretrained(tmp_path, safe_serialization=True)
    return AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                attn_implementation=model.config._attn_implementation).eval()


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
    torch.testing.assert_close(logits(pruned), logits(zeroed), rtol=1e-5, atol=1e-5)
    reloaded = round_trip(pruned, tmp_path)
    assert torch.equal(logits(reloaded), logits(pruned))


def test_opt_refuses_hidden_pruning_it_cannot_express():
    with pytest.raises(WhelpError, match="cannot express this pruned shape"):
        prune_generic(opt(), {"hidden_size": 48}, "magnitude")


def test_gemma_heads_equal_zeroed_heads_and_rope_is_restored():
    teacher = gemma()
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
            zeroed.model.layers[i].self_attn.o_proj.weight.data[:, head * 16:(head + 1) * 16] = 0
    torch.testing.assert_close(logits(pruned), logits(zeroed), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("importance", ["magnitude", "taylor", "random"])
def test_gemma_all_axes_config_matches_and_round_trips(importance, tmp_path):
    target = {"hidden_size": 48, "intermediate_size": 64, "num_attention_heads": 2}
    pruned, keep = prune_generic(gemma(), target, importance, TOKENS)
    got = shape(pruned.config)
    assert {k: got[k] for k in target} == target and got["num_key_value_heads"] == 2 and got["head_dim"] == 16
    assert got["tie_word_embeddings"] and pruned.lm_head.weight is pruned.model.embed_tokens.weight
    assert [len(k) for k in keep.mlp] == [64, 64] and len(keep.hidden) == 48
    reloaded = round_trip(pruned, tmp_path)
    assert shape(reloaded.config) == got
    assert torch.equal(logits(reloaded), logits(pruned))


def test_gemma_hidden_keeps_exactly_the_selected_channels_of_every_tensor():
    """RMSNorm and Gemma's sqrt(hidden) embedding scale change with the width, so hidden pruning is not
    function-preserving; what must hold is that every residual-stream tensor is the teacher's slice."""
    teacher = gemma()
    pruned, keep = prune_generic(copy.deepcopy(teacher), {"hidden_size": 40}, "activation", TOKENS)
    h = keep.hidden
    assert len(h) == 40 and torch.equal(h, h.sort().values)
    src, dst = teacher.state_dict(), pruned.state_dict()
    assert src.keys() == dst.keys()
    for name, tensor in src.items():
        expected = tensor
        for dim, size in enumerate(tensor.shape):
            if size == 64 and not (name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")) and dim == 0) \
                    and not (name.endswith("o_proj.weight") and dim == 1):
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
        prune_generic(gemma(), {"num_hidden_layers": 1}, "magnitude")
    with pytest.raises(WhelpError, match="must be in"):
        prune_generic(gemma(), {"intermediate_size": 512}, "magnitude")
    with pytest.raises(WhelpError, match="unknown importance"):
        prune_generic(gemma(), {"intermediate_size": 64}, "weights")
    with pytest.raises(WhelpError, match="calibration tokens"):
        prune_generic(gemma(), {"intermediate_size": 64}, "activation")
