"""``whelp generate``: a token store of the teacher's own text, usable wherever DATA is.

Sequence-level KD (Kim & Rush 2016; stage 1 of Qwen3's strong-to-weak distillation) trains the student on what the
teacher says rather than on one corpus: the student then learns the teacher's general language, not the domain of
whatever text was at hand, and no dataset is needed.

Batch ``b`` holds ``batch_size`` sequences, each a prompt (the first ``prompt_tokens`` tokens of the next document
of ``prompts``, cycled; or a lone BOS, EOS when the tokenizer has no BOS) followed by up to ``new_tokens`` tokens
sampled with transformers' ``generate`` (left padding, KV cache, stopping at EOS) and one EOS. The RNG is seeded
from ``(seed, b)`` before each batch, so every batch depends on the spec and its index alone: a run resumed after an
interruption writes exactly the store an uninterrupted one does. Shards (the token-store format of
``whelp.data.tokenstore``) are cut at batch boundaries once they hold ``shard_tokens`` tokens and record how many
batches they hold; the last one is cut at exactly ``max_tokens``. Memory is one batch plus one shard.

With ``chat`` the store holds conversations with loss masks instead (``whelp.data.chatgen``), under the same scheme.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from transformers import GenerationConfig

import whelp.data.tokenstore as tokenstore
from whelp import architecture, models, store
from whelp.data import chat, chatgen
from whelp.data.sources import check_source, iter_documents, source_identity
from whelp.errors import WhelpError
from whelp.models import check_device, load_tokenizer, locate
from whelp.output import Progress
from whelp.specs import GenerateSpec, LoadPolicy, record
from whelp.specs.teacher import CHAT_FIELDS, OPTIONAL_FIELDS

SHARD_TOKENS = 1 << 18  # 256K tokens a shard: a resumed run loses at most this much sampling


def prompt_ids(spec: GenerateSpec, tokenizer) -> Iterator[list[int]]:
    """Prompts as token ids, endless: each document's first ``prompt_tokens`` tokens (``prompts`` read again from
    its start when it ends), or ``[BOS]`` for every sequence when there are no prompts."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if spec.prompts is None:
        yield from itertools.repeat([start])
        return
    for _ in itertools.count():
        found = False
        for doc in iter_documents(spec.prompts.name, "text", None):
            ids = tokenizer(doc[: 64 * spec.prompt_tokens], add_special_tokens=False).input_ids[: spec.prompt_tokens]
            if ids:
                found = True
                yield ids
        if not found:
            raise WhelpError(f"--prompts {spec.prompts} holds no text to prompt with")


def generation_config(spec: GenerateSpec, tokenizer):
    """Every setting ``generate`` samples with, explicit: a checkpoint's generation_config.json and transformers'
    defaults (top_k=50) must not change what the spec says."""
    sample = spec.temperature > 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return GenerationConfig(
        max_new_tokens=spec.new_tokens,
        min_new_tokens=0,
        do_sample=sample,
        num_beams=1,
        temperature=spec.temperature if sample else 1.0,
        top_p=spec.top_p if sample else 1.0,
        top_k=spec.top_k if sample else 0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )


def check_teacher(spec: GenerateSpec, config, tokenizer=None, template: int = 0) -> None:
    """Refuse what the teacher cannot sample, from its config (before minutes of loading, and in ``whelp plan``): a
    prompt and its new tokens past its positions (its RoPE and masks end there; ``template``: the tokens of its chat
    template), and a top-k above its vocabulary (the ids of ``tokenizer`` that have logits, when it is known)."""
    prompt = spec.frame(template) - 1  # the store's EOS is never fed to the teacher
    architecture.check_positions(
        config, prompt + spec.new_tokens, f"prompt tokens (up to {prompt:,}) + --new-tokens {spec.new_tokens:,} ="
    )
    vocab = config.vocab_size if tokenizer is None else min(config.vocab_size, len(tokenizer))
    if spec.top_k > vocab:
        raise WhelpError(
            f"--top-k {spec.top_k:,} is more than the teacher's {vocab:,}-token vocabulary; use --top-k from 0 (all) "
            f"to {vocab:,}"
        )


def sample(model, prompts: list[list[int]], config, seed: int) -> list[np.ndarray]:
    """One batch: the prompts continued by ``generate`` (``chatgen.continuations``, left padding) with the RNG
    seeded by ``seed``; each sequence is prompt + continuation up to (without) its first EOS + one EOS."""
    torch.manual_seed(seed)
    outs = chatgen.continuations(model, prompts, config)
    return [np.concatenate([prompt, ids, [config.eos_token_id]]) for prompt, (ids, _) in zip(prompts, outs)]


def _identity(
    spec: GenerateSpec, tokenizer, teacher_name: str, teacher_dir: Path, shard_tokens: int, end_of_turn=None
) -> dict:
    """A token store's identity whose source is the teacher's files, with every sampling setting (the chat ones
    only with ``chat``, so that a text store's identity is what it was before chat); a chat store's also holds
    its mask format, end-of-turn ids and chat template (``tokenstore.chat_identity``); the system turn only when
    given."""
    settings = {
        k: v
        for k, v in record(spec).items()
        if k != "max_tokens" and (spec.chat or k not in CHAT_FIELDS) and (v is not None or k not in OPTIONAL_FIELDS)
    }
    generation = {
        **settings,
        "teacher": teacher_name,
        "prompts_identity": source_identity(spec.prompts.name) if spec.prompts else None,
    }
    return tokenstore.manifest_identity(
        tokenizer,
        f"generate:{teacher_name}",
        store.content_id(store.path_identity(teacher_dir)),
        spec.max_tokens,
        shard_tokens,
        generation=generation,
        **tokenstore.chat_identity(tokenizer, end_of_turn),
    )


