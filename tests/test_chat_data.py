"""Chat data: loss masks in the token-store format (old stores unchanged, damage named), conversations rendered with
their assistant spans, ``whelp generate --chat`` (Magpie self-instruct and answers to prompts, best of N by the
teacher's own score, the same store for the same seed and after a resume) and ``whelp tokenize --chat``.

The generation tests run a tiny random Llama over a tiny ChatML tokenizer (SmolLM2's template, trained on pydoc in
a second) whose end-of-turn row is pushed toward the mean hidden state, so that turns end; the masks are checked
against the spans found independently, from ``<|im_start|>assistant\\n`` to the next ``<|im_end|>`` in the ids."""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import bpe_tokenizer, run_cli, tiny_model, tiny_tokenizer

from whelp import models, store
from whelp.data import chat, chatgen, tokenstore
from whelp.data import generate as gen
from whelp.errors import WhelpError
from whelp.specs import GenerateSpec

CHATML = (  # SmolLM2-Instruct's chat template
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
HEADER = "<|im_start|>assistant\n"
SPEC = GenerateSpec(max_tokens=900, chat=True, new_tokens=16, request_tokens=8, batch_size=4, seed=2)


@functools.lru_cache(maxsize=1)
def chatml():
    """A 512-token byte-level BPE with ChatML's special tokens (``<|im_end|>`` its EOS) and SmolLM2's template."""
    fast = bpe_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny random teacher over ``chatml()`` whose ``<|im_end|>`` row is moved toward its mean final hidden state,
    so that it ends most turns within a few tokens (a random model would once in 512)."""
    path, tok = tmp_path_factory.mktemp("chat") / "teacher", chatml()
    model = tiny_model(vocab_size=len(tok), initializer_range=0.2)
    with torch.no_grad():
        hidden = model(torch.randint(len(tok), (4, 32)), output_hidden_states=True).hidden_states[-1]
        direction = hidden.reshape(-1, hidden.shape[-1]).mean(0)
        model.lm_head.weight[tok.eos_token_id] += 4 * direction / direction.norm()
    models.save_model(model, tok, path)
    return model, path


@pytest.fixture(scope="module")
def magpie(teacher, tmp_path_factory):
    """The self-instructed store of ``SPEC``."""
    return run(teacher, tmp_path_factory.mktemp("magpie") / "store")


def run(teacher, out, spec=SPEC, shard_tokens=300):
    model, path = teacher
    made = gen.generate(model, chatml(), out, spec, "teacher", path, progress=False, shard_tokens=shard_tokens)
    return tokenstore.open_store(made, chatml())


def assistant_spans(tok, ids) -> np.ndarray:
    """The reference mask: True from just after each ``<|im_start|>assistant\\n`` through the next ``<|im_end|>``
    (to the end when the stream is cut first); an ``<|im_end|>`` the template's newline does not follow is the
    document's EOS after an unfinished answer, not a target."""
    header, end = tok(HEADER, add_special_tokens=False).input_ids, tok.convert_tokens_to_ids("<|im_end|>")
    newline = tok("\n", add_special_tokens=False).input_ids
    ids, mask = list(ids), np.zeros(len(ids), dtype=bool)
    for at in (i for i in range(len(ids)) if ids[i : i + len(header)] == header):
        start = at + len(header)
        stop = next((j for j in range(start, len(ids)) if ids[j] == end), len(ids) - 1)
        closed = stop == len(ids) - 1 or ids[stop + 1 : stop + 1 + len(newline)] == newline
        mask[start : stop + 1 if closed else stop] = True
    return mask


def documents(s) -> list[np.ndarray]:
    """The stored conversations, split by the lengths each shard records."""
    ids = s.read(0, len(s))
    return np.split(ids, np.cumsum([n for sh in s.manifest["shards"] for n in sh["document_tokens"]])[:-1])


def parsed(tok, doc) -> list[dict]:
    """The turns of a rendered ChatML conversation, read back from its decoded text."""
    text = tok.decode(doc)
    return [{"role": r, "content": c} for r, c in re.findall(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>\n", text, re.S)]


# ---- the token-store format


def masked_store(path, parts, masks, shard_tokens=2):
    """A store written by hand with ``flush`` (one shard per ``shard_tokens`` parts) and ``seal``."""
    tok = chatml()
    identity = tokenstore.manifest_identity(tok, "hand", None, None, 99, **tokenstore.chat_identity(tok, (2,)))

    def fill(work, manifest):
        for i in range(0, len(parts), shard_tokens):
            tokenstore.flush(work, manifest, parts[i : i + shard_tokens], 1, masks[i : i + shard_tokens])
        tokenstore.seal(work, manifest, sum(map(len, parts)))

    return tokenstore.open_store(tokenstore.write(path, identity, False, fill))


def test_masks_are_read_back_bit_for_bit_and_old_stores_read_unchanged(tmp_path):
    g = np.random.default_rng(0)
    parts = [g.integers(0, 512, n).astype("<u2") for n in (13, 7, 21, 1, 9)]
    masks = [g.random(len(p)) < 0.4 for p in parts]
    s = masked_store(tmp_path / "m", parts, masks)
    ids, mask = np.concatenate(parts), np.concatenate(masks)
    assert s.has_mask and s.manifest["mask"] == 1 and s.manifest["targets"] == mask.sum()
    shard = s.manifest["shards"][0]
    bits = (s.path / "mask-00000.bin").read_bytes()
    assert shard["mask"]["file"] == "mask-00000.bin" and len(bits) == shard["mask"]["bytes"] == (13 + 7 + 7) // 8
    assert bits == np.packbits(mask[:20], bitorder="little").tobytes()
    for a, b in [(0, len(ids)), (3, 4), (12, 22), (19, 21), (5, 48), (len(ids), len(ids))] + [
        tuple(sorted(g.integers(0, len(ids) + 1, 2))) for _ in range(30)
    ]:
        assert np.array_equal(s.read_mask(a, b), mask[a:b]) and np.array_equal(s.read(a, b), ids[a:b])
    with pytest.raises(WhelpError, match="outside the store"):
        s.read_mask(0, len(ids) + 1)

    text = tmp_path / "t.jsonl"  # a text store: no mask key, its fingerprint as before masks
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("one", "two words", "three more words")))
    plain = tokenstore.open_store(tokenstore.tokenize(str(text), tiny_tokenizer(), tmp_path / "p", 1, progress=False))
    assert "mask" not in plain.manifest and "targets" not in plain.manifest and not plain.has_mask
    shas = [sh["sha256"] for sh in plain.manifest["shards"]]
    assert plain.fingerprint == store.content_id([plain.manifest["dtype"], shas])
    assert not any(p.name.startswith("mask-") for p in plain.path.iterdir())
    with pytest.raises(WhelpError, match="has no loss mask"):
        plain.read_mask(0, 1)


def test_a_damaged_mask_shard_is_named_and_an_all_zero_mask_is_refused(tmp_path):
    parts = [np.arange(10, dtype="<u2"), np.arange(20, dtype="<u2")]
    masks = [np.arange(10) % 3 == 0, np.arange(20) % 2 == 0]
    s = masked_store(tmp_path / "m", parts, masks, shard_tokens=1)
    bits = s.path / "mask-00001.bin"
    raw = bits.read_bytes()
    bits.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    reopened = tokenstore.open_store(s.path)
    assert np.array_equal(reopened.read_mask(0, 10), masks[0])  # only the shard a read touches is hashed
    with pytest.raises(WhelpError, match=r"mask shard .*mask-00001.bin is corrupted"):
        reopened.read_mask(5, 15)
    bits.write_bytes(raw[:-1])
    with pytest.raises(WhelpError, match=r"tokens-00001.bin has its mask shard mask-00001.bin, which is truncated"):
        tokenstore.open_store(s.path)
    with pytest.raises(WhelpError, match="without one assistant token to train on"):
        masked_store(tmp_path / "zero", parts, [np.zeros(10, bool), np.zeros(20, bool)])


# ---- rendering


def test_render_masks_each_assistant_turn_through_its_end_of_turn():
    tok = chatml()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    ids, mask = chat.render(tok, messages)
    assert ids == tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert np.array_equal(mask, assistant_spans(tok, ids)) and mask.sum() > 0
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Hello! How can I help?<|im_end|>4<|im_end|>"
    assert ids[-1] == tok("\n").input_ids[0] and not mask[-1]  # the newline after the last end of turn is context
    prefix = chat.user_prefix(tok)
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert tok.decode(prefix) == f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
    assert chat.end_of_turn_ids(tok, {"eos_token_id": [0, 2]}) == (0, 2) and chat.end_of_turn_ids(tok) == (2,)
    with pytest.raises(WhelpError, match="has no chat template .*; --chat needs an instruct model"):
        chat.check_chat_template(tiny_tokenizer(), "teacher t")


@pytest.mark.demo
def test_the_demo_teachers_own_template_masks_its_answers(demo_tokenizer, demo_dir):
    messages = [
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7 is prime."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "11."},
    ]
    eot = chat.saved_end_of_turn(demo_tokenizer, demo_dir)
    ids, mask = chat.render(demo_tokenizer, messages, eot)
    assert eot == (demo_tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    assert np.array_equal(mask, assistant_spans(demo_tokenizer, ids))
    assert demo_tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "7 is prime.<|im_end|>11.<|im_end|>"
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    prefix = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
    assert chat.user_prefix(demo_tokenizer) == demo_tokenizer(prefix, add_special_tokens=False).input_ids


def test_loops_catches_repetition_and_passes_ordinary_answers():
    normal = (
        "Paris is the capital of France. It lies on the Seine, and it is known for the Louvre, the Eiffel Tower "
        "and its cafes. About two million people live in the city itself."
    )
    assert not chat.loops(normal) and not chat.loops(list(range(40)))
    assert chat.loops(normal + " I hope this helps. I hope this helps. I hope this helps.")
    assert chat.loops("- buy milk\n- call mom\n- buy milk\n- call mom\n- buy milk\n- call mom")
    assert chat.loops([5, 6, 7, 8] * 3) and not chat.loops([5, 6, 7, 8] * 2)
    seen = chat.Seen()
    seen.add("How do I bake sourdough bread at home?")
    assert seen.duplicate("how do I bake  sourdough bread at home") and not seen.duplicate("What is a monad?")
    assert seen.duplicate("How do I bake sourdough bread at home quickly?")  # Jaccard 6/7 of word 3-grams


def test_refuses_catches_refusals_and_passes_ordinary_answers():
    refusals = [
        "I'm sorry, but I can't help with that.",
        "Sure! However, as a chatbot, I don't have the ability to browse the web.",
        "As an AI language model, I do not have personal opinions.",
        "I apologize for the confusion.",
        "While I’m here to help, I’m not capable of listing every album of 2023.",
        "I cannot provide medical advice.",
        "I am unable to open links.",
    ]
    fine = [
        "The capital of France is Paris.",
        "You can't go wrong with a walk after dinner; I can recommend three routes.",
        "Sorry to hear that! Here are three tips: sleep, water, and a short walk.",
        "An AI is a program; as a rule, it learns from data.",
    ]
    assert all(map(chat.refuses, refusals)) and not any(map(chat.refuses, fine))


# ---- whelp generate --chat


def test_self_instruct_same_seed_same_store_of_user_and_assistant_turns_with_their_masks(teacher, magpie, tmp_path):
    a, b = magpie, run(teacher, tmp_path / "b")
    assert a.fingerprint == b.fingerprint and len(a) == 900 and len(a.manifest["shards"]) > 1
    other = run(teacher, tmp_path / "c", replace(SPEC, seed=3, max_tokens=200))
    assert not np.array_equal(other.read(0, 200), a.read(0, 200))
    tok, ids = chatml(), a.read(0, len(a))
    assert np.array_equal(a.read_mask(0, len(a)), assistant_spans(tok, ids))
    docs, requests, unfinished = documents(a), [], 0
    close = [tok.eos_token_id, *tok("\n", add_special_tokens=False).input_ids]  # ChatML's end of every turn
    for doc in docs[:-1]:  # the last is cut at max_tokens
        assert doc[-1] == tok.eos_token_id
        body = list(doc[:-1])
        closing = [] if body[-len(close) :] == close else close  # an unfinished answer stops without its turn's end
        unfinished += bool(closing)
        turns = parsed(tok, np.array(body + closing))
        assert [t["role"] for t in turns] == ["system", "user", "assistant"]
        assert body + closing == tok.apply_chat_template(turns, tokenize=True, return_dict=False)
        assert turns[1]["content"].strip() and turns[2]["content"].strip()
        requests.append(" ".join(re.findall(r"\w+", turns[1]["content"].lower())))
    assert len(set(requests)) == len(requests)  # no request repeated
    counts = a.manifest["chat"]
    assert counts["kept"] == a.manifest["documents"] == len(docs) and counts["dropped"]["duplicate"] > 0
    assert 0 < unfinished <= counts["unfinished"] and counts["dropped"]["no_end"] > 0  # requests still need an end
    assert a.manifest["targets"] == a.read_mask(0, len(a)).sum()


def test_an_interrupted_chat_run_resumes_to_the_same_store(teacher, magpie, tmp_path, monkeypatch):
    whole = magpie
    real, calls = tokenstore.flush, []

    def interrupted(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tokenstore, "flush", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(teacher, tmp_path / "out")
    monkeypatch.undo()
    assert len(store.read_record(tmp_path / "out" / tokenstore.MANIFEST, "")["shards"]) == 1
    resumed = run(teacher, tmp_path / "out")
    assert resumed.fingerprint == whole.fingerprint and resumed.manifest["chat"] == whole.manifest["chat"]
    model, _ = teacher
    t = chatgen.Teacher(model, chatml(), SPEC, (2,), gen.generation_config(SPEC, chatml()))
    seen = chatgen._seen(t, whole.path, whole.manifest, chat.user_prefix(chatml()))
    for doc in documents(whole)[:-1]:  # what a resumed run holds: every kept request
        assert seen.duplicate(parsed(chatml(), doc)[1]["content"])


def test_answers_to_prompts_keep_the_teachers_best_of_n(teacher, tmp_path, monkeypatch):
    model, _ = teacher
    tok, prompts = chatml(), tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Explain topic {i}."} for i in range(5)] + [
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Why?"},
            ]
        }
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = replace(SPEC, prompts=str(prompts), samples_per_prompt=3, max_tokens=10_000)
    sampled, real = [], chatgen.continuations
    monkeypatch.setattr(chatgen, "continuations", lambda m, p, c: sampled.extend(out := real(m, p, c)) or out)
    s = run(teacher, tmp_path / "s", spec)
    assert len(sampled) == 3 * len(rows) and s.manifest["total_tokens"] < spec.max_tokens  # every prompt answered once
    want, dropped, later = [], dict.fromkeys(chatgen.REASONS, 0), 0
    for i, row in enumerate(rows):
        messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        start = len(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False))
        scored = []
        for ids, ended in sampled[3 * i : 3 * i + 3]:
            answer = tok.decode(ids, skip_special_tokens=True).strip()
            why = "empty" if not answer else "loop" if chat.loops(answer) else None if ended else "no_end"
            if why:
                dropped[why] += 1
                continue
            conv = tok.apply_chat_template(
                [*messages, {"role": "assistant", "content": answer}], tokenize=True, return_dict=False
            )
            end = conv.index(tok.eos_token_id, start)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([conv])).logits[0].double(), -1)
            scored.append((float(sum(logp[j - 1, conv[j]] for j in range(start, end + 1)) / (end + 1 - start)), conv))
        if scored:
            best = max(range(len(scored)), key=lambda k: scored[k][0])
            want.append(scored[best][1] + [tok.eos_token_id])
            later += best > 0
    assert [list(d) for d in documents(s)] == want and len(want) >= 3 and later >= 1  # not merely the first
    assert np.array_equal(s.read_mask(0, len(s)), assistant_spans(tok, s.read(0, len(s))))
    assert s.manifest["chat"] == {"kept": len(want), "unfinished": 0, "dropped": dropped}


