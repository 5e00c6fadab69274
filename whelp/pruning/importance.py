"""Importance scores for every prunable axis, and the selection of a ``Keep`` from them.

Default (Minitron, Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation"): forward-only activation statistics. MLP neurons: |input of down_proj|; query heads:
L2 norm of each head's share of the o_proj output (``head_outputs``); hidden channels: |output| of every
RMSNorm. Each is aggregated as the mean over the sequence, then L2 over the batch. Layers: block
influence ``1 - cos(x_in, x_out)`` averaged over tokens (ShortGPT, Men et al. 2024), or the LM-loss
increase when the layer is skipped. Baselines: weight magnitude (sum of w^2 of every weight of the
structure), first-order Taylor (sum of |w * dL/dw|, Molchanov et al. 2019) and random.

Scores are a flat ``dict[str, Tensor]`` (kept in one safetensors file):
``hidden`` [H], ``mlp.{l}`` [I], ``heads.{l}`` [num_attention_heads], ``layers.block`` [L] and,
when asked for, ``layers.loss`` [L]. Activation statistics are kept as sums of squares over
batches (so they add across batches and shards); ranking does not need the final square root.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from whelp.architecture import layer_output
from whelp.errors import WhelpError
from whelp.pruning import moe
from whelp.pruning.arch import Family, axes_of
from whelp.pruning.keep import Keep, head_dim_of, rope_exact_dims, text_config, top_indices
from whelp.specs import IMPORTANCE

SCORES_VERSION = 3  # part of every saved score's identity; bumped when a definition changes (2: heads after o_proj;
# 3: an MoE teacher's scores hold its dense axes beside its experts')


def minitron_sq(acts: Tensor) -> Tensor:
    """Activations [B, T, N] -> sum over batch of (mean over sequence of |a|)^2: [N] fp32 (Minitron mean/L2)."""
    return acts.detach().float().abs().mean(dim=1).pow(2).sum(dim=0)


def head_outputs(acts: Tensor, o_weight: Tensor, head_dim: int) -> Tensor:
    """Per-head L2 norm of each head's share of the o_proj output: [B, T, heads].

    ``acts`` is the input of o_proj [B, T, heads * head_dim], ``o_weight`` its weight [H, heads * head_dim].
    Minitron scores a head by its attention output; measured here after o_proj (what the head adds to the
    residual stream), because the raw output norm ignores o_proj's scaling: on SmolLM2-135M, keeping 6 of 9
    heads by the raw norm gave ppl 232 on pydoc:eval, worse than random (129); by the projected norm 124
    (bench/RESULTS.md). One head at a time bounds the temporary to [B, T, H].
    """
    a = acts.detach().float().unflatten(-1, (-1, head_dim))
    w = o_weight.detach().float().unflatten(-1, (-1, head_dim))  # [H, heads, head_dim]
    return torch.stack([(a[..., h, :] @ w[:, h, :].T).norm(dim=-1) for h in range(a.shape[-2])], dim=-1)


def block_influence(x_in: Tensor, x_out: Tensor) -> Tensor:
    """Sum over tokens of ``1 - cos(x_in, x_out)`` for hidden states [B, T, H]: a scalar (ShortGPT)."""
    return (1 - F.cosine_similarity(x_in.detach().float(), x_out.detach().float(), dim=-1)).sum()


def _add(stats: dict, key: str, value: Tensor) -> None:
    stats[key] = stats[key] + value if key in stats else value


def attach(layer, family: Family, head_dim: int, stats: dict, index: int) -> list:
    """Hooks on one decoder layer adding its statistics into ``stats`` on every forward; returns the handles.

    Keys: ``mlp.{index}`` (a dense MLP: not an MoE layer), ``heads.{index}``, ``hidden``, ``influence.{index}``
    (sum) and ``tokens.{index}``; an MoE layer's experts add ``moe.*`` (moe.attach_experts).
    """
    modules = dict(layer.named_modules())
    handles = [
        modules[family.o_proj].register_forward_pre_hook(
            lambda m, args: _add(stats, f"heads.{index}", minitron_sq(head_outputs(args[0], m.weight, head_dim)))
        )
    ]
    if family.down_proj in modules:
        handles.append(
            modules[family.down_proj].register_forward_pre_hook(
                lambda m, args: _add(stats, f"mlp.{index}", minitron_sq(args[0]))
            )
        )
    if moe.is_moe(layer):
        handles += moe.attach_experts({index: layer.mlp}, stats)
    for norm in family.norms:
        handles.append(
            modules[norm].register_forward_hook(lambda m, args, out: _add(stats, "hidden", minitron_sq(out)))
        )

    def on_layer(module, args, kwargs, out):
        x_in = args[0] if args else kwargs["hidden_states"]
        x_out = layer_output(out)
        _add(stats, f"influence.{index}", block_influence(x_in, x_out))
        _add(stats, f"tokens.{index}", torch.tensor(float(x_in.shape[0] * x_in.shape[1])))

    handles.append(layer.register_forward_hook(on_layer, with_kwargs=True))
    return handles


def finish(stats: dict, n_layers: int) -> dict[str, Tensor]:
    """Raw hook sums -> scores: ``layers.block`` is the mean block influence per token."""
    scores = {k: v for k, v in stats.items() if k.startswith(("mlp.", "heads.", "hidden"))}
    scores["layers.block"] = torch.stack([stats[f"influence.{i}"] / stats[f"tokens.{i}"] for i in range(n_layers)])
    return scores


def batches(tokens: Tensor, batch_size: int):
    return [tokens[i : i + batch_size] for i in range(0, len(tokens), batch_size)]


def calibrate(
    model,
    family: Family,
    tokens: Tensor,
    method: str = "activation",
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Scores of ``method`` for every axis from one pass over ``tokens`` [N, T] (forward; + backward for Taylor).

    Block influence is recorded in the same pass whatever the width method; so are the experts' scores of an MoE
    teacher (moe.expert_scores: REAP for activation; Taylor is refused there).
    """
    if method not in IMPORTANCE:
        raise WhelpError(f"unknown importance '{method}'; choose one of {', '.join(IMPORTANCE)}")
    if family.experts_key:  # before the pass, not after it
        moe.check_method(method, f"{family.name} (MoE)")
    cfg = text_config(model.config)
    stats: dict = {}
    layers = model.model.layers
    handles = [h for i, layer in enumerate(layers) for h in attach(layer, family, head_dim_of(cfg), stats, i)]
    final_norm = dict(model.named_modules())[family.final_norm.rsplit(".", 1)[0]]
    handles.append(final_norm.register_forward_hook(lambda m, args, out: _add(stats, "hidden", minitron_sq(out))))
    try:
        for batch in batches(tokens, batch_size):
            with torch.set_grad_enabled(method == "taylor"):
                out = model(
                    input_ids=batch.to(model.device), labels=batch.to(model.device) if method == "taylor" else None
                )
            if method == "taylor":
                out.loss.backward()
            if progress is not None:
                progress(len(batch))
    finally:
        for h in handles:
            h.remove()
    scores = finish(stats, len(layers))
    if family.experts_key:
        scores.update(moe.expert_scores({**stats, **moe.expert_magnitudes(moe.moe_blocks(model))}, method, seed))
    if method == "activation":
        return scores
    if method == "random":
        gen = torch.Generator().manual_seed(seed)
        width = {
            k: torch.rand(v.shape, generator=gen)
            for k, v in scores.items()
            if k.startswith(("mlp.", "heads.", "hidden"))
        }
    else:
        values = {
            n: (p.detach().float() ** 2 if method == "magnitude" else (p.detach() * p.grad).float().abs())
            for n, p in model.named_parameters()
        }
        width = weight_scores(values, family, model.config)
        model.zero_grad(set_to_none=True)
    return {**{k: v for k, v in scores.items() if k.startswith(("experts.", "ffn.", "layers."))}, **width}


