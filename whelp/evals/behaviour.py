"""What an instruct model says: every model answers prompt sets greedily through the reference's chat template, and
``whelp.evals.chat`` scores the answers (loops, endings, accuracy, format), with the reference's NLL of them and
their ROUGE-L agreement with its own answers, and each model's NLL of the facts in the reference's right answers.

Each prompt is rendered as text by the reference tokenizer's ``apply_chat_template(..., add_generation_prompt=True)``
and tokenized by each model's own tokenizer (no special tokens added: the template writes them); a model stops at the
reference's end-of-turn tokens (its generation config's eos ids and its tokenizer's eos, taken by their text into
each model's vocabulary) or after ``chat_new_tokens``. Decoding is greedy (argmax) in batches of ``chat_batch_size``
with left padding; a checkpoint's own generation settings (sampling, penalties) do not apply. The reference then scores
each answer teacher-forced: the prompt in its tokens, the answer's text in its tokens, and its first end-of-turn
token when the answer ended.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig

from whelp.data import chat as chat_data
from whelp.data import source_identity
from whelp.errors import WhelpError
from whelp.evals import chat
from whelp.evals.perplexity import token_nll
from whelp.models import locate
from whelp.output import Progress
from whelp.specs import CHAT_SETS, EvalSpec

BUILT_IN = Path(__file__).resolve().parent / "data"


def set_path(name: str) -> Path:
    """The jsonl file of a prompt set: a built-in set's package file (``chat:general``) or the path given."""
    return BUILT_IN / f"chat_{name.split(':', 1)[1]}.jsonl" if name in CHAT_SETS else Path(name).expanduser()


def set_label(name: str) -> str:
    """The set's name in the report: ``chat:general``, or ``chat:`` + the file's name (``chat:mine.jsonl``)."""
    return name if name in CHAT_SETS else f"chat:{Path(name).name}"


def set_identity(name: str) -> object:
    """What a set's answers depend on of the file (its name, size and mtime: an edit changes it)."""
    return source_identity(str(set_path(name)))


