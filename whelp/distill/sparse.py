"""Closed-form logit gradient of one chunk whose teachers are all sparse (cached) targets, or none (plain CE).

A cached target touches the student only through a few log-probs per row: the k listed ids and the tail
bucket (top-k), the S drawn ids (sampled), the label (CE). With s = log_softmax(x), x = z / T, p = exp(s):

    d s_i / dx    = e_i - p                                    (a listed, drawn or label id i)
    d s_tail / dx = p * notlisted / P_tail - p,   P_tail = sum_{j not listed} p_j

so with bucket gradients g taken by autograd over the small [c, k + 1] buckets alone,

    d loss / dx = sum_t (g_tail,t / P_tail,t) * p * notlisted_t  -  p * sum_b g_b  +  scatter_b(g_b).

That is an exp pass and two multiply-adds over [c, V] where autograd over log_softmax, scatter and logsumexp
takes several; it keeps a cached-KD step at the cost of a CE step (issue 5's <= 1.10x target). The values
equal ``losses.chunk_terms`` (the autograd reference, tested against each other and a naive fp32 loss).
CE uses the untempered logits, so at T != 1 its softmax is a second [c, V] pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from whelp.distill.divergences import LOSSES, LossSpec, SparseTarget, combine


def _softmax_(x: Tensor, ids: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """Overwrites logits x [c, V] with softmax(x); returns it and the log-probs [c, m] at each ids [c, m].
    Like log_softmax, log-probs are taken relative to the row maximum (x - max is exact), not as x - lse,
    which loses the low bits when the logits are large; gathered before exp so that an id far below the
    maximum keeps a finite log-prob."""
    x.sub_(x.amax(-1, keepdim=True))
    gathered = [x.gather(1, i) for i in ids]
    total = x.exp_().sum(-1, keepdim=True)
    log_total = total.log()
    return x.div_(total), [g - log_total for g in gathered]


def _tail_mass(p: Tensor, ids: Tensor) -> Tensor:
    """[c] probability outside the listed ids [c, k] (unique per row), summed directly, not as 1 - listed,
    which would cancel when the listed ids hold almost all the mass. ``p`` is restored before returning."""
    listed = p.gather(1, ids)
    mass = p.scatter_(1, ids, 0.0).sum(-1)
    p.scatter_(1, ids, listed)
    return mass.clamp_min(torch.finfo(p.dtype).tiny)


def _bucket_terms(p: Tensor, target: SparseTarget, s_ids: Tensor, spec: LossSpec, want: bool):
    """(divergence sum, leaf bucket log-probs [c, k(+1)], tail mass [c] or None) of one sparse target."""
    if target.mode == "sample":  # cross-entropy on the draws minus the teacher entropy: unbiased forward KL
        s = s_ids.requires_grad_(want)
        return (-s.mean(-1) - target.entropy.to(p.device)).sum(), s, None
    logp = target.logp.to(p.device)
    if target.ids.shape[1] >= p.shape[1]:  # every id listed: no tail bucket
        s = s_ids.requires_grad_(want)
        return LOSSES[spec.name](s, logp, spec).sum(), s, None
    tail = _tail_mass(p, target.ids.to(p.device))
    s = torch.cat([s_ids, tail.log()[:, None]], 1).requires_grad_(want)
    t_tail = target.tail.to(p.device).clamp_min(torch.finfo(torch.float32).tiny).log()
    return LOSSES[spec.name](s, torch.cat([logp, t_tail[:, None]], 1), spec).sum(), s, tail


def _tail_gradient(p: Tensor, tails: list[tuple[Tensor, Tensor]]) -> Tensor:
    """sum_t ratio_t * p * notlisted_t [c, V] for (ids [c, k], ratio = g_tail / P_tail [c]) per top-k target.
    Listed entries are restored, never subtracted: ratio reaches 1e30 when the listed ids hold nearly all the
    student mass, and p_i * ratio - p_i * ratio would wipe out the rest of the gradient."""
    if not tails:
        return torch.zeros_like(p)
    dz = p * tails[0][1][:, None]
    dz.scatter_(1, tails[0][0], 0.0)
    for ids, ratio in tails[1:]:
        before = dz.gather(1, ids)
        dz.addcmul_(p, ratio[:, None]).scatter_(1, ids, before)
    return dz


def sparse_chunk(z: Tensor, targets: list[SparseTarget], weights: Tensor, spec: LossSpec,
                 labels: Tensor | None, want: bool):
    """(loss, per-teacher sums [n], CE sum or None, d loss / d z [c, V] or None) of one chunk.

    z [c, V] fp32 student logits (consumed: overwritten in place); targets hold the same c rows; labels [c]
    next-token ids with -100 = ignored; weights [n] the current teacher weights."""
    T = spec.temperature
    ids = [t.ids.to(z.device) for t in targets]
    p_ce = s_label = None
    if labels is not None:
        label_ids = labels.clamp_min(0)[:, None]
        if T != 1:  # CE on the untempered logits needs its own softmax
            p_ce, (s_label,) = _softmax_(z.clone(), [label_ids])
        else:
            ids.append(label_ids)
    p, logps = _softmax_(z.div_(T) if T != 1 else z, ids)
    if labels is not None and T == 1:
        p_ce, s_label = p, logps.pop()
    with torch.enable_grad():
        terms = [_bucket_terms(p, t, s, spec, want) for t, s in zip(targets, logps)]
        per = torch.stack([term[0] for term in terms]) if terms else z.new_zeros(0)
        ce = None
        if labels is not None:
            s_label = s_label.squeeze(1).requires_grad_(want and spec.ce_weight > 0)
            ce = -torch.where(labels != -100, s_label, 0.0).sum()
        loss = combine(per, ce, weights, spec)
        if not want:
            return loss, per, ce, None
        leaves = [term[1] for term in terms] + ([s_label] if s_label is not None and s_label.requires_grad else [])
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    tails = [(i, g[:, -1] / tail) for i, (_, _, tail), g in zip(ids, terms, grads)
             if g is not None and tail is not None]
    dz = _tail_gradient(p, tails)
    g_sum = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    adds = []
    for target_ids, g in zip(ids, grads[: len(terms)]):
        if g is not None:
            g_sum += g.sum(-1)
            adds.append((target_ids, g[:, : target_ids.shape[1]]))
    g_label = grads[len(terms)] if len(grads) > len(terms) else None
    if g_label is not None and T == 1:
        g_sum += g_label
        adds.append((label_ids, g_label[:, None]))
    dz.addcmul_(p, g_sum[:, None], value=-1)
    for target_ids, g in adds:
        dz.scatter_add_(1, target_ids, g)
    if T != 1:
        dz.div_(T)
        if g_label is not None:
            dz.add_(p_ce.mul_(-g_label[:, None]).scatter_add_(1, label_ids, g_label[:, None]))
    return loss, per, ce, dz
