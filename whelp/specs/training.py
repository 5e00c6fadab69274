"""The parts of a distillation run, one frozen spec per concern: the teacher-weight ``Schedule``, the loss
(``LossSpec``), AdamW (``OptimSpec``), on-policy GKD (``OnPolicySpec``), the data mixture (``MixtureSpec``), the
hardware (``ComputeSpec``), what is measured (``MonitorSpec``) and what is written (``SaveSpec``);
``whelp.specs.distill`` gathers them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from whelp.errors import WhelpError
from whelp.schema import check_types
from whelp.specs.base import (
    HIDDEN_LOSSES,
    HIDDEN_MAPS,
    LOSSES,
    ON_POLICY_LOSSES,
    SAVE_DTYPES,
    SCHEDULES,
    _choice,
    _non_negative,
    _positive,
    _require,
    opt,
)


@dataclass(frozen=True)
class Schedule:
    """How teacher weights move over optimizer steps.

    ``constant``: the given weights throughout. ``linear:N`` / ``cosine:N``: all weight on the FIRST teacher at
    step 0, moving (linearly / along a half cosine) to the given weights at step N and staying there: "8B first,
    annealing toward the 70B" is ``--teacher 8b:0 --teacher 70b:1 --schedule linear:N``.
    """

    kind: str = "constant"
    steps: int = 0

    def __post_init__(self):
        check_types(self)
        _require(
            [
                _choice("teacher-weight schedule", self.kind, SCHEDULES),
                (self.kind != "constant" or self.steps == 0, "'constant' takes no step count; write constant"),
                (
                    self.kind == "constant" or self.steps >= 1,
                    f"schedule '{self.kind}' needs a positive step count, e.g. {self.kind}:100",
                ),
            ]
        )

    @classmethod
    def parse(cls, text: str) -> Schedule:
        """``constant`` | ``linear:N`` | ``cosine:N``."""
        kind, _, steps = text.partition(":")
        if kind not in SCHEDULES or (steps and not steps.isdigit()):
            raise WhelpError(f"unknown teacher-weight schedule '{text}'; write constant, linear:N or cosine:N")
        return cls(kind, int(steps or 0))

    def __str__(self) -> str:
        return self.kind if self.kind == "constant" else f"{self.kind}:{self.steps}"


@dataclass(frozen=True)
class LossSpec:
    """How student and teacher distributions are compared (``whelp.distillation.divergences``).

    loss = (1 - ce_weight) * sum_i w_i * c * KD_i + ce_weight * CE, with c = T^2 if ``t2_scale`` (Hinton et al.
    2015: keeps gradient magnitudes comparable across temperatures) else 1. CE uses the untempered student.
    ``vocab_size``: the tokenizer's vocabulary when an lm_head is padded (e.g. 49152 real ids in 49216 rows);
    ids at or above it are excluded from every softmax, which is exactly masking their logits to -inf.
    ``chat_loss`` "ce": the rows of chat data (a source with a loss mask) train with loss = CE alone, the teacher's
    sampled answers as targets (sequence-level KD, Kim & Rush 2016), while text rows keep the loss above: on the
    demo it cut greedy looping on held-out requests from 53% to 36% for +3% licence perplexity (bench/RESULTS.md).
    """

    name: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"] = opt(
        "forward_kl", "Divergence: forward_kl | reverse_kl | jsd | skew_kl | tvd"
    )
    temperature: float = opt(1.0, "Softmax temperature of student and teachers")
    t2_scale: bool = opt(False, "Scale the KD term by T^2 (Hinton et al. 2015)")
    beta: float = opt(0.5, "jsd: mixture weight of the teacher, in (0, 1)")
    alpha: float = opt(0.1, "skew_kl: skew toward the teacher, in [0, 1)")
    ce_weight: float = opt(0.0, "Weight of the next-token CE in [0, 1]")
    chat_loss: Literal["kd", "ce"] = opt(
        "kd",
        "The loss of chat data's answers (a store with a loss mask): kd (as text: KD + ce_weight CE) | ce (CE alone "
        "on the teacher's sampled answers: sequence-level KD, which loops less; text rows keep KD)",
    )
    chunk_size: int = opt(1024, "Tokens per loss chunk: loss memory ~ 3 x chunk x vocab x 4 bytes")
    vocab_size: int | None = None

    def __post_init__(self):
        check_types(self)
        _require(
            [
                _choice("loss", self.name, LOSSES),
                (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
                (0 < self.beta < 1, f"jsd beta must be in (0, 1), got {self.beta}"),
                (0 <= self.alpha < 1, f"skew_kl alpha must be in [0, 1), got {self.alpha}"),
                (0 <= self.ce_weight <= 1, f"ce_weight must be in [0, 1], got {self.ce_weight}"),
                _choice("chat_loss", self.chat_loss, ("kd", "ce")),
                *_positive(self, ("chunk_size", "vocab_size")),
            ]
        )


@dataclass(frozen=True)
class HiddenSpec:
    """Intermediate states (``whelp.distillation.hidden``, ``whelp.distillation.local``): a global term on the
    residual stream of matched layers, weighted by ``weight`` against the per-token KD, or, with ``local``, a
    block-local stage that trains each student block on the teacher's states alone (no logits). ``map``: which
    teacher layer each student layer matches; ``auto`` is the pruning's kept layers where the student records them
    (prune_report.json), else uniform."""

    weight: float = opt(0.0, "Weight of the hidden-state loss between matched layers (0: logits only)")
    loss: Literal["nmse", "cosine"] = opt("nmse", "Hidden-state distance: nmse | cosine")
    map: Literal["auto", "kept", "uniform"] = opt(
        "auto", "Layer map: auto (kept layers from the pruning, else uniform) | kept | uniform"
    )
    local: bool = opt(False, "Block-local stage: each student block learns the teacher span it replaces (no logits)")

    def __post_init__(self):
        check_types(self)
        _require(
            [
                (self.weight >= 0, f"hidden_weight must be >= 0, got {self.weight}"),
                _choice("hidden_loss", self.loss, HIDDEN_LOSSES),
                _choice("hidden_map", self.map, HIDDEN_MAPS),
            ]
        )

    @property
    def active(self) -> bool:
        """Whether the run reads the teacher's hidden states."""
        return self.local or self.weight > 0


