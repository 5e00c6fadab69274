"""Mixture-of-experts pruning: drop whole experts (and optionally shrink every expert's FFN) of Mixtral, Qwen2-MoE
and Qwen3-MoE, beside the dense axes (layers, hidden, heads, head_dim) that surgery.py slices for every row of the
family table (arch.py), writing vanilla HF MoE checkpoints.

Saliency (REAP, Cerebras 2025, "REAP: Router-weighted Expert Activation Pruning"): expert ``j`` of a layer scores

    S_j = (1 / |X_j|) * sum_{x in X_j} g_j(x) * || f_j(x) ||_2

over the calibration tokens ``X_j`` the router sends to ``j`` (its top-k), ``g_j(x)`` the routing weight the MoE block
multiplies the expert's output by and ``f_j(x)`` that output. An expert never routed to scores 0 and goes first.
Baselines: router frequency (``|X_j|``), weight magnitude (sum of w^2 of the expert) and random. The statistics are
gathered by hooks (``attach_experts``) in the same forward pass as the dense axes' (importance.calibrate, and layer by
layer in streaming.py).

transformers 5.x keeps each layer's experts fused in memory (``mlp.experts.gate_up_proj`` [E, 2I, H],
``mlp.experts.down_proj`` [E, H, I]) with the router ``mlp.gate.weight`` [E, H]; ``save_pretrained`` writes them back
per expert (``Family.disk_block``/``expert_parts``), which moe_layout.py converts for streaming. Pruning slices dim 0
of the three tensors with the same kept expert ids, so the router's rows follow the kept experts; Qwen2-MoE's shared
expert is kept whole.

Exactness: Mixtral renormalizes the top-k routing weights, so dropping experts the router never selects leaves the
function unchanged; Qwen's routing weights (``norm_topk_prob`` false) are softmax probabilities over all experts, so
the kept experts' weights grow by the dropped experts' share of the softmax (nil for never-selected experts with
negligible router mass). ``num_experts_per_tok`` may be lowered, never raised.

One module: expert scoring (REAP, magnitude) and expert selection read the same fused-expert layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from whelp import architecture
from whelp.errors import WhelpError
from whelp.pruning.arch import FAMILIES, Family
from whelp.pruning.keep import text_config, top_indices

EXPERT_KEYS = ("num_local_experts", "num_experts")  # both spellings are accepted on the command line
METHODS = ("activation", "magnitude", "random", "frequency")  # frequency: a baseline of calibrate_experts only
MOE_FAMILIES = {name: family for name, family in FAMILIES.items() if family.experts_key}


def moe_family_of(config) -> Family | None:
    return MOE_FAMILIES.get(text_config(config).model_type)


def moe_shape(config) -> dict:
    """``architecture.shape`` plus the expert axes under the family's HF names (and ``num_experts_per_tok``)."""
    family, cfg = moe_family_of(config), text_config(config)
    return {
        **architecture.shape(cfg),
        family.experts_key: getattr(cfg, family.experts_key),
        "num_experts_per_tok": cfg.num_experts_per_tok,
        family.ffn_key: getattr(cfg, family.ffn_key),
    }


def shape_of(config) -> dict:
    """The shape vocabulary of any teacher: ``moe_shape`` for an MoE family, else ``architecture.shape``."""
    return moe_shape(config) if moe_family_of(config) is not None else architecture.shape(config)


def is_sparse(config, layer: int) -> bool:
    """Whether decoder layer ``layer`` is an MoE block (Qwen: not in ``mlp_only_layers`` and on the
    ``decoder_sparse_step``), as the families' decoder layers decide it."""
    cfg = text_config(config)
    step = getattr(cfg, "decoder_sparse_step", 1) or 1
    return layer not in (getattr(cfg, "mlp_only_layers", None) or []) and (layer + 1) % step == 0


def moe_blocks(model) -> dict[int, torch.nn.Module]:
    """Decoder layer index -> its sparse MoE block (Qwen's ``mlp_only_layers`` / ``decoder_sparse_step`` layers are
    dense and absent)."""
    family = moe_family_of(model.config)
    return {i: layer.mlp for i, layer in enumerate(model.get_submodule(family.layers)) if is_moe(layer)}


# ---------------------------------------------------------------- saliency


