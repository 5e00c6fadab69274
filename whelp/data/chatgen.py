"""``whelp generate --chat``: conversations the teacher answers, each one document of the token store with a loss mask
on its answer (``whelp.data.chat``), so that an instruct student learns the teacher's answers and not the user's side.

Requests are the rows of ``--prompts`` (``messages`` ending in a user turn, or a ``prompt``), each read once; or,
without prompts, Magpie self-instruct (Xu et al. 2024, arXiv 2406.08464): the teacher continues its own template's
pre-query prefix (``chat.user_prefix``) and so writes a request, until an end-of-turn id or ``request_tokens``.
Each request is answered ``samples_per_prompt`` times through the template (generation prompt on), stopping at any
end-of-turn id; with more than one answer, rejection sampling with the teacher as judge keeps the answer whose
tokens (its end of turn included) the teacher gives the highest mean log-probability, from one fp32-scored forward
of the whole rendered conversation per answer.

Dropped (and counted in the manifest's ``chat``, by reason): self-written requests that are empty, loop
(``chat.loops``), hit ``request_tokens`` without end of turn, or nearly repeat a kept one (``chat.Seen``); answers
that are empty, loop (finished or not), refuse (``drop_refusals``: ``chat.refuses``), or (when there is a choice,
``samples_per_prompt`` > 1) hit ``new_tokens`` without end of turn (a request none of whose answers survives is
lost). A single answer that hits ``new_tokens`` is kept as far as it went, without an end of turn (counted
``unfinished``) unless it loops or refuses: forward KL on each of its tokens still teaches the
teacher's whole next-token distribution, its probability of ending the turn there included, and a small teacher's
answers often run past a CPU budget (SmolLM2-135M-Instruct ends 28% of its answers within 160 tokens), so dropping
them would throw away most of the sampling.

With ``system`` (``--system``), each request is answered under that system turn in place of the template's default
(or first, for a template without one), and stored without it: context distillation (Askell et al. 2021; Snell et
al. 2022), the student learns to answer as the instructed teacher does with no instruction given; the rejection
sampling's score is read under it too, as the teacher answered.

Determinism and resume as in ``whelp.data.generate``: batch ``b`` (``batch_size`` requests) runs with the RNG seeded
from ``(seed, b)``; shards end at batch boundaries, recording their batches and their documents' lengths. The kept
requests, the one state carried from batch to batch, are read back from the stored conversations when a run
resumes, exactly as they were added when it wrote them, so it writes the store an uninterrupted run does.
"""

from __future__ import annotations

import collections
import copy
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import whelp.data.tokenstore as tokenstore
from whelp.data import chat, sampling
from whelp.data.sources import iter_records
from whelp.errors import WhelpError
from whelp.output import Progress
from whelp.specs import GenerateSpec

REASONS = ("loop", "no_end", "duplicate", "empty", "refusal")
IDLE_BATCHES = 64  # self-instruct stops with an error after this many batches in a row keep nothing


@torch.no_grad()
def continuations(model, prompts: list[list[int]], config) -> list[tuple[np.ndarray, bool]]:
    """One ``generate`` call (the RNG as it is; top-p by ``sampling.nucleus``) on the prompts left-padded into
    ``[B, P]`` with their attention mask: per prompt, its continuation up to (without) the first stop id
    (``config.eos_token_id``, one or a list) and whether it stopped there (else it ran out of ``max_new_tokens``)."""
    width, pad = max(map(len, prompts)), config.pad_token_id
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    plain, processors = sampling.nucleus(config)
    out = model.generate(
        input_ids=ids.to(model.device),
        attention_mask=mask.to(model.device),
        generation_config=plain,
        logits_processor=processors,
    ).cpu()[:, width:]
    stops = torch.tensor(config.eos_token_id).reshape(-1)
    ended = torch.isin(out, stops)
    lengths = torch.where(ended.any(1), ended.int().argmax(1), torch.tensor(out.shape[1])).tolist()
    return [(out[row, :n].numpy(), bool(ended[row].any())) for row, n in enumerate(lengths)]


