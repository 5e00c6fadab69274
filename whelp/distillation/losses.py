"""Knowledge-distillation losses computed in token chunks, so no [N, V] tensor ever exists.

``kd_loss`` evaluates the divergences of ``whelp.distillation.divergences`` from the student's final hidden states
and lm_head weight. A custom autograd function walks over chunks of ``chunk_size`` tokens: each chunk's student
logits (and each live teacher's) are formed, the loss and d loss / d logits are taken, and the chunk's gradient
is pushed at once into d hidden [N, Hs] and d weight [V, Hs] (the approach of Liger-Kernel's fused linear
losses, Hsu et al. 2024). Gradients are formed in the forward pass rather than recomputed in backward because
recomputation would run every teacher's lm_head twice (1.6x the matmul FLOPs of a naive step instead of 1.0x).
Peak extra memory is a few [chunk_size, V] fp32 tensors, independent of N.

d loss / d logits comes in closed form (``whelp.distillation.closed_form``) for cached targets, CE and live teachers
under forward KL; other divergences with a live teacher take autograd over the chunk's [c, V] log-softmax.

Logits are the model's own (``head_logits``): the matmul, then the family's logit transform (Granite's
logits_scaling, Cohere's logit_scale, Gemma 2/3's final soft-capping; ``model_transform``), for the student and for
every live teacher, as a cache stores them. The student's is applied in place and its gradient taken back through
it in closed form (``_through_transform``), so a transformed student holds no more [chunk_size, V] tensors than a
plain one. tests/test_families.py checks both against ``model(...).logits`` and a naive KL for every family.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from whelp import architecture
from whelp.distillation import closed_form
from whelp.distillation.divergences import LOSSES, NEG_INF, LiveTarget, LossSpec, SparseTarget, combine, head_logits
from whelp.errors import WhelpError

__all__ = [
    "LOSSES",
    "KDResult",
    "LiveTarget",
    "LossSpec",
    "SparseTarget",
    "backbone",
    "head_logits",
    "kd_loss",
    "model_transform",
]


@dataclass(frozen=True)
class KDResult:
    loss: Tensor  # scalar with grad: SUM over unmasked tokens (the caller divides by its global token count)
    per_teacher: tuple[Tensor, ...]  # detached per-teacher divergence sums (no weight, no T^2)
    ce: Tensor | None  # detached CE sum over unmasked tokens with a label (if labels given)
    tokens: int  # unmasked tokens


def backbone(lm):
    """The decoder stack under the lm_head (``model`` for Llama, ``transformer`` for GPT-2, ``gpt_neox``...)."""
    return lm.base_model


def model_transform(model) -> architecture.LogitTransform | None:
    """The logit transform of ``model``'s family (``whelp.architecture.logit_transform``: what its forward applies to
    ``lm_head(hidden)``), or None where that is the identity, so plain families pay nothing for it."""
    transform = architecture.logit_transform(model.config)
    return None if transform.identity else transform


def _target_rows(target, index):
    if isinstance(target, LiveTarget):
        return dataclasses.replace(target, hidden=target.hidden[index])
    return target.rows(index)


def _effective_vocab(student_rows: int, targets, spec: LossSpec) -> int:
    """The shared vocabulary width; refuses vocabularies that differ beyond padding."""
    vocab = spec.vocab_size or student_rows
    if vocab > student_rows:
        raise WhelpError(f"LossSpec.vocab_size={vocab} exceeds the student's {student_rows} lm_head rows")
    for i, target in enumerate(targets):
        width = target.weight.shape[0] if isinstance(target, LiveTarget) else target.vocab_size
        if width < vocab:
            raise WhelpError(
                f"teacher {i} has a {width}-token vocabulary but the student uses {vocab}: the "
                "vocabularies differ, so token-level distillation is undefined; use a teacher "
                "with the student's tokenizer"
            )
        if width != student_rows and spec.vocab_size is None:
            raise WhelpError(
                f"teacher {i} has {width} vocabulary rows, the student {student_rows}; if one lm_head "
                "is padded, set LossSpec.vocab_size to the tokenizer's vocabulary size"
            )
        if isinstance(target, SparseTarget):
            _check_sparse(target, spec, vocab, i)
    return vocab


def _check_sparse(target: SparseTarget, spec: LossSpec, vocab: int, i: int) -> None:
    if target.mode == "sample" and spec.name != "forward_kl":
        raise WhelpError(
            f"teacher {i} is a sampled cache, which estimates only forward_kl without bias "
            f"(Anshumann et al. 2025), not '{spec.name}'; use forward_kl or a top-k cache"
        )
    if not math.isclose(target.temperature, spec.temperature):
        raise WhelpError(
            f"teacher {i} was cached at temperature {target.temperature} but the loss uses "
            f"{spec.temperature}; use the cache's temperature or rebuild the cache"
        )
    if target.ids.numel() and int(target.ids.max()) >= vocab:
        raise WhelpError(
            f"teacher {i} targets token id {int(target.ids.max())} outside the student's vocabulary of {vocab}"
        )


def _support(target, s_full: Tensor, scaled: Tensor, vocab: int, T: float) -> tuple[Tensor, Tensor | None]:
    """(student, teacher) log-probs on a common support: [c, vocab] for a live teacher, [c, k + 1] buckets for
    a top-k target (k listed ids + the tail), [c, S] student log-probs of the draws (teacher None) when sampled.

    ``s_full`` [c, vocab] is log_softmax of ``scaled`` = student logits / T (fp32, requires grad)."""
    if isinstance(target, LiveTarget):
        t_z = target.logits()
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


def _autograd_chunk(z: Tensor, targets, weights: Tensor, spec: LossSpec, labels: Tensor | None, want: bool):
    """(loss, per-teacher sums, CE sum, d loss / d z or None) of one chunk by autograd over its [c, V] logits."""
    with torch.enable_grad():
        z.requires_grad_(want)
        per, ce = chunk_terms(z, targets, spec, z.shape[1], labels)
        loss = combine(per, ce, weights, spec)
        dz = torch.autograd.grad(loss, z)[0] if want else None
    return loss, per, ce, dz


class _FusedKD(torch.autograd.Function):
    """Chunked loss over tokens; saves d loss / d hidden [N, Hs] and d loss / d weight [V, Hs] for backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, spec, labels, vocab, transform):
        with torch.autocast(hidden.device.type, enabled=False):  # fp32 logits even inside a bf16 autocast region
            return _FusedKD._forward(ctx, hidden, weight, targets, weights, spec, labels, vocab, transform)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, weights, spec, labels, vocab, transform):
        want = any(ctx.needs_input_grad[:2])
        w = weight[:vocab].float()  # no copy in fp32; bf16 logits alone move the KD gradient by ~0.5%
        targets = [
            dataclasses.replace(t, weight=t.weight[:vocab].float()) if isinstance(t, LiveTarget) else t for t in targets
        ]
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if want else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want else None
        total, per_sum, ce_sum = (
            torch.zeros(size, dtype=torch.float64, device=hidden.device) for size in ((), len(targets), ())
        )
        terms = closed_form.closed_form_chunk if closed_form.supported(targets, spec) else _autograd_chunk
        for start in range(0, hidden.shape[0], spec.chunk_size):
            rows = slice(start, start + spec.chunk_size)
            h = hidden[rows].float()
            chunk = [_target_rows(t, rows) for t in targets]
            chunk_labels = None if labels is None else labels[rows]
            z = h @ w.T if transform is None else transform.apply_(h @ w.T)  # the terms may overwrite it
            loss, per, ce, dz = terms(z, chunk, weights, spec, chunk_labels, want)
            if want and transform is not None:  # d loss / d (h @ w^T); autograd's terms leave z intact
                _through_transform(dz, z if terms is _autograd_chunk else None, h, w, transform)
            del z
            if want:
                grad_h[rows] = dz @ w
                grad_w.addmm_(dz.T, h)
            del dz  # else it outlives the next chunk's logits: one more [chunk, V] tensor at the peak
            total += loss.detach().double()
            per_sum += per.detach().double()
            if ce is not None:
                ce_sum += ce.detach().double()
        if want:
            if vocab == weight.shape[0]:
                full_w = grad_w.to(weight.dtype)
            else:
                full_w = torch.zeros_like(weight)
                full_w[:vocab] = grad_w
            ctx.save_for_backward(grad_h.to(hidden.dtype), full_w)
        per_sum, ce_sum = per_sum.float(), ce_sum.float()
        ctx.mark_non_differentiable(per_sum, ce_sum)
        return total.float(), per_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_total, _grad_per, _grad_ce):
        # scaled in place: a copy of d weight [V, Hs] would double the loss's peak memory (1 GB at V=128256,
        # Hs=2048); a second backward through the same graph is refused by autograd's version check
        grad_h, grad_w = ctx.saved_tensors
        g = grad_total.to(grad_h.dtype)
        return grad_h.mul_(g), grad_w.mul_(g), None, None, None, None, None, None


