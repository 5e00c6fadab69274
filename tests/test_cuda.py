"""The CUDA and bf16-autocast paths against the CPU fp32/fp64 references.

They need an NVIDIA GPU, so they run on GPU machines (``pytest tests/test_cuda.py``) and are skipped on CPU-only
ones such as CI; every other test covers the same code on the CPU.
"""

from __future__ import annotations

import contextlib
import json
import unittest.mock
from dataclasses import replace

import pytest
import torch
from conftest import KD_SPECS, LOOP_SPEC, Crash, fail_at, grads, kd_inputs, load_weights, max_diff, naive_kd_loss

from whelp.distillation.api import distill_run as distill
from whelp.distillation.losses import LiveTarget, LossSpec, kd_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def to_cuda(h, w, teachers, labels, mask, dtype=torch.float32):
    def move(x):
        return x.detach().to("cuda", dtype).requires_grad_()

    return (
        move(h),
        move(w),
        [LiveTarget(t.hidden.to("cuda", dtype), t.weight.to("cuda", dtype)) for t in teachers],
        labels.cuda(),
        mask.cuda(),
    )


@pytest.mark.parametrize("spec", KD_SPECS, ids=lambda s: f"{s.name}-T{s.temperature}-ce{s.ce_weight}")
def test_fused_loss_on_cuda_equals_cpu_fp64_reference(spec):
    h, w, teachers, labels, mask = kd_inputs()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = naive_kd_loss(
        h64, w64, [t.hidden.double() @ t.weight.double().T for t in teachers], (0.7, 0.3), spec, labels, mask
    )
    hc, wc, tc, lc, mc = to_cuda(h, w, teachers, labels, mask)
    got = kd_loss(hc, wc, tc, (0.7, 0.3), spec, labels=lc, mask=mc)
    assert abs(got.loss.item() - ref.item()) <= 1e-4 * max(1.0, abs(ref.item()))
    for a, b in zip(grads(got.loss, hc, wc), grads(ref, h64, w64)):
        assert float((a.double().cpu() - b).abs().max()) <= 1e-4


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
def test_bf16_autocast_on_cuda_within_1e2_of_fp32(name):
    """What the loop does on a GPU: bf16 hidden states and lm_head under autocast; the loss math stays fp32."""
    h, w, teachers, labels, mask = kd_inputs()
    spec = LossSpec(name=name, ce_weight=0.2, chunk_size=6)
    ref = naive_kd_loss(h, w, [t.hidden @ t.weight.T for t in teachers], (0.5, 0.5), spec, labels, mask)
    hc, wc, tc, lc, mc = to_cuda(h, w, teachers, labels, mask, torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = kd_loss(hc, wc, tc, (0.5, 0.5), spec, labels=lc, mask=mc)
    assert got.loss.dtype == torch.float32
    assert abs(got.loss.item() / ref.item() - 1) <= 1e-2
    for a, b in zip(grads(got.loss, hc, wc), grads(ref, h, w)):
        assert float((a.float().cpu() - b).norm() / b.norm()) <= 1e-2


def test_distill_on_cuda_in_bf16_learns_and_resumes(tiny_dirs, tmp_path, monkeypatch):
    """dtype auto = bf16 autocast on the GPU, fp32 master weights; a crash after step 4 resumes to the same weights."""
    teacher, teacher2, student = tiny_dirs
    teachers = ((teacher, 0.5), (teacher2, 0.5))
    spec = replace(LOOP_SPEC, steps=6, dtype="auto")
    report = distill(student, tmp_path / "ref", spec, teachers=teachers, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "ref.distill" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert report["eval_end"]["eval_ppl"] < float("inf")
    weights = load_weights(tmp_path / "ref")
    assert all(v.dtype == torch.float32 for v in weights.values())  # master weights, not the bf16 compute copies

    def crash(result):
        raise Crash

    fail_at(monkeypatch, 2 * 5, crash)  # dies inside step 5; resumes from the checkpoint of step 4
    with pytest.raises(Crash):
        distill(student, tmp_path / "crash", spec, teachers=teachers, progress=False)
    monkeypatch.undo()
    distill(student, tmp_path / "crash", spec, teachers=teachers, progress=False)
    assert max_diff(load_weights(tmp_path / "crash"), weights) <= 1e-6


def test_capture_on_cuda_in_bf16_matches_the_cpu_fp32_cache(tiny_dirs, tmp_path):
    """``whelp cache-logits`` on the GPU (bf16 teacher, chunked fp32 logits on the device) against fp32 on the CPU:
    the same top-k ids wherever the CPU's k-th and (k+1)-th log-probs are apart, log-probs within bf16 noise."""
    from whelp.data import open_blocks
    from whelp.distillation.cache import open_cache
    from whelp.distillation.capture import Teacher, write_cache
    from whelp.models import load_model
    from whelp.specs import CacheSpec

    teacher = tiny_dirs[0]
    caches = []
    for name, dtype, device in (("cpu", "float32", "cpu"), ("cuda", "bfloat16", "cuda")):
        model, tokenizer = load_model(teacher, dtype=dtype, device=device)
        blocks = open_blocks("pydoc:train", tokenizer, 32, max_tokens=1024)
        caches.append(
            open_cache(write_cache(Teacher(model, tokenizer, "t"), blocks, tmp_path / name, CacheSpec("topk", 8, 1.0)))
        )
    rows = torch.arange(len(blocks))
    ref, got = caches[0].targets(rows), caches[1].targets(rows)
    assert float((ref.ids == got.ids).float().mean()) >= 0.95
    same = (ref.ids == got.ids).all(-1)
    assert float((ref.logp[same] - got.logp[same]).abs().max()) <= 0.1
    assert float((ref.tail - got.tail).abs().max()) <= 0.02


def test_distill_on_cuda_in_bf16_follows_the_cpu_fp32_losses(tiny_dirs, tmp_path):
    teacher, teacher2, student = tiny_dirs
    teachers = ((teacher, 0.5), (teacher2, 0.5))
    spec = replace(LOOP_SPEC, steps=3, save_every=0)
    losses = []
    cpu_only = unittest.mock.patch("torch.cuda.is_available", return_value=False)  # the reference: fp32 on the CPU
    for name, dtype, where in (("cpu", "float32", cpu_only), ("cuda", "bfloat16", contextlib.nullcontext())):
        with where:
            distill(student, tmp_path / name, replace(spec, dtype=dtype), teachers=teachers, progress=False)
        rows = (tmp_path / f"{name}.distill" / "metrics.jsonl").read_text().splitlines()
        losses.append([json.loads(r)["loss"] for r in rows])
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)


@pytest.mark.parametrize("name", ["jsd", "forward_kl"])
def test_bf16_gradient_error_of_the_fused_loss(name):
    """Liger-Kernel's GitHub issue #1432 reports 4-23% gradient error for its fused JSD in bf16. whelp's fused loss
    keeps the softmax math in fp32 over bf16 matmuls; its relative gradient error against fp32 is printed and
    bounded at 1%."""
    h, w, teachers, labels, mask = kd_inputs()
    spec = LossSpec(name=name, chunk_size=6)
    ref = naive_kd_loss(h, w, [t.hidden @ t.weight.T for t in teachers], (0.5, 0.5), spec, labels, mask)
    hc, wc, tc, lc, mc = to_cuda(h, w, teachers, labels, mask, torch.bfloat16)
    got = kd_loss(hc, wc, tc, (0.5, 0.5), spec, labels=lc, mask=mc)
    errors = [float((a.float().cpu() - b).norm() / b.norm()) for a, b in zip(grads(got.loss, hc, wc), grads(ref, h, w))]
    print(f"{name} bf16 relative gradient error: hidden {errors[0]:.2%}, lm_head {errors[1]:.2%}")
    assert max(errors) <= 1e-2
