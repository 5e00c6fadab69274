"""``evaluate(models, out, spec)``: score teachers and students the same way and write a comparison report.

Each model gets size (parameters, bytes), speed (prefill / decode tokens per second, peak memory; measured in a
fresh process), perplexity and bits per byte on every ``spec.ppl`` source, and lm-eval scores on ``spec.tasks``.
Per-model results are cached under ``$WHELP_HOME/eval-cache`` keyed by the identity of the model's files and every
setting that changes a number, so a teacher scored once is not scored again by the next build.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from whelp.errors import WhelpError

CACHE_VERSION = 1


@dataclass(frozen=True)
class EvalSpec:
    """What to measure. ``stride`` None means non-overlapping windows of ``seq_len``; ``max_tokens`` bounds the
    tokens read from each perplexity source; ``limit`` caps the documents of each lm-eval task."""

    ppl: tuple[str, ...] = ("pydoc:eval",)
    tasks: tuple[str, ...] = ()
    include_paths: tuple[str, ...] = ()
    limit: int | None = None
    seq_len: int = 512
    stride: int | None = None
    max_tokens: int | None = None
    batch_size: int = 4
    speed_batch_size: int = 1
    speed_prompt_len: int = 128
    speed_new_tokens: int = 32
    speed_repeats: int = 3
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self):
        if self.seq_len < 2:
            raise WhelpError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.stride is not None and not 1 <= self.stride <= self.seq_len:
            raise WhelpError(f"--stride must be between 1 and --seq-len ({self.seq_len}), got {self.stride}")
        if self.limit is not None and self.limit < 1:
            raise WhelpError(f"--limit must be positive, got {self.limit}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise WhelpError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype}")


def parse_model(arg: str) -> tuple[str, str]:
    """``LABEL=MODEL`` or ``MODEL`` -> ``(label, model)``; the default label is the directory or registered name."""
    label, sep, model = arg.partition("=")
    if not sep or Path(arg).expanduser().exists():
        label, model = Path(arg.rstrip("/")).name or arg, arg
    if not label or not model:
        raise WhelpError(f"bad model argument '{arg}': write MODEL or LABEL=MODEL (e.g. teacher=smollm2-135m)")
    return label, model


def model_identity(name: str) -> dict:
    """Identity of a model's files: name, size and mtime of each file of its directory (the hub id if remote)."""
    from whelp.models import resolve
    from whelp.store import path_identity

    path = Path(resolve(name)).expanduser()
    if not path.is_dir():
        return {"hub_id": name}
    return {"files": path_identity(path)}


def versions() -> dict:
    import lm_eval
    import torch
    import transformers

    import whelp

    return {"whelp": whelp.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "lm_eval": lm_eval.__version__, "python": platform.python_version(), "platform": platform.platform()}


def cache_key(name: str, spec: EvalSpec) -> str:
    from whelp.data import data_identity, source_identity
    from whelp.store import content_id

    inputs = [data_identity(s) for s in spec.ppl] + [source_identity(p) for p in spec.include_paths]
    return content_id({"v": CACHE_VERSION, "model": model_identity(name), "spec": asdict(spec), "inputs": inputs,
                       "versions": versions()})[:20]


def _perplexities(model, tokenizer, spec: EvalSpec) -> dict:
    from whelp.data import stream_tokens
    from whelp.evals.perplexity import perplexity

    out = {}
    for source in spec.ppl:
        ids = stream_tokens(source, tokenizer, spec.max_tokens)
        if len(ids) < 2:
            raise WhelpError(f"perplexity source '{source}' gives fewer than 2 tokens; give it more text")
        out[source] = asdict(perplexity(model, ids, spec.seq_len, spec.stride, spec.batch_size, tokenizer))
    return out


def measure(name: str, spec: EvalSpec, manager) -> dict:
    """All numbers of one model (the uncached path)."""
    from whelp.evals.harness import run_tasks
    from whelp.evals.speed import SpeedSpec, measure_in_subprocess
    from whelp.models import count_params, load_model

    start = time.perf_counter()
    speed = measure_in_subprocess(name, SpeedSpec(
        batch_size=spec.speed_batch_size, prompt_len=spec.speed_prompt_len, new_tokens=spec.speed_new_tokens,
        repeats=spec.speed_repeats, device=spec.device, dtype=spec.dtype))
    model, tokenizer = load_model(name, dtype=spec.dtype, device=spec.device)
    total, non_embedding = count_params(model.config)
    result = {"size": {"params": total, "non_embedding_params": non_embedding,
                       "memory_bytes": model.get_memory_footprint()},
              "speed": speed, "perplexity": _perplexities(model, tokenizer, spec),
              "lm_eval": {"scores": {}, "higher_is_better": {}}}
    if spec.tasks:
        result["lm_eval"] = run_tasks(model, tokenizer, spec.tasks, manager, spec.limit, spec.seq_len, spec.batch_size)
    result["seconds"] = time.perf_counter() - start
    return result


def _cached(name: str, spec: EvalSpec, manager) -> dict:
    """Results of a model from ``$WHELP_HOME/eval-cache`` (a sealed record; an edited or damaged one is a miss
    and is measured again), else measured and stored."""
    from whelp import store

    key = cache_key(name, spec)
    path = store.whelp_home() / "eval-cache" / f"{key}.json"
    try:
        return {**store.read_record(path, ""), "cache_key": key, "reused": True}
    except WhelpError:
        result = measure(name, spec, manager)
    store.write_record(path, result)
    return {**result, "cache_key": key, "reused": False}


def order_models(models: Sequence[str], baseline: str | None) -> list[str]:
    """Put ``baseline`` (a ``MODEL`` or ``LABEL=MODEL`` argument) first, adding it if it is not among ``models``."""
    if baseline is None:
        return list(models)
    return [baseline, *(m for m in models if parse_model(m) != parse_model(baseline))]


def evaluate(models: Sequence[str], out: str | Path, spec: EvalSpec, force: bool = False,
             stage_key: str | None = None) -> dict:
    """Evaluate ``models`` (``MODEL`` or ``LABEL=MODEL``; the first is the reference) and write ``metrics.json``,
    ``report.md`` and ``report.png`` to ``out`` atomically (marked with ``stage_key``, a build's key of its
    inputs). Returns the metrics.json content."""
    from whelp.evals.harness import SEEDS, task_manager
    from whelp.evals.report import write_report
    from whelp.store import check_writable

    out = check_writable(out, force, "eval")
    parsed = [parse_model(m) for m in models]
    if not parsed:
        raise WhelpError("give at least one model to evaluate")
    labels = [label for label, _ in parsed]
    if len(set(labels)) != len(labels):
        raise WhelpError(f"model labels must be unique, got {', '.join(labels)}; name them with LABEL=MODEL")
    manager = task_manager(spec.tasks, spec.include_paths) if spec.tasks else None
    results = [{"label": label, "model": name, **_cached(name, spec, manager)} for label, name in parsed]
    metrics = {"reference": labels[0], "settings": asdict(spec), "seeds": {"lm_eval": SEEDS, "speed_inputs": 0},
               "versions": versions(), "models": results}
    write_report(metrics, out, force, stage_key)
    return metrics
