"""``evaluate({label: model})``: score teachers and students the same way; ``evaluate_to`` also writes the report.

Each model gets size (parameters, bytes), speed (prefill / decode tokens per second, peak memory), perplexity and
bits per byte on every ``spec.ppl`` source, lm-eval scores on ``spec.tasks``, and its answers to the chat prompt sets
``spec.chat`` with their behaviour metrics (``whelp.evals.behaviour``; the reference, loaded once after every model
has answered, scores them all). A model given as a directory or name is measured with its speed and peak memory in a
fresh process, and its other results are cached under ``$WHELP_HOME/eval-cache`` keyed by the identity of its files
and every setting that changes a number (with ``spec.chat``, the prompt files' and the reference's too), so a teacher
scored once is not scored again by the next build. Speed is never cached: on a shared machine a speed measured at
another moment is not comparable, so every directory's speed is measured in each run, one after another, and the
report's speed ratios compare numbers taken side by side (a cached teacher's once read 197% prefill for a student
running at the teacher's own speed). A model given in memory is measured in this process (its peak memory is not,
since this process holds other things) and not cached.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers

import whelp
import whelp.models
from whelp import store
from whelp.architecture import check_positions, count_params
from whelp.data import chat as chat_data
from whelp.data import check_data, data_identity, source_identity, stream_tokens
from whelp.data.tokenstore import tokenizer_hash
from whelp.errors import WhelpError
from whelp.evals import behaviour
from whelp.evals.harness import SEEDS, check_include_paths, run_tasks, task_manager
from whelp.evals.perplexity import perplexity, windows
from whelp.evals.report import markdown, write_report
from whelp.evals.speed import SpeedProcess, measure_speed
from whelp.models import check_device, load_config, load_tokenizer, locate
from whelp.output import Progress
from whelp.specs import EvalSpec, LoadPolicy, record
from whelp.store import check_apart, check_writable, content_id

CACHE_VERSION = 6  # 5: records hold no speed; 6: answers flag refusals


@dataclass(frozen=True)
class EvalResult:
    """The metrics of one evaluation (``metrics.json``): the first model is the reference of every comparison."""

    metrics: dict

    def markdown(self) -> str:
        return markdown(self.metrics)

    def to_dict(self) -> dict:
        return dict(self.metrics)


def parse_model(arg: str) -> tuple[str, str]:
    """``LABEL=MODEL`` or ``MODEL`` (the CLI's syntax) -> ``(label, model)``; the default label is the directory or
    registered name."""
    label, sep, model = arg.partition("=")
    if not sep or Path(arg).expanduser().exists():
        label, model = Path(arg.rstrip("/")).name or arg, arg
    if not label or not model:
        raise WhelpError(f"bad model argument '{arg}': write MODEL or LABEL=MODEL (e.g. teacher=smollm2-135m)")
    return label, model


def versions() -> dict:
    import lm_eval  # noqa: PLC0415 - heavy: lm-eval loads only for its version in a report

    return {
        "whelp": whelp.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lm_eval": lm_eval.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def cache_key(name: str, spec: EvalSpec, chat: object = None) -> str:
    """The key of a model directory's results: its files, the settings, the inputs' identities and, with
    ``--chat``, ``chat`` (``ChatPlan.identity``: the prompt files and the reference)."""
    inputs = [data_identity(s) for s in spec.ppl] + [source_identity(p) for p in spec.include_paths]
    return content_id(
        {
            "v": CACHE_VERSION,
            "model": source_identity(locate(name)),
            "spec": {key: value for key, value in record(spec).items() if key != "speed"},  # speed is not cached
            "inputs": inputs,
            "chat": chat,
            "versions": versions(),
        }
    )[:20]


def _ppl_tokens(tokenizer, spec: EvalSpec) -> dict:
    """Every perplexity source's tokens [T], refused if it has fewer than 2 (before any model is loaded)."""
    out = {}
    for mixture in spec.ppl:
        source = str(mixture)
        out[source] = stream_tokens(mixture, tokenizer, spec.max_tokens)
        if len(out[source]) < 2:
            raise WhelpError(f"perplexity source '{source}' gives fewer than 2 tokens; give it more text")
    return out


def _perplexity(model, ids, spec: EvalSpec, tokenizer, source: str) -> dict:
    """``perplexity`` of ``model`` on the tokens ``ids`` [T] of ``source``, with a progress display over windows."""
    n_windows = len(windows(len(ids), spec.seq_len, spec.stride or spec.seq_len))
    with Progress(f"perplexity on {source} (windows)", n_windows) as bar:
        return asdict(perplexity(model, ids, spec.seq_len, spec.stride, spec.batch_size, tokenizer, bar.advance))


def measure(
    model, tokenizer, spec: EvalSpec, manager, ppl_ids: dict, chat=None, label: str = "", reference=None
) -> dict:
    """Size, perplexity on the tokens ``ppl_ids`` ({source: [T]}), lm-eval scores and, given a ``chat`` plan, the
    answers of one in-memory model named ``label`` with what it keeps of the ``reference``'s right answers (the
    reference's behaviour; None for the reference itself). Its speed is measured apart (``whelp.evals.speed``), the
    reference's scores of its answers by ``behaviour.score_all``."""
    start = time.perf_counter()
    total, non_embedding = count_params(model.config)
    ppl = {source: _perplexity(model, ids, spec, tokenizer, source) for source, ids in ppl_ids.items()}
    result = {
        "size": {"params": total, "non_embedding_params": non_embedding, "memory_bytes": model.get_memory_footprint()},
        "perplexity": ppl,
        "lm_eval": {"scores": {}, "higher_is_better": {}},
    }
    if spec.tasks:
        result["lm_eval"] = run_tasks(
            model,
            tokenizer,
            spec.tasks,
            manager,
            spec.limit,
            spec.max_length,
            spec.batch_size,
            spec.apply_chat_template,
        )
    if chat is not None:
        result["behaviour"] = behaviour.answer(model, tokenizer, chat, label, spec, reference)
    result["seconds"] = time.perf_counter() - start
    return result


def _in_memory(model, tokenizer, spec: EvalSpec, manager, ppl_ids: dict, chat, label: str, reference) -> dict:
    """``measure`` plus speed measured in this process (peak memory is not: this process holds other things)."""
    speed = {
        **measure_speed(model, spec.speed),
        "peak_memory_bytes": None,
        "peak_memory_method": "not measured: the model was given in memory (evaluate its directory)",
    }
    return {**measure(model, tokenizer, spec, manager, ppl_ids, chat, label, reference), "speed": speed}


def _cache_path(name: str, spec: EvalSpec, chat: object) -> Path:
    return store.whelp_home() / "eval-cache" / f"{cache_key(name, spec, chat)}.json"


def _cached(name: str, spec: EvalSpec, chat: object) -> dict | None:
    """A model directory's results from ``$WHELP_HOME/eval-cache`` (a sealed record), or None: absent, or edited or
    damaged, which is a miss and is measured again."""
    path = _cache_path(name, spec, chat)
    try:
        return {**store.read_record(path, ""), "cache_key": path.stem, "reused": True}
    except WhelpError:
        return None


def _loaded_and_measured(
    name: str, spec: EvalSpec, manager, policy: LoadPolicy, ppl_ids: dict, chat, label, reference
) -> dict:
    """``measure`` of a model directory, loaded here and released on return (before its speed is measured)."""
    model, tokenizer = whelp.models.load_model(name, dtype=spec.dtype, device=spec.device, policy=policy)
    return measure(model, tokenizer, spec, manager, ppl_ids, chat, label, reference)


def _reference(models: Mapping, tokenizer, spec: EvalSpec, policy: LoadPolicy, label: str):
    """``(model, tokenizer)`` of the reference: the one given in memory, or its directory loaded."""
    model = models[label]
    if isinstance(model, (str, Path)):
        return whelp.models.load_model(str(model), dtype=spec.dtype, device=spec.device, policy=policy)
    return model, tokenizer


def check_lengths(config, spec: EvalSpec) -> None:
    """The perplexity window, lm-eval context and speed prompt fit the positions of a model, from its config: before
    any data is read or weights load, and in ``whelp plan`` for a build's eval (which runs last, after hours)."""
    if spec.ppl:  # the window of perplexity alone
        check_positions(config, spec.seq_len, "--seq-len")
    if spec.max_length is not None:
        check_positions(config, spec.max_length, "--max-length")
    check_positions(config, spec.speed.prompt_len + spec.speed.new_tokens, "--speed-prompt-len + new tokens")


def _check(models: Mapping, tokenizer, spec: EvalSpec, policy: LoadPolicy):
    """Labels, model names and their files, tasks, chat prompts and templates, positions and perplexity sources, before
    any model is loaded: returns the task manager, each model's perplexity tokens ({label: {source: [T]}}, read once
    here) and tokenizer hash (perplexities of different tokenizers count different tokens: the report compares them by
    bits per byte only), and the chat plan (None without ``spec.chat``)."""
    if not models:
        raise WhelpError("give at least one model to evaluate")
    check_device(spec.device)
    for source in spec.ppl:
        check_data(source)
    check_include_paths(spec.include_paths)
    manager = task_manager(spec.tasks, spec.include_paths) if spec.tasks else None
    owns, configs = {}, {}
    for label, model in models.items():
        if isinstance(model, (str, Path)):
            whelp.models.check_checkpoint(str(model), policy)
            configs[label], owns[label] = load_config(str(model), policy), load_tokenizer(str(model), policy)
        elif tokenizer is None:
            raise WhelpError(f"model '{label}' is given in memory: pass its tokenizer")
        else:
            configs[label], owns[label] = model.config, tokenizer
        if spec.apply_chat_template:
            why = "--apply-chat-template formats lm-eval requests with each model's template; drop it for this model"
            chat_data.check_chat_template(owns[label], f"model '{label}'", why)
    chat = behaviour.plan(spec, models, owns) if spec.chat else None
    for config in configs.values():
        check_lengths(config, spec)
    shared = _ppl_tokens(tokenizer, spec) if tokenizer is not None else None  # the in-memory models' tokenizer
    tokens = {label: shared if owns[label] is tokenizer else _ppl_tokens(owns[label], spec) for label in models}
    return manager, tokens, {label: tokenizer_hash(own) for label, own in owns.items()}, chat


def evaluate(
    models: Mapping[str, object], tokenizer=None, spec: EvalSpec = EvalSpec(), policy: LoadPolicy = LoadPolicy()
) -> EvalResult:
    """Evaluate ``{label: model}`` (in-memory models with ``tokenizer``, or directories / registered names); the first
    is the reference every other model is compared with.

    Directories not in the cache are loaded and measured one at a time while a speed process imports torch, and then
    cached; every directory's speed, cached or not, is measured after all of them, one after another, each by a child
    of that process (see the module docstring), once per architecture (``SpeedProcess.measure_each``)."""
    models = {str(label): model for label, model in models.items()}
    manager, tokens, tokenizers, chat = _check(models, tokenizer, spec, policy)
    ident = None if chat is None else chat.identity
    cached = chat is None or ident is not None  # answers scored by an in-memory reference are not cached
    on_disk = {label: str(m) for label, m in models.items() if isinstance(m, (str, Path))}
    results = {label: _cached(name, spec, ident) if cached else None for label, name in on_disk.items()}
    missing = [label for label, hit in results.items() if hit is None]
    with contextlib.ExitStack() as stack:
        speed = stack.enter_context(SpeedProcess(policy)) if on_disk else None
        for label, model in models.items():  # the reference first: the others' answers are judged against its
            ref = None if chat is None or label == chat.reference else results[chat.reference]["behaviour"]
            if label in missing:
                results[label] = _loaded_and_measured(
                    on_disk[label], spec, manager, policy, tokens[label], chat, label, ref
                )
            elif label not in on_disk:
                own = _in_memory(model.eval(), tokenizer, spec, manager, tokens[label], chat, label, ref)
                results[label] = {"reused": False, **own}
        if chat is not None:
            fresh = [label for label in models if label in missing or label not in on_disk]
            reference = functools.partial(_reference, models, tokenizer, spec, policy, chat.reference)
            results = behaviour.score_all(chat, results, fresh, reference, spec)
        for label in missing:
            path = _cache_path(on_disk[label], spec, ident)
            if cached:
                store.write_record(path, results[label])
            results[label] = {**results[label], "cache_key": path.stem if cached else None, "reused": False}
        for label, timed in (speed.measure_each(on_disk, spec) if on_disk else {}).items():
            results[label]["speed"] = timed
    rows = [
        {
            "label": label,
            "model": on_disk.get(label, type(model).__name__),
            **results[label],
            "tokenizer_sha256": tokenizers[label],
        }
        for label, model in models.items()
    ]
    return EvalResult(
        {
            "reference": next(iter(models)),
            "settings": record(spec),
            "seeds": {"lm_eval": SEEDS, "speed_inputs": spec.speed.seed},
            "versions": versions(),
            "models": rows,
        }
    )


@store.writer
def evaluate_to(
    out: str | Path,
    models: Mapping[str, str],
    spec: EvalSpec,
    force: bool = False,
    stage_key: str | None = None,
    policy: LoadPolicy = LoadPolicy(),
) -> dict:
    """``evaluate`` model directories and write ``metrics.json``, ``report.md`` and ``report.png`` to ``out``
    atomically (marked with ``stage_key``, a build's key of its inputs). Returns the metrics."""
    out = check_writable(out, force, "eval")
    check_apart(out, models.values())
    metrics = evaluate(models, None, spec, policy).metrics
    write_report(metrics, out, force, stage_key)
    return metrics


def labelled(args: list[str], baseline: str | None = None) -> dict[str, str]:
    """The CLI's ``MODEL`` / ``LABEL=MODEL`` arguments as ``{label: model}``, ``baseline`` first (added if absent)."""
    first = parse_model(baseline) if baseline else None
    out: dict[str, str] = dict([first]) if first else {}
    for label, model in map(parse_model, args):
        if (label, model) == first:
            continue  # the baseline, also listed among the models
        if label in out:
            raise WhelpError(
                f"model label '{label}' is given twice; each model once, named with LABEL=MODEL if "
                "two share a directory name"
            )
        out[label] = model
    return out
