"""Chat behaviour evaluation: the metrics against hand-computed values, greedy answers and the reference's NLL against
stock transformers on tiny models over the real SmolLM2 tokenizer (and its ChatML template), ``whelp eval --chat``
end to end, and the one-line refusals of bad prompts and templates."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli, save_tiny, tiny_model, tiny_tokenizer

from whelp.errors import WhelpError
from whelp.evals import api, behaviour, chat, harness, report
from whelp.specs import EvalSpec

PROMPTS = [
    {"prompt": "What is the capital of France?", "answer": ["Paris"]},
    {"prompt": "List three fruits as bullet points.", "format": {"kind": "bullets", "n": 3}},
    {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi, I am Sam."},
            {"role": "assistant", "content": "Hello Sam!"},
            {"role": "user", "content": "Write a haiku about the sea, please, in three short lines."},
        ]
    },
]


def write_prompts(path, rows=PROMPTS) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_the_loop_rule_on_crafted_answers():
    french = "The French is a French is a French is a French is a French".split()
    listing = "The following are a list of the list of the list of the list of the list of".split()
    normal = (
        "Here are three fruits: 1. Apple , a red fruit. 2. Banana , a yellow fruit. 3. Cherry , a small fruit.".split()
    )
    assert chat.loops(french) and chat.loops(listing)  # "French is a French is a" x3, "list of the list of the" x3
    assert not chat.loops(normal)  # "a ... fruit." frames share at most 2-grams three times
    assert not chat.loops(french[:-2]) and not chat.loops(listing[:-4])  # each 6-gram twice at most
    assert chat.loops([5, 7] + [9] * 8) and not chat.loops([5, 7] + [9] * 7)  # one token 8 times: (9,) * 6 x3
    assert chat.loops(list("abcdeabcdeabcdea")) and not chat.loops(list("abcdeabcdeabcde"))  # abcdea at 0, 5, 10
    assert not chat.loops([1, 2, 3]) and not chat.loops([])


def test_the_loop_rule_on_token_ids():
    tok = tiny_tokenizer()  # any tokenizer: the rule reads ids
    assert chat.loops(tok("The French is a French is a French is a French is a French").input_ids)
    assert not chat.loops(tok("Here are three fruits:\n- Apple\n- Banana\n- Cherry").input_ids)


def test_rouge_l_is_the_lcs_f1_on_whitespace_tokens():
    assert chat.lcs_length("ABCBDAB", "BDCABA") == 4  # the textbook example (BCBA)
    assert chat.lcs_length([], [1]) == 0 and chat.lcs_length([1, 2], [2, 1]) == 1
    # LCS "the cat on mat" = 4 of 6 and 6 tokens: P = R = 4/6
    assert chat.rouge_l("the cat sat on the mat", "the cat lay on a mat") == pytest.approx(4 / 6)
    # LCS "a c" = 2: P = 2/4, R = 2/2, F1 = 2 * 0.5 * 1 / 1.5
    assert chat.rouge_l("a b c d", "a c") == pytest.approx(2 / 3)
    assert chat.rouge_l("The end", "the end") == pytest.approx(0.5)  # case kept
    assert chat.rouge_l("x", "y") == 0 and chat.rouge_l("", " ") == 1 and chat.rouge_l("a", "") == 0
    assert chat.mean_rouge_l(["a b", "x"], ["a b", "y"]) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "fmt, good, bad",
    [
        (
            {"kind": "bullets", "n": 3},
            "Fruits:\n- Apple\n  * Banana\n• Cherry",
            ["- a\n- b", "1. a\n2. b\n3. c", "-a\n-b\n-c"],
        ),
        ({"kind": "lowercase"}, "a small cat sleeps, 3 times.", ["A small cat", "123"]),
        ({"kind": "uppercase"}, "HELLO!", ["Hello"]),
        ({"kind": "max_words", "n": 5}, "one two three four", ["one two three four five"]),
        ({"kind": "end_with", "word": "today"}, "It is sunny TODAY!", ["Today it is sunny.", "It is todays"]),
        ({"kind": "starts_with", "word": "Yes"}, "**Yes**, water is wet.", ["Yesterday it rained.", "Well, yes."]),
        ({"kind": "no_commas"}, "a b c.", ["a, b"]),
        ({"kind": "paragraphs", "n": 2}, "One.\nStill one.\n\n  \nTwo.", ["One.\nTwo.", "A\n\nB\n\nC"]),
    ],
)
def test_format_checks(fmt, good, bad):
    assert chat.follows(good, fmt)
    assert not any(chat.follows(text, fmt) for text in bad)
    assert not chat.follows("  \n", fmt)  # an empty answer follows no instruction


def test_accuracy_matches_words_on_boundaries_and_numbers_by_value():
    assert chat.correct("The capital of France is Paris.", ["Paris"]) and chat.correct("it is paris", ["Paris"])
    assert not chat.correct("Parisian food is good.", ["Paris"])
    assert chat.correct("7 times 8 is 56.", ["56"]) and chat.correct("That makes 56.0", ["56"])
    assert not any(chat.correct(t, ["56"]) for t in ("560", "5.6", "0.56", "56th", "It is 65"))
    assert chat.correct("About 1,000 people", ["1000"]) and chat.correct("-3 degrees", ["-3"])
    assert chat.correct("It is fifty-six.", ["56", "fifty-six"]) and not chat.correct("It is 57.", ["56", "fifty-six"])


def test_the_answer_span_is_where_the_accepted_answer_is_written():
    assert chat.answer_span("The capital of France is Paris.", ["Paris"]) == (25, 30)
    assert chat.answer_span("it is paris, then Paris", ["Paris"]) == (6, 11)  # the first, case-insensitive
    assert chat.answer_span("560 or 56.0 people", ["56"]) == (7, 11)  # by value, not the 56 of 560
    assert chat.answer_span("About 1,000", ["1000"]) == (6, 11)
    assert chat.answer_span("fifty-six or 56", ["56", "fifty-six"]) == (13, 15)  # accepted answers in order
    assert chat.answer_span("Parisian", ["Paris"]) is None


def test_kept_counts_the_references_right_answers_the_model_also_gets():
    def row(correct):
        return {"correct": correct}

    refs = [row(True), row(True), row(False), row(None), row(True)]
    answers = [row(True), row(False), row(True), row(None), row(True)]
    assert chat.kept(answers, refs) == 2 / 3  # its right answer where the reference was wrong does not count
    assert chat.kept(answers, [row(False)] * 5) is None
    with pytest.raises(ValueError):
        chat.kept(answers[:4], refs)


def test_summary_of_judged_answers():
    rows = chat.parse_prompts([json.dumps(r) for r in PROMPTS], "p")
    answers = [
        chat.judged(rows[0], "Paris.", [1, 2], True),
        chat.judged(rows[1], "- a\n- b\n- c", [3, 4] * 5, False),  # (3, 4, 3, 4, 3, 4) x3: loops
        chat.judged(rows[2], " ", [9], True),
        chat.judged(rows[2], "I'm sorry, I can't count.", [7, 8], True),
    ]
    assert [a["refusal"] for a in answers] == [False, False, False, True]
    assert chat.summary(answers) == {
        "loop": 1 / 4,
        "ended": 3 / 4,
        "empty": 1 / 4,
        "refusal": 1 / 4,
        "accuracy": 1.0,
        "format": 1.0,
        "prompts": 4,
        "checked": 1,
        "formatted": 1,
    }
    assert chat.summary(answers[2:])["accuracy"] is None


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "not JSON"),
        ('{"text": "hi"}', 'a row needs "messages"'),
        ('{"prompt": "hi", "messages": []}', 'a row needs "messages"'),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
            "last turn is 'assistant'",
        ),
        ('{"messages": [{"role": "robot", "content": "a"}, {"role": "user", "content": "b"}]}', "each message is"),
        ('{"prompt": "hi", "answer": "Paris"}', '"answer" must be a list'),
        ('{"prompt": "hi", "format": {"kind": "haiku"}}', "one of bullets"),
        ('{"prompt": "hi", "format": {"kind": "bullets"}}', r"format 'bullets' takes n \(int\)"),
        ('{"prompt": "hi", "format": {"kind": "bullets", "n": 0}}', r"format 'bullets' takes n \(int\)"),
        ('{"prompt": "hi", "checks": 1}', "unknown key 'checks'"),
    ],
)
def test_bad_prompt_rows_fail_in_one_line_naming_the_row(line, message):
    with pytest.raises(WhelpError, match=rf"^p.jsonl line 3: .*{message}") as info:
        chat.parse_prompts(['{"prompt": "ok"}', "", line], "p.jsonl")
    assert "\n" not in str(info.value)


def test_the_built_in_set_parses_and_has_its_checks():
    rows = behaviour.read_prompts("chat:general")
    assert len(rows) >= 100 and len({r.text for r in rows}) == len(rows)
    assert sum(bool(r.answers) for r in rows) >= 30 and sum(r.format is not None for r in rows) >= 20
    assert {r.format["kind"] for r in rows if r.format} == set(chat.FORMATS)
    assert len(behaviour.read_prompts("chat:general", limit=5)) == 5
    with pytest.raises(WhelpError, match="unknown chat prompt set 'chat:nope'; choose chat:general"):
        EvalSpec(chat=("chat:nope",))
    with pytest.raises(WhelpError, match="give --tasks too"):
        EvalSpec(apply_chat_template=True)


def test_report_directions_of_the_behaviour_rows():
    kinds = {m: report.direction(f"chat:general/{m}", {}) for m in chat.METRICS}
    assert kinds == {
        "loop": "share_lower",
        "ended": "higher",
        "empty": "share_lower",
        "refusal": "share_lower",
        "accuracy": "higher",
        "kept": "higher",
        "fact_nll": "lower",
        "format": "higher",
        "ref_nll": "lower",
        "rouge_l": "higher",
    }
    assert report.percent("share_lower", 0.1, 0.55) == pytest.approx(50)  # 45% good answers of the reference's 90%
    assert report.percent("lower", 1.5, 3.0) == pytest.approx(50)


def test_the_report_shows_the_first_answers_side_by_side_and_writes_them_all(tmp_path):
    def result(label, answers):
        judged = [
            chat.judged(chat.Prompt(({"role": "user", "content": f"q{i}?"},)), a, a.split(), True)
            for i, a in enumerate(answers)
        ]
        empty = {"size": {}, "speed": {}, "perplexity": {}, "lm_eval": {"scores": {}, "higher_is_better": {}}}
        return {"label": label, **empty, "behaviour": {"chat:x": {"answers": judged, "metrics": chat.summary(judged)}}}

    long = "word " * 100
    metrics = {
        "settings": {},
        "models": [result("t", ["a <b>\n\n- c | d", "x", long, "y"]), result("s", ["", "x x", "z", "w"])],
    }
    text = report.markdown(metrics)
    assert "| t | a &lt;b&gt;<br>- c \\| d |\n| s | (empty) |" in text
    assert f"| t | {'word ' * 47}word ... _(loops)_ |" in text and "q3?" not in text  # cut to 240 characters; 3 prompts
    report.write_report(metrics, tmp_path / "out")
    rows = [json.loads(line) for line in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["q0?", "q1?", "q2?", "q3?"] and rows[1]["answers"]["s"]["answer"] == "x x"
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["models"][0]["behaviour"] == {
        "chat:x": {"metrics": chat.summary(metrics["models"][0]["behaviour"]["chat:x"]["answers"])}
    }
    assert "## Answers" not in report.markdown(written)  # read back, the metrics hold no answers


@pytest.mark.demo
def test_end_of_turn_tokens_are_the_generation_configs_and_the_tokenizers(demo_tokenizer):
    from transformers import GenerationConfig

    tok = demo_tokenizer
    assert behaviour.end_tokens(tok, GenerationConfig(eos_token_id=[0, 2])) == ("<|endoftext|>", "<|im_end|>")
    assert behaviour.end_tokens(tok, None) == ("<|im_end|>",)
    assert behaviour.stop_ids(tok, ("<|endoftext|>", "<|im_end|>"), "m") == [0, 2]
    with pytest.raises(WhelpError, match="model 'm' has none of the reference's end-of-turn tokens"):
        behaviour.stop_ids(tiny_tokenizer(), ("<|im_end|>",), "m")


@pytest.fixture(scope="module")
def chat_models(demo_tokenizer):
    """Two tiny random Llamas over the SmolLM2 vocabulary; the reference's end-of-turn row scaled up so that some
    greedy answers end before their budget and others run to it."""
    models = []
    for seed in (1, 0):
        model = tiny_model(seed=seed, vocab_size=len(demo_tokenizer), initializer_range=0.2)
        with torch.no_grad():
            model.lm_head.weight[2] *= 4  # <|im_end|>
        models.append(model)
    return models


@pytest.mark.demo
def test_greedy_answers_equal_stock_generate_through_the_template(chat_models, demo_tokenizer, tmp_path):
    tok, model = demo_tokenizer, chat_models[0]
    spec = EvalSpec(chat=(write_prompts(tmp_path / "p.jsonl"),), chat_new_tokens=12, chat_batch_size=2)
    plan = behaviour.plan(spec, {"ref": model}, {"ref": tok})
    got = behaviour.answer(model, tok, plan, "ref", spec)["chat:p.jsonl"]["answers"]
    ended = []
    for row, answer in zip(PROMPTS, got):
        messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=[2], pad_token_id=2)[
            0, ids.shape[1] :
        ]
        stop = (out == 2).nonzero()
        new = out[: stop[0, 0]] if len(stop) else out
        assert answer["answer"] == tok.decode(new, skip_special_tokens=True)
        assert answer["tokens"] == len(new) and answer["ended"] == bool(len(stop))
        ended.append(answer["ended"])
    assert True in ended and False in ended  # both paths ran


@pytest.mark.demo
def test_ref_nll_is_the_references_mean_nll_per_answer_token(chat_models, demo_tokenizer, tmp_path):
    tok, (ref, student) = demo_tokenizer, chat_models
    spec = EvalSpec(chat=(write_prompts(tmp_path / "p.jsonl"),), chat_new_tokens=10, batch_size=2)
    plan = behaviour.plan(spec, {"ref": ref, "student": student}, {"ref": tok, "student": tok})
    own = behaviour.answer(ref, tok, plan, "ref", spec)
    theirs = behaviour.answer(student, tok, plan, "student", spec)
    name = "chat:p.jsonl"
    got = behaviour.scored(ref, tok, plan, theirs, own, spec)[name]["metrics"]
    total, count = 0.0, 0
    for text, answer in zip(plan.texts[name], theirs[name]["answers"]):
        prompt = tok(text, add_special_tokens=False).input_ids
        target = tok(answer["answer"], add_special_tokens=False).input_ids + [2] * answer["ended"]
        ids = torch.tensor([prompt + target])
        labels = torch.tensor([[-100] * len(prompt) + target])
        with torch.no_grad():
            total += float(ref(input_ids=ids, labels=labels).loss) * len(target)
        count += len(target)
    assert got["ref_nll"] == pytest.approx(total / count, rel=1e-5)
    own_texts = [a["answer"] for a in own[name]["answers"]]
    assert got["rouge_l"] == pytest.approx(chat.mean_rouge_l([a["answer"] for a in theirs[name]["answers"]], own_texts))
    assert behaviour.scored(ref, tok, plan, own, own, spec)[name]["metrics"]["rouge_l"] == 1.0


@pytest.mark.demo
def test_fact_nll_is_the_models_nll_of_the_answer_the_reference_got_right(chat_models, demo_tokenizer, tmp_path):
    tok, (ref, student) = demo_tokenizer, chat_models
    rows = [
        *PROMPTS,
        {"prompt": "What is 7 times 8?", "answer": ["56"]},
        {"prompt": "Capital of Peru?", "answer": ["Lima"]},
    ]
    spec = EvalSpec(chat=(write_prompts(tmp_path / "p.jsonl", rows),), chat_new_tokens=4, batch_size=2)
    plan = behaviour.plan(spec, {"ref": ref, "student": student}, {"ref": tok, "student": tok})
    name = "chat:p.jsonl"
    said = ["The capital of France is Paris, of course.", "- a", "Waves", "It is 56.0 in all.", "It is Quito."]
    crafted = [chat.judged(p, text, [0], True) for p, text in zip(plan.prompts[name], said)]
    assert [a["correct"] for a in crafted] == [True, None, None, True, False]
    got = behaviour.answer(student, tok, plan, "student", spec, {name: {"answers": crafted}})[name]
    nlls = []
    for text, (head, fact) in zip(
        (plan.texts[name][0], plan.texts[name][3]), (("The capital of France is", " Paris"), ("It is ", "56.0"))
    ):
        context = tok(text + head, add_special_tokens=False).input_ids
        target = tok(fact, add_special_tokens=False).input_ids
        assert tok(text + head + fact, add_special_tokens=False).input_ids == context + target
        ids = torch.tensor([context + target])
        with torch.no_grad():
            nlls.append(
                float(student(input_ids=ids, labels=torch.tensor([[-100] * len(context) + target])).loss) * len(target)
            )
    assert got["metrics"]["fact_nll"] == pytest.approx(sum(nlls) / 2, rel=1e-5)
    assert got["metrics"]["kept"] == chat.kept(got["answers"], crafted)
    contexts, facts = behaviour.fact_rows(tok, plan.texts[name], plan.prompts[name], crafted)
    # a token joining the space to the answer is the answer's; SmolLM2's lone space before digits is the context's
    assert [tok.decode(f) for f in facts] == [" Paris", "56.0"]
    wrong = [{**a, "correct": False} for a in crafted]
    assert (
        behaviour.answer(student, tok, plan, "student", spec, {name: {"answers": wrong}})[name]["metrics"]["fact_nll"]
        is None
    )


@pytest.mark.demo
def test_evaluate_judges_each_model_against_the_references_answers(chat_models, demo_tokenizer, tmp_path):
    from whelp.specs import SpeedSpec

    tok, (ref, student) = demo_tokenizer, chat_models
    spec = EvalSpec(chat=(write_prompts(tmp_path / "p.jsonl"),), chat_new_tokens=8, batch_size=2)
    plan = behaviour.plan(spec, {"ref": ref}, {"ref": tok})
    first = behaviour.answer(ref, tok, plan, "ref", spec)["chat:p.jsonl"]["answers"][0]["answer"]
    word = next(w for w in chat.WORD.findall(first) if w.isalpha())  # the reference "knows" this word
    rows = [{**PROMPTS[0], "answer": [word]}, *PROMPTS[1:]]
    spec = EvalSpec(
        ppl=(),
        chat=(write_prompts(tmp_path / "p.jsonl", rows),),
        chat_new_tokens=8,
        batch_size=2,
        speed=SpeedSpec(prompt_len=4, new_tokens=1, repeats=1),
    )
    models = {"ref": ref, "student": student}
    got = {m["label"]: m["behaviour"]["chat:p.jsonl"] for m in api.evaluate(models, tok, spec).metrics["models"]}
    plan = behaviour.plan(spec, models, {"ref": tok, "student": tok})
    own = behaviour.answer(ref, tok, plan, "ref", spec)
    theirs = behaviour.answer(student, tok, plan, "student", spec, own)["chat:p.jsonl"]["metrics"]
    assert (
        got["ref"]["metrics"]["kept"] == 1.0
        and got["ref"]["metrics"]["fact_nll"] < got["student"]["metrics"]["fact_nll"]
    )
    assert {k: got["student"]["metrics"][k] for k in ("kept", "fact_nll")} == pytest.approx(
        {k: theirs[k] for k in ("kept", "fact_nll")}
    )
    alone = behaviour.answer(student, tok, plan, "student", spec)["chat:p.jsonl"]["metrics"]
    assert alone["fact_nll"] != pytest.approx(theirs["fact_nll"]) or alone["kept"] != theirs["kept"]


class NoSpeed:
    """In place of ``SpeedProcess`` where speed is not the point: its subprocess costs most of an eval's time."""

    def __init__(self, _policy):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        return None

    def measure_each(self, models, _spec):
        return {label: {"peak_memory_bytes": 1} for label in models}


