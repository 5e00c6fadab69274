"""Width pruning of architectures outside the family table, through torch-pruning's dependency graph.

torch-pruning (DepGraph, arXiv:2301.12900; the extra ``whelp[generic]``) traces the model and groups the parameter
slices coupled to each hidden channel and MLP neuron, whose coupling is architecture-specific. Query heads are pruned
here (q rows, o columns, k/v too under MHA): with transformers 5.x and GQA a head's traced group wrongly spans k/v.
Workarounds for torch-pruning 1.6.1 (docs/design.md section 3):
  * tracing RoPE's ``rotate_half`` never ends and sdpa with uneven GQA heads fails: ``traceable`` swaps in an
    identity ``apply_rotary_pos_emb`` and eager attention while tracing, and restores both even on error;
  * a pruned tied embedding leaves two matrices: the model is rebuilt from the new config and loaded strictly;
  * transformers' Conv1D (GPT-2) has no channel rule: traced and pruned as the equivalent nn.Linear, written back
    transposed; the KV cache's concatenations have none either: tracing runs without a cache.
Importance: ``activation`` (Minitron, arXiv:2407.14679, as in importance.py), ``magnitude`` and ``taylor``
(torch-pruning's group L2 and |w * dL/dw|, Molchanov et al. 2019) and ``random``.

One module: the torch-pruning graph, its groups and the surgery after it are one optional path (``whelp[generic]``),
imported only by ``pruning.api``.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM
from transformers.initialization import no_init_weights
from transformers.pytorch_utils import Conv1D

from whelp import architecture
from whelp.errors import WhelpError
from whelp.pruning.importance import batches, head_outputs, minitron_sq
from whelp.pruning.keep import top_indices
from whelp.pruning.targets import check_target, generic_config
from whelp.specs import IMPORTANCE


@dataclass(frozen=True)
class Block:
    """The prunable linears of one decoder layer, found from the dependency graph."""

    mlp_in: tuple[nn.Linear, ...]  # up (and gate) projections: output rows are MLP neurons
    mlp_out: nn.Linear  # down projection: input columns are MLP neurons
    qkv: tuple[nn.Linear, ...] | None  # (q, k, v) or None for a fused / unrecognised attention
    o: nn.Linear | None


@dataclass(frozen=True)
class GenericKeep:
    """Kept source indices per axis, sorted: hidden [H'], per layer MLP [I'] and query heads [n_heads'] (None: all)."""

    hidden: torch.Tensor
    mlp: tuple[torch.Tensor, ...]
    heads: tuple[torch.Tensor, ...] | None


Scores = GenericKeep  # the same axes holding importance per channel (heads None: not head-prunable)


@contextlib.contextmanager
def traceable(model):
    """Eager attention and identity RoPE while torch-pruning traces ``model``; both restored on exit, even on error."""
    names = {type(m).__module__ for m in model.modules()}  # a subclass (remote code) runs its parents' attention
    ropes = {
        mod: mod.apply_rotary_pos_emb
        for mod in map(importlib.import_module, names)
        if hasattr(mod, "apply_rotary_pos_emb")
    }
    attn = model.config._attn_implementation
    try:
        model.set_attn_implementation("eager")
        for mod in ropes:
            mod.apply_rotary_pos_emb = lambda q, k, *args, **kwargs: (q, k)
        yield
    finally:
        for mod, rope in ropes.items():
            mod.apply_rotary_pos_emb = rope
        model.set_attn_implementation(attn)


def require(model_type: str) -> None:
    """torch-pruning is an optional extra: say how to get it, before any model is loaded."""
    try:
        importlib.import_module("torch_pruning")  # only whether it is there
    except ImportError:
        raise WhelpError(
            f"pruning a {model_type} model (outside whelp's family table) needs torch-pruning: "
            "pip install 'whelp[generic]'"
        ) from None


def build_graph(model):
    """torch-pruning's DependencyGraph of ``model`` (traced on 8 dummy tokens, no KV cache); its Conv1D layers
    become the equivalent nn.Linear first (``linearize_``: the same function); WhelpError if tracing fails."""
    require(model.config.model_type)
    import torch_pruning as tp  # noqa: PLC0415 - optional extra whelp[generic], needed only by this path

    linearize_(model)
    # no KV cache: its concatenations (GPT-2's) have no channels torch-pruning can size, and pruning needs none
    example = {"input_ids": torch.zeros(1, 8, dtype=torch.long, device=model.device), "use_cache": False}
    try:
        with traceable(model), torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=example, verbose=False, output_transform=lambda out: out.logits
            )
    except Exception as exc:  # noqa: BLE001 - torch-pruning fails inside its tracer on layers it cannot follow
        raise WhelpError(
            f"torch-pruning could not trace {type(model).__name__} ({model.config.model_type}): "
            f"{type(exc).__name__} in its dependency graph; whelp's generic path prunes only models it "
            "can trace (whelp distil and eval still take this model)"
        ) from None