@torch.no_grad()
def mean_logprob(model, ids: list[int], targets: np.ndarray) -> float:
    """The mean log-probability (fp32) ``model`` gives the tokens of ``ids`` [T] where ``targets`` [T] is True, each
    predicted from the tokens before it: the length-normalised score of an answer (DESIGN §9)."""
    x = torch.tensor([ids], device=model.device)
    at = torch.from_numpy(np.flatnonzero(targets[1:])).to(model.device)  # position t - 1 predicts token t
    logits = model(input_ids=x).logits[0, at].float()
    return float(torch.log_softmax(logits, -1).gather(1, x[0, at + 1, None]).mean())


@dataclass
class Teacher:
    """The teacher and what a batch needs of it: the end-of-turn ids, and ``config`` (the spec's sampling settings,
    ``generate.generation_config``) made into one config for answers and one for requests, both ending a turn."""

    model: object
    tokenizer: object
    spec: GenerateSpec
    end_of_turn: tuple[int, ...]
    config: object
    answers: object = field(init=False)
    requests: object = field(init=False)

    def __post_init__(self):
        self.answers = copy.deepcopy(self.config)
        self.answers.eos_token_id = list(self.end_of_turn)
        self.requests = copy.deepcopy(self.answers)
        self.requests.max_new_tokens = self.spec.request_tokens

    def text(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def render(self, messages: list[dict]) -> tuple[list[int], np.ndarray]:
        return chat.render(self.tokenizer, messages, self.end_of_turn)

    def prompt(self, messages: list[dict]) -> list[int]:
        return chat.template_ids(self.tokenizer, messages, add_generation_prompt=True)

    def shown(self, messages: list[dict]) -> list[dict]:
        """The request as the teacher answers it: under the spec's system turn when it has one."""
        return messages if self.spec.system is None else chat.with_system(messages, self.spec.system)

    def score(self, messages: list[dict], start: int) -> float:
        """The teacher's mean log-probability of the last (assistant) turn of ``messages``, end of turn included;
        ``start``: the length of the prompt before it (``prompt(messages[:-1])``, already rendered to sample it)."""
        ids, mask = self.render(messages)
        return mean_logprob(self.model, ids, mask & (np.arange(len(ids)) >= start))

    def generated(self, prompts: list[list[int]], config) -> list[tuple[np.ndarray, bool]]:
        """``continuations`` of the prompts, ``batch_size`` at a time."""
        step = self.spec.batch_size
        return [
            out
            for i in range(0, len(prompts), step)
            for out in continuations(self.model, prompts[i : i + step], config)
        ]


def _drop(t: Teacher, ids: np.ndarray, ended: bool, answer: bool = False) -> str | None:
    """Why a sampled request or ``answer`` is dropped, or None: ``no_end`` last, so that an unfinished single answer
    (kept as far as it went) is still dropped when it loops; only an answer is tested for a refusal (a request may
    well say "I can't ..."), and only with ``drop_refusals``."""
    text = t.text(ids)
    if not text:
        return "empty"
    if chat.loops(text):
        return "loop"
    if answer and t.spec.drop_refusals and chat.refuses(text):
        return "refusal"
    return None if ended else "no_end"


def self_instruct(t: Teacher, prefix: list[int], seen: chat.Seen, counts: collections.Counter) -> list[list[dict]]:
    """``batch_size`` requests sampled from the pre-query ``prefix``, the dropped ones counted; a request may not
    nearly repeat one kept before (``seen``) nor one earlier in this batch."""
    batch, kept = chat.Seen(), []
    for ids, ended in t.generated([prefix] * t.spec.batch_size, t.requests):
        why, text = _drop(t, ids, ended), t.text(ids)
        if why is None and (seen.duplicate(text) or batch.duplicate(text)):
            why = "duplicate"
        if why:
            counts[why] += 1
            continue
        batch.add(text)
        kept.append([{"role": "user", "content": text}])
    return kept


def answer(t: Teacher, requests: list[list[dict]], counts: collections.Counter) -> list[tuple[list[int], np.ndarray]]:
    """Each request's conversation with its best surviving answer, rendered (ids, mask): ``samples_per_prompt``
    answers per request, the dropped ones counted, the rest scored by the teacher when there is a choice."""
    n = t.spec.samples_per_prompt
    shown = [t.prompt(t.shown(messages)) for messages in requests]
    outs = t.generated([p for p in shown for _ in range(n)], t.answers)
    done = []
    for i, messages in enumerate(requests):
        best, score, start = None, -float("inf"), len(t.prompt(messages))  # start: the stored answer's first token
        for ids, ended in outs[i * n : (i + 1) * n]:
            if (why := _drop(t, ids, ended, answer=True)) and not (why == "no_end" and n == 1):
                counts[why] += 1
                continue
            reply = {"role": "assistant", "content": t.text(ids)}
            conv = t.render([*messages, reply])
            if not ended:  # an unfinished single answer: kept as far as it went, no end of turn to learn
                close = start + int(np.flatnonzero(np.isin(conv[0][start:], t.end_of_turn))[0])
                conv = (conv[0][:close], conv[1][:close])
            value = t.score([*t.shown(messages), reply], len(shown[i])) if n > 1 else 0.0  # as the teacher answered
            if best is None or value > score:
                best, score = conv, value
        if best is not None:
            done.append(best)
    return done


def request_of(t: Teacher, doc: np.ndarray, prefix: list[int]) -> str:
    """The self-written request of a stored conversation: its tokens after the pre-query ``prefix`` up to the first
    end-of-turn id (the document's end in a store's last conversation, cut at ``max_tokens``), as text (what
    ``Seen`` holds, the same when written and when read back on resume)."""
    end = next((j for j in range(len(prefix), len(doc)) if doc[j] in t.end_of_turn), len(doc))
    return t.text(doc[len(prefix) : end])


def _seen(t: Teacher, out: Path, manifest: dict, prefix: list[int]) -> chat.Seen:
    """The requests kept by the shards already written (a resumed run), read back from their conversations."""
    seen = chat.Seen()
    for shard in manifest["shards"]:
        tokens = np.fromfile(out / shard["file"], dtype=manifest["dtype"])
        for doc in np.split(tokens, np.cumsum(shard["document_tokens"])[:-1]):
            seen.add(request_of(t, doc, prefix))
    return seen


def requests_of(spec: GenerateSpec):
    """The conversations of ``--prompts``, each ending in a user turn, in order."""
    return (chat.messages_of(row, where, prompt=True) for where, row in iter_records(spec.prompts.name))


def check_prompts(spec: GenerateSpec) -> None:
    """Refuse a prompts source whose first row is not a request, or has a system turn of its own beside ``--system``
    (before any model loads)."""
    first = next(iter_records(spec.prompts.name), None)
    if first is None:
        raise WhelpError(f"--prompts {spec.prompts} holds no rows to answer")
    messages = chat.messages_of(first[1], first[0], prompt=True)
    if spec.system is not None:
        chat.with_system(messages, spec.system, first[0])


def _batch(t: Teacher, index: int, rows, prefix, seen, counts: collections.Counter) -> list | None:
    """Batch ``index``'s kept conversations as documents ``(ids + [EOS], mask + [False])``, with the RNG seeded from
    ``(seed, index)``: answers to the next ``batch_size`` rows of prompts (None once they are all answered), or to
    self-written requests, which ``seen`` then holds."""
    torch.manual_seed(t.spec.seed * 1_000_003 + index)
    if rows is None:
        requests = self_instruct(t, prefix, seen, counts)
    elif not (requests := list(itertools.islice(rows, t.spec.batch_size))):
        return None
    kept = answer(t, requests, counts)
    for ids, _ in kept if seen is not None else ():
        seen.add(request_of(t, np.asarray(ids), prefix))
    counts["kept"] += len(kept)
    return [(np.append(ids, t.tokenizer.eos_token_id), np.append(mask, False)) for ids, mask in kept]


def fill(out: Path, manifest: dict, t: Teacher, bar: Progress) -> None:
    """Generate conversations after the recorded shards into new shards, shown on ``bar``, then seal the store
    complete."""
    spec, shards = t.spec, manifest["shards"]
    done = sum(s["batches"] for s in shards)
    total = first = sum(s["tokens"] for s in shards)
    prefix = None if spec.prompts else chat.user_prefix(t.tokenizer)
    seen = None if spec.prompts else _seen(t, out, manifest, prefix)
    rows = itertools.islice(requests_of(spec), done * spec.batch_size, None) if spec.prompts else None
    docs, counts, batches, idle, t0 = [], collections.Counter(), 0, 0, time.perf_counter()
    bar.update(info="sampling the first batch")
    for index in itertools.count(done):
        if (kept := _batch(t, index, rows, prefix, seen, counts)) is None:
            break  # every prompt answered
        idle = 0 if kept else idle + 1
        if idle == IDLE_BATCHES:
            raise WhelpError(
                f"the teacher kept no conversation in {idle} batches in a row ({_said(counts)}); raise "
                "--new-tokens or --request-tokens, lower --temperature, or give other --prompts"
            )
        docs += kept
        held, batches = sum(len(d) for d, _ in docs), batches + 1
        last = total + held >= spec.max_tokens
        if last:  # the conversations past the cut were never kept
            whole, docs = len(docs), _cut(docs, spec.max_tokens - total)
            counts["kept"] -= whole - len(docs)
        if held >= manifest["shard_tokens"] or last:
            total += _flush(out, manifest, docs, batches, counts, t.end_of_turn)
            docs, counts, batches = [], collections.Counter(), 0
        rate = (total + held - first) / max(time.perf_counter() - t0, 1e-9)
        bar.update(completed=min(total + held, spec.max_tokens), info=f"{rate:,.0f} tok/s")
        if last:
            break
    if docs:
        total, counts = total + _flush(out, manifest, docs, batches, counts, t.end_of_turn), collections.Counter()
    if total == 0:
        raise WhelpError(f"the teacher kept no conversation ({_said(counts)}); give other prompts or settings")
    tokenstore.seal(out, manifest, total, chat=_summed([s["chat"] for s in manifest["shards"]], counts))


def _cut(docs: list, keep: int) -> list:
    """The documents cut at exactly ``keep`` tokens, inside the one that crosses it."""
    ends = np.cumsum([len(ids) for ids, _ in docs])
    crossing = int(np.searchsorted(ends, keep))
    rest = keep - (int(ends[crossing - 1]) if crossing else 0)
    return docs[:crossing] + [(docs[crossing][0][:rest], docs[crossing][1][:rest])]


def _flush(
    out: Path, manifest: dict, docs: list, batches: int, counts: collections.Counter, end_of_turn: tuple[int, ...]
) -> int:
    """The documents as the next shard, which records its batches, their lengths and the batches' counts (an answer
    is ``unfinished`` when its last target token is no end-of-turn id)."""
    parts, masks = [ids for ids, _ in docs], [mask for _, mask in docs]
    ends = [ids[np.flatnonzero(mask)[-1]] for ids, mask in docs if mask.any()]
    counts["unfinished"] = int(np.sum(~np.isin(ends, end_of_turn)))
    return tokenstore.flush(
        out,
        manifest,
        parts,
        len(docs),
        masks,
        batches=batches,
        document_tokens=[len(p) for p in parts],
        chat=_summed([], counts),
    )


def _summed(records: list[dict], counts: collections.Counter) -> dict:
    """The manifest's ``chat``: kept conversations and dropped samples by reason, of ``records`` and ``counts``."""
    return {
        "kept": sum(r["kept"] for r in records) + counts["kept"],
        "unfinished": sum(r["unfinished"] for r in records) + counts["unfinished"],
        "dropped": {why: sum(r["dropped"].get(why, 0) for r in records) + counts[why] for why in REASONS},
    }


def _said(counts: collections.Counter) -> str:
    return ", ".join(f"dropped {counts[why]} for {why}" for why in REASONS if counts[why]) or "nothing sampled"
