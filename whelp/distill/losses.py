"""Knowledge-distillation losses computed in token chunks, so no [N, V] tensor ever exists.

Divergences (``LOSSES``) are pure functions ``fn(s, t, spec) -> [n]`` on student log-probs ``s`` and
teacher log-probs ``t`` of shape [n, V] (or [n, k + 1] buckets of a cached top-k target) at temperature T:

* ``forward_kl``  KL(p_t || p_s)   Hinton et al. 2015 (default; mode-covering)
* ``reverse_kl``  KL(p_s || p_t)   Gu et al. 2024, MiniLLM (mode-seeking)
* ``jsd``         beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s  (Agarwal et al. 2024, GKD)
* ``skew_kl``     KL(p_t || alpha p_t + (1 - alpha) p_s)    Ko et al. 2024, DistiLLM
* ``tvd``         0.5 sum |p_t - p_s|                       (Wen et al. 2023, f-divergence KD)

``kd_loss`` evaluates them from the student's final hidden states and lm_head weight. A custom autograd
function walks over chunks of ``chunk_size`` tokens: each chunk's student logits (and each live teacher's)
are formed, the loss and d loss / d logits are taken, and the chunk's gradient is pushed at once into
d hidden [N, Hs] and d weight [V, Hs] (the approach of Liger-Kernel's fused linear losses, Hsu et al. 2024).
Gradients are formed in the forward pass rather than recomputed in backward because recomputation would
run every teacher's lm_head twice (1.6x the matmul FLOPs of a naive step instead of 1.0x). Peak extra memory
is a few [chunk_size, V] fp32 tensors, independent of N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from whelp.errors import WhelpError

NEG_INF = float("-inf")


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """sum_v p (log p - log q) over the last dim: [n]; terms with p = 0 are exactly 0 (0 log 0 = 0)."""
    terms = logp.exp() * (logp - logq)
    return torch.where(logp == NEG_INF, torch.zeros((), dtype=terms.dtype), terms).sum(-1)


def forward_kl(s: Tensor, t: Tensor, spec: "LossSpec") -> Tensor:
    return _kl(t, s)


def reverse_kl(s: Tensor, t: Tensor, spec: "LossSpec") -> Tensor:
    return _kl(s, t)


def jsd(s: Tensor, t: Tensor, spec: "LossSpec") -> Tensor:
    b = spec.beta
    m = torch.logaddexp(t + math.log(b), s + math.log(1 - b))
    return b * _kl(t, m) + (1 - b) * _kl(s, m)


def skew_kl(s: Tensor, t: Tensor, spec: "LossSpec") -> Tensor:
    if spec.alpha == 0:
        return _kl(t, s)
    m = torch.logaddexp(t + math.log(spec.alpha), s + math.log(1 - spec.alpha))
    return _kl(t, m)


def tvd(s: Tensor, t: Tensor, spec: "LossSpec") -> Tensor:
    return 0.5 * (t.exp() - s.exp()).abs().sum(-1)


LOSSES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd, "skew_kl": skew_kl, "tvd": tvd}


@dataclass(frozen=True)
class LossSpec:
    """How student and teacher distributions are compared.

    loss = (1 - ce_weight) * sum_i w_i * c * KD_i + ce_weight * CE, with c = T^2 if ``t2_scale`` (Hinton et al.
    2015: keeps gradient magnitudes comparable across temperatures) else 1. CE uses the untempered student.
    ``vocab_size``: the tokenizer's vocabulary when an lm_head is padded (e.g. 49152 real ids in 49216 rows);
    ids at or above it are excluded from every softmax, which is exactly masking their logits to -inf.
    """

    name: str = "forward_kl"
    temperature: float = 1.0
    t2_scale: bool = False
    beta: float = 0.5
    alpha: float = 0.1
    ce_weight: float = 0.0
    chunk_size: int = 1024
    vocab_size: int | None = None

    def __post_init__(self):
        checks = [
            (self.name in LOSSES, f"unknown loss '{self.name}'; choose one of {', '.join(LOSSES)}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (0 < self.beta < 1, f"jsd beta must be in (0, 1), got {self.beta}"),
            (0 <= self.alpha < 1, f"skew_kl alpha must be in [0, 1), got {self.alpha}"),
            (0 <= self.ce_weight <= 1, f"ce_weight must be in [0, 1], got {self.ce_weight}"),
            (self.chunk_size >= 1, f"chunk_size must be >= 1, got {self.chunk_size}"),
            (self.vocab_size is None or self.vocab_size >= 1, f"vocab_size must be >= 1, got {self.vocab_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise WhelpError(message)


@dataclass(frozen=True)
class LiveTarget:
    """A teacher run live on the same tokens."""

    hidden: Tensor  # [N, Ht] teacher final hidden states (after the final norm), no grad
    weight: Tensor  # [Vt, Ht] teacher lm_head weight


@dataclass(frozen=True)
class SparseTarget:
    """Cached teacher targets for N positions, at the cache's ``temperature`` (see whelp.distill.cache).

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

    def rows(self, index) -> "SparseTarget":
        pick = (lambda x: None if x is None else x[index])
        return SparseTarget(self.mode, self.ids[index], self.temperature, self.vocab_size,
                            pick(self.logp), pick(self.tail), pick(self.entropy))


