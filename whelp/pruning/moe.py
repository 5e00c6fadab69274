"""Mixture-of-experts pruning: drop whole experts (and optionally shrink every expert's FFN) of Mixtral, Qwen2-MoE
and Qwen3-MoE, writing vanilla HF MoE checkpoints.

Saliency (REAP, Cerebras 2025, "REAP: Router-weighted Expert Activation Pruning"): expert ``j`` of a layer scores

    S_j = (1 / |X_j|) * sum_{x in X_j} g_j(x) * || f_j(x) ||_2

over the calibration tokens ``X_j`` the router sends to ``j`` (its top-k), ``g_j(x)`` the routing weight the MoE block
multiplies the expert's output by and ``f_j(x)`` that output. An expert never routed to scores 0 and goes first.
Baselines: router frequency (``|X_j|``), weight magnitude (sum of w^2 of the expert) and random.

transformers 5.x keeps each layer's experts fused in memory (``mlp.experts.gate_up_proj`` [E, 2I, H],
``mlp.experts.down_proj`` [E, H, I]) with the router ``mlp.gate.weight`` [E, H]; ``save_pretrained`` writes them back
per expert (``experts.{j}.w1`` for Mixtral, ``experts.{j}.gate_proj`` for Qwen), so outputs load in stock
``from_pretrained``. Pruning slices dim 0 of the three tensors with the same kept expert ids, so the router's rows
follow the kept experts; attention, norms, embeddings and Qwen2-MoE's shared expert are kept whole.

Exactness: Mixtral renormalizes the top-k routing weights, so dropping experts the router never selects leaves the
function unchanged; Qwen's routing weights (``norm_topk_prob`` false) are softmax probabilities over all experts, so
the kept experts' weights grow by the dropped experts' share of the softmax (nil for never-selected experts with
negligible router mass).

Only the expert axes change here: the expert count, ``num_experts_per_tok`` (lowered, never raised) and the expert
FFN width; layers, hidden size and heads of an MoE model are refused in one line.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from whelp import models
from whelp.errors import WhelpError

EXPERT_KEYS = ("num_local_experts", "num_experts")  # both spellings are accepted on the command line
METHODS = {"activation": "reap", "magnitude": "magnitude", "random": "random", "frequency": "frequency"}


@dataclass(frozen=True)
class MoeFamily:
    """An MoE family: the config names of its expert count and of one expert's FFN width."""

    name: str
    experts_key: str
    ffn_key: str
    layers: str = "model.layers"
    block: str = "mlp"  # the MoE block inside a decoder layer (router ``gate``, fused ``experts``)


MOE_FAMILIES = {
    "mixtral": MoeFamily("mixtral", "num_local_experts", "intermediate_size"),
    "qwen2_moe": MoeFamily("qwen2_moe", "num_experts", "moe_intermediate_size"),
    "qwen3_moe": MoeFamily("qwen3_moe", "num_experts", "moe_intermediate_size"),
}


