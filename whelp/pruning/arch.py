"""Per-family table of state-dict names and the axis each tensor dimension lives on.

Surgery (surgery.py) and weight-based importance (importance.py) read only this table, so a new
decoder family with the Llama layout is one entry here. Axis names:

  ``hidden``   a residual-stream channel (size hidden_size)
  ``q``        a query row: head h, dim j -> row h * head_dim + j (heads grouped by KV head)
  ``kv``       a key/value row: KV head g, dim j -> row g * head_dim + j
  ``mlp``      an MLP neuron (size intermediate_size)
  ``head_dim`` a dimension within one head (per-head q_norm / k_norm of Qwen3)
  ``vocab``    a token id (never pruned)
"""

from __future__ import annotations

from dataclasses import dataclass

_ATTN = {
    "self_attn.q_proj.weight": ("q", "hidden"),
    "self_attn.k_proj.weight": ("kv", "hidden"),
    "self_attn.v_proj.weight": ("kv", "hidden"),
    "self_attn.o_proj.weight": ("hidden", "q"),
}
_BIAS_QKV = {"self_attn.q_proj.bias": ("q",), "self_attn.k_proj.bias": ("kv",), "self_attn.v_proj.bias": ("kv",)}
_BIAS_O = {"self_attn.o_proj.bias": ("hidden",)}
_MLP = {
    "mlp.gate_proj.weight": ("mlp", "hidden"),
    "mlp.up_proj.weight": ("mlp", "hidden"),
    "mlp.down_proj.weight": ("hidden", "mlp"),
}
_BIAS_MLP = {"mlp.gate_proj.bias": ("mlp",), "mlp.up_proj.bias": ("mlp",), "mlp.down_proj.bias": ("hidden",)}
_NORMS = {"input_layernorm.weight": ("hidden",), "post_attention_layernorm.weight": ("hidden",)}
_QK_NORM = {"self_attn.q_norm.weight": ("head_dim",), "self_attn.k_norm.weight": ("head_dim",)}


@dataclass(frozen=True)
class Family:
    """State-dict layout of one decoder family (Llama layout: pre-norm, GQA attention, gated MLP).

    ``layer_tensors`` maps a name inside ``{layers}.{i}.`` to the axis of each dimension;
    ``q_norm`` is set when per-head RMSNorms follow q/k (Qwen3), which changes where the
    head_dim scale is folded (surgery.py).
    """

    name: str
    layer_tensors: dict
    layers: str = "model.layers"
    embed: str = "model.embed_tokens.weight"
    lm_head: str = "lm_head.weight"
    final_norm: str = "model.norm.weight"
    q_proj: str = "self_attn.q_proj"
    o_proj: str = "self_attn.o_proj"
    down_proj: str = "mlp.down_proj"
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    q_norm: str | None = None

    def global_tensors(self) -> dict:
        return {self.embed: ("vocab", "hidden"), self.lm_head: ("vocab", "hidden"), self.final_norm: ("hidden",)}


# Llama and Mistral may carry optional biases (attention_bias / mlp_bias); Qwen2 always has q/k/v biases;
# Qwen3 has per-head q_norm / k_norm of size head_dim.
FAMILIES = {
    "llama": Family("llama", {**_ATTN, **_BIAS_QKV, **_BIAS_O, **_MLP, **_BIAS_MLP, **_NORMS}),
    "mistral": Family("mistral", {**_ATTN, **_MLP, **_NORMS}),
    "qwen2": Family("qwen2", {**_ATTN, **_BIAS_QKV, **_MLP, **_NORMS}),
    "qwen3": Family("qwen3", {**_ATTN, **_BIAS_QKV, **_BIAS_O, **_MLP, **_NORMS, **_QK_NORM},
                    q_norm="self_attn.q_norm"),
}


def family_of(config) -> Family | None:
    """The table entry for a config's ``model_type``, or None (then only the generic path applies)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return FAMILIES.get(text.model_type)


def split_name(name: str, family: Family) -> tuple[int | None, str]:
    """``"model.layers.3.mlp.up_proj.weight"`` -> ``(3, "mlp.up_proj.weight")``; globals -> ``(None, name)``."""
    prefix = family.layers + "."
    if not name.startswith(prefix):
        return None, name
    index, _, rest = name[len(prefix):].partition(".")
    return int(index), rest


def axes_of(name: str, family: Family) -> tuple[int | None, str, tuple[str, ...]]:
    """``(layer, suffix, axes)`` of a state-dict entry; KeyError for a tensor the family does not know."""
    layer, suffix = split_name(name, family)
    table = family.global_tensors() if layer is None else family.layer_tensors
    return layer, suffix, table[suffix]
