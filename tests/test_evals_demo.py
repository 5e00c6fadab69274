"""Evaluation harness on the real demo teacher (SmolLM2-135M): perplexity level and lm-eval offline."""

from __future__ import annotations

import math

import pytest
from conftest import naive_multiple_choice

from whelp.data import read_documents, token_stream
from whelp.evals import harness
from whelp.evals.perplexity import perplexity
from whelp.evals.tasks import whelp_data

pytestmark = pytest.mark.demo


def test_demo_teacher_pydoc_eval_perplexity_is_sane(demo):
    model, tokenizer = demo
    ids = token_stream(read_documents("pydoc:eval"), tokenizer, max_tokens=1025)
    got = perplexity(model, ids, seq_len=512, tokenizer=tokenizer)
    assert got.tokens == 511 * 2
    assert math.isfinite(got.ppl) and 1 < got.ppl < 60
    assert 0.3 < got.bits_per_byte < 2


@pytest.mark.slow
def test_lm_eval_offline_on_demo_teacher_agrees_with_whelp(demo, monkeypatch):
    """lm-eval's rolling perplexity of a pydoc document and whelp's fixed-window perplexity of the same text differ
    only in how windows meet the document (lm-eval: prefix BOS, 1 token of context at window starts, last window
    right-aligned; whelp: window-first tokens unscored): a few percent in bits per byte."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = demo
    tasks = ("whelp_pydoc", "whelp_pydoc_next")
    got = harness.run_tasks(model, tokenizer, tasks, harness.task_manager(tasks), limit=1, max_length=256)["scores"]
    first = whelp_data.next_sentence_items(read_documents("pydoc:eval"))[0]  # limit=1: the task's first item
    want = naive_multiple_choice(model, tokenizer, first, max_length=256)
    assert got["whelp_pydoc_next/acc"] == want["acc"] and got["whelp_pydoc_next/acc_norm"] == want["acc_norm"]
    ours = perplexity(
        model, token_stream(read_documents("pydoc:eval")[:1], tokenizer), seq_len=256, tokenizer=tokenizer
    )
    assert got["whelp_pydoc/bits_per_byte"] == pytest.approx(ours.bits_per_byte, rel=0.05)
    assert 0.3 < got["whelp_pydoc/bits_per_byte"] < 2