def _text(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def moe_family_of(config) -> MoeFamily | None:
    return MOE_FAMILIES.get(_text(config).model_type)


def moe_shape(config) -> dict:
    """``models.shape`` plus the expert axes under the family's HF names (and ``num_experts_per_tok``)."""
    family, cfg = moe_family_of(config), _text(config)
    return {**models.shape(cfg), family.experts_key: getattr(cfg, family.experts_key),
            "num_experts_per_tok": cfg.num_experts_per_tok, family.ffn_key: getattr(cfg, family.ffn_key)}


def moe_blocks(model) -> dict[int, torch.nn.Module]:
    """Decoder layer index -> its sparse MoE block (Qwen's ``mlp_only_layers`` / ``decoder_sparse_step`` layers are
    dense and absent)."""
    family = moe_family_of(model.config)
    return {i: getattr(layer, family.block) for i, layer in enumerate(model.get_submodule(family.layers))
            if hasattr(getattr(layer, family.block), "experts")}


# ---------------------------------------------------------------- saliency


def expert_outputs(experts, x: Tensor, expert: int) -> tuple[Tensor, Tensor]:
    """``(f_j(x), a)`` of expert ``j`` for tokens ``x`` [N, H] in fp32: its output [N, H] and the input of its
    down projection [N, I] (the FFN neurons' activations)."""
    gate, up = F.linear(x.float(), experts.gate_up_proj[expert].float()).chunk(2, dim=-1)
    act = experts.act_fn(gate) * up
    return F.linear(act, experts.down_proj[expert].float()), act


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


@torch.no_grad()
def calibrate_experts(model, tokens: Tensor, method: str = "activation", batch_size: int = 4,
                      progress=None, seed: int = 0) -> dict[str, Tensor]:
    """Scores per MoE layer ``l`` from one forward pass over ``tokens`` [N, T]: ``experts.{l}`` [E] (the method's
    expert score: REAP for "activation"), ``experts.{l}.tokens`` [E] (routed calibration tokens) and ``ffn.{l}``
    [E, I] (router-weighted |activation| of each expert's FFN neurons)."""
    if method not in METHODS:
        raise WhelpError(f"MoE expert pruning scores experts by activation (REAP), frequency, magnitude or random, "
                         f"not '{method}'")
    blocks = moe_blocks(model)
    stats: dict = {}
    handles = []
    for index, block in blocks.items():
        def hook(module, args, kwargs, index=index):
            names = ("hidden_states", "top_k_index", "top_k_weights")
            x, top_k_index, top_k_weights = (args[i] if i < len(args) else kwargs[n] for i, n in enumerate(names))
            for key, value in reap_sums(module, x, top_k_index, top_k_weights).items():
                _add(stats, f"{key}.{index}", value)
        handles.append(block.experts.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        for i in range(0, len(tokens), batch_size):
            batch = tokens[i: i + batch_size]
            model(input_ids=batch.to(model.device))
            if progress is not None:
                progress(len(batch))
    finally:
        for handle in handles:
            handle.remove()
    gen = torch.Generator().manual_seed(seed)
    scores = {}
    for index, block in blocks.items():
        count = stats[f"tokens.{index}"]
        if method == "activation":
            score = torch.where(count > 0, stats[f"reap.{index}"] / count.clamp(min=1), torch.zeros(()))
        elif method == "frequency":
            score = count.clone()
        elif method == "magnitude":
            score = (block.experts.gate_up_proj.detach().float() ** 2).sum(dim=(1, 2)).cpu() + (
                block.experts.down_proj.detach().float() ** 2).sum(dim=(1, 2)).cpu()
        else:
            score = torch.rand(count.shape, generator=gen)
        scores[f"experts.{index}"] = score
        scores[f"experts.{index}.tokens"] = count
        scores[f"ffn.{index}"] = stats[f"ffn.{index}"]
    return scores


# ---------------------------------------------------------------- selection and surgery


@dataclass(frozen=True)
class ExpertKeep:
    """Kept source expert ids per MoE layer (sorted ascending) and, when the FFN shrinks, each kept expert's kept
    neurons (``ffn[l]`` [E', I'], sorted ascending per row, rows in the order of ``experts[l]``)."""

    experts: dict[int, Tensor]
    ffn: dict[int, Tensor] | None = None


def top_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest scores, ascending (ties broken by the lower index)."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return torch.sort(order[:k]).values


def select_experts(scores: dict[str, Tensor], source_cfg, shape: dict) -> ExpertKeep:
    """The experts (and FFN neurons) of the highest scores, the same count in every MoE layer."""
    family, cfg = moe_family_of(source_cfg), _text(source_cfg)
    n, width = shape[family.experts_key], shape[family.ffn_key]
    layers = sorted(int(k.split(".")[1]) for k in scores if k.startswith("experts.") and k.count(".") == 1)
    if not layers:
        raise WhelpError("the scores hold no expert scores (experts.{layer}); recompute them on this MoE teacher "
                         "(drop --scores)")
    experts = {layer: top_indices(scores[f"experts.{layer}"], n) for layer in layers}
    ffn = None
    if width != getattr(cfg, family.ffn_key):
        ffn = {layer: torch.stack([top_indices(scores[f"ffn.{layer}"][e], width) for e in experts[layer].tolist()])
               for layer in layers}
    return ExpertKeep(experts=experts, ffn=ffn)


def slice_moe_tensor(name: str, tensor: Tensor, keep: ExpertKeep, family: MoeFamily, width: int) -> Tensor:
    """One in-memory state-dict entry -> the pruned tensor (``width``: the teacher's expert FFN width)."""
    prefix = family.layers + "."
    if not name.startswith(prefix):
        return tensor
    index, _, suffix = name[len(prefix):].partition(".")
    layer = int(index)
    if layer not in keep.experts:
        return tensor
    kept = keep.experts[layer].to(tensor.device)
    router, gate_up, down = (f"{family.block}.gate.weight", f"{family.block}.experts.gate_up_proj",
                             f"{family.block}.experts.down_proj")
    if suffix not in (router, gate_up, down):
        return tensor
    out = tensor.index_select(0, kept)
    if keep.ffn is not None and suffix == gate_up:
        rows = torch.cat([keep.ffn[layer], keep.ffn[layer] + width], dim=1).to(tensor.device)  # gate rows, up rows
        out = torch.gather(out, 1, rows[:, :, None].expand(-1, -1, out.shape[-1]))
    elif keep.ffn is not None and suffix == down:
        cols = keep.ffn[layer].to(tensor.device)
        out = torch.gather(out, 2, cols[:, None, :].expand(-1, out.shape[1], -1))
    return out.contiguous()


def moe_config(source_cfg, shape: dict):
    """The target HF config: the teacher's with the expert count, top-k and expert FFN width of ``shape``."""
    family = moe_family_of(source_cfg)
    cfg = copy.deepcopy(_text(source_cfg))
    setattr(cfg, family.experts_key, shape[family.experts_key])
    setattr(cfg, family.ffn_key, shape[family.ffn_key])
    cfg.num_experts_per_tok = shape["num_experts_per_tok"]
    return cfg


def prune_moe_model(model, keep: ExpertKeep, target_cfg):
    """A new model of ``target_cfg`` holding ``model``'s kept experts (strict load)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    family = moe_family_of(model.config)
    width = getattr(_text(model.config), family.ffn_key)
    state = {k: slice_moe_tensor(k, v, keep, family, width) for k, v in model.state_dict().items()}
    with no_init_weights():
        pruned = AutoModelForCausalLM.from_config(target_cfg, dtype=model.dtype)
    pruned.load_state_dict(state, strict=True)
    if getattr(target_cfg, "tie_word_embeddings", False):
        pruned.tie_weights()
    return pruned.eval()


def kept_report(keep: ExpertKeep) -> dict:
    return {"experts": {str(k): v.tolist() for k, v in keep.experts.items()},
            "expert_ffn": None if keep.ffn is None else {str(k): v.tolist() for k, v in keep.ffn.items()}}


def check_spec(source_cfg, spec) -> None:
    """Refuse, before any weights load, what expert pruning does not do."""
    name = _text(source_cfg).model_type
    if spec.stream:
        raise WhelpError(f"{name} (MoE) experts are pruned in memory only; drop --stream")
    if spec.importance not in METHODS:
        raise WhelpError(f"{name} (MoE) experts are scored by --importance activation (REAP), magnitude or random, "
                         f"not {spec.importance}")


def prune_moe(model, target, tokens: Tensor, spec, scores: dict | None):
    """``api._prune`` for an MoE teacher: ``(pruned, scores, kept, details)``; ``model`` is left as it was."""
    from whelp.output import Progress

    timings = {}
    t = time.perf_counter()
    if scores is None:
        with Progress(f"calibrating experts ({spec.importance})", len(tokens)) as bar:
            scores = calibrate_experts(model, tokens, spec.importance, spec.batch_size, bar.advance, spec.seed)
    timings["calibrate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    keep = select_experts(scores, model.config, target.shape)
    pruned = prune_moe_model(model, keep, moe_config(model.config, target.shape))
    timings["surgery_s"] = time.perf_counter() - t
    shapes = {"source": moe_shape(model.config), "target": moe_shape(pruned.config)}
    return pruned, scores, kept_report(keep), {"path": "in-memory (moe)", "tie": None, "rope": "teacher",
                                              "moe": shapes, "timings": timings}


# ---------------------------------------------------------------- targets and counts


def parse_moe_target(source_cfg, spec: str):
    """``key=value,...`` over the expert axes: the expert count (``num_local_experts`` or ``num_experts``),
    ``num_experts_per_tok`` and the expert FFN width (the family's HF name); other axes must stay the teacher's."""
    from whelp.pruning.targets import Target

    family, source = moe_family_of(source_cfg), moe_shape(source_cfg)
    if "=" not in spec:
        raise WhelpError(f"{family.name} (MoE) prunes to key=value targets such as {family.experts_key}="
                         f"{max(1, source[family.experts_key] // 2)}; presets and config.json targets are dense shapes")
    shape, seen = dict(source), set()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, value = (s.strip() for s in item.partition("="))
        key = family.experts_key if key in EXPERT_KEYS else key
        if not sep:
            raise WhelpError(f"target item '{item}' is not key=value; write e.g. {family.experts_key}=4")
        if key in seen:
            raise WhelpError(f"target key '{key}' is given twice in '{spec}'; give each key once")
        seen.add(key)
        if key not in source:
            raise WhelpError(f"unknown target key '{key}' for {family.name}; valid keys: {', '.join(source)}")
        if key == "tie_word_embeddings":
            parsed = value.lower() == "true" if value.lower() in ("true", "false") else value
        else:
            try:
                parsed = int(value)
            except ValueError:
                raise WhelpError(f"{key}={value}: expected a positive integer") from None
        if key not in (family.experts_key, family.ffn_key, "num_experts_per_tok") and parsed != source[key]:
            raise WhelpError(f"{family.name} (MoE) pruning changes the experts only ({family.experts_key}, "
                             f"num_experts_per_tok, {family.ffn_key}); {key}={value} differs from the teacher's "
                             f"{source[key]}")
        shape[key] = parsed
    validate_moe(source, shape, family)
    return Target(name=spec, shape=shape)


def validate_moe(source: dict, shape: dict, family: MoeFamily) -> None:
    n, k = shape[family.experts_key], shape["num_experts_per_tok"]
    for key in (family.experts_key, "num_experts_per_tok", family.ffn_key):
        if not 1 <= shape[key] <= source[key]:
            raise WhelpError(f"target {key}={shape[key]} is out of range: must be an integer in 1..{source[key]} "
                             f"(the teacher's {key} is {source[key]}; pruning only removes)")
    if k > n:
        raise WhelpError(f"target {family.experts_key}={n} is fewer than num_experts_per_tok={k}: top-{k} routing "
                         f"needs at least {k} experts per layer; keep {k}..{source[family.experts_key]} experts or "
                         f"also lower num_experts_per_tok")


def count_moe_params(config) -> dict:
    """Total, non-embedding and active parameters (per token: every parameter but the experts its router does not
    pick, i.e. E - k experts of each MoE layer) of the model ``config`` describes, on the meta device."""
    from transformers import AutoModelForCausalLM

    cfg = _text(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())
    embedding = {id(p): p.numel() for p in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}
    idle = 0
    for block in moe_blocks(model).values():
        n = block.experts.gate_up_proj.shape[0]
        per_expert = sum(p.numel() for p in block.experts.parameters()) // n
        idle += (n - cfg.num_experts_per_tok) * per_expert
    return {"params": total, "non_embedding_params": total - sum(embedding.values()), "active_params": total - idle}


def plan_moe_target(source_cfg, target: str) -> dict:
    """``targets.plan_target`` for an MoE teacher: shapes with the expert axes, total and active parameters."""
    parsed = parse_moe_target(source_cfg, target)
    out = {}
    for side, config in (("source", _text(source_cfg)), ("target", moe_config(source_cfg, parsed.shape))):
        out[side] = {**moe_shape(config), **count_moe_params(config)}
    return out