def linearize_(model):
    """Swap transformers' ``Conv1D`` (GPT-2 and its kin: y = x @ W + b, W [in, out]), whose channels torch-pruning
    1.6 cannot follow, for the equivalent ``nn.Linear`` (W^T) in place: the same function, traceable.
    ``apply_generic`` transposes them back into the pruned model's Conv1D."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                linear = nn.Linear(
                    child.weight.shape[0],
                    child.weight.shape[1],
                    bias=child.bias is not None,
                    device=child.weight.device,
                    dtype=child.weight.dtype,
                )
                with torch.no_grad():
                    linear.weight.copy_(child.weight.T)
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                setattr(parent, name, linear)
    return model


def find_blocks(model, graph) -> tuple[Block, ...]:
    """Per decoder layer (of the ModuleList of ``num_hidden_layers`` modules): the MLP (1-2 row-coupled linears
    read by one linear writing the residual stream) and attention (q/k/v read by o)."""
    import torch_pruning as tp  # noqa: PLC0415 - optional extra whelp[generic], needed only by this path

    def coupled(linear):  # linears whose output rows / input columns go with output row 0 of ``linear``
        group = [
            d
            for d, _ in graph.get_pruning_group(linear, tp.prune_linear_out_channels, [0])
            if isinstance(d.target.module, nn.Linear)
        ]
        return (
            [d.target.module for d in group if graph.is_out_channel_pruning_fn(d.handler)],
            [d.target.module for d in group if graph.is_in_channel_pruning_fn(d.handler)],
        )

    hidden, n = model.get_input_embeddings().weight.shape[1], architecture.shape(model.config)["num_hidden_layers"]
    intermediate = architecture.shape(model.config)["intermediate_size"]
    layers = next((m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n), None)
    if layers is None:
        raise WhelpError(
            f"found no list of {n} decoder layers in {type(model).__name__}; "
            "this architecture cannot be pruned by the generic path"
        )
    blocks = []
    for index, layer in enumerate(layers):
        readers = [m for m in layer.modules() if isinstance(m, nn.Linear) and m.in_features == hidden]
        groups = {frozenset(map(id, g[0])): g for g in map(coupled, readers)}.values()
        groups = [(outs, ins) for outs, ins in groups if len(ins) == 1]
        # q is the projection with the most rows (GQA); equal rows for MHA
        attn = [(tuple(sorted(outs, key=lambda m: -m.out_features)), ins[0]) for outs, ins in groups if len(outs) == 3]
        mlp = [g for g in groups if len(g[0]) in (1, 2) and g[1][0].out_features == hidden]
        if len(mlp) > 1:  # a fused qkv (GPT-NeoX, Phi-3) also reads and writes the residual: the MLP is the I-wide one
            mlp = [g for g in mlp if g[1][0].in_features == intermediate]
        if len(mlp) == 1 and any(m.out_features != mlp[0][1][0].in_features for m in mlp[0][0]):
            raise WhelpError(
                f"layer {index} of {type(model).__name__}: its MLP input projection is fused (e.g. "
                "gate_up_proj), which the generic path does not split; it prunes one MLP of separate "
                "(optionally gated) linears per layer"
            )
        if len(mlp) != 1:
            raise WhelpError(
                f"layer {index} of {type(model).__name__}: found {len(mlp)} MLP groups, expected 1; "
                "the generic path supports one (optionally gated) MLP per layer"
            )
        qkv, o = attn[0] if len(attn) == 1 else (None, None)
        blocks.append(Block(mlp_in=tuple(mlp[0][0]), mlp_out=mlp[0][1][0], qkv=qkv, o=o))
    return tuple(blocks)


@torch.no_grad()
def activation_scores(model, blocks, calib_tokens: torch.Tensor, batch_size: int = 4) -> Scores:
    """Minitron activation importance (importance.minitron_sq, .head_outputs) over ``calib_tokens`` [N, T]."""
    hidden, head_dim = model.get_input_embeddings().weight.shape[1], architecture.shape(model.config)["head_dim"]
    sums, batch = {}, []  # sums of minitron_sq per key; the current batch of token ids

    def add(key, act, o_weight=None):  # some architectures (OPT) flatten [B, T, C] to [B * T, C] inside a layer
        act = act.reshape(*batch[0].shape, -1)
        sums[key] = sums.get(key, 0) + minitron_sq(act if o_weight is None else head_outputs(act, o_weight, head_dim))

    norms = [
        m
        for m in model.modules()
        if "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None and m.weight.shape == (hidden,)
    ]
    hooks = [m.register_forward_hook(lambda _m, _i, out: add("hidden", out)) for m in norms]
    for i, block in enumerate(blocks):
        hooks.append(block.mlp_out.register_forward_pre_hook(lambda _m, args, i=i: add(f"mlp{i}", args[0])))
        if block.o is not None:
            hooks.append(block.o.register_forward_pre_hook(lambda m, args, i=i: add(f"o{i}", args[0], m.weight)))
    try:
        for ids in batches(calib_tokens, batch_size):
            batch[:] = [ids.to(model.device)]
            model(input_ids=batch[0])
    finally:
        for hook in hooks:
            hook.remove()
    layers = range(len(blocks))
    heads = tuple(sums[f"o{i}"].sqrt() for i in layers) if all(b.o is not None for b in blocks) else None
    return Scores(hidden=sums["hidden"].sqrt(), mlp=tuple(sums[f"mlp{i}"].sqrt() for i in layers), heads=heads)


def weight_scores(model, graph, blocks, method: str, calib_tokens: torch.Tensor | None, batch_size: int = 4) -> Scores:
    """torch-pruning's group importance (L2 magnitude or Taylor) of hidden channels and MLP neurons; query heads
    by the sum of w^2 (or |w * grad|) of their q rows and o columns."""
    import torch_pruning as tp  # noqa: PLC0415 - optional extra whelp[generic], needed only by this path

    if method == "taylor":
        model.zero_grad()
        with torch.enable_grad():
            for ids in batches(calib_tokens.to(model.device), batch_size):
                model(input_ids=ids, labels=ids).loss.backward()
    magnitude = method == "magnitude"
    imp = tp.importance.GroupMagnitudeImportance(p=2) if magnitude else tp.importance.GroupTaylorImportance()
    term = (lambda w: w.detach().pow(2)) if magnitude else (lambda w: (w.detach() * w.grad).abs())
    n_heads, embed = architecture.shape(model.config)["num_attention_heads"], model.get_input_embeddings()
    hidden = imp(graph.get_pruning_group(embed, tp.prune_embedding_out_channels, list(range(embed.weight.shape[1]))))
    mlp = tuple(
        imp(
            graph.get_pruning_group(b.mlp_in[0], tp.prune_linear_out_channels, list(range(b.mlp_in[0].out_features)))
        ).detach()
        for b in blocks
    )
    heads = (
        None
        if any(b.o is None for b in blocks)
        else tuple(
            term(b.qkv[0].weight).view(n_heads, -1).sum(1) + term(b.o.weight).T.reshape(n_heads, -1).sum(1)
            for b in blocks
        )
    )
    model.zero_grad(set_to_none=True)
    return Scores(hidden=hidden.detach(), mlp=mlp, heads=heads)


def generic_scores(
    model,
    importance: str = "activation",
    calib_tokens: torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int = 4,
    graph=None,
) -> Scores:
    """Importance of every hidden channel, MLP neuron and query head of ``model`` (not modified); ``graph``:
    ``build_graph(model)`` when the caller has it (tracing a 30-layer model takes seconds; graphs cannot be copied)."""
    if importance not in IMPORTANCE:
        raise WhelpError(f"unknown importance '{importance}'; choose one of {', '.join(IMPORTANCE)}")
    if importance in ("activation", "taylor") and calib_tokens is None:
        raise WhelpError(f"{importance} importance needs calibration tokens; pass calib_tokens [N, T]")
    graph = graph or build_graph(model)
    blocks = find_blocks(model, graph)
    if importance == "activation":
        return activation_scores(model, blocks, calib_tokens, batch_size)
    if importance != "random":
        return weight_scores(model, graph, blocks, importance, calib_tokens, batch_size)
    gen, n_heads = torch.Generator().manual_seed(seed), architecture.shape(model.config)["num_attention_heads"]
    heads = None if any(b.o is None for b in blocks) else tuple(torch.rand(n_heads, generator=gen) for _ in blocks)
    return Scores(
        hidden=torch.rand(model.get_input_embeddings().weight.shape[1], generator=gen),
        mlp=tuple(torch.rand(b.mlp_out.in_features, generator=gen) for b in blocks),
        heads=heads,
    )


def select_heads(scores: torch.Tensor, n_kv: int, keep: int) -> torch.Tensor:
    """Kept query heads [keep]: the same number ranked within each of the ``n_kv`` KV groups (MHA: globally)."""
    if n_kv == len(scores):
        return top_indices(scores, keep)
    if keep % n_kv:
        raise WhelpError(
            f"num_attention_heads={keep} must be a multiple of num_key_value_heads={n_kv} "
            "(the same number of query heads is kept in every KV group)"
        )
    group = len(scores) // n_kv
    return torch.cat([top_indices(s, keep // n_kv) + g * group for g, s in enumerate(scores.view(n_kv, group))])


def select_generic(scores: Scores, config, target: dict) -> GenericKeep:
    """Kept indices of a width target (``check_target``) from the scores of the source (of ``config``)."""
    source, want = architecture.shape(config), check_target(config, target)
    if (prune_heads := want["num_attention_heads"] != source["num_attention_heads"]) and scores.heads is None:
        raise WhelpError(
            "this architecture's attention (fused or unrecognised q/k/v) cannot be head-pruned by "
            "the generic path; keep num_attention_heads unchanged"
        )
    heads = (
        tuple(select_heads(s, source["num_key_value_heads"], want["num_attention_heads"]) for s in scores.heads)
        if prune_heads
        else None
    )
    return GenericKeep(
        hidden=top_indices(scores.hidden, want["hidden_size"]),
        mlp=tuple(top_indices(s, want["intermediate_size"]) for s in scores.mlp),
        heads=heads,
    )


def _dropped(n: int, kept: torch.Tensor) -> list[int]:
    return sorted(set(range(n)) - set(kept.tolist()))


def apply_generic(model, keep: GenericKeep, graph=None):
    """Prune ``model`` in place to ``keep``; returns a fresh model of the new config holding its weights (strict
    load, re-tied embeddings). ``graph``: ``build_graph(model)`` if already built."""
    source = architecture.shape(model.config)
    n_heads, head_dim = source["num_attention_heads"], source["head_dim"]
    want = check_target(
        model.config,
        {
            "hidden_size": len(keep.hidden),
            "intermediate_size": len(keep.mlp[0]),
            "num_attention_heads": len(keep.heads[0]) if keep.heads else n_heads,
        },
    )
    graph = graph or build_graph(model)
    import torch_pruning as tp  # noqa: PLC0415 - optional extra whelp[generic], needed only by this path

    blocks = find_blocks(model, graph)
    for block, kept in zip(blocks, keep.mlp):
        if drop := _dropped(block.mlp_out.in_features, kept):
            graph.get_pruning_group(block.mlp_in[0], tp.prune_linear_out_channels, drop).prune()
    for block, kept in zip(blocks, keep.heads or ()):  # q rows (k, v too under MHA) and o columns
        drop = [h * head_dim + j for h in _dropped(n_heads, kept) for j in range(head_dim)]
        for linear in block.qkv if source["num_key_value_heads"] == n_heads else block.qkv[:1]:
            tp.prune_linear_out_channels(linear, drop)
        tp.prune_linear_in_channels(block.o, drop)
    if drop := _dropped(source["hidden_size"], keep.hidden):
        graph.get_pruning_group(model.get_input_embeddings(), tp.prune_embedding_out_channels, drop).prune()
    config = generic_config(model.config, want)
    with no_init_weights():  # every parameter is overwritten below
        pruned = AutoModelForCausalLM.from_config(config, dtype=model.dtype).to(model.device)
    state, linears = model.state_dict(), dict(model.named_modules())
    for name, module in pruned.named_modules():  # Conv1D traced as nn.Linear (linearize_): W^T back
        if isinstance(module, Conv1D) and isinstance(linears.get(name), nn.Linear):
            state[f"{name}.weight"] = state[f"{name}.weight"].T.contiguous()
    pruned.load_state_dict(state, strict=True)
    if config.get_text_config().tie_word_embeddings:
        pruned.tie_weights()
    return pruned.eval()


def prune_generic(
    model, target_shape: dict, importance: str = "activation", calib_tokens: torch.Tensor | None = None, seed: int = 0
) -> tuple[object, GenericKeep]:
    """Width-prune a model torch-pruning can trace to ``target_shape`` (``architecture.shape`` keys, any subset; only
    ``WIDTH_KEYS`` may differ); ``calib_tokens`` [N, T] for ``activation`` and ``taylor``. ``model`` is consumed
    (pruned in place); returns a fresh model built from the updated config and the kept indices."""
    check_target(model.config, target_shape)  # refuse before tracing and calibrating
    graph = build_graph(model)
    scores = generic_scores(model, importance, calib_tokens, seed, graph=graph)
    keep = select_generic(scores, model.config, target_shape)
    return apply_generic(model, keep, graph), keep