TRANSFORM_BLOCK = 4096  # lm_head rows per matmul when soft-capped logits are made again for their derivative


def _through_transform(dz: Tensor, logits: Tensor | None, h: Tensor, w: Tensor, transform: architecture.LogitTransform):
    """d loss / d (h @ w^T) in place in ``dz`` = d loss / d logits [c, V], the transform's derivative in closed form
    from the transformed logits (``LogitTransform.grad_``): a constant for scaling, scale * (1 - (logits / cap)^2)
    for soft-capping, which a gradient taken at the capped logits alone would miss. ``logits``: the chunk's
    transformed logits if the terms left them intact (overwritten here), else None; soft-capped ones are then made
    again over column blocks of ``TRANSFORM_BLOCK`` ids, so the transform adds no [c, V] tensor (one more
    [c, Hs] x [Hs, V] matmul per chunk instead, for soft-capped students whose terms take the closed form, which
    consumes its logits)."""
    if logits is not None or not transform.cap:
        return transform.grad_(logits, dz)
    for v in range(0, dz.shape[1], TRANSFORM_BLOCK):
        rows = slice(v, v + TRANSFORM_BLOCK)
        transform.grad_(transform.apply_(h @ w[rows].T), dz[:, rows])
    return dz


def _split(hidden, weight, targets, weights, spec, labels, mask, transform, ce_only: Tensor) -> KDResult:
    """``kd_loss`` of the ``ce_only`` positions by CE alone plus that of the others by ``spec``, summed."""
    counted = torch.ones_like(ce_only) if mask is None else mask
    ce = kd_loss(hidden, weight, [], [], dataclasses.replace(spec, ce_weight=1.0), labels, counted & ce_only, transform)
    rest = counted & ~ce_only
    if not rest.any():
        per = tuple(torch.zeros((), dtype=ce.loss.dtype) for _ in targets)
        return KDResult(loss=ce.loss, per_teacher=per, ce=ce.ce, tokens=ce.tokens)
    kd = kd_loss(hidden, weight, targets, weights, spec, labels, rest, transform)
    both = None if kd.ce is None else kd.ce + ce.ce
    return KDResult(loss=kd.loss + ce.loss, per_teacher=kd.per_teacher, ce=both, tokens=kd.tokens + ce.tokens)


def kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    targets: Sequence[LiveTarget | SparseTarget],
    weights: Sequence[float],
    spec: LossSpec,
    labels: Tensor | None = None,
    mask: Tensor | None = None,
    transform: architecture.LogitTransform | None = None,
    ce_only: Tensor | None = None,
) -> KDResult:
    """Weighted multi-teacher KD (+ optional CE) summed over unmasked tokens, without [N, V] tensors.

    student_hidden [N, Hs] final hidden states (after the final norm), student_weight [V, Hs] lm_head weight;
    each target holds N positions aligned with the student's (position t predicts token t + 1); ``weights``
    one fixed float per target (a schedule over steps is the caller's: it passes the current weights);
    labels [N] next-token ids (-100 = ignore); mask [N] bool, True = the position counts. Masked positions
    never enter the computation, so their gradient is exactly zero. ``transform``: the student family's logit
    transform (``model_transform``), applied to every chunk's ``hidden @ weight^T`` as its forward does; live
    teachers carry their own (``LiveTarget.transform``), caches hold transformed logits already. ``ce_only`` [N]
    bool: positions trained by CE alone (chat answers under ``chat_loss`` "ce"), the others as ``spec`` says;
    ``per_teacher`` then sums over the others only.
    """
    if ce_only is not None and bool(ce_only.any()):
        return _split(student_hidden, student_weight, targets, weights, spec, labels, mask, transform, ce_only)
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
    total, per, ce = _FusedKD.apply(student_rows, student_weight, tuple(targets), w, spec, labels, vocab, transform)
    return KDResult(
        loss=total,
        per_teacher=tuple(per.unbind(0)),
        ce=None if labels is None else ce,
        tokens=int(student_rows.shape[0]),
    )