@pytest.mark.demo
def test_eval_chat_end_to_end(tmp_path, demo_tokenizer, monkeypatch):
    monkeypatch.setenv("WHELP_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(api, "SpeedProcess", NoSpeed)
    dirs = [tmp_path / "teacher", tmp_path / "student"]
    for path, seed in zip(dirs, (0, 1)):
        save_tiny(path, demo_tokenizer, seed=seed, initializer_range=0.2)
    prompts = write_prompts(tmp_path / "p.jsonl")
    args = [
        "eval",
        f"student={dirs[1]}",
        "--baseline",
        f"teacher={dirs[0]}",
        "--out",
        str(tmp_path / "out"),
        "--chat",
        prompts,
        "--chat-new-tokens",
        "6",
        "--max-tokens",
        "64",
        "--seq-len",
        "32",
        "--speed-prompt-len",
        "4",
        "--speed-new-tokens",
        "1",
        "--speed-repeats",
        "1",
    ]
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    name = "chat:p.jsonl"
    flats = [report.flat_metrics(m) for m in metrics["models"]]
    assert {
        f"{name}/{m}" for m in ("loop", "ended", "empty", "refusal", "accuracy", "format", "ref_nll", "rouge_l")
    } <= set(flats[1])
    for model in metrics["models"]:  # the random teacher answers nothing right: nothing to keep
        assert {"kept": None, "fact_nll": None}.items() <= model["behaviour"][name]["metrics"].items()
    assert flats[0][f"{name}/rouge_l"] == 1.0 and flats[1][f"{name}/ref_nll"] > 0
    assert "answers" not in json.dumps(metrics)  # the answers are in answers.jsonl
    rows = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [
        PROMPTS[0]["prompt"],
        PROMPTS[1]["prompt"],
        PROMPTS[2]["messages"][-1]["content"],
    ]
    assert all(set(r["answers"]) == {"teacher", "student"} for r in rows)
    assert (
        rows[0]["answers"]["student"]["correct"] in (True, False) and rows[2]["answers"]["student"]["correct"] is None
    )
    text = (out / "report.md").read_text()
    assert f"| {name}/loop | % recovered ((1-model)/(1-ref)) |" in text
    assert "**" + name + " #1**: What is the capital of France?" in text
    first = text.split(f"**{name} #1**")[1].split("**")[0]
    assert "| teacher | " in first and "| student | " in first

    def fail(*_args, **_kwargs):
        raise AssertionError("measured again a model whose results are cached")

    monkeypatch.setattr(api, "measure", fail)
    monkeypatch.setattr(api.whelp.models, "load_model", fail)
    again = run_cli(*args, "--force")
    assert again.exit_code == 0, again.stderr
    assert json.loads((out / "metrics.json").read_text())["models"][1]["reused"]
    assert (out / "answers.jsonl").read_text().splitlines() == [json.dumps(r) for r in rows]
    spec = EvalSpec(chat=(prompts,))
    before = behaviour.plan(spec, {"teacher": str(dirs[0])}, {"teacher": demo_tokenizer}).identity
    write_prompts(tmp_path / "p.jsonl", PROMPTS + PROMPTS[:1])
    after = behaviour.plan(spec, {"teacher": str(dirs[0])}, {"teacher": demo_tokenizer}).identity
    assert api.cache_key(str(dirs[1]), spec, before) != api.cache_key(str(dirs[1]), spec, after)  # a cache miss


@pytest.mark.demo
def test_eval_chat_refuses_bad_prompts_and_a_reference_without_template_before_loading(
    tmp_path, demo_tokenizer, monkeypatch
):
    def fail(*_args, **_kwargs):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(api.whelp.models, "load_model", fail)
    save_tiny(tmp_path / "chat", demo_tokenizer)
    save_tiny(tmp_path / "plain", tiny_tokenizer())
    good = write_prompts(tmp_path / "p.jsonl")
    bad = write_prompts(tmp_path / "bad.jsonl", [PROMPTS[0], {"text": "hi"}])
    for model, prompts, message in (
        ("chat", bad, f'error: {bad} line 2: a row needs "messages"'),
        ("chat", str(tmp_path / "none.jsonl"), f"error: chat prompts {tmp_path / 'none.jsonl'}: no such file"),
        ("plain", good, "error: reference model 'plain' has no chat template"),
    ):
        result = run_cli("eval", str(tmp_path / model), "--out", str(tmp_path / "out"), "--chat", prompts)
        assert result.exit_code == 2 and result.stderr.startswith(message) and result.stderr.count("\n") == 1
    (tmp_path / "other").mkdir()
    twin = write_prompts(tmp_path / "other" / "p.jsonl")
    result = run_cli("eval", str(tmp_path / "chat"), "--out", str(tmp_path / "o"), "--chat", good, "--chat", twin)
    assert result.exit_code == 2 and "two chat prompt sets have the same file name" in result.stderr
    result = run_cli(
        "eval", str(tmp_path / "plain"), "--out", str(tmp_path / "o"), "--tasks", "whelp_pydoc", "--apply-chat-template"
    )
    assert result.exit_code == 2 and "model 'plain' has no chat template" in result.stderr


def test_apply_chat_template_reaches_lm_eval(monkeypatch):
    import lm_eval

    seen = {}

    def simple_evaluate(**kwargs):
        seen.update(kwargs)
        return {"results": {}, "higher_is_better": {}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", simple_evaluate)
    for flag in (True, False):
        harness.run_tasks(tiny_model(), tiny_tokenizer(), ("whelp_pydoc",), None, apply_chat_template=flag)
        assert seen["apply_chat_template"] is flag and seen["tasks"] == ["whelp_pydoc"]


def test_a_recipe_eval_section_takes_the_chat_keys(tmp_path):
    from whelp import recipe

    path = tmp_path / "r.yaml"
    text = (
        "name: t\nteacher: {model: llama-3.1-8b}\ndata: {seq_len: 64}\nprune: {target: llama-3.2-1b}\n"
        "eval: {chat: [%s], chat_new_tokens: 32, chat_batch_size: 8}\n"
    )
    path.write_text(text % "chat:general")
    loaded = recipe.load(str(path))
    assert loaded.eval.chat == ("chat:general",) and loaded.eval.chat_new_tokens == 32
    assert loaded.eval.chat_batch_size == 8 and loaded.eval.batch_size == 4
    shown = run_cli("show", str(path))
    assert shown.exit_code == 0 and "chat:\n  - chat:general\n  chat_new_tokens: 32\n" in shown.stdout
    path.write_text(text.replace("chat_batch_size: 8", "chat_batch_size: 0") % "chat:general")
    bad = run_cli("validate", str(path))
    assert bad.exit_code == 2 and "chat_batch_size must be positive" in bad.stderr
    path.write_text(text % str(tmp_path / "none.jsonl"))
    bad = run_cli("validate", str(path))
    assert (
        bad.exit_code == 2
        and bad.stderr.startswith("error: recipe.eval.chat[0]: chat prompts")
        and "no such file" in bad.stderr
    )
    save_tiny(tmp_path / "plain", tiny_tokenizer())  # a local teacher without a chat template
    path.write_text(
        text.replace("llama-3.1-8b", str(tmp_path / "plain")).replace("llama-3.2-1b", "num_hidden_layers=1")
        % "chat:general"
    )
    bad = run_cli("validate", str(path))
    assert bad.exit_code == 2 and bad.stderr.startswith("error: recipe.eval.chat: the teacher has no chat template")


def test_behaviour_rows_enter_the_model_card_as_whelp_datasets():
    from whelp.card import _eval_result

    got = _eval_result("chat:general/loop", 0.125)
    assert (got.task_name, got.dataset_type, got.metric_type, got.metric_value) == (
        "chat:general",
        "whelp:chat:general",
        "loop",
        0.125,
    )
