"""Chunked fused KD losses against a naive fp32 reference on full logits (torch.nn.functional)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import KD_HS, KD_HT, KD_N, KD_SPECS, KD_V, grads, kd_inputs, naive_divergence, naive_kd_loss
from torch.utils._python_dispatch import TorchDispatchMode

from whelp.architecture import logit_transform
from whelp.distillation import losses
from whelp.distillation.losses import LOSSES, LiveTarget, LossSpec, SparseTarget, kd_loss
from whelp.errors import WhelpError

N, HS, HT, V = KD_N, KD_HS, KD_HT, KD_V


@pytest.mark.parametrize("spec", KD_SPECS, ids=lambda s: f"{s.name}-T{s.temperature}-ce{s.ce_weight}-c{s.chunk_size}")
def test_fused_equals_naive_fp32(spec):
    h, w, teachers, labels, mask = kd_inputs()
    weights = (0.7, 0.3)
    got = kd_loss(h, w, teachers, weights, spec, labels=labels, mask=mask)
    ref = naive_kd_loss(h, w, [t.hidden @ t.weight.T for t in teachers], weights, spec, labels, mask)
    assert got.tokens == int(mask.sum())
    assert got.ce.grad_fn is None and all(p.grad_fn is None for p in got.per_teacher)
    assert abs(float(got.loss) - float(ref)) <= 1e-5
    for a, b in zip(grads(got.loss, h, w), grads(ref, h, w)):
        assert (a - b).abs().max() <= 1e-5
    per = [
        naive_kd_loss(
            h,
            w,
            [t.hidden @ t.weight.T],
            (1.0,),
            LossSpec(name=spec.name, temperature=spec.temperature, beta=spec.beta, alpha=spec.alpha),
            mask=mask,
        )
        for t in teachers
    ]
    assert torch.allclose(torch.stack(got.per_teacher), torch.stack(per).detach(), atol=1e-5)
    ce = F.cross_entropy((h @ w.T)[mask], labels[mask], ignore_index=-100, reduction="sum")
    assert abs(float(got.ce) - float(ce)) <= 1e-5


@pytest.mark.parametrize("name", list(LOSSES))
def test_bf16_within_2e3_relative(name):
    h, w, teachers, labels, mask = kd_inputs(dtype=torch.bfloat16)
    spec = LossSpec(name=name, chunk_size=6)
    got = kd_loss(h, w, teachers, (0.5, 0.5), spec, labels=labels, mask=mask)
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = naive_kd_loss(
        h32, w32, [(t.hidden.float() @ t.weight.float().T) for t in teachers], (0.5, 0.5), spec, mask=mask
    )
    assert got.loss.dtype == torch.float32
    assert abs(float(got.loss) / float(ref) - 1) <= 2e-3
    for a, b in zip(grads(got.loss, h, w), grads(ref, h32, w32)):
        assert float((a.float() - b).norm() / b.norm()) <= 2e-3


def test_gradient_accumulation_invariance():
    h, w, teachers, labels, mask = kd_inputs(n=32)
    spec = LossSpec(name="jsd", ce_weight=0.2, chunk_size=3)
    full = kd_loss(h, w, teachers, (0.6, 0.4), spec, labels=labels, mask=mask)
    g_full = grads(full.loss / full.tokens, h, w)
    total, parts = int(mask.sum()), []
    for rows in torch.arange(32).chunk(4):
        micro = [LiveTarget(t.hidden[rows], t.weight) for t in teachers]
        parts.append(kd_loss(h[rows], w, micro, (0.6, 0.4), spec, labels=labels[rows], mask=mask[rows]).loss / total)
    g_acc = grads(sum(parts), h, w)
    for a, b in zip(g_full, g_acc):
        assert (a - b).abs().max() <= 1e-6


def test_masked_positions_get_exactly_zero_gradient():
    h, w, teachers, labels, mask = kd_inputs()
    spec = LossSpec(name="tvd", ce_weight=0.5, chunk_size=4)
    got = kd_loss(h, w, teachers, (1.0, 1.0), spec, labels=labels, mask=mask)
    g_h, _ = grads(got.loss, h, w)
    assert torch.all(g_h[~mask] == 0) and torch.all(g_h[mask].abs().sum(-1) > 0)


@pytest.mark.parametrize("name", list(LOSSES))
def test_divergence_of_a_distribution_with_itself_is_zero(name):
    h, w, _, _, _ = kd_inputs()
    got = kd_loss(h, w, [LiveTarget(h.detach(), w.detach())], (1.0,), LossSpec(name=name, chunk_size=4))
    assert abs(float(got.loss)) <= 1e-6
    assert all(float(g.abs().max()) <= 1e-6 for g in grads(got.loss, h, w))


def test_weights_one_zero_equal_single_teacher():
    h, w, teachers, labels, mask = kd_inputs()
    spec = LossSpec(name="skew_kl", chunk_size=7)
    both = kd_loss(h, w, teachers, (1.0, 0.0), spec, mask=mask)
    one = kd_loss(h, w, teachers[:1], (1.0,), spec, mask=mask)
    assert float(both.loss) == float(one.loss)
    assert all(torch.equal(a, b) for a, b in zip(grads(both.loss, h, w), grads(one.loss, h, w)))
    assert float(both.per_teacher[1]) > 0  # the zero-weight teacher is still measured


def test_padded_teacher_vocab_is_masked_not_zero_padded():
    h, w, teachers, _, _ = kd_inputs(n_teachers=1)
    padded = LiveTarget(teachers[0].hidden, torch.cat([teachers[0].weight, torch.randn(12, HT) * 5]))
    spec = LossSpec(chunk_size=4, vocab_size=V)
    got = kd_loss(h, w, [padded], (1.0,), spec)
    masked = padded.hidden @ padded.weight.T
    masked[:, V:] = float("-inf")  # the extra ids carry no teacher mass
    student = torch.cat([h @ w.T, torch.full((N, 12), float("-inf"))], 1)
    s_logp, t_logp = F.log_softmax(student, -1)[:, :V], F.log_softmax(masked, -1)[:, :V]
    ref = F.kl_div(s_logp, t_logp, log_target=True, reduction="sum")
    assert abs(float(got.loss) - float(ref)) <= 1e-5
    with pytest.raises(WhelpError, match="padded, set LossSpec.vocab_size"):
        kd_loss(h, w, [padded], (1.0,), LossSpec())
    with pytest.raises(WhelpError, match="vocabularies differ"):
        kd_loss(h, w, [LiveTarget(padded.hidden, padded.weight[: V - 1])], (1.0,), LossSpec())


def bucketed(t_logits, k):
    """Top-k target as SparseTarget (exact fp32) and the teacher's [n, k+1] bucket log-probs."""
    logp = F.log_softmax(t_logits, -1)
    values, ids = logp.topk(k, -1)
    tail = 1 - values.exp().sum(-1)
    return SparseTarget("topk", ids, 1.0, V, logp=values, tail=tail.clamp_min(0)), ids


