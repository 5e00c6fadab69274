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
        groups = {frozenset(map(id, g[0])): g for g in (_coupled(graph, m) for m in readers)}.values()
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


def _norms(model, hidden: int) -> list[nn.Module]:
    return [m for m in model.modules() if "norm" in type(m).__name__.lower()
            and getattr(m, "weight", None) is not None and m.weight.shape == (hidden,)]


@torch.no_grad()
def activation_scores(model, blocks, calib_tokens: torch.Tensor, batch_size: int = 4) -> Scores:
    """Minitron activation importance (importance.minitron_sq, .head_outputs) from a forward pass over ``calib_tokens`` [N, T]."""
    from whelp.prune.importance import head_outputs, minitron_sq

    hidden = model.get_input_embeddings().weight.shape[1]
    n_heads = model.config.get_text_config().num_attention_heads
    head_dim = blocks[0].qkv[0].out_features // n_heads if blocks[0].qkv else None
    sums: dict[str, torch.Tensor] = {}
    batch: list[torch.Tensor] = []

    def add(key, act, o_weight=None):  # some architectures (OPT) flatten [B, T, C] to [B * T, C] inside a layer
        act = act.reshape(*batch[0].shape, -1)
        sums[key] = sums.get(key, 0) + minitron_sq(act if o_weight is None else head_outputs(act, o_weight, head_dim))

    hooks = [m.register_forward_hook(lambda _m, _i, out: add("hidden", out)) for m in _norms(model, hidden)]
    for i, block in enumerate(blocks):
        hooks.append(block.mlp_out.register_forward_pre_hook(lambda _m, args, i=i: add(f"mlp{i}", args[0])))
        if block.o is not None:
            hooks.append(block.o.register_forward_pre_hook(lambda m, args, i=i: add(f"o{i}", args[0], m.weight)))
    try:
        for start in range(0, len(calib_tokens), batch_size):
            batch[:] = [calib_tokens[start:start + batch_size].to(model.device)]
            model(input_ids=batch[0])
    finally:
        for hook in hooks:
            hook.remove()
    heads = None
    if all(b.o is not None for b in blocks):
        heads = tuple(sums[f"o{i}"].sqrt() for i in range(len(blocks)))
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