def expert_activations(experts, x: Tensor, expert: int) -> Tensor:
    """The FFN neurons' activations of expert ``j`` for tokens ``x`` [N, H], in fp32: the input of its down
    projection [N, I]."""
    gate, up = F.linear(x.float(), experts.gate_up_proj[expert].float()).chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def expert_outputs(experts, x: Tensor, expert: int) -> tuple[Tensor, Tensor]:
    """``(f_j(x), a)`` of expert ``j`` for tokens ``x`` [N, H] in fp32: its output [N, H] and the input of its
    down projection [N, I] (the FFN neurons' activations)."""
    act = expert_activations(experts, x, expert)
    return F.linear(act, experts.down_proj[expert].float()), act


def expert_inputs(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
    """``(hidden_states [N, H], top_k_index [N, k], top_k_weights [N, k])``: what an MoE block hands its experts,
    from a forward pre-hook's arguments (the signature every family's experts module shares)."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    return tuple(args[i] if i < len(args) else kwargs[n] for i, n in enumerate(names))


def is_moe(layer) -> bool:
    """Whether a decoder layer's MLP is a sparse MoE block (Qwen's dense ``mlp_only_layers`` are not)."""
    return hasattr(getattr(layer, "mlp", None), "experts")


def reap_sums(experts, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> dict[str, Tensor]:
    """One batch's sums per expert: ``reap`` [E] (sum of g * ||f||), ``tokens`` [E] (routed tokens) and ``ffn``
    [E, I] (sum of g * |a| per FFN neuron), from the inputs the MoE block passes its experts."""
    n_experts, width = experts.gate_up_proj.shape[0], experts.down_proj.shape[-1]
    reap, tokens, ffn = torch.zeros(n_experts), torch.zeros(n_experts), torch.zeros(n_experts, width)
    x = x.detach().reshape(-1, x.shape[-1])
    for expert in top_k_index.unique().tolist():
        if not 0 <= expert < n_experts:
            continue
        token, slot = torch.where(top_k_index == expert)
        g = top_k_weights[token, slot].detach().float()
        out, act = expert_outputs(experts, x[token], expert)
        reap[expert] = (g * out.norm(dim=-1)).sum().cpu()
        tokens[expert] = float(len(token))
        ffn[expert] = (g[:, None] * act.abs()).sum(dim=0).cpu()
    return {"reap": reap, "tokens": tokens, "ffn": ffn}


def _add(stats: dict, key: str, value: Tensor) -> None:
    stats[key] = stats[key] + value if key in stats else value


def expert_magnitudes(blocks: dict[int, torch.nn.Module]) -> dict[str, Tensor]:
    """``moe.magnitude.{layer}`` [E]: the sum of w^2 over each expert's weights (read once, not per batch), one
    expert at a time so the temporary is one expert's, not the layer's."""

    def sq(weight: Tensor) -> Tensor:
        return torch.stack([weight[j].detach().float().pow(2).sum() for j in range(weight.shape[0])]).cpu()

    return {
        f"moe.magnitude.{index}": sq(block.experts.gate_up_proj) + sq(block.experts.down_proj)
        for index, block in blocks.items()
    }


def attach_experts(blocks: dict[int, torch.nn.Module], stats: dict) -> list:
    """Hooks adding each block's REAP sums into ``stats`` (``moe.{reap,tokens,ffn}.{layer}``, zero until routed to)
    on every forward; returns the handles."""
    handles = []
    for index, block in blocks.items():
        experts = block.experts
        n_experts, width = experts.gate_up_proj.shape[0], experts.down_proj.shape[-1]
        for key, value in {
            "reap": torch.zeros(n_experts),
            "tokens": torch.zeros(n_experts),
            "ffn": torch.zeros(n_experts, width),
        }.items():
            stats.setdefault(f"moe.{key}.{index}", value)

        def hook(module, args, kwargs, index=index):
            x, top_k_index, top_k_weights = expert_inputs(args, kwargs)
            for key, value in reap_sums(module, x, top_k_index, top_k_weights).items():
                _add(stats, f"moe.{key}.{index}", value)

        handles.append(experts.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def expert_scores(stats: dict, method: str, seed: int = 0) -> dict[str, Tensor]:
    """Hook sums -> per MoE layer ``l``: ``experts.{l}`` [E] (the method's expert score: REAP for "activation"),
    ``experts.{l}.tokens`` [E] (routed calibration tokens) and ``ffn.{l}`` [E, I] (router-weighted |activation| of
    each expert's FFN neurons)."""
    check_method(method)
    layers = sorted(int(key.rsplit(".", 1)[1]) for key in stats if key.startswith("moe.magnitude."))
    gen = torch.Generator().manual_seed(seed)
    scores = {}
    for index in layers:
        count = stats[f"moe.tokens.{index}"]
        if method == "activation":
            score = torch.where(count > 0, stats[f"moe.reap.{index}"] / count.clamp(min=1), torch.zeros(()))
        elif method == "frequency":
            score = count.clone()
        elif method == "magnitude":
            score = stats[f"moe.magnitude.{index}"]
        else:
            score = torch.rand(count.shape, generator=gen)
        scores[f"experts.{index}"] = score
        scores[f"experts.{index}.tokens"] = count
        scores[f"ffn.{index}"] = stats[f"moe.ffn.{index}"]
    return scores


@torch.no_grad()
def calibrate_experts(
    model, tokens: Tensor, method: str = "activation", batch_size: int = 4, progress=None, seed: int = 0
) -> dict[str, Tensor]:
    """``expert_scores`` from one forward pass over ``tokens`` [N, T] with only the experts' hooks (the dense axes'
    statistics come from importance.calibrate, which attaches these hooks too)."""
    blocks = moe_blocks(model)
    stats = expert_magnitudes(blocks)
    handles = attach_experts(blocks, stats)
    try:
        for i in range(0, len(tokens), batch_size):
            batch = tokens[i : i + batch_size]
            model(input_ids=batch.to(model.device))
            if progress is not None:
                progress(len(batch))
    finally:
        for handle in handles:
            handle.remove()
    return expert_scores(stats, method, seed)


# ---------------------------------------------------------------- selection and surgery


@dataclass(frozen=True)
class ExpertKeep:
    """Kept source expert ids per MoE layer (sorted ascending), ``top_k`` (None: the teacher's
    ``num_experts_per_tok``) and, when the FFN shrinks, each kept expert's kept neurons (``ffn[l]`` [E', I'], sorted
    ascending per row, rows in the order of ``experts[l]``). ``count`` / ``width``: the target's experts per layer and
    FFN width (None: read off ``experts`` / ``ffn``; given when no MoE layer is kept)."""

    experts: dict[int, Tensor]
    ffn: dict[int, Tensor] | None = None
    top_k: int | None = None
    count: int | None = None
    width: int | None = None


def select_experts(
    scores: dict[str, Tensor], source_cfg, shape: dict, kept_layers: tuple[int, ...] | None = None
) -> ExpertKeep:
    """The experts (and FFN neurons) of the highest scores, the same count in every MoE layer (of ``kept_layers``,
    source indices, when given)."""
    family, cfg = moe_family_of(source_cfg), text_config(source_cfg)
    n, width = shape[family.experts_key], shape[family.ffn_key]
    layers = sorted(int(k.split(".")[1]) for k in scores if k.startswith("experts.") and k.count(".") == 1)
    if not layers and any(is_sparse(cfg, i) for i in range(cfg.num_hidden_layers)):
        raise WhelpError(
            "the scores hold no expert scores (experts.{layer}); recompute them on this MoE teacher (drop --scores)"
        )
    layers = [layer for layer in layers if kept_layers is None or layer in kept_layers]
    experts = {layer: top_indices(scores[f"experts.{layer}"], n) for layer in layers}
    ffn = None
    if width != getattr(cfg, family.ffn_key):
        ffn = {
            layer: torch.stack([top_indices(scores[f"ffn.{layer}"][e], width) for e in experts[layer].tolist()])
            for layer in layers
        }
    return ExpertKeep(experts=experts, ffn=ffn, top_k=shape["num_experts_per_tok"], count=n, width=width)


def first_experts(source_cfg, shape: dict) -> ExpertKeep:
    """The ExpertKeep of ``shape`` taking the first experts and neurons: for configs and counts without scores."""
    family, cfg = moe_family_of(source_cfg), text_config(source_cfg)
    n, width = shape[family.experts_key], shape[family.ffn_key]
    layers = [i for i in range(cfg.num_hidden_layers) if is_sparse(cfg, i)]
    ffn = None if width == getattr(cfg, family.ffn_key) else {i: torch.arange(width).repeat(n, 1) for i in layers}
    return ExpertKeep(
        experts={i: torch.arange(n) for i in layers}, ffn=ffn, top_k=shape["num_experts_per_tok"], count=n, width=width
    )


def slice_experts(suffix: str, tensor: Tensor, layer: int, keep: ExpertKeep, width: int) -> Tensor:
    """One in-memory MoE tensor of decoder layer ``layer`` (router ``mlp.gate.weight`` [E, H], fused
    ``mlp.experts.gate_up_proj`` [E, 2I, H] or ``down_proj`` [E, H, I]) -> its kept experts and FFN neurons
    (``width``: the teacher's expert FFN width I); the hidden axis is surgery.py's."""
    if layer not in keep.experts:
        return tensor
    out = tensor.index_select(0, keep.experts[layer].to(tensor.device))
    if keep.ffn is not None and suffix == "mlp.experts.gate_up_proj":
        rows = torch.cat([keep.ffn[layer], keep.ffn[layer] + width], dim=1).to(tensor.device)  # gate rows, up rows
        out = torch.gather(out, 1, rows[:, :, None].expand(-1, -1, out.shape[-1]))
    elif keep.ffn is not None and suffix == "mlp.experts.down_proj":
        cols = keep.ffn[layer].to(tensor.device)
        out = torch.gather(out, 2, cols[:, None, :].expand(-1, out.shape[1], -1))
    return out.contiguous()


def expert_config(cfg, keep: ExpertKeep | None, layers: tuple[int, ...], source_cfg) -> None:
    """Set the expert axes of the target config ``cfg`` (in place) from ``keep`` (None: the teacher's), and where
    source ``layers`` were dropped, say which kept layers are dense as the decoder reads it: ``mlp_only_layers``
    (target indices) with ``decoder_sparse_step`` 1, since a step pattern rarely survives dropped layers."""
    family, source = moe_family_of(source_cfg), text_config(source_cfg)
    if keep is not None:
        count = keep.count if keep.count is not None else len(next(iter(keep.experts.values())))
        width = (
            keep.width
            if keep.width is not None
            else (next(iter(keep.ffn.values())).shape[1] if keep.ffn else getattr(source, family.ffn_key))
        )
        setattr(cfg, family.experts_key, count)
        setattr(cfg, family.ffn_key, width)
        cfg.num_experts_per_tok = keep.top_k or source.num_experts_per_tok
    if hasattr(source, "mlp_only_layers") and len(layers) != source.num_hidden_layers:
        cfg.mlp_only_layers = [i for i, layer in enumerate(layers) if not is_sparse(source, layer)]
        cfg.decoder_sparse_step = 1


def kept_report(keep: ExpertKeep) -> dict:
    return {
        "experts": {str(k): v.tolist() for k, v in keep.experts.items()},
        "expert_ffn": None if keep.ffn is None else {str(k): v.tolist() for k, v in keep.ffn.items()},
    }


def check_spec(source_cfg, spec) -> None:
    """Refuse, before any weights load, what expert pruning does not do."""
    check_method(spec.importance, f"{text_config(source_cfg).model_type} (MoE)")


def check_method(method: str, who: str = "MoE") -> None:
    """``method`` scores experts (``frequency`` too: a benchmark baseline of calibrate_experts), or a WhelpError."""
    if method not in METHODS:
        raise WhelpError(
            f"{who} experts are scored by --importance activation (REAP), magnitude or random, not {method}"
        )


# ---------------------------------------------------------------- targets and counts


def canonical_key(key: str, config) -> str:
    """A target key with either expert-count spelling mapped to the family's own."""
    family = moe_family_of(config)
    return family.experts_key if family is not None and key in EXPERT_KEYS else key


def validate_moe(source: dict, shape: dict, family: Family) -> None:
    n, k = shape[family.experts_key], shape["num_experts_per_tok"]
    for key in (family.experts_key, "num_experts_per_tok", family.ffn_key):
        if not isinstance(shape[key], int) or not 1 <= shape[key] <= source[key]:
            raise WhelpError(
                f"target {key}={shape[key]} is out of range: must be an integer in 1..{source[key]} "
                f"(the teacher's {key} is {source[key]}; pruning only removes)"
            )
    if k > n:
        raise WhelpError(
            f"target {family.experts_key}={n} is fewer than num_experts_per_tok={k}: top-{k} routing "
            f"needs at least {k} experts per layer; keep {k}..{source[family.experts_key]} experts or "
            f"also lower num_experts_per_tok"
        )
