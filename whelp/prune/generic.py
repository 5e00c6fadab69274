"""Width pruning of architectures outside the family table, through torch-pruning's dependency graph.

torch-pruning (Fang et al., "DepGraph", CVPR 2023, arXiv:2301.12900) traces the model once and
groups every parameter slice coupled to a channel: pruning residual channel c removes column c of
every linear that reads the residual stream, row c of every linear that writes it, entry c of every
norm, of the token and position embeddings and of the lm_head. whelp uses it for exactly the two axes
where that coupling is architecture-specific - hidden channels and MLP neurons - and prunes attention
heads itself (query/output projections only), because with transformers 5.x and GQA the traced
group of a query head wrongly spans the smaller k/v projections.

Workarounds for torch-pruning 1.6.1 with transformers 5.x (DESIGN.md section 3):
  * tracing through RoPE's ``rotate_half`` never terminates: the model module's
    ``apply_rotary_pos_emb`` is replaced by a channel-preserving identity while the graph is built;
  * sdpa attention with uneven GQA heads fails while tracing: the graph is built under eager attention;
  * pruning a tied embedding leaves two separate matrices: the pruned model is rebuilt from the
    updated config (which re-ties them) and loaded with ``strict=True``, which also proves that the
    config matches every weight shape.

Importance: ``activation`` (Minitron, Muralidharan et al. 2024, arXiv:2407.14679: inputs of the MLP
down projection / attention output projection and outputs of every norm, mean over sequence, L2 over
batch), ``magnitude`` and ``taylor`` (torch-pruning's group L2 magnitude and |w * dL/dw|, Molchanov
et al. 2019) and ``random``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from whelp.errors import WhelpError

IMPORTANCE = ("activation", "magnitude", "taylor", "random")
WIDTH_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads")
INTERMEDIATE_KEYS = ("intermediate_size", "ffn_dim", "n_inner")  # HF spellings of the MLP width


@dataclass(frozen=True)
class Block:
    """The prunable linears of one decoder layer, found from the dependency graph."""

    mlp_in: tuple[nn.Linear, ...]  # up (and gate) projections: output rows are MLP neurons
    mlp_out: nn.Linear  # down projection: input columns are MLP neurons
    qkv: tuple[nn.Linear, ...] | None  # (q, k, v) or None for a fused / unrecognised attention
    o: nn.Linear | None


@dataclass(frozen=True)
class Scores:
    """Importance per channel of the source model: hidden [H], per layer MLP [I] and heads [n_heads]."""

    hidden: torch.Tensor
    mlp: tuple[torch.Tensor, ...]
    heads: tuple[torch.Tensor, ...] | None


@dataclass(frozen=True)
class GenericKeep:
    """Kept source indices per axis, sorted: hidden [H'], per layer MLP [I'] and query heads [n_heads']."""

    hidden: torch.Tensor
    mlp: tuple[torch.Tensor, ...]
    heads: tuple[torch.Tensor, ...] | None


@contextlib.contextmanager
def traceable(model):
    """Eager attention and identity RoPE while torch-pruning traces ``model`` (see module docstring)."""
    module = importlib.import_module(type(model).__module__)
    rope = getattr(module, "apply_rotary_pos_emb", None)
    attn = model.config._attn_implementation
    model.set_attn_implementation("eager")
    if rope is not None:
        module.apply_rotary_pos_emb = lambda q, k, *args, **kwargs: (q, k)
    try:
        yield
    finally:
        if rope is not None:
            module.apply_rotary_pos_emb = rope
        model.set_attn_implementation(attn)


def build_graph(model):
    """torch-pruning's DependencyGraph of ``model`` (traced on 8 dummy tokens)."""
    import torch_pruning as tp

    example = {"input_ids": torch.zeros(1, 8, dtype=torch.long, device=model.device)}
    with traceable(model), torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False,
                                                     output_transform=lambda out: out.logits)


def decoder_layers(model) -> nn.ModuleList:
    """The ModuleList of decoder layers: the one with ``num_hidden_layers`` entries."""
    n = model.config.get_text_config().num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise WhelpError(f"found no list of {n} decoder layers in {type(model).__name__}; "
                     "this architecture cannot be pruned by the generic path")


def _coupled(graph, linear: nn.Linear) -> tuple[list[nn.Linear], list[nn.Linear]]:
    """Linears whose output rows / input columns are coupled to the output rows of ``linear``."""
    import torch_pruning as tp

    group = graph.get_pruning_group(linear, tp.prune_linear_out_channels, [0])
    outs = [d.target.module for d, _ in group if isinstance(d.target.module, nn.Linear)
            and graph.is_out_channel_pruning_fn(d.handler)]
    ins = [d.target.module for d, _ in group if isinstance(d.target.module, nn.Linear)
           and graph.is_in_channel_pruning_fn(d.handler)]
    return outs, ins