@dataclass(frozen=True)
class OptimSpec:
    """AdamW and its learning-rate schedule (linear warmup, then cosine decay to 0): what may change on resume."""

    lr: float = opt(1e-4, "Peak learning rate (AdamW)")
    warmup: int = opt(0, "Linear warmup steps before cosine decay to 0")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm")

    def __post_init__(self):
        check_types(self)
        _require(
            [
                (self.lr > 0, f"lr must be > 0 (0 trains nothing), got {self.lr}"),
                *_non_negative(self, ("warmup", "weight_decay", "max_grad_norm")),
            ]
        )

    def check_steps(self, steps: int) -> None:
        """Refuse a warmup not below the run's ``steps`` (for a --max-tokens budget known once the processes are)."""
        _require(
            [
                (
                    self.warmup < steps,
                    f"warmup={self.warmup} is not below the run's {steps} steps: the learning "
                    "rate would only rise; lower --warmup (or train longer)",
                )
            ]
        )


@dataclass(frozen=True)
class OnPolicySpec:
    """On-policy distillation (GKD, ``whelp.distillation.onpolicy``): the ``fraction`` of micro-batches in which the
    student samples ``gen_tokens`` tokens after each block's first ``prompt_tokens`` and the live teachers score
    them with the divergence ``loss``."""

    fraction: float = opt(
        0.0,
        "Fraction of micro-batches in [0, 1] whose continuations the student samples and the live teachers score (GKD)",
    )
    gen_tokens: int = opt(64, "On-policy: tokens the student samples after each prompt")
    prompt_tokens: int | None = opt(
        None, "On-policy: prompt tokens cut from each block (default: seq_len - gen_tokens)"
    )
    loss: Literal["reverse_kl", "jsd", "forward_kl"] = opt(
        "reverse_kl", "On-policy divergence: reverse_kl | jsd | forward_kl"
    )
    from_step: int = opt(0, "On-policy micro-batches only from this optimizer step on (0: from the first)")

    def __post_init__(self):
        check_types(self)
        _require(
            [
                (
                    0 <= self.fraction <= 1,
                    f"on_policy is the fraction of on-policy micro-batches, in [0, 1]; got {self.fraction}",
                ),
                *_positive(self, ("gen_tokens", "prompt_tokens")),
                (self.from_step >= 0, f"on_policy_from is the first on-policy step, >= 0; got {self.from_step}"),
                _choice("on_policy_loss", self.loss, ON_POLICY_LOSSES),
            ]
        )

    def prompt_len(self, seq_len: int) -> int:
        """Prompt tokens cut from each block of ``seq_len``: ``prompt_tokens``, or the rest after ``gen_tokens``."""
        return self.prompt_tokens if self.prompt_tokens is not None else seq_len - self.gen_tokens

    def loss_spec(self, loss: LossSpec) -> LossSpec:
        """The loss of on-policy micro-batches: ``loss`` with this divergence, KD alone (student samples have no
        labels), so a sampled position carries the divergence at full weight where a data position carries
        ``1 - ce_weight``."""
        return replace(loss, name=self.loss, ce_weight=0.0)


