"""Structured surgery as a pure function on state-dict entries, plus the one place the config changes.

``slice_tensor`` maps ONE source tensor to its target entries, so the same code prunes an
in-memory model (apply to every entry of ``state_dict()``) and streams shard to shard
(streaming.py). Index conventions follow HF ``repeat_kv``: query head ``h = g * n_rep + r`` belongs
to KV head ``g``; row ``h * head_dim + j`` of ``q_proj`` is dimension ``j`` of head ``h``.

RoPE-exact head_dim (docs/design.md section 3): HF rotates dim ``j`` with ``j + d/2`` at frequency
``theta^(-2j/d)``. Keeping pairs ``j = s*k`` (``s = d/d'``) gives the new pair ``k`` frequency
``theta^(-2k/d')`` = the old one, so the target's own rotary embedding reproduces the original
rotation exactly (llama3 scaling included: it depends only on the frequency). The logits
``q.k / sqrt(d)`` restricted to the kept dims are kept by scaling the kept q rows by
``sqrt(d'/d)`` (the target divides by ``sqrt(d')``); with q_norm (Qwen3, OLMo 2) the scale goes
into ``q_norm.weight`` instead, since the norm would cancel it. A family whose attention scale is a
config constant (Granite's ``attention_multiplier``: ``Family.head_dim_scaling`` False) keeps it, and
the restricted logits need no scale.

Gemma scales its embeddings by ``sqrt(hidden_size)`` inside the model, so a pruned hidden_size H' would
shrink the embedding's share of the residual stream by ``sqrt(H'/H)``; the kept embedding columns are
multiplied by ``c = sqrt(H/H')`` to keep the residual stream's values. A tied target reads the same
matrix as lm_head, so its final (1 + w) RMSNorm is divided by ``c`` to keep the logits
(``embed_compensation``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM
from transformers.initialization import no_init_weights

from whelp.errors import WhelpError
from whelp.pruning.arch import SQRT_HIDDEN, Family, axes_of
from whelp.pruning.keep import Keep, head_dim_of, identity_keep, text_config
from whelp.pruning.moe import ExpertKeep, expert_config, moe_family_of, slice_experts
from whelp.specs import TIE


def q_rows(kv_heads: Tensor, q_heads: Tensor, n_rep: int, head_dims: Tensor, head_dim: int) -> Tensor:
    """Source q_proj rows (= o_proj columns) of the kept heads, in target order: LongTensor [G'*Q'*d']."""
    heads = (kv_heads[:, None] * n_rep + q_heads).reshape(-1)
    return (heads[:, None] * head_dim + head_dims[None, :]).reshape(-1)


def kv_rows(kv_heads: Tensor, head_dims: Tensor, head_dim: int) -> Tensor:
    """Source k/v_proj rows of the kept KV heads: LongTensor [G'*d']."""
    return (kv_heads[:, None] * head_dim + head_dims[None, :]).reshape(-1)


def _axis_index(axis: str, layer: int | None, keep: Keep, source_cfg) -> Tensor | None:
    cfg = text_config(source_cfg)
    if axis in ("vocab", "shared", "unit", "expert", "expert_ffn", "expert_gate_up"):
        return None  # never pruned, or sliced before by moe.slice_experts
    if axis == "hidden":
        return keep.hidden
    if axis == "head_dim":
        return keep.head_dims
    i = keep.layers.index(layer)
    if axis == "mlp":
        return keep.mlp[i]
    if axis == "gate_up":  # fused [gate; up] rows: the kept neurons of each block
        return torch.cat([keep.mlp[i], cfg.intermediate_size + keep.mlp[i]])
    d = head_dim_of(cfg)
    kv = kv_rows(keep.kv_heads[i], keep.head_dims, d)
    if axis == "kv":
        return kv
    n_rep = cfg.num_attention_heads // cfg.num_key_value_heads
    q = q_rows(keep.kv_heads[i], keep.q_heads[i], n_rep, keep.head_dims, d)
    if axis == "qkv":  # fused [q; k; v] rows: the kept rows of each block, offset by the blocks before it
        n_q, n_kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        return torch.cat([q, n_q + kv, n_q + n_kv + kv])
    return q


def _slice(tensor: Tensor, indices: list[Tensor | None]) -> Tensor:
    for dim, index in enumerate(indices):
        if index is not None:
            tensor = tensor.index_select(dim, index.to(tensor.device))
    return tensor.contiguous()


def slice_tensor(name: str, tensor: Tensor, keep: Keep, family: Family, source_cfg, target_cfg) -> dict[str, Tensor]:
    """One source state-dict entry -> its target entries (empty for a dropped layer).

    Embeddings: with ``keep.tie`` set, the embedding and lm_head are both returned sliced under
    their own names; ``tie_embeddings`` then merges them (the "mean" choice needs both).
    """
    try:
        layer, suffix, axes = axes_of(name, family)
    except KeyError:
        raise WhelpError(
            f"tensor '{name}' is not in the {family.name} table of whelp/pruning/arch.py; "
            "this checkpoint's layout differs from the family it claims"
        ) from None
    if layer is not None and layer not in keep.layers:
        return {}
    if keep.experts is not None and axes[0] == "expert":
        tensor = slice_experts(suffix, tensor, layer, keep.experts, getattr(text_config(source_cfg), family.ffn_key))
    out = _slice(tensor, [_axis_index(axis, layer, keep, source_cfg) for axis in axes])
    d, d_new = head_dim_of(source_cfg), head_dim_of(target_cfg)
    scaled = f"{family.q_norm}.weight" if family.q_norm else (f"{family.q_proj}.weight", f"{family.q_proj}.bias")
    if d_new != d and family.head_dim_scaling and layer is not None and suffix in scaled:
        if axes[0] == "qkv":  # only the q block of a fused projection
            n_q = text_config(target_cfg).num_attention_heads * d_new
            out = torch.cat([out[:n_q] * math.sqrt(d_new / d), out[n_q:]])
        else:
            out = out * math.sqrt(d_new / d)
    if layer is not None:
        name = f"{family.layers}.{keep.layers.index(layer)}.{suffix}"
    else:
        out = embed_compensation(name, out, family, source_cfg, target_cfg)
    return {name: out}


def embed_compensation(name: str, tensor: Tensor, family: Family, source_cfg, target_cfg) -> Tensor:
    """A sliced global tensor with Gemma's ``sqrt(hidden_size)`` embedding scale compensated (module docstring)."""
    hidden, target = text_config(source_cfg).hidden_size, text_config(target_cfg)
    if family.embed_multiplier != SQRT_HIDDEN or target.hidden_size == hidden:
        return tensor
    c = math.sqrt(hidden / target.hidden_size)
    if name == family.embed or (name == family.lm_head and target.tie_word_embeddings):
        return tensor * c  # tied: both are scaled, so tie_embeddings of the two is the scaled matrix
    if name == family.final_norm and target.tie_word_embeddings:
        return (tensor + family.norm_offset) / c - family.norm_offset
    return tensor


def tie_embeddings(embedding: Tensor, lm_head: Tensor, how: str) -> Tensor:
    """The one matrix [V, H'] an untied teacher's embedding and lm_head become when tied."""
    if how == "embedding":
        return embedding
    if how == "lm_head":
        return lm_head
    if how == "mean":
        return (embedding + lm_head) / 2
    raise WhelpError(f"unknown tie init '{how}'; choose one of {', '.join(TIE)}")


def prune_state_dict(state: dict[str, Tensor], keep: Keep, family: Family, source_cfg, target_cfg) -> dict[str, Tensor]:
    """``slice_tensor`` over a whole state dict; tied targets get one shared embedding matrix."""
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        out.update(slice_tensor(name, tensor, keep, family, source_cfg, target_cfg))
    if text_config(target_cfg).tie_word_embeddings:
        how = keep.tie or "embedding"
        shared = tie_embeddings(out[family.embed], out.get(family.lm_head, out[family.embed]), how)
        out[family.embed] = out[family.lm_head] = shared
    return out


def target_config(source_cfg, keep: Keep, rope_parameters: dict | None = None):
    """The target HF config: the source config with every pruned axis (and optionally RoPE) updated.

    ``rope_parameters`` None keeps the teacher's RoPE (policy "teacher"); a dict replaces it
    (policy "target", e.g. the llama3 factor 8 -> 32 of Llama 3.2).
    """
    cfg = copy.deepcopy(text_config(source_cfg))
    q_per_group = keep.q_heads[0].shape[1] if keep.q_heads else cfg.num_attention_heads // cfg.num_key_value_heads
    kv = len(keep.kv_heads[0]) if keep.kv_heads else cfg.num_key_value_heads
    cfg.num_hidden_layers = len(keep.layers)
    cfg.hidden_size = len(keep.hidden)
    cfg.intermediate_size = len(keep.mlp[0]) if keep.mlp else cfg.intermediate_size
    cfg.num_key_value_heads = kv
    cfg.num_attention_heads = kv * q_per_group
    cfg.head_dim = len(keep.head_dims)
    if keep.tie is not None:
        cfg.tie_word_embeddings = True
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in keep.layers]
    if moe_family_of(source_cfg) is not None:
        expert_config(cfg, keep.experts, keep.layers, source_cfg)
    if rope_parameters is not None:
        cfg.rope_parameters = copy.deepcopy(rope_parameters)
    return cfg


def prune_model(model, keep: Keep, family: Family, target_cfg):
    """A new fp32/bf16 model of ``target_cfg`` holding the sliced weights of ``model`` (strict load)."""
    state = prune_state_dict(model.state_dict(), keep, family, model.config, target_cfg)
    with no_init_weights():  # every parameter is overwritten below; random init would only cost time
        pruned = AutoModelForCausalLM.from_config(target_cfg, dtype=model.dtype)
    pruned.load_state_dict(state, strict=True)
    if text_config(target_cfg).tie_word_embeddings:
        pruned.tie_weights()
    return pruned.eval()


def prune_moe_model(model, keep: ExpertKeep, target_cfg):
    """A new model of ``target_cfg`` holding ``model``'s kept experts, every dense axis whole (strict load)."""
    full = replace(identity_keep(model.config), experts=keep)
    return prune_model(model, full, moe_family_of(model.config), target_cfg)