def find_blocks(model, graph) -> tuple[Block, ...]:
    """Per decoder layer: MLP = the group whose rows number ``intermediate``; attention = q/k/v + o."""
    hidden = model.get_input_embeddings().weight.shape[1]
    blocks = []
    for index, layer in enumerate(decoder_layers(model)):
        readers = [m for m in layer.modules() if isinstance(m, nn.Linear) and m.in_features == hidden]
        groups = {id(g[0][0]): g for g in (_coupled(graph, m) for m in readers)}.values()
        groups = [(outs, ins) for outs, ins in groups if len(ins) == 1]
        attn = [g for g in groups if len(g[0]) == 3]
        mlp = [g for g in groups if len(g[0]) in (1, 2) and g[1][0].out_features == hidden]
        if len(mlp) != 1:
            raise WhelpError(f"layer {index} of {type(model).__name__}: found {len(mlp)} MLP groups, expected 1; "
                             "the generic path supports one (optionally gated) MLP per layer")
        qkv, o = (tuple(attn[0][0]), attn[0][1][0]) if len(attn) == 1 else (None, None)
        if qkv is not None:  # q is the projection with the most rows (GQA); equal rows for MHA
            qkv = tuple(sorted(qkv, key=lambda m: -m.out_features))
        blocks.append(Block(mlp_in=tuple(mlp[0][0]), mlp_out=mlp[0][1][0], qkv=qkv, o=o))
    return tuple(blocks)


def aggregate(act: torch.Tensor) -> torch.Tensor:
    """Minitron aggregation of activations [B, T, C]: mean of |x| over T, then sum of squares over B: [C].

    Returned as a sum of squares so batches can be accumulated; take the sqrt for the L2 norm.
    """
    return act.detach().float().abs().mean(dim=1).pow(2).sum(dim=0)


def _norms(model, hidden: int) -> list[nn.Module]:
    return [m for m in model.modules() if "norm" in type(m).__name__.lower()
            and getattr(m, "weight", None) is not None and m.weight.shape == (hidden,)]


@torch.no_grad()
def activation_scores(model, blocks, calib_tokens: torch.Tensor, batch_size: int = 4) -> Scores:
    """Minitron activation importance from a forward pass over ``calib_tokens`` [N, T]."""
    hidden = model.get_input_embeddings().weight.shape[1]
    sums: dict[str, torch.Tensor] = {}

    def add(key, act):
        sums[key] = sums.get(key, 0) + aggregate(act)

    hooks = [m.register_forward_hook(lambda _m, _i, out: add("hidden", out)) for m in _norms(model, hidden)]
    for i, block in enumerate(blocks):
        hooks.append(block.mlp_out.register_forward_pre_hook(lambda _m, args, i=i: add(f"mlp{i}", args[0])))
        if block.o is not None:
            hooks.append(block.o.register_forward_pre_hook(lambda _m, args, i=i: add(f"o{i}", args[0])))
    try:
        for start in range(0, len(calib_tokens), batch_size):
            model(input_ids=calib_tokens[start:start + batch_size].to(model.device))
    finally:
        for hook in hooks:
            hook.remove()
    heads = None
    if all(b.o is not None for b in blocks):  # head score: L2 over its channels' aggregated activations
        n_heads = model.config.get_text_config().num_attention_heads
        heads = tuple(sums[f"o{i}"].view(n_heads, -1).sum(1).sqrt() for i in range(len(blocks)))
    return Scores(hidden=sums["hidden"].sqrt(), mlp=tuple(sums[f"mlp{i}"].sqrt() for i in range(len(blocks))),
                  heads=heads)


def _head_weight_scores(block: Block, n_heads: int, method: str) -> torch.Tensor:
    """Magnitude (sum of w^2) or Taylor (sum of |w * grad|) of each query head's q rows and o columns: [n_heads]."""
    q, o = block.qkv[0].weight, block.o.weight
    term = (lambda w: w.detach().pow(2)) if method == "magnitude" else (lambda w: (w.detach() * w.grad).abs())
    return term(q).view(n_heads, -1).sum(1) + term(o).T.reshape(n_heads, -1).sum(1)


def weight_scores(model, graph, blocks, method: str, calib_tokens: torch.Tensor | None,
                  batch_size: int = 4) -> Scores:
    """torch-pruning's group importance (L2 magnitude or Taylor) of hidden channels and MLP neurons."""
    import torch_pruning as tp

    if method == "taylor":
        if calib_tokens is None:
            raise WhelpError("taylor importance needs calibration tokens for its gradients; pass calib_tokens")
        model.zero_grad()
        with torch.enable_grad():
            for start in range(0, len(calib_tokens), batch_size):
                ids = calib_tokens[start:start + batch_size].to(model.device)
                model(input_ids=ids, labels=ids).loss.backward()
    imp = tp.importance.GroupMagnitudeImportance(p=2) if method == "magnitude" else tp.importance.GroupTaylorImportance()
    embed = model.get_input_embeddings()
    hidden = imp(graph.get_pruning_group(embed, tp.prune_embedding_out_channels, list(range(embed.weight.shape[1]))))
    mlp = tuple(imp(graph.get_pruning_group(b.mlp_in[0], tp.prune_linear_out_channels,
                                            list(range(b.mlp_in[0].out_features)))) for b in blocks)
    n_heads = model.config.get_text_config().num_attention_heads
    heads = None if any(b.o is None for b in blocks) else tuple(
        _head_weight_scores(b, n_heads, method) for b in blocks)
    model.zero_grad(set_to_none=True)
    return Scores(hidden=hidden.detach(), mlp=tuple(s.detach() for s in mlp), heads=heads)


def random_scores(blocks, hidden: int, n_heads: int, seed: int = 0) -> Scores:
    gen = torch.Generator().manual_seed(seed)
    heads = None if any(b.o is None for b in blocks) else tuple(torch.rand(n_heads, generator=gen) for _ in blocks)
    return Scores(hidden=torch.rand(hidden, generator=gen),
                  mlp=tuple(torch.rand(b.mlp_out.in_features, generator=gen) for b in blocks), heads=heads)
