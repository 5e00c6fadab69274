"""Chat data: conversations rendered through a tokenizer's own chat template with a loss mask on the assistant turns,
the pre-query prefix Magpie samples requests from, and the filters of generated conversations.

An instruct student learns to answer, not to write the user's side: the loss runs over the assistant turns' tokens
and their end-of-turn token only (``mask[t]`` True: token ``t`` is a target, the loss at position ``t - 1`` that
predicts it counts); system, user and template tokens (``<|im_start|>assistant\\n``, the newline after
``<|im_end|>``) are context. Templates such as SmolLM2's ChatML mark no ``{% generation %}`` spans, so an assistant
turn ``i`` is found by rendering the conversation's prefix ``messages[:i]`` with the generation prompt: the turn
starts where that prefix ends and ends at (and includes) the first end-of-turn id after it. A template that does not
render prefixes as prefixes of the whole is refused rather than guessed at.

Magpie (Xu et al. 2024, arXiv 2406.08464): an aligned model given only the template up to where a user's words
would start (``user_prefix``, the default system turn included) writes a plausible request itself.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from whelp.errors import WhelpError

SENTINEL = "\u2063whelp\u2063"  # user content the template copies verbatim: where the user's words start
LOOP_N, LOOP_TIMES = 4, 3  # an n-gram of 4 words (or ids) occurring 3 times is a loop
JACCARD, WINDOW = 0.7, 4096  # near-duplicate requests: word 3-gram Jaccard, against the last WINDOW kept
# The phrases of an English refusal: the refusal prefixes of Zou et al. 2023 (arXiv 2307.15043, their attack's
# success test), with the wordings a small instruct model uses ("as a chatbot", "I don't have the ability"); either
# apostrophe, case as written (``I`` is a capital anywhere; "as an AI" starts a sentence or not).
REFUSAL = re.compile(
    r"\b(?:I['’]m sorry|I am sorry|I apologi[sz]e|[Aa]s an AI|[Aa]s a chatbot|I cannot|"
    r"I can['’]t|I can not|I['’]m (?:not able|unable) to|I am (?:not able|unable) to|I do(?:n['’]t| not) have the "
    r"(?:ability|capability)|I['’]m not capable)"
)


def check_chat_template(tokenizer, what: str, why: str = "--chat needs an instruct model (e.g. smollm2-135m)") -> None:
    """Refuse a tokenizer without a chat template (a base model's: it has no turns to render), naming ``what`` model
    and ``why`` it needs one."""
    if not getattr(tokenizer, "chat_template", None):
        raise WhelpError(
            f"{what} has no chat template (chat_template.jinja or tokenizer_config.json's chat_template); {why}"
        )


def end_of_turn_ids(tokenizer, generation_config=None) -> tuple[int, ...]:
    """Every id that ends a turn: the eos ids of the model's generation config (a ``GenerationConfig`` or its JSON
    as a dict; one id or a list) and the tokenizer's eos, sorted. A student that drops one never stops (DESIGN §9)."""
    if isinstance(generation_config, dict):
        found = generation_config.get("eos_token_id")
    else:
        found = getattr(generation_config, "eos_token_id", None)
    ids = {*(found if isinstance(found, (list, tuple)) else [found]), tokenizer.eos_token_id} - {None}
    if not ids:
        raise WhelpError("the tokenizer has no EOS token and the model's generation config none: no turn can end")
    return tuple(sorted(int(i) for i in ids))


def saved_end_of_turn(tokenizer, model_dir: str | Path) -> tuple[int, ...]:
    """``end_of_turn_ids`` of a saved model: its ``generation_config.json`` (when it has one) and its tokenizer."""
    path = Path(model_dir) / "generation_config.json"
    return end_of_turn_ids(tokenizer, json.loads(path.read_text()) if path.is_file() else None)


def template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """``apply_chat_template(messages)`` as ids; with ``add_generation_prompt`` ending in the assistant's header."""
    try:
        return list(
            tokenizer.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
            )
        )
    except Exception as exc:  # jinja's raise_exception (roles must alternate, ...) and its TemplateErrors
        raise WhelpError(f"the chat template refuses the conversation: {str(exc).splitlines()[0]}") from None


def render(tokenizer, messages: list[dict], end_of_turn: Sequence[int] | None = None) -> tuple[list[int], np.ndarray]:
    """``(ids, mask)``: ``apply_chat_template(messages)`` (no generation prompt) and a bool mask [len(ids)], True on
    each assistant turn's tokens from just after its header through its first end-of-turn id (``end_of_turn``,
    default the tokenizer's eos)."""
    stops = set(end_of_turn or end_of_turn_ids(tokenizer))
    ids = template_ids(tokenizer, messages)
    mask = np.zeros(len(ids), dtype=bool)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise WhelpError("a conversation starts with an assistant turn; chat rows start with a system or user turn")
        start = len(prefix := template_ids(tokenizer, messages[:i], add_generation_prompt=True))
        if ids[:start] != prefix:
            raise WhelpError(
                f"the chat template of {getattr(tokenizer, 'name_or_path', '') or 'the tokenizer'} does not render "
                f"turns 0-{i - 1} (with the generation prompt) as a prefix of the whole conversation; whelp cannot "
                "find its assistant spans"
            )
        end = next((j for j in range(start, len(ids)) if ids[j] in stops), None)
        if end is None:
            raise WhelpError(f"assistant turn {i} renders without an end-of-turn token {sorted(stops)}")
        mask[start : end + 1] = True
    return ids, mask