@dataclass(frozen=True)
class KDResult:
    loss: Tensor  # scalar with grad: SUM over unmasked tokens (the caller divides by its global token count)
    per_teacher: tuple[Tensor, ...]  # detached per-teacher divergence sums (no weight, no T^2)
    ce: Tensor | None  # detached CE sum over unmasked tokens with a label (if labels given)
    tokens: int  # unmasked tokens


def _target_rows(target, index):
    if isinstance(target, LiveTarget):
        return LiveTarget(target.hidden[index], target.weight)
    return target.rows(index)


def _effective_vocab(student_rows: int, targets, spec: LossSpec) -> int:
    """The shared vocabulary width; refuses vocabularies that differ beyond padding."""
    vocab = spec.vocab_size or student_rows
    if vocab > student_rows:
        raise WhelpError(f"LossSpec.vocab_size={vocab} exceeds the student's {student_rows} lm_head rows")
    for i, target in enumerate(targets):
        width = target.weight.shape[0] if isinstance(target, LiveTarget) else target.vocab_size
        if width < vocab:
            raise WhelpError(f"teacher {i} has a {width}-token vocabulary but the student uses {vocab}: the "
                             "vocabularies differ, so token-level distillation is undefined; use a teacher "
                             "with the student's tokenizer")
        if width != student_rows and spec.vocab_size is None:
            raise WhelpError(f"teacher {i} has {width} vocabulary rows, the student {student_rows}; if one lm_head "
                             "is padded, set LossSpec.vocab_size to the tokenizer's vocabulary size")
        if isinstance(target, SparseTarget):
            _check_sparse(target, spec, vocab, i)
    return vocab


def _check_sparse(target: SparseTarget, spec: LossSpec, vocab: int, i: int) -> None:
    if target.mode == "sample" and spec.name != "forward_kl":
        raise WhelpError(f"teacher {i} is a sampled cache, which estimates only forward_kl without bias "
                         f"(Anshumann et al. 2025), not '{spec.name}'; use forward_kl or a top-k cache")
    if not math.isclose(target.temperature, spec.temperature):
        raise WhelpError(f"teacher {i} was cached at temperature {target.temperature} but the loss uses "
                         f"{spec.temperature}; use the cache's temperature or rebuild the cache")
    if target.ids.numel() and int(target.ids.max()) >= vocab:
        raise WhelpError(f"teacher {i} targets token id {int(target.ids.max())} outside the student's vocabulary "
                         f"of {vocab}")


def _support(target, s_full: Tensor, scaled: Tensor, vocab: int, T: float) -> tuple[Tensor, Tensor | None]:
    """(student, teacher) log-probs on a common support: [c, vocab] for a live teacher, [c, k + 1] buckets for
    a top-k target (k listed ids + the tail), [c, S] student log-probs of the draws (teacher None) when sampled.

    ``s_full`` [c, vocab] is log_softmax of ``scaled`` = student logits / T (fp32, requires grad)."""
    if isinstance(target, LiveTarget):
        t_z = target.hidden.float() @ target.weight.T
        return s_full, torch.log_softmax(t_z / T if T != 1 else t_z, dim=-1)
    ids = target.ids.to(s_full.device)
    s_ids = s_full.gather(1, ids)
    if target.mode == "sample":
        return s_ids, None
    logp = target.logp.to(s_full.device)
    if ids.shape[1] >= vocab:  # every id is listed: no tail bucket
        return s_ids, logp
    s_tail = torch.logsumexp(scaled.scatter(1, ids, NEG_INF), dim=-1) - torch.logsumexp(scaled, dim=-1)
    # a tail stored as 0 is below fp16 resolution, not impossible: flooring it keeps reverse KL finite
    t_tail = target.tail.to(s_full.device).clamp_min(torch.finfo(torch.float32).tiny).log()
    return torch.cat([s_ids, s_tail[:, None]], 1), torch.cat([logp, t_tail[:, None]], 1)


def chunk_terms(z: Tensor, targets, spec: LossSpec, vocab: int, labels: Tensor | None):
    """Per-teacher divergence sums [n_teachers] and CE sum of one chunk from its fp32 student logits ``z``."""
    scaled = z / spec.temperature if spec.temperature != 1 else z
    s_full = torch.log_softmax(scaled, dim=-1)
    per = []
    for target in targets:
        s, t = _support(target, s_full, scaled, vocab, spec.temperature)
        if t is None:  # sampled: cross-entropy on the draws minus the teacher entropy
            per.append((-s.mean(-1) - target.entropy.to(z.device)).sum())
        else:
            per.append(LOSSES[spec.name](s, t, spec).sum())
    ce = None
    if labels is not None:
        ce = torch.nn.functional.cross_entropy(z, labels, ignore_index=-100, reduction="sum")
    return torch.stack(per) if per else z.new_zeros(0), ce


