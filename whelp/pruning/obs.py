"""Which units to keep when their map is refit afterwards: structured Optimal Brain Surgeon selection (pure math).

Pruning by importance ranks units (MLP neurons) by how much they carry and keeps the top; the refit that follows
(lsq.py) then compensates what was removed. Units that the others can stand in for are the cheap ones to remove,
and importance cannot see that. Structured OBS (ZipLM, Kurtic et al. NeurIPS 2023; SlimGPT, Ling et al. NeurIPS 2024;
the group form of Hassibi & Stork 1993) chooses the kept set for the refit itself: for the least-squares map
``min_W ||T - A W||^2 + lam ||W||^2`` over unit activations ``A`` [N, n] and target ``T`` [N, out], with
``G = A^T A + lam I`` and the optimum ``W = G^-1 A^T T`` [n, out], removing unit ``j`` and refitting the rest
optimally raises the error by exactly

    cost_j = ||W_j||^2 / [G^-1]_jj

and the optimum of the remaining units and the inverse of their Gram matrix follow in closed form
(``W -= G^-1[:, j] W_j / [G^-1]_jj``, the same rank-one update of ``G^-1``). Units are removed greedily, cheapest
first; ``group`` > 1 removes that many of the cheapest at once with the exact block update (Schur complement), which
turns ``n - k`` rank-one steps into ``(n - k) / group`` matrix products for wide layers (8B: n = 14,336).

The selection solves that ridge towards zero with ``lam`` from the full Gram's diagonal; the refit that follows
(lsq.py) pulls towards the sliced weights instead, with ``lam`` from the kept units' Gram. So the cost ranks the
removals by a proxy of the refit's own error, not by that error exactly (exact at ``damp`` -> 0, where the two agree).

Inputs are the moments only (``gram`` = A^T A [n, n], ``cross`` = A^T T [n, out], float64), so the statistics
accumulate over any number of calibration tokens in O(n^2) memory; a step costs O(n^2 group + n out).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from whelp.architecture import layer_output
from whelp.errors import WhelpError
from whelp.pruning.arch import Family
from whelp.pruning.layerwise import Stop, standing_in
from whelp.pruning.lsq import Moments

STEPS = 64  # removal steps per layer: the group size is ceil(removed / STEPS) (1 at or below 64 removed)
REFITS = ("lsq", "span", "span_attn")  # the reconstructions whose down_proj refit a selection chooses the neurons for


def obs_keep(gram: Tensor, cross: Tensor, keep: int, damp: float, group: int | None = None) -> Tensor:
    """The ``keep`` units [keep] (ascending) whose optimal refit leaves the least error, by greedy structured OBS.

    ``gram`` [n, n] = sum a a^T and ``cross`` [n, out] = sum a t^T over calibration tokens (float64);
    ``damp``: the ridge lam as a fraction of mean(diag gram) (it keeps G invertible for dead or collinear units);
    ``group``: units removed per step (1 is exact greedy; None: ceil((n - keep) / STEPS))."""
    n = len(gram)
    group = max(1, -(-(n - keep) // STEPS)) if group is None else group
    if not 0 < keep <= n or group < 1:
        raise WhelpError(f"OBS selection needs 0 < keep <= {n} and group >= 1 (got keep={keep}, group={group})")
    g = gram.double() + damp * gram.diagonal().double().mean().clamp_min(1e-30) * torch.eye(n, dtype=torch.float64)
    inv = torch.cholesky_inverse(torch.linalg.cholesky(g))
    w = inv @ cross.double()
    units = torch.arange(n)  # the units left (ascending), in the order of w's rows and inv's rows and columns
    while len(units) > keep:
        cost = w.square().sum(1) / inv.diagonal().clamp_min(1e-300)
        drop = torch.topk(cost, min(group, len(units) - keep), largest=False).indices
        w, inv, left = _remove(w, inv, drop)
        units = units[left]  # ``left`` ascends, so the units stay in order
    return units


def _remove(w: Tensor, inv: Tensor, drop: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(w, inv, left)``: the optimum and inverse Gram of the units left after removing the rows ``drop`` (exact
    block update), and the positions ``left`` of those units. Both shrink to the units left, so a step reads and
    writes only what is still alive (the last steps of a layer that keeps 854 of 1,536 neurons touch a third of the
    first one's inverse), in one gather and one in-place product."""
    left = torch.ones(len(inv), dtype=torch.bool)
    left[drop] = False
    left = left.nonzero().flatten()
    block = torch.linalg.inv(inv[drop][:, drop])  # [g, g]
    coef = inv[left][:, drop] @ block  # [m - g, g]
    w = w[left].addmm_(coef, w[drop], alpha=-1)
    inv = inv[left][:, left].addmm_(coef, inv[drop][:, left], alpha=-1)
    return w, inv, left


def plain_mlp(family: Family | None) -> bool:
    """Whether the family's MLP neurons are rows of gate/up and columns of down_proj alone (no experts, no fused
    gate_up), which is what ``select_mlp`` moves."""
    return (
        family is not None and not family.experts_key and all("gate_up" not in a for a in family.layer_tensors.values())
    )


def resolve_select(select: str, mode: str, family: Family | None) -> str:
    """The choice ``auto`` stands for: ``obs`` where a refit (``mode``: the resolved reconstruction, lsq or span)
    follows on a plain gated MLP, else ``importance``; other choices are themselves."""
    if select != "auto":
        return select
    return "obs" if mode in REFITS and plain_mlp(family) else "importance"