def test_answers_that_loop_or_refuse_are_dropped_finished_or_not(teacher, tmp_path, monkeypatch):
    """One answer per request (``samples_per_prompt`` 1, where an unfinished answer is kept as far as it went): a
    looping one is dropped whether it ended or not, a refusal only with ``drop_refusals``; each counted by reason."""
    tok, prompts = chatml(), tmp_path / "prompts.jsonl"
    said = {
        "Name a fruit.": ("An apple is a fruit.", True),
        "Name a tree.": ("The oak is a tall tree with", False),  # unfinished: kept as far as it went
        "Name a river.": ("I'm sorry, but I cannot name rivers.", True),
        "Name a city.": ("Rome is a city. " * 4, False),  # loops, unfinished
        "Name a colour.": ("Red and blue. " * 4, True),  # loops, finished
    }
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in said))
    ids = {p: tok(text, add_special_tokens=False).input_ids for p, (text, _) in said.items()}

    def scripted(model, batch, config):  # each prompt's scripted answer, by the request it ends with
        asked = [
            next(p for p in said if tok.decode(b).rstrip().endswith(f"{p}<|im_end|>\n{HEADER.strip()}")) for b in batch
        ]
        return [(np.array(ids[p]), said[p][1]) for p in asked]

    monkeypatch.setattr(chatgen, "continuations", scripted)
    kept = {}
    for drop in (False, True):
        spec = replace(SPEC, prompts=str(prompts), max_tokens=10_000, drop_refusals=drop)
        s = run(teacher, tmp_path / f"s{drop}", spec)
        kept[drop] = [parsed(tok, d)[1]["content"] for d in documents(s)]
        counts = s.manifest["chat"]
        assert counts["dropped"] == {**dict.fromkeys(chatgen.REASONS, 0), "loop": 2, "refusal": int(drop)}
        assert counts["unfinished"] == 1 and counts["kept"] == len(kept[drop])
    assert kept == {False: ["Name a fruit.", "Name a tree.", "Name a river."], True: ["Name a fruit.", "Name a tree."]}