def weight_scores(values: dict[str, Tensor], family: Family, config) -> dict[str, Tensor]:
    """Per-structure sums of elementwise weight scores (w^2 or |w g|): every weight touching a structure counts.

    ``values`` maps state-dict names to tensors of the parameters' shapes. Query heads collect their
    q_proj rows and o_proj columns; KV groups are ranked later by the sum of their query heads.
    """
    d, cfg = head_dim_of(config), text_config(config)
    scores: dict[str, Tensor] = {}
    for name, value in values.items():
        layer, _, axes = axes_of(name, family)
        for dim, axis in enumerate(axes):
            per_index = value.sum(dim=[i for i in range(value.dim()) if i != dim]) if value.dim() > 1 else value
            if axis == "qkv":  # fused (Phi-3): its q block counts for the query heads, as q_proj would
                axis, per_index = "q", per_index[: cfg.num_attention_heads * d]
            elif axis == "gate_up":  # fused: the gate and the up row of each neuron
                axis, per_index = "mlp", per_index[: cfg.intermediate_size] + per_index[cfg.intermediate_size :]
            if axis == "hidden":
                _add(scores, "hidden", per_index)
            elif axis == "mlp":
                _add(scores, f"mlp.{layer}", per_index)
            elif axis == "q":
                _add(scores, f"heads.{layer}", per_index.unflatten(0, (-1, d)).sum(dim=1))
    return scores


