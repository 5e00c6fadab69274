"""Closed-form d loss / d logits of one chunk, so that autograd never runs over a [c, V] tensor.

With x = z / T the student's tempered logits, s = log_softmax(x) and p = exp(s):

* a cached target touches the student only through a few log-probs per row, the k listed ids and the tail
  bucket (top-k) or the S drawn ids (sampled); the label does the same for CE. Since
      d s_i / dx    = e_i - p                                  (a listed, drawn or label id i)
      d s_tail / dx = p * notlisted / P_tail - p,  P_tail = sum_{j not listed} p_j,
  bucket gradients g taken by autograd over the small [c, k + 1] buckets alone give
      d loss / dx = sum_t (g_tail,t / P_tail,t) p notlisted_t  -  p sum_b g_b  +  scatter_b(g_b);
* a live teacher under forward KL (the default divergence) has d KL(p_t || p_s) / dx = p - p_t, scaled by the
  teacher's coefficient in the loss.

That is an exp pass and a few multiply-adds over [c, V] where autograd over log_softmax, the divergence and
their backward takes a dozen, and it keeps two [c, V] fp32 tensors alive instead of about eight: a cached KD
step costs what a CE step does, and a live one what CE plus the teacher forward does (bench/kd_step.py measures both). Other
divergences with live teachers go through autograd (``losses.chunk_terms``). Values match that reference and a
fp64 one (tests/test_losses.py). CE uses the untempered logits, so at T != 1 its softmax is a second pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from whelp.distillation.divergences import LOSSES, LiveTarget, LossSpec, SparseTarget, combine


def supported(targets, spec: LossSpec) -> bool:
    return spec.name == "forward_kl" or all(isinstance(t, SparseTarget) for t in targets)


def _shift_(x: Tensor) -> Tensor:
    """x [c, V] minus its row maximum, in place: log-probs relative to it keep their low bits (as log_softmax)."""
    return x.sub_(x.amax(-1, keepdim=True))


def _normalize_(x: Tensor) -> Tensor:
    """Shifted logits [c, V] -> softmax in place; returns the log normaliser [c, 1] (log-probs = x - it)."""
    total = x.exp_().sum(-1, keepdim=True)
    x.div_(total)
    return total.log()


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """sum_v a * b per row [c], without a [c, V] product tensor."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _dense_forward_kl(x: Tensor, target: LiveTarget, T: float, block: int = 4096) -> tuple[Tensor, Tensor]:
    """A live teacher's p_t [c, V] and sum_v p_t (t_v - x_v) - log Z_t [c], where t, x are the shifted teacher
    and student logits / T: KL(p_t || p_s) is that plus the student's log normaliser. The sum runs over column
    blocks of ``block`` ids, so only the teacher's [c, V] tensor exists beside the student's; differencing the
    logits before normalising makes KL(p || p) exactly 0."""
    t = target.logits()
    t = _shift_(t.div_(T) if T != 1 else t)
    cross = sum(
        _rowdot(t[:, v : v + block].exp(), t[:, v : v + block] - x[:, v : v + block])
        for v in range(0, t.shape[1], block)
    )
    total = t.exp_().sum(-1)
    return cross / total - total.log(), t.div_(total[:, None])


def _tail_mass(p: Tensor, ids: Tensor) -> Tensor:
    """[c] probability outside the listed ids [c, k] (unique per row), summed directly, not as 1 - listed,
    which would cancel when the listed ids hold almost all the mass. ``p`` is restored before returning."""
    listed = p.gather(1, ids)
    mass = p.scatter_(1, ids, 0.0).sum(-1)
    p.scatter_(1, ids, listed)
    return mass.clamp_min(torch.finfo(p.dtype).tiny)


def _bucket_terms(p: Tensor, target: SparseTarget, ids: Tensor, s_ids: Tensor, spec: LossSpec, want: bool):
    """(divergence sum, leaf bucket log-probs [c, k(+1)], tail mass [c] or None) of one sparse target whose
    ids [c, k] are already on p's device."""
    if target.mode == "sample":  # cross-entropy on the draws minus the teacher entropy: unbiased forward KL
        s = s_ids.requires_grad_(want)
        return (-s.mean(-1) - target.entropy.to(p.device)).sum(), s, None
    logp = target.logp.to(p.device)
    if target.ids.shape[1] >= p.shape[1]:  # every id listed: no tail bucket
        s = s_ids.requires_grad_(want)
        return LOSSES[spec.name](s, logp, spec).sum(), s, None
    tail = _tail_mass(p, ids)
    s = torch.cat([s_ids, tail.log()[:, None]], 1).requires_grad_(want)
    t_tail = target.tail.to(p.device).clamp_min(torch.finfo(torch.float32).tiny).log()
    return LOSSES[spec.name](s, torch.cat([logp, t_tail[:, None]], 1), spec).sum(), s, tail


