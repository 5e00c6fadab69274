"""On-policy distillation: the student's samples scored by the teacher, against naive full-logit references."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import (
    LOOP_SPEC,
    killed_and_resumed,
    load_weights,
    make_models,
    max_diff,
    naive_divergence,
    run_cli,
    tiny_model,
)

from whelp.data import TensorBlocks
from whelp.distillation import inprocess, loop, onpolicy, parallel, state
from whelp.distillation.api import distill_run
from whelp.errors import WhelpError
from whelp.recipe import load as load_recipe
from whelp.specs import DistillSpec

ON = replace(LOOP_SPEC, on_policy=1.0, gen_tokens=8, loss="forward_kl", save_every=0)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("models"))


def teacher_and_student():
    teacher, student = tiny_model(seed=1), tiny_model(seed=2, intermediate_size=64, num_hidden_layers=1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(40.0)  # far from uniform, as in test_loop
    return teacher.requires_grad_(False), student


def naive_sample(lm, prompts: torch.Tensor, new_tokens: int, rng: torch.Generator) -> torch.Tensor:
    """The reference sampler: the whole sequence through the model at every step (no KV cache)."""
    ids = prompts
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = lm(input_ids=ids).logits[:, -1].float()
            ids = torch.cat([ids, torch.multinomial(torch.softmax(logits, -1), 1, generator=rng)], dim=1)
    return ids


def reverse_kl_sum(student, teacher, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Naive fp32 reverse KL(p_s || p_t) summed over the positions that predict sampled tokens."""
    zs = student(input_ids=ids).logits.float()[:, prompt - 1 : -1]
    zt = teacher(input_ids=ids).logits.float()[:, prompt - 1 : -1]
    s, t = zs.log_softmax(-1), zt.log_softmax(-1)
    return (s.exp() * (s - t)).sum()


def test_the_fraction_is_exact_and_evenly_spread():
    for fraction, n in ((0.0, 40), (0.25, 40), (0.5, 40), (1 / 3, 42), (1.0, 40), (0.7, 100)):
        picks = [onpolicy.is_on_policy(g, fraction) for g in range(n)]
        assert sum(picks) == int(n * fraction + 1e-9)
    assert [onpolicy.is_on_policy(g, 0.5) for g in range(4)] == [False, True, False, True]
    spec = replace(ON, on_policy=0.5, grad_accum=2, batch_size=3)
    assert onpolicy.step_tokens(0, spec, 4) == (3 * 4 * 31, 3 * 4 * 8)  # the same slot on every rank
    assert onpolicy.generator(0, 0, 1, spec, 4, torch.device("cpu")) is None
    draws = {
        float(torch.rand(1, generator=onpolicy.generator(0, 1, r, spec, 4, torch.device("cpu")))) for r in range(4)
    }
    assert len(draws) == 4  # every rank samples its own rows with its own RNG


def test_the_sampler_equals_a_naive_loop_and_keeps_the_prompt():
    _, student = teacher_and_student()
    prompts = torch.randint(0, 512, (3, 5), generator=torch.Generator().manual_seed(0))
    got = onpolicy.sample(student, prompts, 12, 512, torch.Generator().manual_seed(7))[0]
    ref = naive_sample(student, prompts, 12, torch.Generator().manual_seed(7))
    assert got.shape == (3, 17) and torch.equal(got, ref) and torch.equal(got[:, :5], prompts)
    assert int(got.max()) < 512
    other = onpolicy.sample(student, prompts, 12, 512, torch.Generator().manual_seed(8))[0]
    assert not torch.equal(other, got)
    assert onpolicy.sample(student, prompts, 12, 100, torch.Generator().manual_seed(7))[0][:, 5:].max() < 100