def read_prompts(name: str, limit: int | None = None) -> list[chat.Prompt]:
    """The first ``limit`` (all when None) prompt rows of a set, each checked (``chat.parse_prompts``)."""
    path = set_path(name)
    if not path.is_file():
        raise WhelpError(f"chat prompts {name}: no such file; give a jsonl file or {', '.join(CHAT_SETS)}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise WhelpError(f"cannot read chat prompts {name}: {exc}") from None
    return chat.parse_prompts(lines, name)[:limit]


def generation_config(model) -> GenerationConfig | None:
    """The reference's generation config: an in-memory model's own, a directory's generation_config.json (None
    when it has none)."""
    if not isinstance(model, (str, Path)):
        return model.generation_config
    try:
        return GenerationConfig.from_pretrained(locate(str(model)))
    except OSError:
        return None


def end_tokens(tokenizer, config: GenerationConfig | None) -> tuple[str, ...]:
    """The reference's end-of-turn tokens as text: its generation config's eos ids, then its tokenizer's eos."""
    ids = getattr(config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    ids += [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    return tuple(dict.fromkeys(tokenizer.convert_ids_to_tokens(ids)))


def stop_ids(tokenizer, tokens: tuple[str, ...], label: str) -> list[int]:
    """The ids of the end-of-turn ``tokens`` in a model's vocabulary (those it has; refused if it has none)."""
    ids = [i for i in tokenizer.convert_tokens_to_ids(list(tokens)) if i is not None]
    ids = [i for i in ids if tokenizer.convert_ids_to_tokens(i) in tokens]
    if not ids:
        raise WhelpError(
            f"model '{label}' has none of the reference's end-of-turn tokens ({', '.join(tokens)}) in its "
            "vocabulary, so it could not end a turn; compare models that share the reference's chat tokens"
        )
    return list(dict.fromkeys(ids))


@dataclass(frozen=True)
class ChatPlan:
    """The prompt sets (by report label) with their rendered prompts, each model's stop ids, the reference's label,
    and ``identity``: what answers and scores depend on besides a model's own files (None for an in-memory
    reference, whose results are then not cached)."""

    prompts: dict[str, list[chat.Prompt]]
    texts: dict[str, list[str]]
    stops: dict[str, list[int]]
    reference: str
    identity: object | None


def plan(spec: EvalSpec, models: Mapping[str, object], tokenizers: Mapping[str, object]) -> ChatPlan:
    """Read and check the prompt sets and the reference's template and end-of-turn tokens, before any model loads
    (``models``: in-memory models or names, the first the reference; ``tokenizers``: each one's)."""
    prompts = {set_label(name): read_prompts(name, spec.chat_limit) for name in spec.chat}
    if len(prompts) < len(spec.chat):
        raise WhelpError("two chat prompt sets have the same file name (their name in the report); rename one")
    reference = next(iter(models))
    tokenizer, model = tokenizers[reference], models[reference]
    why = "--chat answers through the reference's template: make an instruct model the reference (first, or --baseline)"
    chat_data.check_chat_template(tokenizer, f"reference model '{reference}'", why)
    ends = end_tokens(tokenizer, generation_config(model))
    texts = {
        label: [tokenizer.apply_chat_template(list(p.messages), add_generation_prompt=True, tokenize=False) for p in ps]
        for label, ps in prompts.items()
    }
    stops = {label: stop_ids(tok, ends, label) for label, tok in tokenizers.items()}
    on_disk = isinstance(model, (str, Path))
    identity = [source_identity(locate(str(model))), [set_identity(n) for n in spec.chat]] if on_disk else None
    return ChatPlan(prompts, texts, stops, reference, identity)


@contextlib.contextmanager
def _bare_generation(model):
    """``model.generate`` without the checkpoint's generation defaults (transformers fills unset settings from
    ``model.generation_config``): greedy is argmax, whatever the checkpoint's sampling or penalties say."""
    own = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = own


@torch.no_grad()
def greedy(model, prompts: list[list[int]], stops: list[int], new_tokens: int, batch_size: int, progress=None):
    """Greedy answers to token-id ``prompts``: ``[(answer ids without the end token, ended)]``, ``batch_size``
    prompts at a time left-padded into ``[B, P]`` with their attention mask; ``ended`` when a stop id came within
    ``new_tokens``."""
    config = GenerationConfig(
        max_new_tokens=new_tokens, do_sample=False, num_beams=1, eos_token_id=stops, pad_token_id=stops[0]
    )
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), stops[0], dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(batch):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        with _bare_generation(model):
            new = model.generate(
                input_ids=ids.to(model.device), attention_mask=mask.to(model.device), generation_config=config
            )
        for row in new[:, width:].tolist():
            end = next((i for i, t in enumerate(row) if t in stops), None)
            out.append((row, False) if end is None else (row[:end], True))
        if progress is not None:
            progress(len(batch))
    return out


def answer(model, tokenizer, plan: ChatPlan, label: str, spec: EvalSpec, reference: dict | None = None) -> dict:
    """Model ``label``'s answers to every set: ``{set: {"answers": [chat.judged], "metrics": chat.summary + kept,
    fact_nll}}``, ``kept`` and ``fact_nll`` against ``reference`` (the reference's own result of this function; None
    for the reference itself, measured against its own answers)."""
    out = {}
    for name, texts in plan.texts.items():
        prompts = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        with Progress(f"{label} answers {name}", len(prompts)) as bar:
            got = greedy(model, prompts, plan.stops[label], spec.chat_new_tokens, spec.chat_batch_size, bar.advance)
        answers = [
            chat.judged(p, tokenizer.decode(ids, skip_special_tokens=True), ids, ended)
            for p, (ids, ended) in zip(plan.prompts[name], got)
        ]
        refs = answers if reference is None else reference[name]["answers"]
        contexts, facts = fact_rows(tokenizer, texts, plan.prompts[name], refs)
        sums, _ = row_nll(model, contexts, facts, spec.batch_size)
        metrics = {
            **chat.summary(answers),
            "kept": chat.kept(answers, refs),
            "fact_nll": sum(sums) / len(sums) if sums else None,
        }
        out[name] = {"answers": answers, "metrics": metrics}
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def fact_rows(tokenizer, texts: list[str], prompts: list[chat.Prompt], references: list[dict]):
    """``(contexts, facts)``: for each row the ``references`` answer correctly, the token ids of the rendered prompt
    and the reference's answer up to the accepted answer in it (``chat.answer_span``), and those of the answer; the
    text up to the answer's end is tokenized whole and split where it leaves the context's tokens, so a token that
    joins the space before the answer to it (`` Paris``) is scored as the answer's."""
    contexts, facts = [], []
    for text, prompt, ref in zip(texts, prompts, references, strict=True):
        if not ref["correct"]:
            continue
        start, end = chat.answer_span(ref["answer"], prompt.answers)
        head = tokenizer(text + ref["answer"][:start], add_special_tokens=False).input_ids
        full = tokenizer(text + ref["answer"][:end], add_special_tokens=False).input_ids
        cut = min(common_prefix(head, full), len(full) - 1)
        contexts.append(full[:cut])
        facts.append(full[cut:])
    return contexts, facts


@torch.no_grad()
def row_nll(model, prompts: list[list[int]], answers: list[list[int]], batch_size: int):
    """``(sums, counts)``: each answer's summed NLL (nats, fp32) of its tokens given its prompt, teacher-forced, and
    its token count; each ``prompt + answer`` row right-padded into ``[B, L]`` with its attention mask."""
    sums, counts = [], []
    for start in range(0, len(prompts), batch_size):
        rows = [p + a for p, a in zip(prompts[start : start + batch_size], answers[start : start + batch_size])]
        width = max(map(len, rows))
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        scored = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (row, prompt) in enumerate(zip(rows, prompts[start:])):
            ids[i, : len(row)] = torch.tensor(row)
            scored[i, len(prompt) : len(row)] = True
        mask = (torch.arange(width) < torch.tensor([len(r) for r in rows])[:, None]).long()
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits[:, :-1].float()
        nll = token_nll(logits, ids[:, 1:].to(logits.device)).cpu()
        sums += (nll * scored[:, 1:]).sum(1).tolist()
        counts += scored[:, 1:].sum(1).tolist()
    return sums, counts


def scored(reference, tokenizer, plan: ChatPlan, behaviour: dict, own: dict, spec: EvalSpec) -> dict:
    """A model's ``behaviour`` (``answer``'s result) with ``ref_nll`` (the ``reference`` model's mean NLL per
    answer token, None when no answer has a token) and ``rouge_l`` against the reference's ``own`` answers."""
    end = plan.stops[plan.reference][0]
    out = {}
    for name, result in behaviour.items():
        prompts = [tokenizer(t, add_special_tokens=False).input_ids for t in plan.texts[name]]
        answers = [
            tokenizer(a["answer"], add_special_tokens=False).input_ids + [end] * a["ended"] for a in result["answers"]
        ]
        sums, counts = row_nll(reference, prompts, answers, spec.batch_size)
        total, count = sum(sums), sum(counts)
        rouge = chat.mean_rouge_l([a["answer"] for a in result["answers"]], [a["answer"] for a in own[name]["answers"]])
        metrics = {**result["metrics"], "ref_nll": total / count if count else None, "rouge_l": rouge}
        out[name] = {**result, "metrics": metrics}
    return out


def score_all(plan: ChatPlan, results: dict, labels: list[str], load_reference: Callable, spec: EvalSpec) -> dict:
    """``results`` ({label: result}) with the reference's scores added to the behaviour of each of ``labels``, the
    reference loaded once by ``load_reference()`` -> ``(model, tokenizer)``, and only when a label needs it."""
    if not labels:
        return results
    model, tokenizer = load_reference()
    own = results[plan.reference]["behaviour"]
    return {
        label: {**result, "behaviour": scored(model, tokenizer, plan, result["behaviour"], own, spec)}
        if label in labels
        else result
        for label, result in results.items()
    }
