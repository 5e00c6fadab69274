"""Behaviour metrics of chat answers: pure functions of text and token ids, no model (``whelp.evals.behaviour``
generates the answers and the reference's NLL of them).

A prompt row (``parse_prompts``) is ``{"messages": [{"role", "content"}, ...]}`` or ``{"prompt": "..."}`` (one user
turn), with optional checks: ``"answer"`` (a list of accepted answers, any of which counts) and ``"format"`` (one
instruction checked by code, ``FORMATS``). Per model and prompt set (``summary``):

- ``loop``: share of answers that loop (``loops``: some token 6-gram occurs at least 3 times);
- ``ended``: share that ended with an end-of-turn token within the budget; ``empty``: share with no visible text;
- ``refusal``: share that refuse or apologise for what they cannot do (``whelp.data.chat.refuses``: English phrases);
- ``accuracy``: on rows with ``answer``, share correct (``correct``); ``format``: on rows with ``format``, share that
  follow it (``follows``), IFEval-style verifiable instructions (Zhou et al. 2023, arXiv 2311.07911);
- ``kept``: of the rows the reference answers correctly, the share this model also answers correctly (``kept``);
- ``fact_nll``: on those rows, the model's NLL (nats, summed over the answer's tokens, mean over rows) of the
  accepted answer the reference wrote, teacher-forced after the reference's own answer up to it (computed in
  ``whelp.evals.behaviour``): whether a model still knows the fact, even where its greedy answer drifts elsewhere.
  On 26 rows a greedy right/wrong moves a share by 4%; the NLL tells apart students that answer equally few;
- ``rouge_l``: mean ROUGE-L F1 (Lin 2004) against the reference's answer to the same prompt (``rouge_l``);
- ``ref_nll``: the reference model's mean NLL per answer token (computed in ``whelp.evals.behaviour``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

from whelp.data import chat
from whelp.errors import WhelpError

METRICS = ("loop", "ended", "empty", "refusal", "accuracy", "kept", "fact_nll", "format", "ref_nll", "rouge_l")
LOWER_IS_BETTER = ("loop", "empty", "refusal", "fact_nll", "ref_nll")
SHARES = ("loop", "ended", "empty", "refusal", "accuracy", "kept", "format")  # fractions in [0, 1]
LOOP_N, LOOP_TIMES = 6, 3
# Each format kind with its parameters and their types; ``follows`` holds the exact rule of each.
FORMATS = {
    "bullets": {"n": int},
    "lowercase": {},
    "uppercase": {},
    "max_words": {"n": int},
    "end_with": {"word": str},
    "starts_with": {"word": str},
    "no_commas": {},
    "paragraphs": {"n": int},
}
ROLES = ("system", "user", "assistant")
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?(?![\w]|\.\d)")
BULLET = re.compile(r"^\s*[-*•]\s+\S")
WORD = re.compile(r"[\w'-]+")


@dataclass(frozen=True)
class Prompt:
    """One prompt row: its chat ``messages`` (the last a user turn), accepted ``answers`` (any of, may be empty) and
    a ``format`` instruction (``{"kind": ..., params}``) or None."""

    messages: tuple[dict, ...]
    answers: tuple[str, ...] = ()
    format: dict | None = None

    @property
    def text(self) -> str:
        """The last user turn: the request as a reader sees it."""
        return self.messages[-1]["content"]


def parse_prompts(lines: Iterable[str], where: str) -> list[Prompt]:
    """The prompt rows of a jsonl text (blank lines skipped); a bad row fails in one line naming ``where`` and its
    line number."""
    out = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append(_row(json.loads(line)))
            except (json.JSONDecodeError, WhelpError) as exc:
                problem = str(exc) if isinstance(exc, WhelpError) else f"not JSON ({exc.msg})"
                raise WhelpError(f"{where} line {number}: {problem}") from None
    if not out:
        raise WhelpError(f"{where} holds no prompt rows; write one JSON object per line")
    return out


def _row(row) -> Prompt:
    if not isinstance(row, dict) or ("messages" in row) == ("prompt" in row):
        raise WhelpError('a row needs "messages" (a list of {"role", "content"}) or "prompt" (text), one of them')
    unknown = set(row) - {"messages", "prompt", "answer", "format"}
    if unknown:
        raise WhelpError(f"unknown key '{sorted(unknown)[0]}'; a row has messages or prompt, answer, format")
    messages = chat.messages_of(row, "the row", prompt=True)
    if bad := next((m for m in messages if m["role"] not in ROLES), None):
        raise WhelpError(f'each message is {{"role": {"|".join(ROLES)}, "content": text}}, got {bad!r}')
    if not messages[-1]["content"].strip():
        raise WhelpError("the last message must be a user turn with text: the request the model answers")
    answers = row.get("answer", [])
    if not (isinstance(answers, list) and all(isinstance(a, str) and a.strip() for a in answers)):
        raise WhelpError('"answer" must be a list of accepted answers (text), e.g. ["Paris"]')
    return Prompt(tuple(messages), tuple(answers), _format(row.get("format")))


def _format(fmt) -> dict | None:
    if fmt is None:
        return None
    kind = fmt.get("kind") if isinstance(fmt, dict) else None
    if kind not in FORMATS:
        raise WhelpError(f'"format" must be {{"kind": one of {", ".join(FORMATS)}, ...}}, got {fmt!r}')
    params = FORMATS[kind]
    if set(fmt) - {"kind"} != set(params) or not all(
        type(fmt[k]) is tp and (tp is not int or fmt[k] >= 1) for k, tp in params.items()
    ):
        given = ", ".join(f"{k} ({tp.__name__})" for k, tp in params.items()) or "no parameters"
        raise WhelpError(f"format '{kind}' takes {given}, got {fmt!r}")
    return dict(fmt)


def loops(tokens: Sequence[Hashable], n: int = LOOP_N, times: int = LOOP_TIMES) -> bool:
    """Whether an answer loops: some ``n``-gram of its tokens [T] occurs at least ``times`` times (occurrences may
    overlap). With the defaults (6, 3): a cycle of period p <= 6 repeated over 2p + 6 tokens ("The French is a
    French is a French is a French"), any longer cycle repeated three times, and one token repeated 8 times in a row,
    as a degenerate greedy answer does until its budget ends. A list of three items shares no 6-gram three times.
    On SmolLM2-135M-Instruct's answers to ``chat:general``, 4-grams also flagged plain repetitive prose (a phrase
    three times in an explanation, "- 1 tbsp" in a recipe); 6-grams flagged only the answers that do loop."""
    return chat.loops(list(tokens), n, times)


def empty(text: str) -> bool:
    """No visible text (only whitespace, or nothing) in the decoded answer."""
    return not text.strip()


def answer_span(text: str, answers: Sequence[str]) -> tuple[int, int] | None:
    """Where the first accepted answer appears in ``text`` as ``(start, end)`` character offsets, or None: a number
    (``56``, ``-3``, ``1,000``, ``2.5``) as any number written in the text with the same value (``56.0``, ``1000``;
    not the ``56`` of ``560`` or ``5.6``), anything else as a case-insensitive substring on word boundaries
    (``Paris`` in "It is paris.", not in "Parisian")."""
    for answer in answers:
        answer = answer.strip()
        if NUMBER.fullmatch(answer):
            value = float(answer.replace(",", ""))
            found = next((m for m in NUMBER.finditer(text) if float(m.group().replace(",", "")) == value), None)
        else:
            found = re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", text, re.IGNORECASE)
        if found is not None:
            return found.span()
    return None


def correct(text: str, answers: Sequence[str]) -> bool:
    """Any accepted answer appears in ``text`` (``answer_span``)."""
    return answer_span(text, answers) is not None


def _words(text: str) -> list[str]:
    return WORD.findall(text)


def follows(text: str, fmt: dict) -> bool:
    """Whether ``text`` follows the instruction ``fmt`` (an empty answer follows none):

    ``bullets n``: exactly n lines that start with ``-``, ``*`` or ``•`` and a space; ``lowercase`` / ``uppercase``:
    letters and no letter of the other case; ``max_words n``: fewer than n whitespace-separated words;
    ``end_with word``: the last word (letters, digits, ``'`` and ``-``) is ``word``, case-insensitive, trailing
    punctuation aside; ``starts_with word``: the first word likewise; ``no_commas``: no ``,``; ``paragraphs n``:
    exactly n non-empty blocks separated by blank lines."""
    if empty(text):
        return False
    kind, words = fmt["kind"], _words(text)
    if kind == "bullets":
        return sum(bool(BULLET.match(line)) for line in text.splitlines()) == fmt["n"]
    if kind in ("lowercase", "uppercase"):
        return any(c.isalpha() for c in text) and text == (text.lower() if kind == "lowercase" else text.upper())
    if kind == "max_words":
        return len(text.split()) < fmt["n"]
    if kind in ("end_with", "starts_with"):
        return bool(words) and words[-1 if kind == "end_with" else 0].lower() == fmt["word"].lower()
    if kind == "no_commas":
        return "," not in text
    return len([p for p in re.split(r"\n\s*\n", text) if p.strip()]) == fmt["n"]


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (dynamic programming, O(len a x len b))."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004) on whitespace tokens, case kept: with L the LCS length, P = L / len(candidate),
    R = L / len(reference), F1 = 2PR / (P + R). Two empty texts agree (1.0); one empty gets 0."""
    c, r = candidate.split(), reference.split()
    if not c or not r:
        return float(not c and not r)
    lcs = lcs_length(c, r)
    return 0.0 if lcs == 0 else 2 * lcs / (len(c) + len(r))


def share(flags: Iterable[bool]) -> float | None:
    """The fraction of true flags; None for no flags (no row of that kind)."""
    flags = list(flags)
    return sum(flags) / len(flags) if flags else None


def judged(prompt: Prompt, text: str, tokens: Sequence[Hashable], ended: bool) -> dict:
    """One answer with its flags: ``loop``, ``ended``, ``empty``, ``refusal`` and, where the row checks them,
    ``correct`` and ``followed`` (None where it does not)."""
    return {
        "prompt": prompt.text,
        "answer": text,
        "tokens": len(tokens),
        "ended": ended,
        "empty": empty(text),
        "refusal": chat.refuses(text),
        "loop": loops(tokens),
        "correct": correct(text, prompt.answers) if prompt.answers else None,
        "followed": follows(text, prompt.format) if prompt.format else None,
    }


def kept(answers: Sequence[dict], references: Sequence[dict]) -> float | None:
    """Of the rows whose ``references`` answer (the reference model's ``judged``) is correct, the share whose
    ``answers`` entry is correct too; None when the reference answers none correctly."""
    return share(a["correct"] for a, ref in zip(answers, references, strict=True) if ref["correct"])


def summary(answers: Sequence[dict]) -> dict:
    """The reference-free metrics of one model on one set from its ``judged`` answers; ``accuracy`` / ``format``
    are None when no row checks them. ``checked`` / ``formatted`` count those rows."""
    checked = [a["correct"] for a in answers if a["correct"] is not None]
    formatted = [a["followed"] for a in answers if a["followed"] is not None]
    return {
        "loop": share(a["loop"] for a in answers),
        "ended": share(a["ended"] for a in answers),
        "empty": share(a["empty"] for a in answers),
        "refusal": share(a["refusal"] for a in answers),
        "accuracy": share(checked),
        "format": share(formatted),
        "prompts": len(answers),
        "checked": len(checked),
        "formatted": len(formatted),
    }


def mean_rouge_l(answers: Sequence[str], references: Sequence[str]) -> float:
    """Mean ``rouge_l`` of each answer against the reference's answer to the same prompt."""
    return sum(map(rouge_l, answers, references)) / len(answers)