def generate(
    model,
    tokenizer,
    out: str | Path,
    spec: GenerateSpec,
    teacher_name: str,
    teacher_dir: Path,
    force: bool = False,
    progress: bool = True,
    shard_tokens: int = SHARD_TOKENS,
    teacher_config=None,
) -> Path:
    """Write ``spec.max_tokens`` tokens sampled from ``model`` (the teacher ``teacher_name``, files at
    ``teacher_dir``; or a function that loads it, called only once ``out`` is known to need work, with its HF config
    ``teacher_config``) to the token store ``out``; resumes an interrupted run of the same call. The sizes of
    ``spec`` (``check_teacher``) and with ``spec.chat`` the teacher's chat template and the prompts' first row are
    checked before it loads; the progress display opens before it loads too."""
    end_of_turn, template = None, 0
    if spec.chat:
        chat.check_chat_template(tokenizer, f"teacher {teacher_name}")
        end_of_turn = chat.saved_end_of_turn(tokenizer, teacher_dir)
        template = chat.template_tokens(tokenizer)
        if spec.prompts is not None:
            chatgen.check_prompts(spec)
        if spec.system is not None:
            chat.system_tokens(tokenizer, spec.system)  # refuses a template that refuses a system turn
    check_teacher(spec, model.config if isinstance(model, torch.nn.Module) else teacher_config, tokenizer, template)
    identity = _identity(spec, tokenizer, teacher_name, Path(teacher_dir), shard_tokens, end_of_turn)
    config = generation_config(spec, tokenizer)

    def fill(work: Path, manifest: dict) -> None:
        what = "generating conversations (tokens)" if spec.chat else "generating (tokens)"
        done = sum(s["tokens"] for s in manifest["shards"])
        with Progress(what, spec.max_tokens, done, enabled=progress, start=True) as bar:
            bar.update(info=f"loading {teacher_name}")
            loaded = (model if isinstance(model, torch.nn.Module) else model()).eval()
            if spec.chat:
                chatgen.fill(work, manifest, chatgen.Teacher(loaded, tokenizer, spec, end_of_turn, config), bar)
            else:
                _fill(work, manifest, loaded, tokenizer, spec, config, bar)

    return tokenstore.write(Path(out).expanduser(), identity, force, fill)


@store.writer
def generate_store(
    teacher: str, out: str | Path, spec: GenerateSpec, force: bool = False, policy: LoadPolicy = LoadPolicy()
) -> Path:
    """``whelp generate``: check the inputs, then sample from the teacher directory or registered name."""
    out = Path(out).expanduser()
    store.check_apart(out, [teacher])
    if spec.prompts is not None:
        check_source(spec.prompts.name)
    check_device(spec.device)
    loader = lambda: models.load_model(teacher, dtype=spec.dtype, device=spec.device, policy=policy)[0]  # noqa: E731
    tokenizer, config = load_tokenizer(teacher, policy), models.load_config(teacher, policy)
    return generate(loader, tokenizer, out, spec, teacher, Path(locate(teacher)), force, teacher_config=config)


def _fill(out: Path, manifest: dict, model, tokenizer, spec: GenerateSpec, config, bar: Progress) -> None:
    """Sample batches after the recorded shards into new shards, shown on ``bar``, then seal the store."""
    done = sum(s["batches"] for s in manifest["shards"])
    total = first = sum(s["tokens"] for s in manifest["shards"])
    prompts = itertools.islice(prompt_ids(spec, tokenizer), done * spec.batch_size, None)
    parts, held, batches, t0 = [], 0, 0, time.perf_counter()
    bar.update(info="sampling the first batch")
    for index in itertools.count(done):
        seqs = sample(model, list(itertools.islice(prompts, spec.batch_size)), config, spec.seed * 1_000_003 + index)
        parts.extend(seqs)
        held, batches = held + sum(map(len, seqs)), batches + 1
        last = total + held >= spec.max_tokens
        if last:  # the stream ends at exactly max_tokens, inside the sequence that crosses it
            keep = spec.max_tokens - total
            ends = np.cumsum([len(p) for p in parts])
            crossing = int(np.searchsorted(ends, keep))  # the first sequence that ends at or past the cut
            parts = parts[:crossing] + [parts[crossing][: keep - (int(ends[crossing - 1]) if crossing else 0)]]
        if held >= manifest["shard_tokens"] or last:
            total += tokenstore.flush(out, manifest, parts, len(parts), batches=batches)
            parts, held, batches = [], 0, 0
        rate = (total + held - first) / max(time.perf_counter() - t0, 1e-9)
        bar.update(completed=total + held, info=f"{rate:,.0f} tok/s")
        if last:
            break
    tokenstore.seal(out, manifest, total)
