"""What ``whelp eval`` measures: ``EvalSpec`` (perplexity, lm-eval tasks, chat behaviour, size) and its
``SpeedSpec``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from whelp.errors import WhelpError
from whelp.schema import check_types
from whelp.specs.base import _choice, _device, _positive, _require, opt
from whelp.specs.data import Mixture, as_mixtures

CHAT_SETS = ("chat:general",)  # the built-in prompt sets (whelp/evals/data/chat_<name>.jsonl)


@dataclass(frozen=True)
class SpeedSpec:
    """Prefill over ``batch_size x prompt_len`` tokens and ``new_tokens`` cached greedy decode steps, median of
    ``repeats`` after one warm-up (``whelp.evals.speed``)."""

    batch_size: int = opt(1, "Speed: sequences per forward")
    prompt_len: int = opt(128, "Speed: prompt tokens")
    new_tokens: int = opt(32, "Speed: decoded tokens")
    repeats: int = opt(3, "Speed: timed repeats (median)")
    seed: int = 0

    def __post_init__(self):
        check_types(self)
        _require(_positive(self, ("batch_size", "prompt_len", "new_tokens", "repeats")))


@dataclass(frozen=True)
class EvalSpec:
    """What to measure. ``stride`` None means non-overlapping windows of ``seq_len``; ``max_tokens`` bounds the
    tokens read from each perplexity source; ``limit`` caps the documents of each lm-eval task. ``chat`` names prompt
    sets every model answers greedily through the reference's chat template (``whelp.evals.behaviour``): a built-in
    set (``CHAT_SETS``) or a jsonl file of ``{"messages": [...]}`` / ``{"prompt": "..."}`` rows."""

    ppl: tuple[Mixture, ...] = opt(
        (Mixture.parse("pydoc:eval"),), "Perplexity source(s) (store, file, dir, pydoc:eval, hf:...)"
    )
    tasks: tuple[str, ...] = opt(
        (), "lm-eval tasks, comma-separated (offline: whelp_pydoc, whelp_licenses, whelp_pydoc_next)", cli="csv"
    )
    include_paths: tuple[str, ...] = opt((), "Directory of extra lm-eval task YAMLs", flag="--include-path")
    limit: int | None = opt(None, "At most N documents per lm-eval task")
    seq_len: int = opt(512, "Perplexity window, in tokens")
    max_length: int | None = opt(None, "lm-eval context in tokens (default: the model's, as stock lm-eval)")
    stride: int | None = opt(None, "Sliding-window stride (default: --seq-len)")
    max_tokens: int | None = opt(None, "Read at most N tokens per perplexity source")
    apply_chat_template: bool = opt(False, "lm-eval tasks: format requests with the model's chat template")
    chat: tuple[str, ...] = opt((), "Chat prompts every model answers: chat:general or a jsonl file (repeatable)")
    chat_new_tokens: int = opt(64, "Chat: the answer budget, in new tokens")
    chat_limit: int | None = opt(None, "Chat: only the first N prompts of each set")
    batch_size: int = opt(4, "Windows / lm-eval requests / teacher-forced chat rows per forward")
    # Greedy decoding costs a fixed overhead per step whatever the batch, so it takes more rows than a forward does:
    # the demo's students answer 48 requests in 65 s at 4, 20-26 s at 16, 13-16 s at 48 on 2 cores (same answers).
    chat_batch_size: int = opt(16, "Chat: prompts decoded together")
    speed: SpeedSpec = SpeedSpec()
    device: str = opt("cpu", "cpu, cuda or cuda:N")
    dtype: Literal["float32", "bfloat16", "float16"] = opt("float32", "float32 | bfloat16 | float16")

    def __post_init__(self):
        as_mixtures(self, ("ppl",))
        check_types(self)
        _require(
            [
                (self.seq_len >= 2, f"seq_len must be at least 2, got {self.seq_len}"),
                (
                    self.stride is None or 1 <= self.stride <= self.seq_len,
                    f"stride must be between 1 and seq_len ({self.seq_len}), got {self.stride}",
                ),
                *_positive(
                    self,
                    (
                        "limit",
                        "max_tokens",
                        "batch_size",
                        "max_length",
                        "chat_new_tokens",
                        "chat_limit",
                        "chat_batch_size",
                    ),
                ),
                (
                    not self.apply_chat_template or bool(self.tasks),
                    "apply_chat_template formats lm-eval task requests; give --tasks too (chat prompts: --chat)",
                ),
                *[
                    (
                        not name.startswith("chat:") or name in CHAT_SETS,
                        f"unknown chat prompt set '{name}'; choose {', '.join(CHAT_SETS)} or a jsonl file",
                    )
                    for name in self.chat
                ],
                _choice("dtype", self.dtype, ("float32", "bfloat16", "float16")),
                _device(self.device),
            ]
        )
        for source in self.ppl:
            if len(source.sources) > 1:
                raise WhelpError(f"perplexity is measured per source; give '{source}' as separate sources")