def test_system_turn_is_shown_to_the_teacher_and_left_out_of_the_store(teacher, tmp_path, monkeypatch):
    """Context distillation: every prompt the teacher samples from (and every conversation it scores) starts with
    the ``system`` turn in place of the template's default; the stored conversations are the plain ones."""
    model, path = teacher
    tok, prompts = chatml(), tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Name thing {i}."} for i in range(3)]
    rows.append({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})
    rows[-1]["messages"].append({"role": "user", "content": "Why?"})
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    system = "<|im_start|>system\nAnswer in one word.<|im_end|>\n"
    sampled, scored, real_sample, real_score = [], [], chatgen.continuations, chatgen.mean_logprob
    monkeypatch.setattr(chatgen, "continuations", lambda m, p, c: sampled.extend(p) or real_sample(m, p, c))
    monkeypatch.setattr(chatgen, "mean_logprob", lambda m, ids, t: scored.append(ids) or real_score(m, ids, t))
    spec = replace(SPEC, prompts=str(prompts), max_tokens=10_000, samples_per_prompt=2, system="Answer in one word.")
    s = run(teacher, tmp_path / "s", spec)
    assert len(sampled) == 2 * len(rows) and scored
    assert all(tok.decode(ids).startswith(system) for ids in sampled + scored)
    docs = [parsed(tok, d) for d in documents(s)]
    assert docs and all(
        d[0]["content"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face" for d in docs
    )
    for doc in documents(s):  # each stored conversation is the template's rendering of its plain turns
        want = tok.apply_chat_template(parsed(tok, doc)[1:], tokenize=True, return_dict=False)
        assert list(doc) == want + [tok.eos_token_id]
    assert np.array_equal(s.read_mask(0, len(s)), assistant_spans(tok, s.read(0, len(s))))
    assert s.manifest["generation"]["system"] == "Answer in one word."
    assert "system" not in run(teacher, tmp_path / "plain", replace(spec, system=None)).manifest["generation"]

    monkeypatch.setattr(chatgen, "continuations", lambda *a: pytest.fail("the teacher sampled"))
    own = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
    (tmp_path / "own.jsonl").write_text(json.dumps({"messages": own}) + "\n")
    strict = copy.deepcopy(chatml())  # chatml() is shared
    strict.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    for tokenizer, source, message in (
        (tok, tmp_path / "own.jsonl", "own.jsonl:1 has a system turn of its own and --system adds one"),
        (strict, prompts, "--system: the chat template refuses the conversation: no system role"),
    ):
        with pytest.raises(WhelpError, match=message):
            gen.generate(
                lambda: pytest.fail("a model was loaded"),
                tokenizer,
                tmp_path / "x",
                replace(spec, prompts=str(source)),
                "teacher",
                path,
                progress=False,
                teacher_config=model.config,
            )
    assert not (tmp_path / "x").exists()


# ---- the command line


def test_tokenize_chat_rows_and_bad_inputs_are_one_line_before_any_model_loads(teacher, tmp_path, monkeypatch):
    _, path = teacher
    tok, data = chatml(), tmp_path / "chat.jsonl"
    convs = [
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
        [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Bonjour"},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "De rien"},
        ],
    ]
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    done = run_cli("tokenize", str(data), "--tokenizer", str(path), "--out", str(tmp_path / "s"), "--chat")
    assert done.exit_code == 0 and "of 2 conversations" in done.stdout, done.stderr
    s = tokenstore.open_store(tmp_path / "s", tok)
    ids = s.read(0, len(s))
    want = [i for c in convs for i in tok.apply_chat_template(c, tokenize=True, return_dict=False) + [tok.eos_token_id]]
    assert list(ids) == want and np.array_equal(s.read_mask(0, len(s)), assistant_spans(tok, ids))
    assert f"{s.manifest['targets']} tokens are training targets" in done.stdout

    plain = tmp_path / "plain"
    models.save_model(tiny_model(vocab_size=512), tiny_tokenizer(), plain)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "no turns"}) + "\n")
    out = str(tmp_path / "o")
    for args, message in (
        (
            ["tokenize", str(data), "--tokenizer", str(plain), "--out", out, "--chat"],
            "tokenizer .* has no chat template",
        ),
        (
            ["tokenize", str(tmp_path / "bad.jsonl"), "--tokenizer", str(path), "--out", out, "--chat"],
            "bad.jsonl:1 has no 'messages'",
        ),
        (
            ["tokenize", str(data), "--tokenizer", str(path), "--out", out],
            "chat.jsonl:1 has no 'text' column .* need --chat",
        ),
        (
            ["generate", str(plain), "--out", out, "--max-tokens", "400", "--chat"],
            "teacher .* has no chat template .*; --chat needs an instruct model",
        ),
        (
            [
                "generate",
                str(path),
                "--out",
                out,
                "--max-tokens",
                "400",
                "--chat",
                "--prompts",
                str(tmp_path / "bad.jsonl"),
            ],
            "bad.jsonl:1 has no 'messages' .* or 'prompt'",
        ),
        (
            ["generate", str(path), "--out", out, "--max-tokens", "400", "--chat", "--prompts", "pydoc:train"],
            "pydoc:train holds plain text, not rows",
        ),
        (
            ["generate", str(path), "--out", out, "--max-tokens", "9", "--samples-per-prompt", "2"],
            "--samples-per-prompt needs --chat",
        ),
        (["generate", str(path), "--out", out, "--max-tokens", "9", "--drop-refusals"], "--drop-refusals needs --chat"),
        (["generate", str(path), "--out", out, "--max-tokens", "9", "--system", "Be brief."], "--system needs --chat"),
        (["generate", str(path), "--out", out, "--max-tokens", "400", "--chat", "--system", " "], "--system is empty"),
    ):
        bad = run_cli(*args)
        assert bad.exit_code == 2 and re.search(message, bad.stderr) and len(bad.stderr.splitlines()) == 1, bad.stderr
    assert not (tmp_path / "o").exists()
