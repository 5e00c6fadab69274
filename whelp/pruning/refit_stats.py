"""What each map of a reconstruction is fitted on (reconstruct.py walks the layers, lsq.py solves): the moments of
o_proj or down_proj gathered by running the student's layer on its calibration hidden states, beside the wide layer
(``wide_stats``: towards the teacher's own layer) or towards the teacher's residual stream (``mid_stats``: after the
kept layer's attention; ``span_stats``: at the span's end), and the teacher's layers advanced beside the student
(``teacher_layer``). Each pass stops where what it needs is taken (``layerwise.Stop``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from whelp.architecture import layer_output
from whelp.pruning.arch import Family
from whelp.pruning.layerwise import Stop
from whelp.pruning.lsq import Moments


def _capture(module, store: list):
    """A forward pre-hook handle appending the module's first input to ``store``."""
    return module.register_forward_pre_hook(lambda m, args: store.append(args[0]))


def _stop(module, args, out):
    raise Stop


def _run_hooked(layer, hidden: Tensor, kw: dict, handles: list) -> None:
    """Run ``layer`` on ``hidden`` until a hook stops it, then remove ``handles`` (the hooks that take what the
    caller needs)."""
    try:
        with torch.no_grad(), contextlib.suppress(Stop):
            layer(hidden, **kw)
    finally:
        for handle in handles:
            handle.remove()


def wide_stats(student_layer, wide_layer, family: Family, which: str, batches, kwargs, wide_rope) -> Moments:
    """Moments of one map (``which`` = family.o_proj or family.down_proj) over every batch: the student layer runs
    on each batch's hidden states; the wide sub-block (attention or MLP) runs on the same input beside it."""
    block = which.split(".")[0]  # self_attn | mlp
    s_map, w_map = student_layer.get_submodule(which), wide_layer.get_submodule(which)
    moments = Moments.empty(w_map.in_features, s_map.in_features)

    wide_block = wide_layer.get_submodule(block)
    for b, (hidden, kw) in enumerate(zip(batches, kwargs)):
        xs, hs = [], []
        rope = None if wide_rope is None else wide_rope[b]

        def run_wide(module, args, kw, rope=rope):
            if rope is not None and "position_embeddings" in kw:
                kw = {**kw, "position_embeddings": rope}
            wide_block(*args, **kw)

        student_block = student_layer.get_submodule(block)
        handles = [
            _capture(s_map, xs),
            _capture(w_map, hs),
            student_block.register_forward_pre_hook(run_wide, with_kwargs=True),
            student_block.register_forward_hook(_stop),  # the rest of the layer is not needed (o_proj: its MLP)
        ]
        _run_hooked(student_layer, hidden, kw, handles)
        moments.add(hs[0], xs[0], w_map.weight)
    return moments


def mid_stats(student_layer, o_map, family: Family, batches, kwargs, span_mid) -> Moments:
    """Moments of ``o_map`` (the student's o_proj) towards the teacher's residual stream after the kept layer's
    attention (``span_mid``, one [B, T, H'] per batch): the target of ``V x`` is ``mid - hidden``, what the attention
    must add to the student's stream (o_proj's own bias taken out); only the student's attention runs."""
    moments = Moments.empty(o_map.out_features, o_map.in_features)
    attention = student_layer.get_submodule(family.o_proj.split(".")[0])
    for hidden, kw, mid in zip(batches, kwargs, span_mid):
        xs: list = []
        _run_hooked(student_layer, hidden, kw, [_capture(o_map, xs), attention.register_forward_hook(_stop)])
        target = mid - hidden if o_map.bias is None else mid - hidden - o_map.bias.detach()
        moments.add(target, xs[0], None)
    return moments


def span_stats(student_layer, down, batches, kwargs, span_end) -> Moments:
    """Moments of ``down`` (the student's down_proj) towards the teacher's residual stream at the span's end:
    the target of ``V x`` is ``end - (out - V0 x)``, what the MLP must add to the layer's attention output."""
    moments = Moments.empty(down.out_features, down.in_features)
    for hidden, kw, end in zip(batches, kwargs, span_end):
        xs: list = []
        handle = _capture(down, xs)
        try:
            with torch.no_grad():
                out = student_layer(hidden, **kw)
        finally:
            handle.remove()
        out = layer_output(out)
        moments.add(end - out + xs[0] @ down.weight.detach().T, xs[0], None)
    return moments


def teacher_layer(
    layer, family: Family, batches: list[Tensor], kwargs: list[dict], mid: list | None = None, channels=None
) -> None:
    """Run ``batches`` through one teacher layer in place (``kwargs`` per batch; the teacher beside the student);
    with ``mid`` (a list), append per batch the residual stream after the layer's attention on the student's
    ``channels`` [H'] (index tensor): its input plus the attention's output (the block joins the stream as it is,
    ``Family.mlp_residual``), taken on the way."""
    outs: list = []
    attention = layer.get_submodule(family.o_proj.split(".")[0])
    handle = None if mid is None else attention.register_forward_hook(lambda m, args, out: outs.append(out[0]))
    try:
        with torch.no_grad():
            for b, (hidden, kw) in enumerate(zip(batches, kwargs)):
                out = layer(hidden, **kw)
                if mid is not None:
                    mid.append((hidden + outs.pop())[..., channels])
                batches[b] = layer_output(out)
    finally:
        if handle is not None:
            handle.remove()