@pytest.mark.parametrize("name", ["reverse_kl", "jsd", "forward_kl"])
def test_an_on_policy_step_equals_the_naive_reference_without_grad_through_sampling(name):
    """One micro-batch: the loss and every gradient equal a naive fp32 reference on the same samples to 1e-5;
    the sampling forwards ran with grad off, and only the one training forward builds a graph."""
    teacher, student = teacher_and_student()
    ref_student = tiny_model(seed=2, intermediate_size=64, num_hidden_layers=1)
    rows = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(1))
    spec = replace(ON, on_policy_loss=name, prompt_tokens=10, batch_size=2, grad_accum=1, steps=1, warmup=0)
    world = parallel.World(0, 1, torch.device("cpu"), owns_group=False)
    t = state.setup(student, [teacher], [], [1.0], ["t"], TensorBlocks(rows), spec, world)
    grad_modes = []
    student.model.layers[0].register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    micro, tokens = torch.tensor([4, 1]), 2 * spec.gkd.gen_tokens
    sums = loop.loss_step(t, micro, (1.0,), onpolicy.generator(3, 0, 0, spec, 1, world.device), tokens)
    assert grad_modes == [False] * spec.gkd.gen_tokens + [True]  # prefill + G-1 cached steps, then the trained forward

    ids = onpolicy.sample(ref_student, rows[micro][:, :10], 8, 512, torch.Generator().manual_seed(3))[
        0
    ]  # seed 0, slot 3
    zs = ref_student(input_ids=ids).logits.float()[:, 9:-1].flatten(0, 1)
    with torch.no_grad():
        zt = teacher(input_ids=ids).logits.float()[:, 9:-1].flatten(0, 1)
    ref = naive_divergence(name, zs.log_softmax(-1), zt.log_softmax(-1), spec.gkd.loss_spec(spec.kd)).sum()
    (ref / tokens).backward()
    ref = ref.detach()
    assert abs(float(sums[0]) - float(ref)) <= 1e-5 * max(1.0, abs(float(ref)))
    assert float(sums[2]) == 0 and float(sums[1]) == 0  # no CE and no off-policy term on sampled tokens
    assert abs(float(sums[3]) - float(ref)) <= 1e-5 * max(1.0, abs(float(ref)))
    for (n, p), q in zip(student.named_parameters(), ref_student.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), n