def with_system(messages: list[dict], system: str, where: str = "a request of --prompts") -> list[dict]:
    """``messages`` under the system turn ``system`` (``whelp generate --system``, context distillation); a request
    with a system turn of its own is refused."""
    if messages[0]["role"] == "system":
        raise WhelpError(f"{where} has a system turn of its own and --system adds one; drop one of them")
    return [{"role": "system", "content": system}, *messages]


def system_tokens(tokenizer, system: str) -> int:
    """Tokens the system turn ``system`` adds to a request as the teacher sees it, against the template's default
    (what the teacher prefills besides the stored conversation); the template refusing one is one clear error."""
    request = [{"role": "user", "content": ""}]
    try:
        shown = template_ids(tokenizer, with_system(request, system), add_generation_prompt=True)
    except WhelpError as exc:
        raise WhelpError(f"--system: {exc}; this teacher answers without one") from None
    return len(shown) - len(template_ids(tokenizer, request, add_generation_prompt=True))


def template_tokens(tokenizer) -> int:
    """Tokens a one-exchange conversation spends on its template alone: the default system turn, both headers and
    end-of-turn ids (an empty request answered by an empty answer); what a planned chat store pays per conversation."""
    return len(template_ids(tokenizer, [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]))


def user_prefix(tokenizer) -> list[int]:
    """The template of a one-user-turn conversation cut just before the user's words (for ChatML: the default
    system turn, then ``<|im_start|>user\\n``): Magpie's pre-query template, as ids."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False)
    if SENTINEL not in text:
        raise WhelpError("the chat template does not copy the user's words verbatim; it has no pre-query prefix")
    ids = tokenizer(text[: text.index(SENTINEL)], add_special_tokens=False).input_ids
    if template_ids(tokenizer, [{"role": "user", "content": "Hello"}])[: len(ids)] != ids:
        raise WhelpError("the chat template's user turn does not start with its own pre-query prefix")
    return ids


def messages_of(row: dict, where: str, prompt: bool = False, column: str = "messages") -> list[dict]:
    """The conversation of one chat row: its ``column`` (``messages``: a list of ``{"role", "content"}`` turns, text
    values) or, with ``prompt`` (a request to answer), its ``prompt`` text as one user turn; a request must end
    with a user turn."""
    if column in row:
        turns = row[column]
        ok = (
            isinstance(turns, list)
            and turns
            and all(
                isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)
                for t in turns
            )
        )
        if not ok:
            raise WhelpError(
                f"{where}: '{column}' must be a non-empty list of {{role, content}} turns with text values"
            )
        turns = [{"role": t["role"], "content": t["content"]} for t in turns]
    elif prompt and isinstance(row.get("prompt"), str):
        turns = [{"role": "user", "content": row["prompt"]}]
    else:
        wanted = f"'{column}' (a list of {{role, content}} turns)" + (" or 'prompt' (text)" if prompt else "")
        raise WhelpError(f"{where} has no {wanted} (has: {', '.join(row) or 'nothing'}); chat rows need it")
    if prompt and turns[-1]["role"] != "user":
        raise WhelpError(f"{where}: a prompt's last turn is '{turns[-1]['role']}'; it must be the user's, to answer")
    return turns


def loops(text_or_ids: str | Sequence[int], n: int = LOOP_N, times: int = LOOP_TIMES) -> bool:
    """Whether generated text is degenerate repetition, the failure of small models sampling long answers: some
    ``n``-gram of its units (whitespace-separated words of a text, ids of a token sequence) occurs ``times`` or more.
    A line repeated 3 times repeats each of its 4-grams; a one-word line, once every 4-gram is that word."""
    units = text_or_ids.split() if isinstance(text_or_ids, str) else list(text_or_ids)
    counts = collections.Counter(tuple(units[i : i + n]) for i in range(len(units) - n + 1))
    return bool(counts) and max(counts.values()) >= times


def refuses(text: str) -> bool:
    """Whether an answer refuses (or apologises for what it cannot do), by ``REFUSAL`` anywhere in it, as Zou et al.
    test a reply. A small teacher refuses harmless requests it wrote itself now and then; a student trained on those
    answers by CE may learn to refuse far more often than the teacher does (bench/RESULTS.md, "Refusals and loops in
    the demo's chat store": 13-24 of 115 held-out requests at two of three seeds, its teacher 2), so ``whelp
    generate --chat --drop-refusals`` drops them and ``whelp eval --chat`` counts them."""
    return REFUSAL.search(text) is not None


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _shingles(words: list[str]) -> frozenset:
    return frozenset(tuple(words[i : i + 3]) for i in range(max(len(words) - 2, 1)))


class Seen:
    """Requests already kept, to drop near-duplicates: one exactly equal after normalisation (lower case, words
    only), or whose word 3-grams overlap one of the last ``window`` kept requests' with Jaccard >= 0.7.

    Memory grows by one 64-bit digest per kept request (about 70 bytes in a Python set: 70 MB at a million) plus
    ``window`` 3-gram sets of requests (a few MB): the exact test covers every request, the Jaccard one a window."""

    def __init__(self, window: int = WINDOW):
        self.digests: set[bytes] = set()
        self.recent: collections.deque = collections.deque(maxlen=window)

    def duplicate(self, text: str) -> bool:
        words = _words(text)
        if hashlib.blake2b(" ".join(words).encode(), digest_size=8).digest() in self.digests:
            return True
        grams = _shingles(words)
        return any(len(grams & other) >= JACCARD * len(grams | other) for other in self.recent)

    def add(self, text: str) -> None:
        words = _words(text)
        self.digests.add(hashlib.blake2b(" ".join(words).encode(), digest_size=8).digest())
        self.recent.append(_shingles(words))
