"""What a structured prune keeps (``Keep``), how kept indices are chosen from scores (``top_indices``), and the config
readings every pruning module shares.

A leaf: it imports nothing of whelp's but the error type, so the family table's users (moe.py, surgery.py,
importance.py, targets.py, streaming.py) all build on it without importing one another for these helpers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from whelp.errors import WhelpError


@dataclass(frozen=True)
class Keep:
    """Kept source indices per axis, all sorted ascending (so kept structures keep their order).

    layers:   kept source layer indices; target layer ``i`` is source layer ``layers[i]``.
    hidden:   LongTensor [H'] kept residual channels.
    mlp:      one LongTensor [I'] per KEPT layer.
    kv_heads: one LongTensor [G'] per kept layer (source KV head ids).
    q_heads:  one LongTensor [G', Q'] per kept layer: kept query heads within each kept KV group
              (``0 <= r < n_rep``), the same count Q' per group.
    head_dims: LongTensor [d'] kept dims within a head (RoPE-exact: pairs s*k and s*k + d/2).
    tie:      "embedding" | "lm_head" | "mean" when an untied teacher becomes tied, else None.
    experts:  moe.ExpertKeep of an MoE teacher whose experts change (kept experts and their FFN neurons), else None.
    """

    layers: tuple[int, ...]
    hidden: Tensor
    mlp: tuple[Tensor, ...]
    kv_heads: tuple[Tensor, ...]
    q_heads: tuple[Tensor, ...]
    head_dims: Tensor
    tie: str | None = None
    experts: object = None  # moe.ExpertKeep | None


def text_config(config):
    """The decoder's config: a composite (multimodal) config's text part, else ``config`` itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def head_dim_of(config) -> int:
    cfg = text_config(config)
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def rope_exact_dims(head_dim: int, target_head_dim: int) -> Tensor:
    """Dims kept when shrinking head_dim d -> d' with RoPE intact: {s*k} then {s*k + d/2}, k < d'/2."""
    if target_head_dim > head_dim or head_dim % target_head_dim or target_head_dim % 2:
        raise WhelpError(
            f"head_dim {head_dim} -> {target_head_dim} is not RoPE-exact: the target must be an even "
            f"divisor of {head_dim} (e.g. {head_dim // 2}); choose head_dim = {head_dim}/s for integer s"
        )
    s = head_dim // target_head_dim
    first = torch.arange(0, head_dim // 2, s)
    return torch.cat([first, first + head_dim // 2])


def identity_keep(config) -> Keep:
    """The Keep of a no-op prune: every index of every axis."""
    cfg = text_config(config)
    kv, n_rep = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    layers = tuple(range(cfg.num_hidden_layers))
    return Keep(
        layers=layers,
        hidden=torch.arange(cfg.hidden_size),
        mlp=tuple(torch.arange(cfg.intermediate_size) for _ in layers),
        kv_heads=tuple(torch.arange(kv) for _ in layers),
        q_heads=tuple(torch.arange(n_rep).repeat(kv, 1) for _ in layers),
        head_dims=torch.arange(head_dim_of(cfg)),
    )


def top_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores, ascending (ties broken by the lower index)."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return torch.sort(order[:k]).values
