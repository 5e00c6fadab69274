"""Datasets of the shipped offline lm-eval tasks, built deterministically from text on every machine.

lm-eval calls these through ``custom_dataset: !function whelp_data.NAME`` with the task's metadata as
keyword arguments, which they do not need.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import datasets

from whelp.data import read_documents

HERE = Path(__file__).resolve().parent
LICENSES = HERE / "licenses.jsonl"
SENTENCE_END = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")


def _dataset(rows: list[dict]):
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def pydoc_eval(**_metadata):
    """One row per topic of the ``pydoc:eval`` split: ``{"text": str}``."""
    return _dataset([{"text": doc} for doc in read_documents("pydoc:eval")])


def licenses(**_metadata):
    """The Apache-2.0 and GPL-3 licence texts: ``{"name": str, "text": str}``."""
    return _dataset([json.loads(line) for line in LICENSES.read_text(encoding="utf-8").splitlines()])


def prose_paragraphs(doc: str) -> list[list[str]]:
    """Sentences of each prose paragraph of a reST document (unindented, not a heading or a list)."""
    out = []
    for block in re.split(r"\n\s*\n", doc):
        lines = block.split("\n")
        if any(line[:1].isspace() or line.startswith(("*", "-", "=", "`", "+")) for line in lines):
            continue
        sentences = [s.strip() for s in SENTENCE_END.split(" ".join(lines)) if len(s.strip()) >= 20]
        if len(sentences) >= 2:
            out.append(sentences)
    return out


def next_sentence_items(docs: list[str], n_choices: int = 4, seed: int = 0) -> list[dict]:
    """Multiple-choice items: ``context`` is a sentence, ``choices`` its true successor in the same paragraph and
    ``n_choices - 1`` sentences of other paragraphs, ``gold`` the index of the true one. Deterministic for ``seed``."""
    paragraphs = [p for doc in docs for p in prose_paragraphs(doc)]
    rng = random.Random(seed)
    items = []
    for i, sentences in enumerate(paragraphs):
        others = [s for j, p in enumerate(paragraphs) if j != i for s in p]
        for context, true_next in zip(sentences, sentences[1:]):
            choices = rng.sample(others, n_choices - 1)
            gold = rng.randrange(n_choices)
            choices.insert(gold, true_next)
            items.append({"context": context, "choices": choices, "gold": gold})
    return items


def pydoc_next(**_metadata):
    return _dataset(next_sentence_items(read_documents("pydoc:eval")))
