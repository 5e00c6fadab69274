"""What a teacher writes once, before any student trains on it: a logit cache (``CacheSpec``, ``whelp
cache-logits``) and a token store of its own text (``GenerateSpec``, ``whelp generate``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from whelp.schema import check_types
from whelp.specs.base import MAX_TOKENS, _at_most, _choice, _device, _non_negative, _positive, _require, opt
from whelp.specs.data import Mixture, as_mixtures


@dataclass(frozen=True)
class CacheSpec:
    """What ``whelp cache-logits`` stores per position: the top-``k`` log-probs + tail mass, or ``k`` samples."""

    mode: Literal["topk", "sample"] = "topk"
    k: int = 64
    temperature: float = opt(1.0, "Teacher softmax temperature")
    seq_len: int = opt(512, "Tokens per packed block")
    max_tokens: int | None = opt(None, "Read at most this many tokens")
    batch_size: int = opt(4, "Blocks per teacher forward")
    dtype: Literal["float32", "bfloat16"] = opt("float32", "Teacher dtype: float32 | bfloat16")
    shard_tokens: int = opt(65536, "Tokens per cache shard file: the unit of work per process and of resume")
    tp_size: int = opt(
        1,
        "Under torchrun: processes sharing one tensor-parallel teacher (a teacher larger than "
        "one device); 1: a whole teacher per process",
    )

    def __post_init__(self):
        check_types(self)
        _require(
            [
                _choice("cache mode", self.mode, ("topk", "sample")),
                (self.k >= 1, f"{'--topk' if self.mode == 'topk' else '--sample'} must be at least 1, got {self.k}"),
                (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
                (self.seq_len >= 2, f"seq_len must be at least 2, got {self.seq_len}"),
                *_positive(self, ("max_tokens", "batch_size", "shard_tokens", "tp_size")),
                *_at_most(self, ("max_tokens",), MAX_TOKENS),
                _choice("dtype", self.dtype, ("float32", "bfloat16")),
            ]
        )


CHAT_FIELDS = ("chat", "samples_per_prompt", "request_tokens")  # recorded in a store's identity with --chat only
OPTIONAL_FIELDS = ("system",)  # recorded in a store's identity only when given, so a store without one keeps its own


@dataclass(frozen=True)
class GenerateSpec:
    """What ``whelp generate`` samples: ``max_tokens`` tokens of the teacher's own text, as sequences of up to
    ``prompt_tokens`` tokens cut from the start of a document of ``prompts`` (or a lone BOS) and up to
    ``new_tokens`` sampled ones (Kim & Rush 2016's sequence-level KD data; Qwen3's strong-to-weak stage 1).

    With ``chat``: conversations through the teacher's chat template, one document each with a loss mask on the
    answer (``whelp.data.chatgen``): answers to the requests of ``prompts`` (rows with ``messages`` ending in a user
    turn, or a ``prompt``; each answered once) or to requests of up to ``request_tokens`` tokens the teacher writes
    itself (Magpie); the best of ``samples_per_prompt`` answers by the teacher's own score is kept. With ``system``
    the teacher answers under that system turn and the store keeps the conversation without it: context
    distillation (Askell et al. 2021, arXiv 2112.00861; Snell et al. 2022, arXiv 2209.15189). ``max_tokens`` still
    bounds the store (the prompts' end may come first)."""

    max_tokens: int | None = opt(None, "Tokens to write (prompts, samples and one EOS per sequence)")
    prompts: Mixture | None = opt(None, "DATA whose documents' first tokens prompt the teacher (default: BOS alone)")
    prompt_tokens: int = opt(32, "Prompt tokens cut from each document")
    new_tokens: int = opt(256, "Sampled tokens per sequence at most (EOS ends one sooner)")
    temperature: float = opt(1.0, "Sampling temperature; 0 is greedy decoding")
    top_p: float = opt(1.0, "Nucleus sampling: keep the smallest set of tokens of this probability (1: all)")
    top_k: int = opt(0, "Keep the k most likely tokens (0: all)")
    batch_size: int = opt(8, "Sequences sampled together")
    seed: int = opt(0, "Sampling seed (each batch is seeded from it and its index)")
    device: str = opt("cpu", "cpu, cuda or cuda:N")
    dtype: Literal["float32", "bfloat16"] = opt("float32", "Teacher dtype: float32 | bfloat16")
    chat: bool = opt(
        False,
        "Conversations through the teacher's chat template, loss-masked to the answers: answers to --prompts "
        "(jsonl rows with messages or prompt), else to requests the teacher writes itself (Magpie)",
    )
    samples_per_prompt: int = opt(
        1, "--chat: answers sampled per request; the one of highest mean teacher log-prob per token is kept"
    )
    request_tokens: int = opt(
        48, "--chat without --prompts: tokens of a self-written request at most (a longer one is dropped)"
    )
    drop_refusals: bool = opt(
        False, "--chat: drop answers that refuse or apologise (English phrases); a request none answers is lost"
    )
    system: str | None = opt(
        None,
        "--chat: a system turn the teacher answers under, left out of the stored conversations, so the student "
        "learns the answers without the instruction (context distillation)",
    )

    def __post_init__(self):
        as_mixtures(self, ("prompts",))
        check_types(self)
        _require(
            [
                (self.max_tokens is not None, "give --max-tokens N: how many tokens to generate"),
                *_positive(
                    self,
                    ("max_tokens", "prompt_tokens", "new_tokens", "batch_size", "samples_per_prompt", "request_tokens"),
                ),
                *_at_most(self, ("max_tokens",), MAX_TOKENS),
                (
                    self.chat or self.samples_per_prompt == 1,
                    "--samples-per-prompt needs --chat (it picks the best answer to a request)",
                ),
                (self.chat or not self.drop_refusals, "--drop-refusals needs --chat (it drops answers)"),
                (self.chat or self.system is None, "--system needs --chat (the teacher answers under it)"),
                (
                    self.system is None or bool(self.system.strip()),
                    "--system is empty; give the instruction or omit it",
                ),
                (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
                (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
                *_non_negative(self, ("top_k",)),
                _choice("dtype", self.dtype, ("float32", "bfloat16")),
                _device(self.device),
                (
                    self.prompts is None or len(self.prompts.sources) == 1,
                    "--prompts takes one source (its documents' first tokens, or with --chat its requests, prompt "
                    "the teacher)",
                ),
            ]
        )
        self._check_store()

    def frame(self, template: int = 0) -> int:
        """Tokens of a sequence besides its ``new_tokens`` sampled ones, at most: its prompt (``prompt_tokens`` of a
        document, or the one BOS; with ``chat`` the template's ``template`` tokens and a self-written request of
        ``request_tokens``, or a request of ``prompts``, whose length only reading it tells) and the EOS that ends
        it in the store."""
        if self.chat:
            return template + (0 if self.prompts else self.request_tokens) + 1
        return (self.prompt_tokens if self.prompts else 1) + 1

    def _check_store(self) -> None:
        """One sequence longer than the whole store would be cut inside its first batch, after sampling all of
        it (for minutes, at 100,000 new tokens): refused with the range of ``new_tokens`` that fits."""
        longest, room = self.frame() + self.new_tokens, self.max_tokens - self.frame()
        fix = f"--max-tokens of at least {longest:,}"
        _require(
            [
                (
                    self.new_tokens <= room,
                    f"--new-tokens {self.new_tokens:,} makes a sequence of up to {longest:,} tokens (with its prompt "
                    f"and EOS), more than --max-tokens {self.max_tokens:,}, the whole store; "
                    + (f"use --new-tokens from 1 to {room:,} or {fix}" if room >= 1 else f"give {fix}"),
                )
            ]
        )