@torch.no_grad()
def skip_losses(model, tokens: Tensor, batch_size: int = 4, progress: Callable[[int], None] | None = None) -> Tensor:
    """LM-loss increase (nats/token) when each decoder layer alone is skipped (its output := its input): [L]."""

    def mean_loss():
        losses = [
            model(input_ids=b.to(model.device), labels=b.to(model.device)).loss for b in batches(tokens, batch_size)
        ]
        return torch.stack(losses).float().mean()

    base = mean_loss()
    increases = []
    for layer in model.model.layers:
        handle = layer.register_forward_hook(
            lambda m, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True
        )
        try:
            increases.append(mean_loss() - base)
        finally:
            handle.remove()
        if progress is not None:
            progress(1)
    return torch.stack(increases).cpu()


def select(
    scores: dict[str, Tensor], source_cfg, shape: dict, layer_method: str = "block", tie: str | None = None
) -> Keep:
    """The Keep of target ``shape`` (``architecture.SHAPE_KEYS``, and an MoE teacher's expert axes) that retains the
    highest-scoring structures.

    Layers are ranked first; widths are then chosen per kept layer. KV groups rank by the summed
    scores of their query heads; query heads rank within their group, the same count per group.
    An MoE layer has no dense MLP to slice: its ``mlp`` entry is the first neurons (unused), and its experts
    are chosen by moe.select_experts.
    """
    cfg = text_config(source_cfg)
    key = f"layers.{layer_method}"
    if key not in scores:
        raise WhelpError(f"the scores hold no '{key}'; recompute them with layer importance '{layer_method}'")
    layers = tuple(top_indices(scores[key], shape["num_hidden_layers"]).tolist())
    kv, per_group = shape["num_key_value_heads"], shape["num_attention_heads"] // shape["num_key_value_heads"]
    kv_heads, q_heads = [], []
    for layer in layers:
        heads = scores[f"heads.{layer}"].float().view(cfg.num_key_value_heads, -1)
        groups = top_indices(heads.sum(dim=1), kv)
        kv_heads.append(groups)
        q_heads.append(torch.stack([top_indices(heads[g], per_group) for g in groups.tolist()]))
    width = shape["intermediate_size"]
    mlp = tuple(
        top_indices(scores[f"mlp.{layer}"], width) if f"mlp.{layer}" in scores else torch.arange(width)
        for layer in layers
    )
    untied_to_tied = not cfg.tie_word_embeddings and shape["tie_word_embeddings"]
    return Keep(
        layers=layers,
        hidden=top_indices(scores["hidden"], shape["hidden_size"]),
        mlp=mlp,
        kv_heads=tuple(kv_heads),
        q_heads=tuple(q_heads),
        head_dims=rope_exact_dims(head_dim_of(cfg), shape["head_dim"]),
        tie=(tie or "embedding") if untied_to_tied else None,
        experts=moe.select_experts(scores, source_cfg, shape, layers) if moe.moe_family_of(cfg) else None,
    )