def generic_scores(model, importance: str = "activation", calib_tokens: torch.Tensor | None = None,
                   seed: int = 0, batch_size: int = 4, graph=None) -> Scores:
    """Importance of every hidden channel, MLP neuron and query head of ``model`` (not modified).

    ``graph``: ``build_graph(model)`` when the caller already has it (tracing a 30-layer model takes seconds).
    """
    if importance not in IMPORTANCE:
        raise WhelpError(f"unknown importance '{importance}'; choose one of {', '.join(IMPORTANCE)}")
    if importance == "activation" and calib_tokens is None:
        raise WhelpError("activation importance needs calibration tokens; pass calib_tokens [N, T]")
    graph = graph or build_graph(model)
    blocks = find_blocks(model, graph)
    if importance == "activation":
        return activation_scores(model, blocks, calib_tokens, batch_size)
    if importance == "random":
        text = model.config.get_text_config()
        return random_scores(blocks, model.get_input_embeddings().weight.shape[1], text.num_attention_heads, seed)
    return weight_scores(model, graph, blocks, importance, calib_tokens, batch_size)


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, in ascending index order: LongTensor [k]."""
    return scores.topk(k).indices.sort().values


def select_heads(scores: torch.Tensor, n_kv: int, keep: int) -> torch.Tensor:
    """Kept query heads [keep]: the same number ranked within each of the ``n_kv`` KV groups.

    With one query head per KV head (MHA) the KV heads go with them, so heads are ranked globally.
    """
    n_heads = len(scores)
    if n_kv == n_heads:
        return top(scores, keep)
    if keep % n_kv:
        raise WhelpError(f"num_attention_heads={keep} must be a multiple of num_key_value_heads={n_kv} "
                         "(the same number of query heads is kept in every KV group)")
    group = n_heads // n_kv
    within = scores.view(n_kv, group).topk(keep // n_kv, dim=1).indices.sort(dim=1).values
    return (within + torch.arange(n_kv).unsqueeze(1) * group).flatten()


def width_of(model) -> dict:
    """Shape of ``model`` under HF key names (``whelp.models.shape``), the MLP width under intermediate_size."""
    from whelp.models import shape

    return {**shape(model.config), **width_of_config(model.config.get_text_config())}


def width_of_config(text) -> dict:
    key = next((k for k in INTERMEDIATE_KEYS if getattr(text, k, None) is not None), None)
    if key is None:
        raise WhelpError(f"{type(text).__name__} names its MLP width none of {', '.join(INTERMEDIATE_KEYS)}; "
                         "this architecture cannot be width-pruned by whelp")
    return {"hidden_size": text.hidden_size, "intermediate_size": getattr(text, key),
            "num_attention_heads": text.num_attention_heads,
            "num_key_value_heads": getattr(text, "num_key_value_heads", None) or text.num_attention_heads}


def check_target(source: dict, target: dict) -> dict:
    """The width target, refusing keys the generic path cannot change and widths above the source."""
    width = {**{k: source[k] for k in WIDTH_KEYS}, **{k: v for k, v in target.items() if k in WIDTH_KEYS and v is not None}}
    other = {k: v for k, v in target.items() if k not in WIDTH_KEYS and v is not None and source.get(k, v) != v}
    if other:
        raise WhelpError(f"the generic pruning path (architectures outside the family table) changes only "
                         f"{', '.join(WIDTH_KEYS)}; drop {', '.join(f'{k}={v}' for k, v in other.items())} from the target")
    for key in WIDTH_KEYS:
        if not 1 <= width[key] <= source[key]:
            raise WhelpError(f"{key}={width[key]} must be in [1, {source[key]}] (the source's width)")
    return width


def select_generic(scores: Scores, source: dict, target: dict) -> GenericKeep:
    """Kept indices for a width target (``check_target``) from the source's scores."""
    width = check_target(source, target)
    heads = None
    if width["num_attention_heads"] != source["num_attention_heads"]:
        if scores.heads is None:
            raise WhelpError("this architecture's attention (fused or unrecognised q/k/v) cannot be head-pruned by "
                             "the generic path; keep num_attention_heads unchanged")
        heads = tuple(select_heads(s, source["num_key_value_heads"], width["num_attention_heads"]) for s in scores.heads)
    return GenericKeep(hidden=top(scores.hidden, width["hidden_size"]),
                       mlp=tuple(top(s, width["intermediate_size"]) for s in scores.mlp), heads=heads)


def _dropped(n: int, kept: torch.Tensor) -> list[int]:
    mask = torch.ones(n, dtype=torch.bool)
    mask[kept] = False
    return mask.nonzero().flatten().tolist()


def _prune_heads(block: Block, kept: torch.Tensor, n_heads: int, head_dim: int, mha: bool) -> None:
    """Remove query heads (and their KV heads under MHA): q (k, v) rows and o columns."""
    import torch_pruning as tp

    drop = [h * head_dim + j for h in _dropped(n_heads, kept) for j in range(head_dim)]
    for linear in block.qkv if mha else block.qkv[:1]:
        tp.prune_linear_out_channels(linear, drop)
    tp.prune_linear_in_channels(block.o, drop)


def generic_config(config, width: dict, mha: bool):
    """The HF config of the pruned model: the one place the generic path updates a config."""
    new = copy.deepcopy(config)
    text = new.get_text_config()
    if getattr(text, "word_embed_proj_dim", None) == text.hidden_size:  # OPT: no projection when equal
        text.word_embed_proj_dim = width["hidden_size"]
    old_mlp = width_of_config(text)["intermediate_size"]
    text.hidden_size = width["hidden_size"]
    for key in INTERMEDIATE_KEYS:
        if getattr(text, key, None) == old_mlp:
            setattr(text, key, width["intermediate_size"])
    text.num_attention_heads = width["num_attention_heads"]
    if mha and getattr(text, "num_key_value_heads", None) is not None:
        text.num_key_value_heads = width["num_attention_heads"]
    return new


