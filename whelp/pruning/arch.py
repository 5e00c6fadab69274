"""Per-family table of state-dict names and the axis each tensor dimension lives on.

Surgery (surgery.py) and weight-based importance (importance.py) read only this table, so a new
decoder family with the Llama layout is one entry here. Axis names:

  ``hidden``   a residual-stream channel (size hidden_size)
  ``q``        a query row: head h, dim j -> row h * head_dim + j (heads grouped by KV head)
  ``kv``       a key/value row: KV head g, dim j -> row g * head_dim + j
  ``mlp``      an MLP neuron (size intermediate_size)
  ``head_dim`` a dimension within one head (per-head q_norm / k_norm of Qwen3)
  ``qkv``      a row of a fused q/k/v projection (Phi-3 ``qkv_proj``): the q block, then the k and v blocks
  ``gate_up``  a row of a fused gate/up projection (Phi-3 ``gate_up_proj``): the gate block, then the up block
  ``vocab``    a token id (never pruned)
  ``expert``, ``expert_ffn``, ``expert_gate_up``  an expert, a neuron of one expert's FFN, a row of its fused
               [gate; up] (MoE rows: the router ``mlp.gate`` [E, H] and the fused ``mlp.experts.gate_up_proj``
               [E, 2I, H] / ``down_proj`` [E, H, I] of transformers 5's memory layout); sliced by moe.py before the
               other axes, since each kept expert keeps its own neurons
  ``shared``   a neuron of Qwen2-MoE's shared expert (kept whole); ``unit``: the one row of its sigmoid gate

Every row prunes every axis of ``AXES`` (experts: the MoE rows); ``Family.exact`` names those where pruning equals zeroing the removed
units in the teacher (layers: skipping them; heads: zeroing their o_proj columns; head_dim: attention restricted
to the kept dims). Hidden channels are never exact (each RMSNorm then averages over fewer channels).
``families_table`` renders the table the README shows (tests/test_prune_families.py checks they agree).
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
# OLMo 2: q_norm / k_norm over the whole projection ([heads * head_dim], [kv * head_dim]), and post-norms only
_QK_NORM_FULL = {"self_attn.q_norm.weight": ("q",), "self_attn.k_norm.weight": ("kv",)}
_POST_NORMS = {"post_attention_layernorm.weight": ("hidden",), "post_feedforward_layernorm.weight": ("hidden",)}
# Gemma 2 / 3: sandwich norms, pre- and post- both sub-blocks
_FF_NORMS = {"pre_feedforward_layernorm.weight": ("hidden",), "post_feedforward_layernorm.weight": ("hidden",)}
_GEMMA_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)
# Phi-3: fused projections, each sliced as its blocks (surgery.py)
_FUSED = {
    "self_attn.qkv_proj.weight": ("qkv", "hidden"),
    "self_attn.o_proj.weight": ("hidden", "q"),
    "mlp.gate_up_proj.weight": ("gate_up", "hidden"),
    "mlp.down_proj.weight": ("hidden", "mlp"),
}
# MoE: the router and the fused experts in memory; Qwen2-MoE's shared expert and its sigmoid gate
_MOE = {
    "mlp.gate.weight": ("expert", "hidden"),
    "mlp.experts.gate_up_proj": ("expert", "expert_gate_up", "hidden"),
    "mlp.experts.down_proj": ("expert", "hidden", "expert_ffn"),
}
_SHARED = {
    "mlp.shared_expert.gate_proj.weight": ("shared", "hidden"),
    "mlp.shared_expert.up_proj.weight": ("shared", "hidden"),
    "mlp.shared_expert.down_proj.weight": ("hidden", "shared"),
    "mlp.shared_expert_gate.weight": ("unit", "hidden"),
}
SQRT_HIDDEN = "sqrt(hidden_size)"  # Family.embed_multiplier of Gemma: its embedding module scales by hidden_size ** 0.5

# the axes of a target (architecture.SHAPE_KEYS) as the README names them
AXES = {
    "num_hidden_layers": "layers",
    "hidden_size": "hidden",
    "intermediate_size": "MLP",
    "num_attention_heads": "query heads",
    "num_key_value_heads": "KV heads",
    "head_dim": "head_dim",
    "num_experts": "experts",
}
_EXACT = frozenset(AXES) - {"hidden_size", "num_experts"}
# all the generic path (generic.py: torch-pruning, for models outside FAMILIES) changes; here beside the table it
# completes, so the table and the target rules read it without importing the optional torch-pruning path
WIDTH_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads")


@dataclass(frozen=True)
class Family:
    """State-dict layout of one decoder family (Llama layout: pre-norm, GQA attention, gated MLP).

    ``layer_tensors`` maps a name inside ``{layers}.{i}.`` to the axis of each dimension;
    ``q_norm`` is set when RMSNorms follow q/k (Qwen3 per head, OLMo 2 over the projection), which changes
    where the head_dim scale is folded (surgery.py). ``head_dim_scaling`` False: the attention scale is a
    config constant (Granite's ``attention_multiplier``), not ``head_dim ** -0.5``, so a smaller head_dim
    needs no fold. ``embed_multiplier``: the config scalar the model multiplies its embeddings by (Granite),
    which streaming calibration applies too; ``SQRT_HIDDEN`` (Gemma) is ``hidden_size ** 0.5``, which changes
    with hidden_size, so surgery compensates it (surgery.py). ``norm_offset``: RMSNorms scale by
    ``norm_offset + weight`` (Gemma: 1). ``exact``: the axes (``AXES`` keys) where pruning equals zeroing.
    ``mlp_residual``: the MLP's down_proj output joins the residual stream as it is (no post-norm, no multiplier),
    which span reconstruction (reconstruct.py) needs.

    Mixture-of-experts rows (moe.py) name the config keys of their expert count (``experts_key``: Mixtral's
    ``num_local_experts``, Qwen's ``num_experts``) and of one expert's FFN width (``ffn_key``), and where the
    per-expert tensors live on disk, which is not where transformers 5 holds them in memory: ``save_pretrained``
    writes ``{disk_block}.experts.{j}.{gate,up,down}.weight`` (``expert_parts``) for the fused ``mlp.experts``.
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
    head_dim_scaling: bool = True
    embed_multiplier: str | None = None
    norm_offset: float = 0.0
    exact: frozenset = _EXACT
    mlp_residual: bool = True
    note: str = ""
    experts_key: str | None = None
    ffn_key: str | None = None
    disk_block: str = "mlp"
    expert_parts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    def global_tensors(self) -> dict:
        return {self.embed: ("vocab", "hidden"), self.lm_head: ("vocab", "hidden"), self.final_norm: ("hidden",)}


# Llama and Mistral may carry optional biases (attention_bias / mlp_bias); Qwen2 always has q/k/v biases;
# Qwen3 has per-head q_norm / k_norm of size head_dim.
FAMILIES = {
    "llama": Family("llama", {**_ATTN, **_BIAS_QKV, **_BIAS_O, **_MLP, **_BIAS_MLP, **_NORMS}),
    "mistral": Family("mistral", {**_ATTN, **_MLP, **_NORMS}),
    "qwen2": Family("qwen2", {**_ATTN, **_BIAS_QKV, **_MLP, **_NORMS}),
    "qwen3": Family(
        "qwen3",
        {**_ATTN, **_BIAS_QKV, **_BIAS_O, **_MLP, **_NORMS, **_QK_NORM},
        q_norm="self_attn.q_norm",
        exact=_EXACT - {"head_dim"},
        note="per-head q/k norms: head_dim changes their statistics",
    ),
    # Granite: the Llama layout with scalar multipliers (embedding_multiplier, residual_multiplier,
    # attention_multiplier, logits_scaling) that the pruned config keeps unchanged; attention_multiplier is the
    # attention scale, so the kept q rows are not rescaled when head_dim shrinks.
    "granite": Family(
        "granite",
        {**_ATTN, **_BIAS_QKV, **_BIAS_O, **_MLP, **_BIAS_MLP, **_NORMS},
        head_dim_scaling=False,
        embed_multiplier="embedding_multiplier",
        mlp_residual=False,
        note="multipliers kept (scalars)",
    ),
    # OLMo 2: post-norms (no input_layernorm) and q/k RMSNorms over the full projection, which follow the q / kv
    # axes. Removing heads (or head dims) changes the statistics of those norms, so query heads, KV heads and
    # head_dim are pruned but not exact; layers and MLP neurons are.
    "olmo2": Family(
        "olmo2",
        {**_ATTN, **_BIAS_QKV, **_BIAS_O, **_MLP, **_POST_NORMS, **_QK_NORM_FULL},
        norms=("post_attention_layernorm", "post_feedforward_layernorm"),
        q_norm="self_attn.q_norm",
        exact=frozenset({"num_hidden_layers", "intermediate_size"}),
        mlp_residual=False,
        note="q/k norms over the full projection: heads change their statistics",
    ),
    # Gemma: head_dim independent of hidden / heads, (1 + weight) RMSNorms, embeddings scaled by sqrt(hidden_size)
    # inside the model (compensated in the kept embedding rows when hidden_size shrinks, surgery.py).
    "gemma": Family(
        "gemma",
        {**_ATTN, **_BIAS_QKV, **_BIAS_O, **_MLP, **_NORMS},
        embed_multiplier=SQRT_HIDDEN,
        norm_offset=1.0,
        note="sqrt(hidden) embedding scale compensated",
    ),
    # Gemma 2: + pre/post feed-forward norms, attention scale query_pre_attn_scalar ** -0.5 (a config constant, kept,
    # so head_dim needs no q rescale), attention / final logit soft-capping (scalars, kept), sliding-window layers
    # (layer_types follows the kept layers).
    "gemma2": Family(
        "gemma2",
        {**_ATTN, **_BIAS_QKV, **_BIAS_O, **_MLP, **_NORMS, **_FF_NORMS},
        norms=_GEMMA_NORMS,
        mlp_residual=False,
        head_dim_scaling=False,
        embed_multiplier=SQRT_HIDDEN,
        norm_offset=1.0,
        note="query_pre_attn_scalar, soft-caps kept; layer_types follow the kept layers",
    ),
    # Gemma 3 (text, Gemma3ForCausalLM): Gemma 2 + per-head (1 + weight) q/k norms and a RoPE per layer type.
    "gemma3_text": Family(
        "gemma3_text",
        {**_ATTN, **_BIAS_QKV, **_BIAS_O, **_MLP, **_NORMS, **_FF_NORMS, **_QK_NORM},
        norms=_GEMMA_NORMS,
        q_norm="self_attn.q_norm",
        mlp_residual=False,
        head_dim_scaling=False,
        embed_multiplier=SQRT_HIDDEN,
        norm_offset=1.0,
        exact=_EXACT - {"head_dim"},
        note="as gemma2; per-head q/k norms: head_dim changes their statistics",
    ),
    # Phi-3: qkv_proj = [q; k; v] and gate_up_proj = [gate; up], each block sliced like its unfused projection.
    "phi3": Family(
        "phi3",
        {**_FUSED, **_NORMS},
        q_proj="self_attn.qkv_proj",
        note="fused qkv_proj, gate_up_proj sliced as blocks; head_dim needs full rotary, no longrope",
    ),
    # Mixture of experts (moe.py): whole experts by REAP saliency; the MLP axis of Mixtral is each expert's FFN.
    # Removing an expert is never the same as zeroing it (the router then picks another), so experts are "yes";
    # where the router renormalises its top-k (Mixtral; Qwen with norm_topk_prob), never-routed experts drop exactly.
    "mixtral": Family(
        "mixtral",
        {**_ATTN, **_NORMS, **_MOE},
        experts_key="num_local_experts",
        ffn_key="intermediate_size",
        disk_block="block_sparse_moe",
        expert_parts=("w1", "w3", "w2"),
        note="MLP: each expert's FFN; never-routed experts drop exactly (renormalised top-k)",
    ),
    # Qwen2-MoE: + a shared expert (kept whole) and dense layers (mlp_only_layers / decoder_sparse_step, whose MLP
    # is the MLP axis); the expert FFN is moe_intermediate_size. Routing weights are softmax over all experts.
    "qwen2_moe": Family(
        "qwen2_moe",
        {**_ATTN, **_BIAS_QKV, **_NORMS, **_MOE, **_SHARED, **_MLP},
        experts_key="num_experts",
        ffn_key="moe_intermediate_size",
        note="shared expert kept whole; MLP: the dense layers (`moe_intermediate_size`: each expert's)",
    ),
    "qwen3_moe": Family(
        "qwen3_moe",
        {**_ATTN, **_BIAS_QKV, **_BIAS_O, **_NORMS, **_QK_NORM, **_MOE, **_MLP},
        q_norm="self_attn.q_norm",
        exact=_EXACT - {"head_dim"},
        experts_key="num_experts",
        ffn_key="moe_intermediate_size",
        note="per-head q/k norms; MLP: the dense layers (`moe_intermediate_size`: each expert's)",
    ),
}


def family_of(config) -> Family | None:
    """The table entry for a config's ``model_type``, or None (then only the generic path applies)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config and text.model_type != config.model_type and config.model_type not in FAMILIES:
        return None  # a composite (e.g. multimodal gemma3) model: its text layers live under other names
    return FAMILIES.get(text.model_type)


def families_table() -> str:
    """The README's families x axes table (markdown), rendered from ``FAMILIES``: "exact" where pruning equals
    zeroing the removed units, "yes" where the axis prunes without that equivalence, "-" where it does not prune
    (the experts of a dense family); last the generic path (generic.py) that serves every other decoder
    torch-pruning can trace."""
    head = "| family | " + " | ".join(AXES.values()) + " | notes |"
    lines = [head, "|" + "---|" * (len(AXES) + 2)]
    for name, family in FAMILIES.items():
        cells = [
            "exact" if key in family.exact else "-" if key == "num_experts" and not family.experts_key else "yes"
            for key in AXES
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {family.note} |")
    cells = [("exact" if key != "hidden_size" else "yes") if key in WIDTH_KEYS else "-" for key in AXES]
    lines.append(
        "| any other (generic path, `whelp[generic]`) | "
        + " | ".join(cells)
        + " | torch-pruning's dependency graph, in memory only; no streaming |"
    )
    return "\n".join(lines) + "\n"


def split_name(name: str, family: Family) -> tuple[int | None, str]:
    """``"model.layers.3.mlp.up_proj.weight"`` -> ``(3, "mlp.up_proj.weight")``; globals -> ``(None, name)``."""
    prefix = family.layers + "."
    if not name.startswith(prefix):
        return None, name
    index, _, rest = name[len(prefix) :].partition(".")
    return int(index), rest


def axes_of(name: str, family: Family) -> tuple[int | None, str, tuple[str, ...]]:
    """``(layer, suffix, axes)`` of a state-dict entry; KeyError for a tensor the family does not know."""
    layer, suffix = split_name(name, family)
    table = family.global_tensors() if layer is None else family.layer_tensors
    return layer, suffix, table[suffix]
