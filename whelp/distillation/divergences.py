"""Divergences between student and teacher next-token distributions, and the specs that select them.

Every divergence in ``LOSSES`` is a pure function ``fn(s, t, spec) -> [n]`` on student log-probs ``s`` and
teacher log-probs ``t`` of shape [n, V] (or [n, k + 1] buckets of a cached top-k target) at temperature T:

* ``forward_kl``  KL(p_t || p_s)   Hinton et al. 2015 (default; mode-covering)
* ``reverse_kl``  KL(p_s || p_t)   Gu et al. 2024, MiniLLM (mode-seeking)
* ``jsd``         beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s  (Agarwal et al. 2024, GKD)
* ``skew_kl``     KL(p_t || alpha p_t + (1 - alpha) p_s)    Ko et al. 2024, DistiLLM
* ``tvd``         0.5 sum |p_t - p_s|                       (Wen et al. 2023, f-divergence KD)

``whelp.distillation.losses`` evaluates them in token chunks from hidden states.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from whelp.specs import LOSSES as LOSS_NAMES
from whelp.specs import LossSpec

NEG_INF = float("-inf")


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """sum_v p (log p - log q) over the last dim: [n]; terms with p = 0 are exactly 0 (0 log 0 = 0)."""
    terms = logp.exp() * (logp - logq)
    return torch.where(logp == NEG_INF, torch.zeros((), dtype=terms.dtype), terms).sum(-1)


def forward_kl(s: Tensor, t: Tensor, spec: LossSpec) -> Tensor:
    return _kl(t, s)


def reverse_kl(s: Tensor, t: Tensor, spec: LossSpec) -> Tensor:
    return _kl(s, t)


def jsd(s: Tensor, t: Tensor, spec: LossSpec) -> Tensor:
    b = spec.beta
    m = torch.logaddexp(t + math.log(b), s + math.log(1 - b))
    return b * _kl(t, m) + (1 - b) * _kl(s, m)


def skew_kl(s: Tensor, t: Tensor, spec: LossSpec) -> Tensor:
    if spec.alpha == 0:
        return _kl(t, s)
    m = torch.logaddexp(t + math.log(spec.alpha), s + math.log(1 - spec.alpha))
    return _kl(t, m)


def tvd(s: Tensor, t: Tensor, spec: LossSpec) -> Tensor:
    return 0.5 * (t.exp() - s.exp()).abs().sum(-1)


LOSSES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd, "skew_kl": skew_kl, "tvd": tvd}
assert tuple(LOSSES) == LOSS_NAMES  # the spec validates names against the same list


def combine(per: Tensor, ce: Tensor | None, weights: Tensor, spec: LossSpec) -> Tensor:
    """The scalar loss from per-teacher divergence sums ``per`` [n_teachers] and the CE sum (see LossSpec)."""
    scale = spec.temperature**2 if spec.t2_scale else 1.0
    total = (1 - spec.ce_weight) * scale * (weights * per).sum()
    if spec.ce_weight:
        total = total + spec.ce_weight * ce
    return total


Transform = Callable[[Tensor], Tensor]  # fp32 [c, V] -> [c, V], elementwise: whelp.architecture.logit_transform


def head_logits(hidden: Tensor, weight: Tensor, transform: Transform | None = None) -> Tensor:
    """The logits of one chunk as the model's own forward makes them: fp32 ``hidden`` [c, H] @ ``weight`` [V, H]^T,
    then the family's ``transform`` (Granite's logits_scaling, Cohere's logit_scale, Gemma 2/3's final soft-capping;
    None: the matmul alone). Differentiable; every logit of the fused losses (students, live teachers) is made here."""
    z = hidden.float() @ weight.float().T
    return z if transform is None else transform(z)


@dataclass(frozen=True)
class LiveTarget:
    """A teacher run live on the same tokens."""

    hidden: Tensor  # [N, Ht] teacher final hidden states (after the final norm), no grad
    weight: Tensor  # [Vt, Ht] teacher lm_head weight
    transform: Transform | None = None  # the teacher family's logit transform (``head_logits``), None: identity

    def logits(self) -> Tensor:
        """fp32 [N, Vt] teacher logits, the family's transform applied."""
        return head_logits(self.hidden, self.weight, self.transform)


@dataclass(frozen=True)
class SparseTarget:
    """Cached teacher targets for N positions, at the cache's ``temperature`` (see whelp.distillation.cache).

    ``topk``:   ids [N, k] top-k token ids, ``logp`` [N, k] their teacher log-probs, ``tail`` [N] the teacher
                mass outside them, used as one extra bucket (student: its mass outside the same ids).
    ``sample``: ids [N, S] S draws from the teacher distribution (repeats carry the counts), ``entropy`` [N]
                the teacher entropy in nats. mean_j -log p_s(id_j) - H(p_t) is an unbiased estimate of
                KL(p_t || p_s) and its gradient (Anshumann et al., ACL 2025); only forward KL has one.
    """

    mode: str  # "topk" | "sample"
    ids: Tensor  # LongTensor [N, K]
    temperature: float
    vocab_size: int  # width of the teacher distribution the ids index
    logp: Tensor | None = None  # topk: fp32 [N, k]
    tail: Tensor | None = None  # topk: fp32 [N]
    entropy: Tensor | None = None  # sample: fp32 [N]

    def rows(self, index) -> SparseTarget:
        def pick(x):
            return None if x is None else x[index]

        return SparseTarget(
            self.mode,
            self.ids[index],
            self.temperature,
            self.vocab_size,
            pick(self.logp),
            pick(self.tail),
            pick(self.entropy),
        )