def _tail_gradient(p: Tensor, tails: list[tuple[Tensor, Tensor]]) -> Tensor | None:
    """sum_t ratio_t * p * notlisted_t [c, V] for (ids [c, k], ratio = g_tail / P_tail [c]) per top-k target.
    Listed entries are restored, never subtracted: ratio reaches 1e30 when the listed ids hold nearly all the
    student mass, and p_i * ratio - p_i * ratio would wipe out the rest of the gradient."""
    if not tails:
        return None
    dz = p * tails[0][1][:, None]
    dz.scatter_(1, tails[0][0], 0.0)
    for ids, ratio in tails[1:]:
        before = dz.gather(1, ids)
        dz.addcmul_(p, ratio[:, None]).scatter_(1, ids, before)
    return dz


def closed_form_chunk(z: Tensor, targets: list, weights: Tensor, spec: LossSpec, labels: Tensor | None, want: bool):
    """(loss, per-teacher sums [n], CE sum or None, d loss / d z [c, V] or None) of one chunk.

    z [c, V] fp32 student logits (consumed: overwritten in place); targets hold the same c rows (live ones with
    fp32 lm_head weights cut to V); labels [c] next-token ids, -100 = ignored; weights [n] teacher weights."""
    T = spec.temperature
    s_label = label_ids = p_ce = None
    if labels is not None:
        label_ids = labels.clamp_min(0)[:, None]
        if T != 1:  # CE on the untempered logits needs its own softmax
            p_ce = _shift_(z.clone())
            s_label = p_ce.gather(1, label_ids)
            s_label = s_label - _normalize_(p_ce)
    x = _shift_(z.div_(T) if T != 1 else z)
    ids = [t.ids.to(x.device) if isinstance(t, SparseTarget) else None for t in targets]
    gathered = [None if i is None else x.gather(1, i) for i in ids]
    dense = [_dense_forward_kl(x, t, T) if isinstance(t, LiveTarget) else None for t in targets]
    if labels is not None and T == 1:
        s_label = x.gather(1, label_ids)
    log_z = _normalize_(x)  # x is now p
    if labels is not None and T == 1:
        s_label, p_ce = s_label - log_z, x
    with torch.enable_grad():
        terms = [
            _bucket_terms(x, t, i, g - log_z, spec, want)
            if d is None
            else ((d[0] + log_z.view(-1)).sum().requires_grad_(want),) * 2 + (None,)
            for t, i, g, d in zip(targets, ids, gathered, dense)
        ]
        per = torch.stack([term[0] for term in terms]) if terms else z.new_zeros(0)
        ce = None
        if labels is not None:
            s_label = s_label.squeeze(1).requires_grad_(want and spec.ce_weight > 0)
            ce = -torch.where(labels != -100, s_label, 0.0).sum()
        loss = combine(per, ce, weights, spec)
        if not want:
            return loss, per, ce, None
        leaves = [term[1] for term in terms] + ([s_label] if ce is not None and s_label.requires_grad else [])
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    g_label = grads[len(terms)] if len(grads) > len(terms) else None
    dz = _assemble(x, ids, dense, terms, grads[: len(terms)], label_ids if T == 1 else None, g_label)
    if T != 1:
        dz.div_(T)
        if g_label is not None:
            dz.add_(p_ce.mul_(-g_label[:, None]).scatter_add_(1, label_ids, g_label[:, None]))
    return loss, per, ce, dz


def _assemble(p: Tensor, ids: list, dense: list, terms: list, grads: tuple, label_ids, g_label) -> Tensor:
    """d loss / dx [c, V] from the student probabilities p (consumed) and the per-target gradients (module
    docstring); the label enters like a one-id bucket when CE shares the tempered softmax (T = 1)."""
    dz = _tail_gradient(
        p, [(i, g[:, -1] / term[2]) for i, term, g in zip(ids, terms, grads) if g is not None and term[2] is not None]
    )
    g_sum = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
    adds = []
    for i, d, g in zip(ids, dense, grads):
        if g is None:
            continue
        if d is not None:  # live teacher, forward KL: coefficient * (p - p_t)
            g_sum -= g
            dz = d[1].mul_(-g) if dz is None else dz.sub_(d[1].mul_(g))
        else:
            g_sum += g.sum(-1)
            adds.append((i, g[:, : i.shape[1]]))
    if g_label is not None and label_ids is not None:
        g_sum += g_label
        adds.append((label_ids, g_label[:, None]))
    if dz is None:  # no tail bucket and no live teacher: p itself becomes the gradient
        dz = p.mul_(-g_sum[:, None])
    else:
        dz.addcmul_(p, g_sum[:, None], value=-1)
    for i, g in adds:
        dz.scatter_add_(1, i, g)
    return dz