def selects(select: str, mode: str, family: Family | None) -> bool:
    """Whether the OBS selection runs: ``select`` resolves to obs and a refit (``mode``) follows. An explicit obs
    without a refit never runs: ``check_select`` refuses it first."""
    return mode in REFITS and resolve_select(select, mode, family) == "obs"


def check_select(mode: str, cfg, family: Family | None) -> None:
    """Refuse ``--select obs`` where no refit follows (``mode``: the resolved reconstruction) or the MLP is not a
    plain gated one (experts, a fused gate_up), before any weight is read."""
    if family is None:
        raise WhelpError(
            f"--select obs chooses MLP neurons for a refit, and {cfg.model_type} is pruned by the generic path, which "
            "has none; use --select importance"
        )
    if mode not in REFITS:
        raise WhelpError(
            f"--select obs chooses MLP neurons for the refit and --reconstruct is {mode}; "
            "use --reconstruct lsq or span (or auto), or --select importance"
        )
    if not plain_mlp(family):
        raise WhelpError(
            f"--select obs chooses the neurons of a plain gated MLP and {cfg.model_type} has "
            f"{'experts' if family.experts_key else 'a fused gate_up projection'}; use --select importance"
        )


def mlp_moments(student_layer, wide_layer, family: Family, batches, kwargs, span_end) -> tuple[Moments, list | None]:
    """The moments (lsq.Moments, float64) of the down_proj refit over *every* wide (teacher) MLP neuron, fed the
    student's input to its MLP (after the student's own, already refit, attention): ``x`` the neurons' activations
    [n], ``h`` the refit's target itself [out] (identity weight): the teacher's residual stream at the span's end
    minus the student's residual stream before its MLP (``span_end`` given, one [B, T, H'] per batch), else the wide
    MLP's own output (``lsq``), a down_proj bias taken out of both. The student's MLP does not run: a stand-in takes
    its input and adds nothing to the residual stream (``span``: the layer's output is then that stream, as
    ``Family.mlp_residual`` promises) or ends the layer there (``lsq``). The selection reads ``gram`` and ``cross``;
    the refit of the neurons it keeps reads their sub-block (``kept_moments``), the same sums a pass over the kept
    neurons alone would give, so the layer is not run again for them. Per batch: the student's attention and one
    wide MLP forward. Returns the moments and, with ``span_end``, per batch the residual stream before the MLP
    [B, T, H'] and every wide neuron's activation [B, T, n]: the refit layer's output is that stream plus its
    down_proj of the kept neurons' activations, so it is not run again either (reconstruct.py)."""
    block = family.down_proj.rsplit(".", 1)[0]
    mlp, wide_mlp = student_layer.get_submodule(block), wide_layer.get_submodule(block)
    down = wide_layer.get_submodule(family.down_proj)
    moments = Moments.empty(down.out_features, down.in_features)
    seen: dict = {}
    parts = None if span_end is None else []

    def stand_in(x, *args, **kw):
        seen["x"] = x
        if span_end is None:
            raise Stop
        return torch.zeros_like(x)

    handle = down.register_forward_pre_hook(lambda m, args: seen.update(a=args[0]))
    try:
        with standing_in([(mlp, stand_in)]):
            for b, (hidden, kw) in enumerate(zip(batches, kwargs)):
                with torch.no_grad():
                    with contextlib.suppress(Stop):
                        residual = layer_output(student_layer(hidden, **kw))
                    wide_out = wide_mlp(seen["x"])
                target = wide_out if span_end is None else span_end[b] - residual
                if down.bias is not None:  # in both outputs: what the neurons must supply is the rest
                    target = target - down.bias
                moments.add(target, seen["a"], None)
                if parts is not None:
                    parts.append((residual, seen["a"]))
    finally:
        handle.remove()
    return moments, parts


def kept_moments(m: Moments, kept: Tensor) -> Moments:
    """The moments of the refit over the ``kept`` neurons [k] alone: sub-blocks of ``m`` over every neuron."""
    return Moments(
        cross=m.cross[:, kept],
        gram=m.gram[kept][:, kept],
        h_sum=m.h_sum,
        x_sum=m.x_sum[kept],
        target_sq=m.target_sq,
        count=m.count,
    )


def select_mlp(
    student_layer, wide_layer, family: Family, batches, kwargs, span_end, damp: float
) -> tuple[Tensor, Moments | None, list | None]:
    """Choose the student layer's MLP neurons by structured OBS and load them from the wide layer (every teacher
    neuron, on the student's hidden channels) in place: gate/up rows and down_proj columns, biases too. Returns the
    kept teacher neuron ids [I'] (ascending), the down_proj refit's moments over them (``kept_moments``; the
    refit follows in reconstruct.py) and ``mlp_moments``' parts of the layer's output (None without ``span_end``).
    A layer that keeps every neuron (a depth-only prune) has nothing to choose: its moments are not gathered
    (None, None)."""
    width, keep = (layer.get_submodule(family.down_proj).in_features for layer in (wide_layer, student_layer))
    if keep == width:
        kept, moments, parts = torch.arange(width), None, None
    else:
        full, parts = mlp_moments(student_layer, wide_layer, family, batches, kwargs, span_end)
        kept = obs_keep(full.gram, full.cross.T, keep, damp)
        moments = kept_moments(full, kept)
    params = dict(wide_layer.named_parameters())
    with torch.no_grad():
        for name, axes in family.layer_tensors.items():
            if "mlp" in axes and name in params:
                student_layer.get_parameter(name).copy_(params[name].index_select(axes.index("mlp"), kept))
    return kept, moments, parts