@pytest.mark.parametrize("name", list(LOSSES))
def test_topk_with_k_equal_v_is_dense_and_smaller_k_uses_a_tail_bucket(name):
    h, w, teachers, _, mask = kd_inputs(n_teachers=1)
    t_logits = teachers[0].hidden @ teachers[0].weight.T
    spec = LossSpec(name=name, chunk_size=6)
    dense = kd_loss(h, w, teachers, (1.0,), spec, mask=mask)
    full, _ = bucketed(t_logits, V)
    sparse = kd_loss(h, w, [full], (1.0,), spec, mask=mask)
    assert abs(float(sparse.loss) - float(dense.loss)) <= 1e-5
    for a, b in zip(grads(sparse.loss, h, w), grads(dense.loss, h, w)):
        assert (a - b).abs().max() <= 1e-5
    target, ids = bucketed(t_logits, 10)
    got = kd_loss(h, w, [target], (1.0,), spec, mask=mask)
    s = F.log_softmax(h @ w.T, -1)
    s_b = torch.cat([s.gather(1, ids), torch.log1p(-s.gather(1, ids).exp().sum(-1, keepdim=True))], 1)
    t_b = torch.cat([target.logp, target.tail.log()[:, None]], 1)
    ref = naive_divergence(name, s_b, t_b, spec)[mask].sum()
    assert abs(float(got.loss) - float(ref)) <= 1e-5
    for a, b in zip(grads(got.loss, h, w), grads(ref, h, w)):
        assert (a - b).abs().max() <= 1e-5