def _combine(per: Tensor, ce: Tensor | None, weights: Tensor, spec: LossSpec) -> Tensor:
    scale = spec.temperature ** 2 if spec.t2_scale else 1.0
    total = (1 - spec.ce_weight) * scale * (weights * per).sum()
    if spec.ce_weight:
        total = total + spec.ce_weight * ce
    return total


class _FusedKD(torch.autograd.Function):
    """Chunked loss over tokens; saves d loss / d hidden [N, Hs] and d loss / d weight [V, Hs] for backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, spec, labels, vocab):
        with torch.autocast(hidden.device.type, enabled=False):  # fp32 logits even inside a bf16 autocast region
            return _FusedKD._forward(ctx, hidden, weight, targets, weights, spec, labels, vocab)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, weights, spec, labels, vocab):
        want = any(ctx.needs_input_grad[:2])
        w = weight[:vocab].float()  # no copy in fp32; bf16 logits alone move the KD gradient by ~0.5%
        targets = [LiveTarget(t.hidden, t.weight[:vocab].float()) if isinstance(t, LiveTarget) else t
                   for t in targets]
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if want else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want else None
        total, per_sum, ce_sum = (torch.zeros(size, dtype=torch.float64, device=hidden.device)
                                  for size in ((), len(targets), ()))
        for start in range(0, hidden.shape[0], spec.chunk_size):
            rows = slice(start, start + spec.chunk_size)
            h = hidden[rows].float()
            with torch.enable_grad():
                z = (h @ w.T).requires_grad_(want)
                chunk = [_target_rows(t, rows) for t in targets]
                per, ce = chunk_terms(z, chunk, spec, vocab, None if labels is None else labels[rows])
                loss = _combine(per, ce, weights, spec)
                if want:
                    (dz,) = torch.autograd.grad(loss, z)
            if want:
                grad_h[rows] = dz @ w
                grad_w.addmm_(dz.T, h)
            total += loss.detach().double()
            per_sum += per.detach().double()
            if ce is not None:
                ce_sum += ce.detach().double()
        if want:
            full_w = torch.zeros_like(weight)
            full_w[:vocab] = grad_w
            ctx.save_for_backward(grad_h.to(hidden.dtype), full_w)
        per_sum, ce_sum = per_sum.float(), ce_sum.float()
        ctx.mark_non_differentiable(per_sum, ce_sum)
        return total.float(), per_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_total, _grad_per, _grad_ce):
        grad_h, grad_w = ctx.saved_tensors
        g = grad_total.to(grad_h.dtype)
        return grad_h * g, grad_w * g, None, None, None, None, None


def kd_loss(student_hidden: Tensor, student_weight: Tensor, targets: Sequence[LiveTarget | SparseTarget],
            weights: Sequence[float], spec: LossSpec, labels: Tensor | None = None,
            mask: Tensor | None = None) -> KDResult:
    """Weighted multi-teacher KD (+ optional CE) summed over unmasked tokens, without [N, V] tensors.

    student_hidden [N, Hs] final hidden states (after the final norm), student_weight [V, Hs] lm_head weight;
    each target holds N positions aligned with the student's (position t predicts token t + 1); ``weights``
    one fixed float per target (a schedule over steps is the caller's: it passes the current weights);
    labels [N] next-token ids (-100 = ignore); mask [N] bool, True = the position counts. Masked positions
    never enter the computation, so their gradient is exactly zero.
    """
    if len(targets) != len(weights):
        raise WhelpError(f"{len(targets)} teachers but {len(weights)} weights; give one weight per teacher")
    if spec.ce_weight and labels is None:
        raise WhelpError(f"ce_weight={spec.ce_weight} needs labels (next-token ids) for the CE term")
    if not targets and spec.ce_weight != 1:
        raise WhelpError("no teacher given: pass at least one target, or set ce_weight=1 for plain CE")
    vocab = _effective_vocab(student_weight.shape[0], targets, spec)
    if mask is not None:
        index = mask.nonzero().squeeze(1)
        student_rows = student_hidden.index_select(0, index)
        targets = [_target_rows(t, index) for t in targets]
        labels = None if labels is None else labels[index]
    else:
        student_rows = student_hidden
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32, device=student_hidden.device)
    total, per, ce = _FusedKD.apply(student_rows, student_weight, tuple(targets), w, spec, labels, vocab)
    return KDResult(loss=total, per_teacher=tuple(per.unbind(0)), ce=None if labels is None else ce,
                    tokens=int(student_rows.shape[0]))