@dataclass(frozen=True)
class MixtureSpec:
    """How a weighted data mixture's sources are drawn (``whelp.distillation.dynamic``): ``static`` keeps the given
    weights (the rows of ``whelp.data.Blocks`` in their seeded order); ``dynamic`` re-weights the sources every
    ``every`` optimizer steps by the student's excess loss over the teacher on ``dev_blocks`` blocks held out of each
    source (Sheared-LLaMA's dynamic batch loading, Xia et al. 2024), so training goes where the student lags most."""

    kind: Literal["static", "dynamic"] = opt(
        "static",
        "Data mixture: static (the given weights) | dynamic (re-weight the sources by the student's excess loss "
        "over the first live teacher, Sheared-LLaMA)",
    )
    every: int = opt(8, "Dynamic mixture: optimizer steps between re-weightings")
    dev_blocks: int = opt(4, "Dynamic mixture: blocks of each source held out of training to measure its losses")

    def __post_init__(self):
        check_types(self)
        _require(
            [
                _choice("mixture", self.kind, ("static", "dynamic")),
                (
                    self.every >= 1,
                    f"mixture_every is the optimizer steps between re-weightings, >= 1; got {self.every}",
                ),
                (
                    self.dev_blocks >= 1,
                    f"mixture_dev_blocks is the blocks held out of each source, >= 1; got {self.dev_blocks}",
                ),
            ]
        )


@dataclass(frozen=True)
class ComputeSpec:
    """How the run uses the hardware (not what it trains): autocast dtype, recomputation, teacher sharding."""

    dtype: Literal["auto", "float32", "bfloat16"] = opt(
        "auto", "Autocast dtype: auto (bf16 on CUDA, else fp32) | float32 | bfloat16; master weights stay fp32"
    )
    grad_checkpointing: bool = opt(False, "Recompute activations in backward (less memory, ~30% slower)")
    shard_teachers: bool = opt(
        False,
        "Under torchrun: FSDP2-shard the live teachers across ranks (forward only) "
        "instead of a full copy on every rank",
    )

    def __post_init__(self):
        check_types(self)
        _require([_choice("dtype", self.dtype, ("auto", "float32", "bfloat16"))])


@dataclass(frozen=True)
class MonitorSpec:
    """What the run measures and logs as it goes: held-out perplexity cadence and size, TensorBoard."""

    eval_every: int = opt(0, "Held-out perplexity every N steps (0: at the start and end only)")
    eval_tokens: int = opt(16384, "Held-out tokens")
    tensorboard: bool = opt(False, "Also log to OUT.distill/tensorboard")

    def __post_init__(self):
        check_types(self)
        _require([*_positive(self, ("eval_tokens",)), *_non_negative(self, ("eval_every",))])


@dataclass(frozen=True)
class SaveSpec:
    """What the run writes: checkpoints (cadence, how many kept), the dtype of the final weights, and how far they
    are from the student the run started from (``interpolate``, WiSE-FT: ``whelp.distillation.interpolate``)."""

    save_every: int = opt(0, "Checkpoint every N steps (0: only at the end)")
    keep_last: int = opt(2, "Checkpoints kept")
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "dtype of the written weights: auto (what the source model stores) | float32 | bfloat16 | float16"
    )
    interpolate: float = opt(
        1.0, "Write (1 - A) x the starting student + A x the trained one (WiSE-FT), A in (0, 1]; 1: the trained weights"
    )

    def __post_init__(self):
        check_types(self)
        _require(
            [
                *_positive(self, ("keep_last",)),
                *_non_negative(self, ("save_every",)),
                _choice("save_dtype", self.save_dtype, SAVE_DTYPES),
                (
                    0 < self.interpolate <= 1,
                    f"interpolate must be in (0, 1] (1 writes the trained weights), got {self.interpolate}",
                ),
            ]
        )