def test_sampled_estimator_is_unbiased():
    from whelp.distillation.cache import sparse_targets

    h, w, teachers, _, _ = kd_inputs(n_teachers=1, n=6)
    t_logits = teachers[0].hidden @ teachers[0].weight.T
    spec = LossSpec(temperature=1.5, chunk_size=4)
    dense = kd_loss(h, w, teachers, (1.0,), spec)
    g_dense = grads(dense.loss, h, w)
    losses, g_sum = [], [torch.zeros_like(h), torch.zeros_like(w)]
    for seed in range(300):
        target = sparse_targets(t_logits, "sample", 16, 1.5, torch.Generator().manual_seed(seed))
        got = kd_loss(h, w, [target], (1.0,), spec)
        losses.append(float(got.loss))
        g_sum = [a + b for a, b in zip(g_sum, grads(got.loss, h, w))]
    mean, sem = sum(losses) / len(losses), torch.tensor(losses).std().item() / math.sqrt(len(losses))
    assert abs(mean - float(dense.loss)) <= 4 * sem and sem < 0.05 * float(dense.loss)
    g_mean = [g / len(losses) for g in g_sum]
    assert all(float((a - b).norm() / b.norm()) < 0.1 for a, b in zip(g_mean, g_dense))
    with pytest.raises(WhelpError, match="only forward_kl"):
        kd_loss(h, w, [target], (1.0,), LossSpec(name="reverse_kl", temperature=1.5))
    with pytest.raises(WhelpError, match="temperature 1.5"):
        kd_loss(h, w, [target], (1.0,), LossSpec())


def test_mixed_live_and_cached_teachers():
    h, w, teachers, _, mask = kd_inputs()
    spec = LossSpec(chunk_size=5)
    cached, _ = bucketed(teachers[1].hidden @ teachers[1].weight.T, V)
    mixed = kd_loss(h, w, [teachers[0], cached], (0.25, 0.75), spec, mask=mask)
    live = kd_loss(h, w, teachers, (0.25, 0.75), spec, mask=mask)
    assert abs(float(mixed.loss) - float(live.loss)) <= 1e-5


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_of_n_by_v_in_forward_or_backward():
    h, w, teachers, labels, mask = kd_inputs(n=64)
    spec = LossSpec(name="jsd", ce_weight=0.1, chunk_size=8)
    with _LargestTensor() as seen:
        got = kd_loss(h, w, teachers, (0.5, 0.5), spec, labels=labels, mask=mask)
        got.loss.backward()
    assert seen.largest <= max(spec.chunk_size * V * 2, V * HT)


def test_spec_and_argument_errors():
    with pytest.raises(WhelpError, match="unknown loss"):
        LossSpec(name="kl")
    with pytest.raises(WhelpError, match="beta"):
        LossSpec(name="jsd", beta=1.0)
    h, w, teachers, _, _ = kd_inputs()
    with pytest.raises(WhelpError, match="one weight per teacher"):
        kd_loss(h, w, teachers, (1.0,), LossSpec())
    with pytest.raises(WhelpError, match="needs labels"):
        kd_loss(h, w, teachers, (1.0, 1.0), LossSpec(ce_weight=0.5))


