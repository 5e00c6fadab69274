"""Evaluation harness on tiny in-process models: perplexity against stock transformers, lm-eval offline, report."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import naive_multiple_choice, run_cli, save_tiny, tiny_model

from whelp.errors import WhelpError
from whelp.evals import api, harness, report
from whelp.evals.perplexity import perplexity, token_nll, windows
from whelp.evals.tasks import whelp_data
from whelp.schema import from_dict

SHIPPED = ("whelp_pydoc", "whelp_licenses", "whelp_pydoc_next")


@pytest.fixture(scope="module")
def stream():
    return torch.randint(512, (101,), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny_vocab_model(demo_tokenizer):
    """A tiny model over the demo tokenizer's vocabulary, so lm-eval and bits per byte have real text."""
    return tiny_model(vocab_size=len(demo_tokenizer), initializer_range=0.2, max_position_embeddings=1024)


def stock_summed_loss(model, ids, labels) -> float:
    """Summed NLL from transformers' own (mean) loss: mean x number of predicted labels."""
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=labels[None]).loss
    return float(loss) * int((labels[1:] != -100).sum())


def test_fixed_windows_match_stock_transformers_loss(stream):
    model = tiny_model()
    got = perplexity(model, stream, seq_len=32, batch_size=2)
    bounds = [(0, 32), (32, 64), (64, 96), (96, 101)]
    total = sum(stock_summed_loss(model, stream[b:e], stream[b:e]) for b, e in bounds)
    assert got.tokens == 31 * 3 + 4
    assert got.nll == pytest.approx(total / got.tokens, rel=1e-5)
    assert got.ppl == pytest.approx(math.exp(got.nll))


def test_sliding_stride_matches_the_hf_guide_definition(stream):
    """The loop of the HF perplexity guide: each window masks (label -100) what the previous one scored."""
    model = tiny_model()
    seq_len, stride = 32, 8
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(stream), stride):
        end = min(begin + seq_len, len(stream))
        labels = stream[begin:end].clone()
        labels[: -(end - prev_end)] = -100
        total += stock_summed_loss(model, stream[begin:end], labels)
        count += int((labels[1:] != -100).sum())
        prev_end = end
        if end == len(stream):
            break
    got = perplexity(model, stream, seq_len=seq_len, stride=stride, batch_size=3)
    assert got.tokens == count == len(stream) - 1
    assert got.nll == pytest.approx(total / count, rel=1e-5)


