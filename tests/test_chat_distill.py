"""Distillation on chat data: KD and CE only on the assistant's tokens (the data's loss mask), and on-policy
micro-batches whose prompts end at the assistant turn and whose samples stop at end-of-turn."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import LOOP_SPEC, killed_and_resumed, naive_divergence, tiny_model, tiny_tokenizer

from whelp.data import Blocks, TensorBlocks, tokenstore
from whelp.distillation import dynamic, loop, onpolicy, parallel, state
from whelp.distillation.api import distill_run
from whelp.errors import WhelpError
from whelp.specs import Mixture

SPEC = replace(LOOP_SPEC, loss="forward_kl", ce_weight=0.5, save_every=0, batch_size=3, grad_accum=1, steps=1, warmup=0)
WORLD = parallel.World(0, 1, torch.device("cpu"), owns_group=False)


def models():
    teacher, student = tiny_model(seed=1), tiny_model(seed=2, intermediate_size=64, num_hidden_layers=1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(40.0)
    return teacher.requires_grad_(False), student


def chat_rows(n: int = 6, length: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens and a mask of one or two assistant spans per row, one starting at a different place in
    each row, and the first row starting inside an answer (a conversation cut at the block edge)."""
    ids = torch.randint(3, 512, (n, length), generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(n, length, dtype=torch.bool)
    for r in range(n):
        start = 4 + 3 * r
        mask[r, start : start + 6] = True
    mask[0, :3] = True
    return ids, mask


def naive_masked_loss(student, teacher, ids, mask, spec) -> torch.Tensor:
    """fp32 forward KL + ce_weight x CE summed over the positions whose next token is a target."""
    zs = student(input_ids=ids).logits.float()[:, :-1]
    with torch.no_grad():
        zt = teacher(input_ids=ids).logits.float()[:, :-1]
    keep = mask[:, 1:]
    s, t = zs[keep].log_softmax(-1), zt[keep].log_softmax(-1)
    kd = naive_divergence("forward_kl", s, t, spec.kd).sum()
    ce = torch.nn.functional.cross_entropy(zs[keep], ids[:, 1:][keep], reduction="sum")
    return (1 - spec.kd.ce_weight) * kd + spec.kd.ce_weight * ce


def test_masked_kd_equals_a_naive_reference_and_masked_tokens_get_no_gradient():
    teacher, student = models()
    ref_student = tiny_model(seed=2, intermediate_size=64, num_hidden_layers=1)
    ids, mask = chat_rows()
    blocks = TensorBlocks(ids, mask=mask)
    t = state.setup(student, [teacher], [], [1.0], ["t"], blocks, SPEC, WORLD)
    micro = torch.tensor([0, 3, 5])
    idx = micro.view(1, 1, 3)
    tokens, on, divergence = loop.step_tokens(t, 0, idx)
    assert on == 0 and tokens == divergence == int(
        mask[micro][:, 1:].sum()
    )  # the step divides by its target tokens only
    sums = loop.loss_step(t, micro, (1.0,), None, tokens)
    ref = naive_masked_loss(ref_student, teacher, ids[micro], mask[micro], SPEC)
    (ref / tokens).backward()
    ref = float(ref.detach())
    assert abs(float(sums[0]) - ref) <= 1e-5 * abs(ref)
    for (name, p), q in zip(student.named_parameters(), ref_student.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), name

    # position t has a label exactly where token t + 1 is a target; the rest are context only
    labels = state.next_token_labels(ids[micro], mask[micro])
    assert torch.equal(labels.view(3, -1)[:, :-1] != -100, mask[micro][:, 1:])


def test_masked_positions_get_exactly_zero_gradient():
    """The fused loss never touches a masked-out position: d loss / d hidden is exactly 0 there."""
    from whelp.distillation.losses import LiveTarget, LossSpec, kd_loss

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(20, 16, generator=g, requires_grad=True)
    weight, t_hidden = torch.randn(50, 16, generator=g), torch.randn(20, 16, generator=g)
    mask = torch.rand(20, generator=g) > 0.5
    labels = torch.randint(0, 50, (20,), generator=g).masked_fill(~mask, -100)
    out = kd_loss(
        hidden, weight, [LiveTarget(t_hidden, weight)], [1.0], LossSpec(ce_weight=0.5, chunk_size=7), labels, mask
    )
    out.loss.backward()
    assert out.tokens == int(mask.sum())
    assert torch.all(hidden.grad[~mask] == 0) and torch.all(hidden.grad[mask].abs().sum(1) > 0)


def test_chat_prompts_end_at_the_assistant_turn_and_fall_back_to_the_text_prompt():
    ids, mask = chat_rows()
    prompts = onpolicy.chat_prompts(ids, mask, 10)
    assert torch.equal(prompts[1], ids[1, :7])  # row 1's turn starts at token 7: the prompt is everything before
    assert torch.equal(prompts[0], ids[0, :4])  # row 0 runs on from a cut answer; its first turn starts at 4
    text = onpolicy.chat_prompts(ids, None, 10)
    assert all(torch.equal(p, row[:10]) for p, row in zip(text, ids))
    padded, attention = onpolicy.left_pad(prompts, 0)
    assert padded.shape == (6, max(len(p) for p in prompts))
    assert [int(a.sum()) for a in attention] == [len(p) for p in prompts]


def naive_chat_sample(lm, prompts, new_tokens, vocab, rng, stop):
    """Reference: every row through the model alone, unpadded and without a KV cache, one draw per step for all
    rows at once (as the sampler draws); a row keeps its first stop id and ignores what is drawn after it."""
    rows, done = [p.clone() for p in prompts], [False] * len(prompts)
    with torch.no_grad():
        for _ in range(new_tokens):
            probs = torch.stack([lm(input_ids=r[None]).logits[0, -1, :vocab].float().softmax(-1) for r in rows])
            draws = torch.multinomial(probs, 1, generator=rng)[:, 0]
            for i, d in enumerate(draws.tolist()):
                if not done[i]:
                    rows[i] = torch.cat([rows[i], torch.tensor([d])])
                    done[i] = d in stop
    return rows


def test_chat_samples_start_after_the_prompt_stop_at_end_of_turn_and_equal_a_naive_sampler():
    _, student = models()
    student.config.attn_implementation = "eager"
    ids, mask = chat_rows()
    prompts = onpolicy.chat_prompts(ids[:4], mask[:4], 10)
    padded, attention = onpolicy.left_pad(prompts, 2)
    stop = (2,)
    got, live = onpolicy.sample(student, padded, 10, 4, torch.Generator().manual_seed(1), stop, attention)
    ref = naive_chat_sample(student, prompts, 10, 4, torch.Generator().manual_seed(1), stop)
    width = padded.shape[1]
    stopped = 0
    for r, row in enumerate(ref):
        n_new = len(row) - len(prompts[r])
        assert torch.equal(got[r][live[r]], row)  # the prompt, then the samples up to the first stop id
        assert int(live[r, width:].sum()) == n_new
        stopped += int(row[-1]) in stop and n_new < 10
    assert stopped >= 1  # at least one row ended its turn early (vocab 4: the stop id is likely)
    loss_rows = onpolicy.sampled_mask(live, 4, width, 10).view(4, -1)
    assert [int(m.sum()) for m in loss_rows] == [len(row) - len(p) for row, p in zip(ref, prompts)]


def test_an_on_policy_chat_micro_batch_is_scored_over_the_answer_only():
    """A whole on-policy micro-batch on chat rows: left-padded prompts, samples stopping at the student's eos ids,
    loss == the naive per-row reverse KL over the sampled tokens (teacher and student run unpadded)."""
    teacher, student = models()
    student.generation_config.eos_token_id = [2, 3]
    ids, mask = chat_rows()
    spec = replace(SPEC, on_policy=1.0, gen_tokens=6, ce_weight=0.0)
    t = state.setup(student, [teacher], [], [1.0], ["t"], TensorBlocks(ids, mask=mask), spec, WORLD)
    micro = torch.tensor([1, 2, 4])
    rng = onpolicy.generator(0, 0, 0, spec, 1, WORLD.device)
    sums = loop.loss_step(t, micro, (1.0,), rng, 3 * 6)
    prompts = onpolicy.chat_prompts(ids[micro], mask[micro], 26)
    rows = naive_chat_sample(student, prompts, 6, 512, onpolicy.generator(0, 0, 0, spec, 1, WORLD.device), (2, 3))
    ref = 0.0
    with torch.no_grad():
        for row, prompt in zip(rows, prompts):
            zs = student(input_ids=row[None]).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
            zt = teacher(input_ids=row[None]).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
            ref += float(naive_divergence("reverse_kl", zs, zt, spec.gkd.loss_spec(spec.kd)).sum())
    assert abs(float(sums[0]) - ref) <= 1e-4 * max(1.0, abs(ref))


def test_on_policy_from_a_step_leaves_the_steps_before_it_off_policy():
    spec = replace(SPEC, on_policy=0.5, gen_tokens=8, grad_accum=2, steps=6, on_policy_from=4)
    cpu = torch.device("cpu")
    picks = [[onpolicy.generator(s, a, 0, spec, 1, cpu) is not None for a in range(2)] for s in range(6)]
    assert picks == [[False, False]] * 4 + [[False, True]] * 2
    assert onpolicy.step_tokens(3, spec, 1) == (2 * 3 * 31, 0) and onpolicy.step_tokens(4, spec, 1) == (3 * 31, 3 * 8)


def write_store(path, tok, parts, masks=None):
    """A token store written with ``flush`` / ``seal``: one shard, with a loss mask when ``masks`` are given."""
    identity = tokenstore.manifest_identity(
        tok, str(path), None, None, 1 << 20, **tokenstore.chat_identity(tok, (0,) if masks else None)
    )

    def fill(work, manifest):
        tokenstore.flush(work, manifest, parts, len(parts), masks)
        tokenstore.seal(work, manifest, sum(map(len, parts)))

    return tokenstore.open_store(tokenstore.write(path, identity, False, fill))


def chat_and_text(tmp_path):
    """``(rows, masks, text_store)``: 16-token rows of a 50/50 mixture of a chat store (six 40-token conversations,
    three targets in every seven tokens) and a 200-token text store."""
    tok = tiny_tokenizer()
    g = np.random.default_rng(0)
    parts = [g.integers(1, 512, 40) for _ in range(6)]
    masks = [np.arange(40) % 7 < 3 for _ in range(6)]
    chat_store = write_store(tmp_path / "chat", tok, parts, masks)
    text_store = write_store(tmp_path / "text", tok, [g.integers(1, 512, 200)])
    return (
        Blocks([(chat_store, 0.5), (text_store, 0.5)], 16, 0, None, Mixture.parse("chat:0.5,text:0.5")),
        masks,
        text_store,
    )


def test_a_mixture_of_a_chat_store_and_text_reads_the_chat_mask_and_trains_every_text_token(tmp_path):
    rows, masks, text_store = chat_and_text(tmp_path)
    assert rows.has_mask
    everything = torch.arange(len(rows))
    got = rows.mask(everything)
    stream = np.concatenate(masks)  # flush stores the parts as given
    for r, (source, block) in enumerate(rows.locate(everything)):
        want = stream[block * 16 : (block + 1) * 16] if source == 0 else np.ones(16, bool)
        assert np.array_equal(got[r].numpy(), want), r
    assert not Blocks([(text_store, 1.0)], 16, 0, None, Mixture.parse("text")).has_mask


def test_on_policy_on_chat_data_killed_and_resumed_equals_uninterrupted(tiny_dirs, tmp_path, monkeypatch):
    teacher, _, student = tiny_dirs
    g = np.random.default_rng(1)
    parts = [g.integers(1, 512, 48) for _ in range(24)]
    masks = [(np.arange(48) >= 20) & (np.arange(48) < 40) for _ in range(24)]  # one answer per conversation
    data = write_store(tmp_path / "chat", tiny_tokenizer(), parts, masks).path
    spec = replace(LOOP_SPEC, data=str(data), on_policy=0.5, gen_tokens=8, save_every=2)
    killed_and_resumed(
        monkeypatch,
        lambda out: distill_run(student, out, spec, teachers=((teacher, 1.0),), progress=False),
        tmp_path / "ref",
        tmp_path / "crash",
        2 * 4 + 1,  # dies in step 5, after the checkpoint of step 4
    )
    log = [json.loads(r) for r in (tmp_path / "ref.distill" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["on_policy_tokens"] == 2 * 8 and f"on/{teacher}" in r for r in log)


def naive_sequence_kd_loss(student, teacher, ids, mask, chat, spec) -> torch.Tensor:
    """fp32 reference of ``chat_loss`` "ce": CE alone summed over the target positions of the ``chat`` rows, and
    forward KL + ce_weight x CE over those of the other rows."""
    ce_spec = replace(spec, ce_weight=1.0)
    return naive_masked_loss(student, teacher, ids[chat], mask[chat], ce_spec) + naive_masked_loss(
        student, teacher, ids[~chat], mask[~chat], spec
    )


def test_chat_loss_ce_trains_chat_rows_by_ce_alone_and_text_rows_by_kd(tmp_path):
    """A mixture of a chat store and text under chat_loss=ce: the step's loss and gradients equal the naive
    reference (CE alone on the chat rows' answers, KD + CE on the text rows), and its logged divergence counts the
    text rows only."""
    rows, _, _ = chat_and_text(tmp_path)
    spec = replace(SPEC, seq_len=16, chat_loss="ce")
    teacher, student = models()
    ref_student = tiny_model(seed=2, intermediate_size=64, num_hidden_layers=1)
    t = state.setup(student, [teacher], [], [1.0], ["t"], rows, spec, WORLD)
    micro = torch.arange(6)
    chat = rows.chat_rows(micro)
    assert torch.equal(chat, torch.tensor([s == 0 for s, _ in rows.locate(micro)])) and 0 < int(chat.sum()) < 6
    view = dynamic.Reweighted(rows, 1, 0)  # a dynamic mixture's rows are flat ids: chat ids come first
    n_chat = rows.n_blocks[0]
    assert torch.equal(view.chat_rows(torch.tensor([0, n_chat - 1, n_chat])), torch.tensor([True, True, False]))
    ids, mask = rows[micro], rows.mask(micro)
    tokens = int(mask[:, 1:].sum())
    seen = []  # the teacher runs on the text rows alone: the chat rows' targets are never read
    hook = teacher.model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["input_ids"]), with_kwargs=True)
    sums = loop.loss_step(t, micro, (1.0,), None, tokens)
    hook.remove()
    assert len(seen) == 1 and torch.equal(seen[0], ids[~chat])
    ref = naive_sequence_kd_loss(ref_student, teacher, ids, mask, chat, spec)
    (ref / tokens).backward()
    ref = float(ref.detach())
    assert abs(float(sums[0]) - ref) <= 1e-5 * abs(ref)
    for (name, p), q in zip(student.named_parameters(), ref_student.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), name
    text_kd = naive_masked_loss(ref_student, teacher, ids[~chat], mask[~chat], replace(spec, ce_weight=0.0))
    assert abs(float(sums[1]) - float(text_kd)) <= 1e-4 * float(text_kd)  # the teacher's KL: text rows only
    counted, _, text_tokens = loop.step_tokens(t, 0, micro.view(1, 1, -1))
    assert counted == tokens and text_tokens == int(mask[~chat][:, 1:].sum()) < tokens
    logged = loop._means(t, sums, tokens, 0, text_tokens)
    assert logged["kl/t"] == pytest.approx(float(text_kd) / text_tokens, rel=1e-4)  # a mean over its own tokens
    only_chat = micro[chat]  # a micro-batch of chat rows alone calls no teacher, and trains by CE alone
    hook = teacher.model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["input_ids"]), with_kwargs=True)
    sums = loop.loss_step(t, only_chat, (1.0,), None, 1)
    hook.remove()
    ce = naive_masked_loss(ref_student, teacher, rows[only_chat], rows.mask(only_chat), replace(spec, ce_weight=1.0))
    assert len(seen) == 1 and float(sums[0]) == pytest.approx(float(ce), rel=1e-5) and float(sums[1]) == 0


def test_chat_loss_ce_needs_chat_data():
    teacher, student = models()
    text = TensorBlocks(torch.randint(3, 512, (6, 32), generator=torch.Generator().manual_seed(0)))
    with pytest.raises(WhelpError, match="chat_loss=ce .* no source of the data has a loss mask"):
        state.setup(student, [teacher], [], [1.0], ["t"], text, replace(SPEC, chat_loss="ce"), WORLD)
    with pytest.raises(WhelpError, match="--local .* drop chat_loss=ce"):
        replace(SPEC, chat_loss="ce", ce_weight=0.0, local=True)