def test_plain_cross_entropy_without_teachers_and_under_no_grad():
    h, w, _, labels, mask = kd_inputs()
    got = kd_loss(h, w, [], [], LossSpec(ce_weight=1.0, chunk_size=4), labels=labels, mask=mask)
    ref = F.cross_entropy((h @ w.T)[mask], labels[mask], ignore_index=-100, reduction="sum")
    assert abs(float(got.loss.detach()) - float(ref)) <= 1e-5
    for a, b in zip(grads(got.loss, h, w), grads(ref, h, w)):
        assert (a - b).abs().max() <= 1e-5
    with torch.no_grad():
        assert float(kd_loss(h, w, [], [], LossSpec(ce_weight=1.0), labels=labels, mask=mask).loss) == pytest.approx(
            float(ref), abs=1e-5
        )


def test_autocast_region_keeps_fp32_logits():
    h, w, teachers, _, mask = kd_inputs()
    spec = LossSpec(name="jsd", chunk_size=8)
    plain = kd_loss(h, w, teachers, (0.5, 0.5), spec, mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = kd_loss(h, w, teachers, (0.5, 0.5), spec, mask=mask)
    assert abs(float(mixed.loss.detach()) - float(plain.loss.detach())) <= 1e-5


@pytest.mark.parametrize("spec", KD_SPECS, ids=lambda s: f"{s.name}-T{s.temperature}-ce{s.ce_weight}")
def test_closed_form_gradient_equals_fp64_autograd(spec):
    """closed_form_chunk (d loss / d logits, fp32) against fp64 autograd over the full log-softmax, with a top-k
    and a full-vocabulary top-k target (plus a sampled one and two live teachers under forward KL) on the same
    rows, CE labels with an ignored row, and
    a peaked row whose top-k holds all but ~1e-30 of the student mass (the tail is summed, not 1 - listed)."""
    from whelp.distillation.cache import sparse_targets
    from whelp.distillation.closed_form import closed_form_chunk
    from whelp.distillation.losses import _autograd_chunk

    g = torch.Generator().manual_seed(1)
    z = torch.randn(9, V, generator=g) * 3
    labels = torch.randint(0, V, (9,), generator=g)
    labels[4] = -100
    t_logits = torch.randn(9, V, generator=g) * 2
    z[2, t_logits[2].topk(7).indices] += 80 * spec.temperature
    targets = [
        sparse_targets(t_logits, "topk", 7, spec.temperature),
        sparse_targets(t_logits, "topk", V, spec.temperature),
    ]
    if spec.name == "forward_kl":  # sampled targets and live teachers take the closed form under forward KL only
        targets.append(sparse_targets(t_logits, "sample", 5, spec.temperature, g))
        targets += [LiveTarget(torch.randn(9, HT, generator=g), torch.randn(V, HT, generator=g)) for _ in range(2)]
    weights = torch.linspace(0.2, 1.0, len(targets))
    got = closed_form_chunk(z.clone(), targets, weights, spec, labels, True)

    def as64(x):
        return None if x is None else x.double()

    every_id = torch.arange(V).expand(9, V)  # a live teacher as its exact dense distribution, in fp64

    def dense64(t):
        return SparseTarget(
            "topk",
            every_id,
            spec.temperature,
            V,
            logp=F.log_softmax(t.hidden.double() @ t.weight.double().T / spec.temperature, -1),
            tail=torch.zeros(9, dtype=torch.float64),
        )

    targets64 = [
        dense64(t)
        if isinstance(t, LiveTarget)
        else SparseTarget(t.mode, t.ids, t.temperature, V, as64(t.logp), as64(t.tail), as64(t.entropy))
        for t in targets
    ]
    ref = _autograd_chunk(z.double(), targets64, weights.double(), spec, labels, True)  # fp64 autograd
    assert abs(float(got[0]) - float(ref[0])) <= 1e-5 * max(1.0, abs(float(ref[0])))
    assert torch.allclose(got[1].double(), ref[1], rtol=1e-5, atol=1e-5)
    assert abs(float(got[2]) - float(ref[2])) <= 1e-5 * abs(float(ref[2]))
    assert (got[3] - ref[3]).abs().max() <= 1e-6
    no_grad = closed_form_chunk(z.clone(), targets, weights, spec, labels, False)
    assert no_grad[3] is None and float(no_grad[0]) == pytest.approx(float(got[0]), abs=1e-6)


def family_transform(**fields):
    """``logit_transform`` of a text config with ``fields`` (Gemma's final_logit_softcapping, Granite's
    logits_scaling, Cohere's logit_scale)."""
    text = SimpleNamespace(**fields)
    return logit_transform(SimpleNamespace(get_text_config=lambda: text))


TRANSFORMS = {
    "softcap": dict(final_logit_softcapping=1.5),
    "granite": dict(logits_scaling=4.0),
    "cohere": dict(logit_scale=0.3),
    "scale+softcap": dict(logit_scale=3.0, final_logit_softcapping=2.0),
}
TRANSFORM_SPECS = [
    LossSpec(chunk_size=5, ce_weight=0.3),  # closed form: live teachers + CE
    LossSpec(temperature=0.7, chunk_size=8),
    LossSpec(name="jsd", beta=0.3, chunk_size=6),  # autograd over the chunk
]


@pytest.mark.parametrize("fields", TRANSFORMS.values(), ids=TRANSFORMS.keys())
@pytest.mark.parametrize("spec", TRANSFORM_SPECS, ids=lambda s: f"{s.name}-T{s.temperature}-ce{s.ce_weight}")
def test_transformed_student_gradient_equals_autograd_through_the_transform(fields, spec, monkeypatch):
    """The student's logit transform: loss and gradient of the fused loss (its derivative in closed form, applied to
    d loss / d logits in place) equal autograd through ``transform(h @ w.T)`` on the naive reference, with live
    teachers (closed form and autograd terms) and a top-k cache; the transform moves the result well beyond 1e-5.
    Soft-capped logits made again for their derivative run over 3 column blocks here (the last one partial)."""
    monkeypatch.setattr(losses, "TRANSFORM_BLOCK", 128)
    h, w, teachers, labels, mask = kd_inputs()
    transform = family_transform(**fields)
    raw = (h @ w.T).detach()
    assert (transform(raw) - raw).abs().max() > 0.5 and transform.apply_(raw.clone()).equal(transform(raw))
    cached, _ = bucketed(teachers[1].hidden @ teachers[1].weight.T, 10)
    weights = (0.6, 0.4)
    for targets in (teachers, [teachers[0], cached]):
        t_logits = [t.hidden @ t.weight.T for t in teachers]
        if targets[1] is cached:
            if spec.name != "forward_kl" or spec.temperature != 1:
                continue  # the bucketed reference below is forward KL at T = 1
            t_logits = t_logits[:1]
        got = kd_loss(h, w, targets, weights, spec, labels=labels, mask=mask, transform=transform)
        ref = naive_kd_loss(h, w, t_logits, weights, spec, labels, mask, transform=transform)
        if targets[1] is cached:  # the top-k cache's term: forward KL on its k + 1 buckets
            s = F.log_softmax(transform(h @ w.T), -1)
            ids = cached.ids
            s_b = torch.cat([s.gather(1, ids), torch.log1p(-s.gather(1, ids).exp().sum(-1, keepdim=True))], 1)
            t_b = torch.cat([cached.logp, cached.tail.log()[:, None]], 1)
            ref = ref + (1 - spec.ce_weight) * weights[1] * naive_divergence(spec.name, s_b, t_b, spec)[mask].sum()
        plain = kd_loss(h, w, targets, weights, spec, labels=labels, mask=mask)
        assert abs(float(got.loss.detach()) - float(ref.detach())) <= 1e-5 * max(1.0, abs(float(ref.detach())))
        for a, b, c in zip(grads(got.loss, h, w), grads(ref, h, w), grads(plain.loss, h, w)):
            assert (a - b).abs().max() <= 1e-5 and (a - c).abs().max() > 1e-3
        with torch.no_grad():
            assert float(kd_loss(h, w, targets, weights, spec, labels, mask, transform).loss) == float(
                got.loss.detach()
            )