def rebuild(pruned, config):
    """A fresh model from ``config`` holding ``pruned``'s weights (strict), so config and weights agree.

    Raises WhelpError naming the first tensor whose shape the config cannot express.
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    try:  # transformers validates configs on load (e.g. hidden_size % num_attention_heads == 0)
        type(config).from_dict(config.to_dict())
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises a validation error per rule
        raise WhelpError(f"the pruned {config.model_type} config would not load back: "
                         f"{str(exc).splitlines()[-1].strip()}; choose widths that satisfy it") from None
    with torch.device("meta"):
        expected = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    state = pruned.state_dict()
    for name, tensor in state.items():
        if name in expected and expected[name] != tensor.shape:
            raise WhelpError(f"{config.model_type} cannot express this pruned shape: {name} is {tuple(tensor.shape)} "
                             f"but its config gives {tuple(expected[name])} (the architecture ties this width to "
                             "another, e.g. head_dim = hidden_size / num_attention_heads); prune fewer axes")
    with no_init_weights():  # every parameter is overwritten below
        model = AutoModelForCausalLM.from_config(config, dtype=pruned.dtype).to(pruned.device)
    model.load_state_dict(state, strict=True)
    if config.get_text_config().tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def apply_generic(model, keep: GenericKeep, graph=None):
    """Prune ``model`` in place to ``keep`` and return the rebuilt model (new config, re-tied embeddings).

    ``graph``: ``build_graph(model)`` if already built (a graph holds autograd nodes: it cannot be copied).
    """
    import torch_pruning as tp

    source = width_of(model)
    mha = source["num_key_value_heads"] == source["num_attention_heads"]
    graph = graph or build_graph(model)
    blocks = find_blocks(model, graph)
    head_dim = blocks[0].qkv[0].out_features // source["num_attention_heads"] if blocks[0].qkv else None
    for block, kept in zip(blocks, keep.mlp):
        if len(kept) < block.mlp_out.in_features:
            graph.get_pruning_group(block.mlp_in[0], tp.prune_linear_out_channels,
                                    _dropped(block.mlp_out.in_features, kept)).prune()
    for block, kept in zip(blocks, keep.heads or ()):
        _prune_heads(block, kept, source["num_attention_heads"], head_dim, mha)
    if len(keep.hidden) < source["hidden_size"]:
        embed = model.get_input_embeddings()
        graph.get_pruning_group(embed, tp.prune_embedding_out_channels, _dropped(source["hidden_size"], keep.hidden)).prune()
    width = {"hidden_size": len(keep.hidden), "intermediate_size": len(keep.mlp[0]),
             "num_attention_heads": len(keep.heads[0]) if keep.heads else source["num_attention_heads"]}
    return rebuild(model, generic_config(model.config, width, mha))


def prune_generic(model, target_shape: dict, importance: str = "activation",
                  calib_tokens: torch.Tensor | None = None, seed: int = 0) -> tuple[object, GenericKeep]:
    """Width-prune a model of any architecture torch-pruning can trace to ``target_shape``.

    ``target_shape`` uses HF config names (``whelp.models.shape`` keys); only hidden_size,
    intermediate_size and num_attention_heads may differ from the source. ``calib_tokens`` [N, T]
    are needed for ``activation`` and ``taylor``. ``model`` is consumed (pruned in place); the
    returned model is a fresh instance built from the updated config, with the kept indices.
    """
    scores = generic_scores(model, importance, calib_tokens, seed)
    keep = select_generic(scores, width_of(model), target_shape)
    return apply_generic(model, keep), keep
