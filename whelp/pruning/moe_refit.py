"""Reconstruction of a mixture-of-experts block after pruning (``--reconstruct lsq|span`` on Mixtral, Qwen2-MoE and
Qwen3-MoE): every kept expert's down projection, and the shared expert's, refit so the *block* does what the
teacher's did.

A block's output on token ``t`` is ``y_t = sum_e g_e(t) D_e a_e(t) [+ s(t) D_sh a_sh(t)]``: the routed experts' down
projections ``D_e`` [H', I'] of their FFN activations ``a_e`` [I'] times the routing weight ``g_e``, plus Qwen2-MoE's
shared expert under its sigmoid gate ``s``. Its target ``T_t`` is, for ``lsq``, the *wide* block's output (the
teacher's block with every expert and FFN neuron, sliced to the student's hidden channels, on the student's input, with
the teacher's own router), and for ``span`` what the block must add to the layer's attention output for the layer to
reach the teacher's residual stream at the end of its span (reconstruct.py). A per-expert fit to the wide expert
would restore removed FFN neurons only; the block target also compensates removed experts, whose tokens the router
now sends elsewhere, and the routing weights' renormalisation.

The joint least squares over all experts is ``(E' I')^2`` (19 GB in float64 for Qwen3-30B-A3B's 64 x 768), so it is
solved by one sweep of block coordinate descent: each expert in turn gets the ridge refit of lsq.py (towards its
current weights) on the residual the others leave on its tokens,
``min_D sum_{t in X_e} || T_t - y_t + g_e(t) D_e a_e(t) - D g_e(t) a_e(t) ||^2``, and the block's output is updated
before the next expert. Each step is kept only where it lowers its tokens' error, so the block's calibration error
never rises. An expert no calibration token is routed to keeps its weights.

Memory per layer: the block's inputs, targets and outputs over the calibration tokens (3 x [N, H']) and one expert's
float64 moments ([H', I'] + [I', I']); time: one FFN forward per routed token and expert, twice, plus a solve each.
"""

from __future__ import annotations

import torch
from torch import Tensor

from whelp.architecture import layer_output
from whelp.pruning.lsq import DAMP, Moments, refit
from whelp.pruning.moe import expert_activations, expert_inputs


def _routed(block, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, top_k_index, top_k_weights)`` of ``block`` on tokens ``x`` [N, H]: its output [N, H] and the routing
    its router chose (read where the block hands them to its experts, the signature every family shares)."""
    seen = []
    handle = block.experts.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(expert_inputs(args, kwargs)), with_kwargs=True
    )
    try:
        with torch.no_grad():
            y = block(x[None]).reshape(x.shape)
    finally:
        handle.remove()
    return y, seen[0][1], seen[0][2]


def _expert_features(experts, x: Tensor, index: Tensor, weights: Tensor, e: int) -> tuple[Tensor, Tensor]:
    """``(tokens, g a_e)``: the tokens routed to expert ``e`` and its FFN activations [n, I'] times their routing
    weight, in float32."""
    token, slot = torch.where(index == e)
    return token, weights[token, slot].float()[:, None] * expert_activations(experts, x[token], e)


def _shared_features(block, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(tokens, s a_sh)``: every token and the shared expert's activations [N, I_sh] times its sigmoid gate."""
    mlp = block.shared_expert
    act = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    return torch.arange(len(x)), torch.sigmoid(block.shared_expert_gate(x)) * act


def _coordinates(block) -> list:
    """One ``(weight, features(x, index, weights))`` per map refit: each expert's down projection [H', I'] (a view
    of the fused tensor), then the shared expert's."""
    experts = block.experts
    coords = [
        (experts.down_proj.data[e], lambda x, i, w, e=e: _expert_features(experts, x, i, w, e))
        for e in range(experts.down_proj.shape[0])
    ]
    if hasattr(block, "shared_expert"):
        coords.append((block.shared_expert.down_proj.weight.data, lambda x, i, w: _shared_features(block, x)))
    return coords


def _sq(tensors: list[Tensor]) -> float:
    return sum(float(t.double().square().sum()) for t in tensors)


@torch.no_grad()
def refit_block(block, inputs: list[Tensor], targets: list[Tensor], damp: float = DAMP) -> dict:
    """Refit ``block``'s down projections in place (one coordinate-descent sweep, module docstring) so its output
    on ``inputs`` (the block's input per batch, [N, H']) approaches ``targets`` ([N, H'] each). Returns the
    relative calibration error of the block's output before and after."""
    routed = [_routed(block, x) for x in inputs]
    outputs = [y.float().clone() for y, _, _ in routed]
    scale = max(_sq(targets), 1e-30)
    before = _sq([t - y for t, y in zip(targets, outputs)]) / scale
    for weight, features in _coordinates(block):
        feats = [features(x, index, w) for x, (_, index, w) in zip(inputs, routed)]
        moments = Moments.empty(weight.shape[0], weight.shape[1])
        for (token, f), target, y in zip(feats, targets, outputs):
            if len(token):
                moments.add(target[token].float() - y[token] + f @ weight.float().T, f, None)
        if moments.count == 0:
            continue
        fitted, _, _ = refit(None, weight, moments, "lsq", damp)
        delta = (fitted.float() - weight.float()).T
        for (token, f), y in zip(feats, outputs):
            y.index_add_(0, token, f @ delta)
        weight.copy_(fitted)
    after = _sq([t - y for t, y in zip(targets, outputs)]) / scale
    return {"before": before, "after": after}


def block_io(layer, batches: list[Tensor], kwargs: list[dict]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """``(inputs, outputs, layer_outputs)`` per batch: what the layer's MoE block receives and returns (flattened
    to [N, H']) and the layer's own output [B, T, H'], from one forward of the layer each."""
    inputs, outputs, finals = [], [], []

    def grab(module, args, out):
        inputs.append(args[0].reshape(-1, args[0].shape[-1]).detach())
        outputs.append(out.reshape(-1, out.shape[-1]).detach().float())

    handle = layer.mlp.register_forward_hook(grab)
    try:
        with torch.no_grad():
            for hidden, kw in zip(batches, kwargs):
                finals.append(layer_output(layer(hidden, **kw)))
    finally:
        handle.remove()
    return inputs, outputs, finals


def block_targets(
    layer, wide_layer, batches: list[Tensor], kwargs: list[dict], span_end: list[Tensor] | None
) -> tuple[list[Tensor], list[Tensor]]:
    """``(inputs, targets)`` of the block of ``layer`` per batch: ``span`` (``span_end`` given, the teacher's
    residual stream at the span's end [B, T, H']): ``end - (layer output - block output)``; else the wide layer's
    block on the same input."""
    inputs, outputs, finals = block_io(layer, batches, kwargs)
    if span_end is not None:
        targets = [
            (end.reshape(y.shape).float() - final.reshape(y.shape).float() + y)
            for end, final, y in zip(span_end, finals, outputs)
        ]
    else:
        with torch.no_grad():
            targets = [wide_layer.mlp(x[None]).reshape(x.shape).float() for x in inputs]
    return inputs, targets