def test_token_nll_is_minus_the_log_softmax_of_each_target_on_a_sliced_batch():
    """The row-layout cross-entropy the perplexity and the chat scores read equals a naive fp64 log-softmax and
    gather, on logits sliced as both slice them (not contiguous)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 50, generator=g) * 4
    targets = torch.randint(0, 50, (3, 8), generator=g)
    naive = -torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, targets[..., None])[..., 0]
    got = token_nll(logits[:, :-1], targets)
    assert got.shape == (3, 8) and torch.allclose(got.double(), naive, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n,seq_len,stride", [(101, 32, 8), (64, 16, 16), (50, 50, 7), (10, 32, 5), (33, 8, 1)])
def test_windows_score_each_token_once(n, seq_len, stride):
    scored = [t for begin, end, k in windows(n, seq_len, stride) for t in range(end - k, end)]
    assert len(scored) == len(set(scored))
    if stride < seq_len:
        assert sorted(scored) == list(range(1, n))
    assert all(end - begin <= seq_len and k <= end - begin - 1 for begin, end, k in windows(n, seq_len, stride))


@pytest.mark.demo
def test_bits_per_byte_is_the_token_nll_over_the_text_bytes(tiny_vocab_model, demo_tokenizer):
    from whelp.data import token_stream

    text = whelp_data.licenses()["test"][0]["text"][:3000]  # Apache-2.0
    ids = token_stream([text], demo_tokenizer)  # ends with EOS, which has no bytes
    one = perplexity(tiny_vocab_model, ids, seq_len=len(ids), tokenizer=demo_tokenizer)
    assert one.bytes == len(demo_tokenizer.decode(ids[1:], skip_special_tokens=True).encode("utf-8"))
    assert one.bits_per_byte == pytest.approx(one.nll * one.tokens / math.log(2) / one.bytes, rel=1e-12)
    slid = perplexity(tiny_vocab_model, ids, seq_len=128, stride=64, tokenizer=demo_tokenizer)
    first = len(demo_tokenizer.decode(ids[:1]).encode("utf-8"))
    assert abs(slid.bytes - (len(text.encode("utf-8")) - first)) <= 8  # byte-level BPE split at window edges
    assert slid.bits_per_byte == pytest.approx(slid.nll * slid.tokens / math.log(2) / slid.bytes, rel=1e-12)


def test_next_sentence_items_are_deterministic_and_true():
    from whelp.data import read_documents

    docs = read_documents("pydoc:eval")
    items = whelp_data.next_sentence_items(docs)
    assert items == whelp_data.next_sentence_items(docs) != whelp_data.next_sentence_items(docs, seed=1)
    assert len(items) >= 40
    pairs = {(a, b) for doc in docs for p in whelp_data.prose_paragraphs(doc) for a, b in zip(p, p[1:])}
    for item in items:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        assert (item["context"], item["choices"][item["gold"]]) in pairs
    assert 0.15 < sum(i["gold"] == 0 for i in items) / len(items) < 0.4


def test_unknown_tasks_name_the_close_matches():
    manager = harness.task_manager(SHIPPED)  # local names only: no scan of lm-eval's registry
    assert set(SHIPPED) <= set(manager.all_tasks)
    with pytest.raises(WhelpError, match="did you mean whelp_pydoc_next"):
        harness.check_tasks(("whelp_pydoc_nxt",), manager.all_tasks)
    with pytest.raises(WhelpError, match="include-path"):
        harness.task_manager(("whelp_pydoc",), ("/no/such/dir",))


@pytest.mark.demo
def test_lm_eval_offline_shipped_tasks_agree_with_whelp_perplexity(tiny_vocab_model, demo_tokenizer, monkeypatch):
    """lm-eval's rolling loglikelihood of a document that fits one window of max_length predicts all its tokens
    after a prefix token (BOS, else EOS): whelp's perplexity over [prefix] + document in one window is the same
    computation. (Longer
    documents differ only in lm-eval's last window, which it right-aligns for more context: see the demo test.)"""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from whelp.data import read_documents

    got = harness.run_tasks(
        tiny_vocab_model, demo_tokenizer, SHIPPED, harness.task_manager(SHIPPED), limit=1, max_length=512
    )
    scores = got["scores"]
    first = whelp_data.next_sentence_items(read_documents("pydoc:eval"))[0]  # limit=1: the task's first item
    want = naive_multiple_choice(tiny_vocab_model, demo_tokenizer, first, max_length=512)
    assert scores["whelp_pydoc_next/acc"] == want["acc"] and scores["whelp_pydoc_next/acc_norm"] == want["acc_norm"]
    assert got["higher_is_better"]["whelp_pydoc_next/acc"]
    assert not got["higher_is_better"]["whelp_licenses/bits_per_byte"]
    assert scores["whelp_pydoc/sample_len"] == scores["whelp_licenses/sample_len"] == 1
    docs = read_documents("pydoc:eval")[:1]
    nll, prefix = 0.0, demo_tokenizer.bos_token_id
    for doc in docs:
        ids = torch.tensor([prefix, *demo_tokenizer(doc, add_special_tokens=False)["input_ids"]])
        assert len(ids) <= 512
        p = perplexity(tiny_vocab_model, ids, seq_len=len(ids))
        assert p.tokens == len(ids) - 1
        nll += p.nll * p.tokens
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    assert scores["whelp_pydoc/bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-4)
    assert scores["whelp_pydoc/byte_perplexity"] == pytest.approx(math.exp(nll / n_bytes), rel=1e-4)


def test_percent_recovered_definitions():
    assert report.percent("log", math.e**2, math.e**4) == pytest.approx(50)  # NLL 2 vs 4
    assert report.percent("lower", 1.0, 2.0) == pytest.approx(50)
    assert report.percent("higher", 0.8, 0.4) == pytest.approx(50)
    assert report.percent("size", 200, 50) == pytest.approx(25)
    hib = {"t/acc": True, "t/bits_per_byte": False}
    assert [
        report.direction(n, hib) for n in ("params", "ppl:x", "t/word_perplexity", "bpb:x", "t/bits_per_byte", "t/acc")
    ] == ["size", "log", "log", "lower", "lower", "higher"]


def test_parse_and_order_models(tmp_path):
    assert api.parse_model("teacher=smollm2-135m") == ("teacher", "smollm2-135m")
    assert api.parse_model(str(tmp_path) + "/") == (tmp_path.name, str(tmp_path) + "/")
    assert list(api.labelled(["a=x", "b=y"], "b=y").items()) == [("b", "y"), ("a", "x")]
    assert list(api.labelled(["a=x"], "t=z").items()) == [("t", "z"), ("a", "x")]
    with pytest.raises(WhelpError, match="given twice"):
        api.labelled(["a=x", "a=y"])
    with pytest.raises(WhelpError, match="stride"):
        api.EvalSpec(seq_len=8, stride=9)


@pytest.mark.demo
def test_eval_cli_writes_report_and_reuses_results(tmp_path, demo_tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WHELP_HOME", str(tmp_path / "home"))
    dirs = [tmp_path / f"m{s}" for s in (0, 1)]
    for s, n in ((0, 2), (1, 1)):
        save_tiny(dirs[s], demo_tokenizer, seed=s, num_hidden_layers=n)
    licenses = str(whelp_data.LICENSES)
    args = [
        "eval",
        f"student={dirs[1]}",
        "--baseline",
        f"teacher={dirs[0]}",
        "--out",
        str(tmp_path / "out"),
        "--ppl",
        licenses,
        "--ppl",
        "pydoc:eval",
        "--max-tokens",
        "300",
        "--seq-len",
        "64",
        "--tasks",
        "whelp_pydoc_next,whelp_pydoc",
        "--limit",
        "2",
    ]
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["reference"] == "teacher" and [m["label"] for m in metrics["models"]] == ["teacher", "student"]
    assert metrics["versions"]["lm_eval"] and metrics["seeds"]["lm_eval"]["random_seed"] == 0
    flats = [report.flat_metrics(m) for m in metrics["models"]]
    assert flats[0]["params"] > flats[1]["params"] and flats[1]["peak_memory_bytes"] > 0
    assert flats[0]["prefill_tokens_per_s"] > 0 and flats[0]["decode_tokens_per_s"] > 0
    names = set(flats[0])
    assert {
        f"ppl:{licenses}",
        "bpb:pydoc:eval",
        "whelp_pydoc_next/acc",
        "whelp_pydoc/bits_per_byte",
        "non_embedding_params",
        "memory_bytes",
    } <= names
    text = (tmp_path / "out" / "report.md").read_text()
    assert all(name in text for name in names) and "| metric | % | teacher (reference) | student |" in text
    row = next(line for line in text.splitlines() if line.startswith("| params |"))
    assert f"{flats[1]['params'] / flats[0]['params'] * 100:.1f}%" in row

    png = tmp_path / "out" / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.pyplot as plt

    assert plt.imread(png).shape[2] in (3, 4)

    refused = run_cli(*args)  # exists, no --force
    assert refused.exit_code == 2 and refused.stderr.startswith("error: ") and "--force" in refused.stderr

    def fail(*_args):
        raise AssertionError("re-measured a model whose results are cached")

    monkeypatch.setattr(api, "measure", fail)
    timed = []
    measure_speed = api.SpeedProcess.measure
    monkeypatch.setattr(
        api.SpeedProcess, "measure", lambda self, name, spec: timed.append(name) or measure_speed(self, name, spec)
    )
    spec = from_dict(api.EvalSpec, metrics["settings"], "settings")
    again = api.evaluate_to(tmp_path / "out", {"teacher": str(dirs[0]), "student": str(dirs[1])}, spec, force=True)
    assert all(m["reused"] for m in again["models"])
    # speed is not cached: both are timed again, side by side, and the cache holds every other number as it was
    assert timed == [str(dirs[0]), str(dirs[1])]
    assert not any(
        "speed" in json.loads(path.read_text()) for path in (tmp_path / "home" / "eval-cache").glob("*.json")
    )
    quality = [{k: v for k, v in f.items() if k not in report.SIZE_SPEED[3:]} for f in flats]
    again_flats = [report.flat_metrics(m) for m in again["models"]]
    assert [{k: v for k, v in f.items() if k not in report.SIZE_SPEED[3:]} for f in again_flats] == quality
    assert all(f["prefill_tokens_per_s"] > 0 and f["peak_memory_bytes"] > 0 for f in again_flats)
    assert "Reused from the cache: teacher, student (speed" in (tmp_path / "out" / "report.md").read_text()


def test_speed_is_measured_once_per_architecture_and_stored_dtype(tmp_path, monkeypatch):
    """Two checkpoints of one shape (a pruned student, then distilled) share one speed measurement; another depth
    or another stored dtype is measured apart."""
    from whelp.evals.speed import SpeedProcess
    from whelp.models import save_model

    dirs = {label: str(tmp_path / label) for label in "abcd"}
    for label, (seed, layers) in {"a": (0, 2), "b": (1, 1), "c": (2, 1)}.items():
        save_tiny(dirs[label], seed=seed, num_hidden_layers=layers)
    save_model(tiny_model(seed=3, num_hidden_layers=1).to(torch.bfloat16), None, dirs["d"])
    calls = []
    monkeypatch.setattr(SpeedProcess, "measure", lambda self, name, spec: calls.append(name) or {"n": len(calls)})
    with SpeedProcess() as speed:
        got = speed.measure_each(dirs, api.EvalSpec())
    assert calls == [dirs["a"], dirs["b"], dirs["d"]]
    assert got == {"a": {"n": 1}, "b": {"n": 2}, "c": {"n": 2, "same_as": "b"}, "d": {"n": 3}}


def test_eval_cache_key_follows_the_content_of_perplexity_files(tmp_path):
    import time

    from whelp.evals.api import EvalSpec, cache_key

    model = tmp_path / "m"
    save_tiny(model)
    text = tmp_path / "ppl.txt"
    text.write_text("some text")
    spec = EvalSpec(ppl=(str(text),))
    before = cache_key(str(model), spec)
    time.sleep(0.01)
    text.write_text("other text, other numbers")
    assert cache_key(str(model), spec) != before


def test_perplexities_of_another_tokenizer_get_no_percent_and_bits_per_byte_do(tmp_path, monkeypatch):
    """Perplexity counts tokens, so two tokenizers' perplexities are not comparable; bits per byte is."""
    import copy

    from conftest import tiny_tokenizer

    from whelp.specs import SpeedSpec

    monkeypatch.setenv("WHELP_HOME", str(tmp_path / "home"))
    other = copy.deepcopy(tiny_tokenizer())
    other.add_tokens(["<extra>"])
    for name, tok in (("ref", tiny_tokenizer()), ("same", tiny_tokenizer()), ("other", other)):
        save_tiny(tmp_path / name, tok, vocab_size=len(other))
    spec = api.EvalSpec(max_tokens=200, seq_len=32, speed=SpeedSpec(prompt_len=4, new_tokens=1, repeats=1))
    result = api.evaluate({name: str(tmp_path / name) for name in ("ref", "same", "other")}, spec=spec)
    assert len({m["tokenizer_sha256"] for m in result.metrics["models"]}) == 2
    rows = {
        cells[0]: cells
        for cells in (line.strip("| ").split(" | ") for line in result.markdown().splitlines() if line.startswith("| "))
    }
    assert rows["ppl:pydoc:eval"][3].endswith("%)") and rows["ppl:pydoc:eval"][4].endswith("(other tokenizer)")
    assert rows["bpb:pydoc:eval"][4].endswith("%)")
    assert "other tokenize differently from ref" in result.markdown()


@pytest.mark.demo
def test_stock_lm_eval_cli_reproduces_whelp_eval_on_a_saved_student(tmp_path, demo_tokenizer):
    """The stock ``lm_eval run`` CLI on a saved model with whelp's own task YAMLs gives the numbers ``whelp eval``
    records, though whelp's perplexity window (16 tokens here) is far shorter: lm-eval's context is the model's
    own unless --max-length says otherwise (it was the perplexity window, and bits per byte disagreed)."""
    import subprocess
    import sys
    from pathlib import Path

    from whelp.evals.tasks import __file__ as tasks_init

    save_tiny(
        tmp_path / "student",
        demo_tokenizer,
        vocab_size=len(demo_tokenizer),
        initializer_range=0.2,
        max_position_embeddings=1024,
    )
    tasks = ("whelp_pydoc", "whelp_pydoc_next")
    ours = api.evaluate(
        {"student": str(tmp_path / "student")},
        spec=from_dict(
            api.EvalSpec,
            {
                "tasks": list(tasks),
                "limit": 2,
                "seq_len": 16,
                "max_tokens": 64,
                "speed": {"prompt_len": 4, "new_tokens": 1, "repeats": 1},
            },
            "spec",
        ),
    ).metrics["models"][0]["lm_eval"]["scores"]
    cmd = [
        str(Path(sys.executable).with_name("lm_eval")),
        "run",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={tmp_path / 'student'},dtype=float32",
        "--tasks",
        ",".join(tasks),
        "--include_path",
        str(Path(tasks_init).parent),
        "--limit",
        "2",
        "--batch_size",
        "4",
        "--output_path",
        str(tmp_path / "lm"),
        "--seed",
        "0,1234,1234,1234",
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    stock = json.loads(next((tmp_path / "lm").rglob("results_*.json")).read_text())["results"]
    for key in ("bits_per_byte", "byte_perplexity", "word_perplexity"):
        assert ours[f"whelp_pydoc/{key}"] == pytest.approx(stock["whelp_pydoc"][f"{key},none"], rel=1e-6)
    assert ours["whelp_pydoc_next/acc"] == stock["whelp_pydoc_next"]["acc,none"]


@pytest.mark.demo
def test_a_task_longer_than_the_lm_eval_context_names_max_length(tiny_vocab_model, demo_tokenizer):
    with pytest.raises(WhelpError, match=r"longer than the 8-token lm-eval context; raise --max-length"):
        harness.run_tasks(
            tiny_vocab_model,
            demo_tokenizer,
            ("whelp_pydoc_next",),
            harness.task_manager(("whelp_pydoc_next",)),
            limit=1,
            max_length=8,
        )
    with pytest.raises(WhelpError, match="max_length must be"):
        from_dict(api.EvalSpec, {"max_length": 0}, "spec")
