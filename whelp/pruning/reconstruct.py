"""Reconstruction after structured pruning: refit the kept weights, layer by layer, so the student's layers do what
the teacher's did (``whelp prune --reconstruct``; the closed forms are lsq.py).

The modes (``specs.RECONSTRUCT``):

- ``lsq``: o_proj and down_proj refit by ridge least squares so each matches the *wide* layer's output: the teacher
  layer sliced to the student's hidden channels only (every neuron, head and head dim), fed the *student's* own input.
  Errors do not compound: layer ``i`` is refit on what the refit layers before it produce, attention before MLP
  (SlimGPT, Ling et al. NeurIPS 2024; ZipLM).
- ``span``: o_proj as ``lsq``; down_proj refit so the layer's output matches the teacher's residual stream at the end
  of the span of teacher layers the student layer replaces (from its kept layer up to the next kept one), so the
  removed layers' work and the drift accumulated before it are compensated too. The teacher runs beside the student
  on the same calibration tokens. Needs blocks that join the residual stream as they are (``Family.mlp_residual``:
  no post-norm, no multiplier, attention and MLP alike in every family).
- ``span_attn``: ``span``, and o_proj refit towards the teacher's residual stream too: the stream after the
  student's attention matches the teacher's after the attention of the kept layer, so the attention compensates
  the drift accumulated before it (where ``span`` leaves an attention that keeps every head as it is).
- ``bias``: FLAP's bias compensation (An et al., AAAI 2024) on both maps; the kept weights stay.
- Mixture-of-experts layers: o_proj as above; the block's experts (and shared expert) refit together towards the
  wide block (``lsq``) or the span's end (``span``), so removed experts are compensated too (moe_refit.py).
- ``select`` (``--select obs``): before down_proj is refit, the layer's MLP neurons are chosen anew for that refit by
  structured OBS on the same inputs and target (obs.py), in place of the importance ranking's top.
- ``auto`` (the default): ``span_attn`` where the family allows it, else ``lsq``; ``none`` for the generic path.
  On the demo shape ``span`` cut one-shot perplexity on general English to 0.6x of the sliced weights', ``lsq`` to
  0.8x, ``bias`` not at all (bench/RESULTS.md, "Reconstruction and one-shot baselines"); ``span_attn`` cut vim's
  manual by another 6-9% at issue 30's filed shape, two seeds ("o_proj towards the teacher's stream"). The demo
  recipe keeps ``span``: after its distillation ``span_attn``'s student followed fewer format instructions and kept
  fewer facts at all three seeds measured.

Memory beyond the prune: the calibration hidden states of the student [N, T, H'] (for ``span`` the teacher's
[N, T, H] too, and its stream at the span's end on the kept channels [N, T, H']; ``span_attn``: after the kept
layer's attention too), one wide layer, and per map the float64 moments ([n, k] + [k, k]); with ``select`` and
``span``, one layer's wide MLP activations [N, T, n] too. Time, per calibration token and layer: the student's
attention three times (``span_attn``: four) and its MLP once, the wide attention and MLP once each, the teacher's
layers of the span once (``span``; the stream after the attention is taken on the way), plus one k x k solve per
map. The layers' inputs are taken without running the layers (``layer_inputs``), and each pass
stops where what it needs is taken (``layerwise.Stop``): on the demo that took the refit from 266 s to 174 s, to the
same kept neurons and weights within 2e-5 (bench/RESULTS.md, "The demo's time"). Under ``lsq`` an attention that
keeps every head is the wide one: its o_proj refit is the identity and is skipped (``span_attn`` refits it towards
the teacher's stream, one more pass of the student's attention); with ``select`` and ``span`` the layer's output is
made from the selection's pass (the stream before the MLP plus the refit down_proj of the kept activations), so the
demo's layer runs the student's attention once and the wide MLP once.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import replace

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM
from transformers.initialization import no_init_weights

from whelp.architecture import layer_output
from whelp.errors import WhelpError
from whelp.pruning.arch import Family, split_name
from whelp.pruning.keep import Keep, head_dim_of, text_config
from whelp.pruning.layerwise import Stop, assign_layer, layer_types, rope_and_mask, skeleton, standing_in
from whelp.pruning.lsq import DAMP, refit
from whelp.pruning.moe import ExpertKeep, is_moe, moe_family_of
from whelp.pruning.moe_refit import block_targets, refit_block
from whelp.pruning.obs import check_select, select_mlp
from whelp.pruning.refit_stats import mid_stats, span_stats, teacher_layer, wide_stats
from whelp.pruning.surgery import slice_tensor, target_config
from whelp.specs import SPAN_MODES


def wide_keep(keep: Keep, source_cfg) -> Keep:
    """The Keep of the wide model: the student's layers and hidden channels, every neuron, head and head dim (and
    of an MoE teacher every expert and expert neuron, routed as the teacher routes)."""
    cfg = text_config(source_cfg)
    kv, n_rep = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    experts = keep.experts
    if experts is not None:
        family = moe_family_of(source_cfg)
        n, width = getattr(cfg, family.experts_key), getattr(cfg, family.ffn_key)
        experts = ExpertKeep({layer: torch.arange(n) for layer in experts.experts}, count=n, width=width)
    return replace(
        keep,
        mlp=tuple(torch.arange(cfg.intermediate_size) for _ in keep.layers),
        kv_heads=tuple(torch.arange(kv) for _ in keep.layers),
        q_heads=tuple(torch.arange(n_rep).repeat(kv, 1) for _ in keep.layers),
        head_dims=torch.arange(head_dim_of(cfg)),
        tie=None,
        experts=experts,
    )


def resolve(mode: str, family: Family | None) -> str:
    """The mode ``auto`` stands for: ``span_attn`` where the family's blocks join the residual stream as they are,
    else ``lsq``; ``none`` for the generic path (not refit). Other modes are themselves."""
    if mode != "auto":
        return mode
    if family is None:
        return "none"
    return "span_attn" if family.mlp_residual else "lsq"


def check_mode(mode: str, source_cfg, family: Family | None, published: bool, select: str = "importance") -> None:
    """Refuse what a reconstruction (and ``--select obs``, which chooses neurons for it) cannot do, before any
    weight is read (``family`` None: the generic path)."""
    cfg = text_config(source_cfg)
    if select == "obs":
        check_select(mode, cfg, family)
    if mode == "none":
        return
    if family is None:
        raise WhelpError(
            f"--reconstruct {mode} walks the layers of the families in whelp/pruning/arch.py and {cfg.model_type} "
            "is pruned by the generic path; use --reconstruct none"
        )
    if family.experts_key and mode == "bias":
        raise WhelpError(
            f"--reconstruct bias adds biases and the experts of {cfg.model_type} have none in transformers; "
            "use --reconstruct lsq or span"
        )
    if mode in SPAN_MODES and not family.mlp_residual:
        raise WhelpError(
            f"--reconstruct {mode} needs an MLP whose output joins the residual stream as it is, and {family.name} "
            "normalises or scales it; use --reconstruct lsq"
        )
    if mode == "bias" and published:
        raise WhelpError(
            "--reconstruct bias adds biases (attention_bias / mlp_bias) and the target is a published shape "
            "(a preset or config.json) that has none; use --reconstruct lsq, or give the shape as key=value"
        )
    if mode == "bias" and not (hasattr(cfg, "attention_bias") and hasattr(cfg, "mlp_bias")):
        raise WhelpError(
            f"--reconstruct bias needs attention_bias and mlp_bias in the config and {cfg.model_type} has no "
            "such keys; use --reconstruct lsq"
        )


def reconstruct_layer(
    student_layer,
    wide_layer,
    family: Family,
    batches: list[Tensor],
    kwargs: list[dict],
    mode: str,
    wide_rope: list | None = None,
    span_end: list[Tensor] | None = None,
    damp: float = DAMP,
    select: bool = False,
    span_mid: list[Tensor] | None = None,
) -> tuple[dict, Tensor | None]:
    """Refit one student layer in place (o_proj, then down_proj on the refit attention's output) and advance
    ``batches`` (hidden states [B, T, H'] entering the layer, one per batch; ``kwargs`` the layer's keyword
    arguments per batch: mask, rotary embeddings) to the layer's output. ``wide_rope``: the wide layer's rotary
    embeddings per batch where its head_dim differs; ``span_end`` (modes ``span``, ``span_attn``) and ``span_mid``
    (``span_attn``): the teacher's hidden states at the end of the span and after the kept layer's attention, sliced
    to the kept channels, per batch; ``select``: the MLP's neurons are first chosen anew by structured OBS (obs.py)
    for the refit that follows. Returns the relative calibration error of each map before and after, and the teacher
    neuron ids the MLP keeps when ``select`` chose them (else None)."""
    report, kept, chosen, parts = {}, None, None, None
    if (mode in SPAN_MODES and span_end is None) or (mode == "span_attn" and span_mid is None):
        raise ValueError(f"{mode} refits towards the teacher's stream: give span_end (and span_mid for span_attn)")
    for which in (family.o_proj, family.down_proj):
        block = which.split(".")[0]
        if which == family.o_proj and mode != "span_attn" and _unchanged(student_layer, wide_layer, block):
            report[which.rsplit(".", 1)[-1]] = {"before": 0.0, "after": 0.0}  # the wide map on the same input
            continue
        if which == family.down_proj and select and not is_moe(student_layer):
            kept, chosen, parts = select_mlp(student_layer, wide_layer, family, batches, kwargs, span_end, damp)
        if which == family.down_proj and is_moe(student_layer):
            inputs, targets = block_targets(student_layer, wide_layer, batches, kwargs, span_end)
            report["experts"] = refit_block(student_layer.mlp, inputs, targets, damp)
            continue
        s_map = student_layer.get_submodule(which)
        if chosen is not None and which == family.down_proj:  # the selection's moments, towards the same target
            weight, moments = None, chosen
        elif mode in SPAN_MODES and which == family.down_proj:
            weight, moments = None, span_stats(student_layer, s_map, batches, kwargs, span_end)
        elif mode == "span_attn":
            weight, moments = None, mid_stats(student_layer, s_map, family, batches, kwargs, span_mid)
        else:
            weight = wide_layer.get_submodule(which).weight.detach()
            moments = wide_stats(student_layer, wide_layer, family, which, batches, kwargs, wide_rope)
        # a teacher's own bias is in both outputs (sliced to the kept channels) and cancels in their difference
        how = "bias" if mode == "bias" else "lsq"
        v, b, report[which.rsplit(".", 1)[-1]] = refit(weight, s_map.weight.detach(), moments, how, damp)
        s_map.weight.data.copy_(v)
        if b is not None:
            s_map.bias.data.add_(b)
    down = None if parts is None else student_layer.get_submodule(family.down_proj)
    with torch.no_grad():
        for i, (hidden, kw) in enumerate(zip(batches, kwargs)):
            if parts is None:
                batches[i] = layer_output(student_layer(hidden, **kw))
            else:  # the stream before the MLP and the neurons' activations, from the selection's pass
                residual, acts = parts[i]
                batches[i] = residual + torch.nn.functional.linear(acts[..., kept], down.weight, down.bias)
                parts[i] = None
    return report, kept


def _unchanged(student_layer, wide_layer, block: str) -> bool:
    """Whether the student's ``block`` is the wide one as it is (every head kept, on the same channels): its refit
    towards the wide block's output on the same input is then the identity, and is not computed."""
    mine, wide = (dict(layer.get_submodule(block).named_parameters()) for layer in (student_layer, wide_layer))
    return mine.keys() == wide.keys() and all(
        p.shape == wide[n].shape and torch.equal(p, wide[n]) for n, p in mine.items()
    )


def layer_inputs(model, family: Family, tokens: Tensor, batch_size: int) -> tuple[list[Tensor], list[list[dict]]]:
    """The hidden states entering ``model``'s first layer, one [B, T, H] per batch of ``tokens`` [N, T], and the
    keyword arguments (mask, rotary embeddings) the model passes each layer, per layer and batch: exactly what its
    own forward gives the layers as they are refit one by one. The layers do not run: each is stood in for by a
    recorder that passes its input on (the arguments do not depend on what the layers compute), and the last one
    ends the forward, so this costs the embeddings, not a forward of the model (the refit runs every layer after)."""
    layers = model.get_submodule(family.layers)
    batches: list[Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in layers]

    def stand_in(index):
        def forward(*args, **kw):
            hidden = args[0] if args else kw["hidden_states"]
            if index == 0:
                batches.append(hidden.detach().clone())
            kwargs[index].append({k: v for k, v in kw.items() if k != "hidden_states"})
            if index == len(layers) - 1:
                raise Stop
            return hidden

        return forward

    with standing_in((layer, stand_in(i)) for i, layer in enumerate(layers)), torch.no_grad():
        for start in range(0, len(tokens), batch_size):
            with contextlib.suppress(Stop):
                model(input_ids=tokens[start : start + batch_size], use_cache=False)
    return batches, kwargs


def layer_states(named, pairs, family: Family, source_cfg) -> list[dict]:
    """A teacher layer's ``(name, tensor)`` pairs, each tensor taken once and sliced to every ``(keep, target
    config)`` of ``pairs``: one state per pair, by names inside the layer (the wide and the student layer of a
    streamed refit from one read)."""
    states: list[dict] = [{} for _ in pairs]
    for name, tensor in named:
        for state, (keep, cfg) in zip(states, pairs):
            for target, sliced in slice_tensor(name, tensor, keep, family, source_cfg, cfg).items():
                state[split_name(target, family)[1]] = sliced
    return states


def with_zero_biases(module, state: dict) -> dict:
    """``state`` completed with zeros for the biases ``module`` has and ``state`` lacks (``--reconstruct bias``
    sets attention_bias / mlp_bias: q/k/v and gate/up biases start at zero); any other missing tensor is refused."""
    missing = {k: v for k, v in module.state_dict().items() if k not in state}
    if not all(k.endswith(".bias") for k in missing):
        raise WhelpError(f"the pruned model needs tensors the teacher does not have: {sorted(missing)[:3]}")
    return {**state, **{k: torch.zeros(v.shape, dtype=v.dtype) for k, v in missing.items()}}


def with_biases(model):
    """``model`` with ``attention_bias`` and ``mlp_bias`` set and every bias they add zero (FLAP's compensation
    goes into the o_proj and down_proj ones); a new model, ``model`` unchanged."""
    cfg = copy.deepcopy(model.config)
    text_config(cfg).attention_bias = text_config(cfg).mlp_bias = True
    with no_init_weights():
        biased = AutoModelForCausalLM.from_config(cfg, dtype=model.dtype)
    biased.load_state_dict(with_zero_biases(biased, model.state_dict()), strict=True)
    if text_config(cfg).tie_word_embeddings:
        biased.tie_weights()
    return biased.eval()


def wide_rotary(wide, family: Family, wide_cfg, student_cfg, batches: list[Tensor], types: list) -> dict | None:
    """The wide layers' rotary embeddings per layer type and batch where their head_dim differs from the student's
    (None where it does not): they depend on the batches' length only, so they are made once for every layer."""
    if head_dim_of(wide_cfg) == head_dim_of(student_cfg):
        return None
    return {t: [rope_and_mask(wide, family, wide_cfg, h, t)[0] for h in batches] for t in set(types)}


def span_ends(keep: Keep, n_layers: int) -> list[int]:
    """The last teacher layer of each student layer's span: up to the next kept layer, the last span to the end."""
    return [nxt - 1 for nxt in keep.layers[1:]] + [n_layers - 1]


def reconstruct_model(
    teacher,
    student,
    keep: Keep,
    family: Family,
    tokens: Tensor,
    batch_size: int,
    mode: str,
    progress=None,
    select: bool = False,
):
    """``(student, report, keep)``: ``student`` (pruned from ``teacher`` as ``keep`` says) refit layer by layer on
    the calibration ``tokens`` [N, T]; ``bias`` returns a new model with biases. ``report``: per layer, the relative
    calibration error of o_proj and down_proj before and after. ``select``: each layer's MLP neurons chosen anew by
    structured OBS, and ``keep`` says which. ``progress(1)`` after each layer."""
    if mode == "bias":
        student = with_biases(student)
    wkeep = wide_keep(keep, teacher.config)
    wide_cfg = target_config(teacher.config, wkeep, getattr(text_config(student.config), "rope_parameters", None))
    wide = skeleton(wide_cfg)
    state, types = teacher.state_dict(), layer_types(text_config(wide_cfg))
    batches, kwargs = layer_inputs(student, family, tokens, batch_size)
    wide_ropes = wide_rotary(wide, family, wide_cfg, student.config, batches, types)
    if mode in SPAN_MODES:
        t_batches, t_kwargs = layer_inputs(teacher, family, tokens, batch_size)
        t_layers, ends, done = teacher.get_submodule(family.layers), span_ends(keep, len(t_kwargs)), 0
    report, chosen = [], []
    for i, layer in enumerate(student.get_submodule(family.layers)):
        prefix = f"{family.layers}.{keep.layers[i]}."
        named = ((name, tensor) for name, tensor in state.items() if name.startswith(prefix))
        wide_layer = assign_layer(wide, family, i, layer_states(named, [(wkeep, wide_cfg)], family, teacher.config)[0])
        rope = None if wide_ropes is None else wide_ropes[types[i]]
        span_end, mid = None, [] if mode == "span_attn" else None
        if mode in SPAN_MODES:
            for j in range(done, ends[i] + 1):
                at = mid if j == keep.layers[i] else None
                teacher_layer(t_layers[j], family, t_batches, t_kwargs[j], at, keep.hidden)
            done, span_end = ends[i] + 1, [h[..., keep.hidden] for h in t_batches]
        errors, kept = reconstruct_layer(
            layer, wide_layer, family, batches, kwargs[i], mode, rope, span_end, select=select, span_mid=mid
        )
        report.append(errors)
        chosen.append(kept)
        wide_layer.to("meta")
        if progress is not None:
            progress(1)
    return student, report, with_mlp(keep, chosen)


def with_mlp(keep: Keep, chosen: list) -> Keep:
    """``keep`` with each layer's MLP neurons replaced by those ``chosen`` for it (None: kept as they were)."""
    return replace(keep, mlp=tuple(old if new is None else new for old, new in zip(keep.mlp, chosen)))


def summary(mode: str, errors: list[dict]) -> dict:
    """The report's record of a reconstruction: the mode, the damping, and per map the relative calibration error
    averaged over layers before and after (and the per-layer values)."""
    maps = sorted({name for layer in errors for name in layer})

    def mean(name: str, when: str) -> float:
        values = [layer[name][when] for layer in errors if name in layer]  # an MoE's dense layers have no experts
        return sum(values) / len(values)

    return {
        "mode": mode,
        "damp": DAMP,
        **{name: {"before": mean(name, "before"), "after": mean(name, "after")} for name in maps},
        "layers": errors,
    }