def test_on_policy_distillation_lowers_reverse_kl_on_fresh_samples():
    """The student is the teacher's body under a random lm_head (so the teacher is reachable in a few steps)."""
    import copy

    teacher = tiny_model(seed=1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(10.0)
    student = copy.deepcopy(teacher.requires_grad_(False)).requires_grad_(True)
    with torch.no_grad():
        student.lm_head.weight.copy_(tiny_model(seed=2).lm_head.weight)
    rows = torch.randint(0, 512, (64, 32), generator=torch.Generator().manual_seed(2))
    prompts = torch.randint(0, 512, (16, 8), generator=torch.Generator().manual_seed(99))

    def fresh_reverse_kl(model) -> float:  # samples no training step drew (another seed, other prompts)
        ids = onpolicy.sample(model.eval(), prompts, 16, 512, torch.Generator().manual_seed(12345))[0]
        with torch.no_grad():
            return float(reverse_kl_sum(model, teacher, ids, 8)) / (16 * 16)

    before = fresh_reverse_kl(student)
    spec = replace(
        ON, steps=80, batch_size=4, grad_accum=1, lr=3e-3, warmup=3, eval_every=0, gen_tokens=16, prompt_tokens=8
    )
    inprocess.distill(student, [teacher], rows, spec, progress=False)
    log = student.whelp_distill["log"]
    assert all("on/teacher0" in row and "kl/teacher0" not in row for row in log)
    assert fresh_reverse_kl(student) < 0.85 * before  # measured: 1.32 -> 0.98 nats per token


def test_killed_and_resumed_equals_uninterrupted_with_mixed_batches(tiny_dirs, tmp_path, monkeypatch):
    teacher, _, student = tiny_dirs
    spec = replace(LOOP_SPEC, on_policy=0.5, gen_tokens=8, save_every=2)  # 2 micro-batches a step: one of each
    killed_and_resumed(
        monkeypatch,
        lambda out: distill_run(student, out, spec, teachers=((teacher, 1.0),), progress=False),
        tmp_path / "ref",
        tmp_path / "crash",
        2 * 4 + 1,  # dies in step 5, after the checkpoint of step 4
    )
    rows = {
        name: [json.loads(r) for r in (tmp_path / f"{name}.distill" / "metrics.jsonl").read_text().splitlines()]
        for name in ("ref", "crash")
    }
    assert [r["loss"] for r in rows["crash"]] == pytest.approx([r["loss"] for r in rows["ref"]], abs=1e-6)
    assert all(r["on_policy_tokens"] == 2 * 8 and f"kl/{teacher}" in r and f"on/{teacher}" in r for r in rows["ref"])
    assert max_diff(load_weights(tmp_path / "ref"), load_weights(student)) > 0


def test_caches_alone_cannot_score_samples_but_mix_with_a_live_teacher(tiny_dirs, tmp_path):
    from whelp.data import open_blocks
    from whelp.distillation.capture import Teacher, write_cache
    from whelp.models import load_model
    from whelp.specs import CacheSpec

    teacher, teacher2, student = tiny_dirs
    spec = replace(LOOP_SPEC, steps=None, max_tokens=3 * 4 * 32, save_every=0, on_policy=0.5, gen_tokens=8)
    model, tokenizer = load_model(teacher)
    write_cache(
        Teacher(model, tokenizer, teacher),
        open_blocks(spec.data, tokenizer, 32, max_tokens=spec.max_tokens),
        tmp_path / "cache",
        CacheSpec("topk", 16, 1.0),
    )
    with pytest.raises(WhelpError, match="needs a live teacher .*cached logits score only the data's tokens"):
        distill_run(student, tmp_path / "out", spec, caches=((str(tmp_path / "cache"), 1.0),), progress=False)
    assert not (tmp_path / "out.distill").exists()  # refused before anything was made
    report = distill_run(
        student,
        tmp_path / "out",
        spec,
        teachers=((teacher2, 1.0),),
        caches=((str(tmp_path / "cache"), 1.0),),
        progress=False,
    )
    assert {f"kl/{tmp_path / 'cache'}", f"kl/{teacher2}", f"on/{teacher2}"} <= set(report["final"])
    assert f"on/{tmp_path / 'cache'}" not in report["final"]  # the cache never scores a sample


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(on_policy=1.5), r"on_policy is the fraction .* in \[0, 1\]; got 1.5"),
        (dict(on_policy=0.5, gen_tokens=40), r"prompt_tokens \+ gen_tokens = -8 \+ 40 .* seq_len=32"),
        (dict(on_policy=0.5, prompt_tokens=30, gen_tokens=4), r"30 \+ 4 tokens, which must fit in seq_len=32"),
        (dict(on_policy_loss="tvd"), "unknown on_policy_loss 'tvd'; choose one of reverse_kl, jsd, forward_kl"),
        (dict(gen_tokens=0), "gen_tokens must be positive"),
        (dict(on_policy_from=-1), r"on_policy_from is the first on-policy step, >= 0; got -1"),
    ],
)
def test_bad_on_policy_settings_are_one_clear_line(changes, message):
    with pytest.raises(WhelpError, match=message):
        replace(LOOP_SPEC, **changes)


def test_recipe_keys_and_cli_flags(tmp_path, tiny_dirs):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: r\nteacher: {model: t}\nprune: {target: smollm2-half}\n"
        "distill: {steps: 4, on_policy: 0.25, gen_tokens: 16, on_policy_loss: jsd, beta: 0.9}\n"
    )
    step = load_recipe(str(recipe)).distill[0].options
    assert (step.gkd.fraction, step.gkd.gen_tokens, step.gkd.loss, step.kd.beta) == (0.25, 16, "jsd", 0.9)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: r\nteacher: {model: t}\nprune: {target: smollm2-half}\n"
        "distill: {steps: 4, on_policy: 1, teachers: [], caches: [{model: teacher}]}\n"
    )
    with pytest.raises(WhelpError, match="needs a live teacher"):
        load_recipe(str(bad))
    teacher, _, student = tiny_dirs
    done = run_cli(
        *[
            "distill",
            student,
            "--out",
            str(tmp_path / "out"),
            "--teacher",
            teacher,
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--dtype",
            "float32",
            "--on-policy",
            "1",
            "--gen-tokens",
            "4",
            "--prompt-tokens",
            "6",
        ]
    )
    assert done.exit_code == 0, done.stderr
    report = json.loads((tmp_path / "out" / "distill_report.json").read_text())
    assert report["spec"]["on_policy"] == 1.0 and report["final"]["on_policy_tokens"] == 2 * 4
    assert DistillSpec(steps=1).gkd.fraction == 0  # off by default: a plain run is unchanged
