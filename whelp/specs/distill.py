"""``DistillSpec``, the hyper-parameters of a distillation run (its own fields and one sub-spec per concern, set
by flat keys), and the checks of its teachers: ``check_on_policy`` and ``check_teacher_weights``."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

from whelp.errors import WhelpError
from whelp.schema import check_types, flatten, unflatten
from whelp.specs.base import MAX_STEPS, MAX_TOKENS, _at_most, _positive, _require, opt
from whelp.specs.data import Mixture, _plain, as_mixtures
from whelp.specs.training import (
    ComputeSpec,
    HiddenSpec,
    LossSpec,
    MixtureSpec,
    MonitorSpec,
    OnPolicySpec,
    OptimSpec,
    SaveSpec,
    Schedule,
)


@dataclass(frozen=True, init=False)
class DistillSpec:
    """Hyper-parameters of a distillation run. Budget: exactly one of ``steps`` / ``max_tokens``.

    The run's own fields (budget, batch, data, schedule, seed) and one frozen sub-spec per concern, each handed to
    the code that acts on it: ``optim`` (AdamW and warmup), ``kd`` (the ``LossSpec``), ``gkd`` (on-policy, GKD),
    ``mix`` (the data mixture), ``compute``, ``monitor`` and ``save``. Users write the flat keys of ``KEYS`` (``--lr``, recipe ``lr:``,
    ``DistillSpec(steps=2, lr=1e-3)``); sub-specs may also be given whole (``DistillSpec(steps=2, optim=...)``).
    """

    # Every key a user writes (CLI flag, recipe key, keyword) -> the field it sets, in the order they are shown.
    KEYS: ClassVar[dict[str, tuple[str, ...]]] = {
        "data": ("data",),
        "steps": ("steps",),
        "max_tokens": ("max_tokens",),
        "batch_size": ("batch_size",),
        "grad_accum": ("grad_accum",),
        "seq_len": ("seq_len",),
        "lr": ("optim", "lr"),
        "warmup": ("optim", "warmup"),
        "weight_decay": ("optim", "weight_decay"),
        "max_grad_norm": ("optim", "max_grad_norm"),
        "loss": ("kd", "name"),
        "temperature": ("kd", "temperature"),
        "t2_scale": ("kd", "t2_scale"),
        "beta": ("kd", "beta"),
        "alpha": ("kd", "alpha"),
        "ce_weight": ("kd", "ce_weight"),
        "chat_loss": ("kd", "chat_loss"),
        "on_policy": ("gkd", "fraction"),
        "gen_tokens": ("gkd", "gen_tokens"),
        "prompt_tokens": ("gkd", "prompt_tokens"),
        "on_policy_loss": ("gkd", "loss"),
        "on_policy_from": ("gkd", "from_step"),
        "shard_teachers": ("compute", "shard_teachers"),
        "chunk_size": ("kd", "chunk_size"),
        "hidden_weight": ("hidden", "weight"),
        "hidden_loss": ("hidden", "loss"),
        "hidden_map": ("hidden", "map"),
        "local": ("hidden", "local"),
        "schedule": ("schedule",),
        "eval_every": ("monitor", "eval_every"),
        "eval_data": ("eval_data",),
        "eval_tokens": ("monitor", "eval_tokens"),
        "seed": ("seed",),
        "mixture": ("mix", "kind"),
        "mixture_every": ("mix", "every"),
        "mixture_dev_blocks": ("mix", "dev_blocks"),
        "dtype": ("compute", "dtype"),
        "save_dtype": ("save", "save_dtype"),
        "interpolate": ("save", "interpolate"),
        "grad_checkpointing": ("compute", "grad_checkpointing"),
        "save_every": ("save", "save_every"),
        "keep_last": ("save", "keep_last"),
        "tensorboard": ("monitor", "tensorboard"),
    }

    data: Mixture = opt(
        Mixture.parse("pydoc:train"), "Training data (store, file, dir, pydoc:train, hf:..., a:0.7,b:0.3)"
    )
    steps: int | None = opt(None, "Optimizer steps (or --max-tokens)")
    max_tokens: int | None = opt(None, "Training tokens (or --steps); also bounds how much of the data is read")
    batch_size: int = opt(8, "Sequences per micro-batch per process")
    grad_accum: int = opt(1, "Micro-batches per optimizer step")
    seq_len: int = opt(512, "Tokens per block")
    schedule: Schedule = opt(
        Schedule(), "Teacher weights: constant | linear:N | cosine:N (first teacher -> given weights)"
    )
    eval_data: Mixture = opt(Mixture.parse("pydoc:eval"), "Held-out data for the perplexity")
    seed: int = opt(0, "Seed of the data order")
    optim: OptimSpec = OptimSpec()
    kd: LossSpec = LossSpec()
    gkd: OnPolicySpec = OnPolicySpec()
    mix: MixtureSpec = MixtureSpec()
    hidden: HiddenSpec = HiddenSpec()
    compute: ComputeSpec = ComputeSpec()
    monitor: MonitorSpec = MonitorSpec()
    save: SaveSpec = SaveSpec()

    def __init__(self, **given):
        """From flat keys (``lr=1e-3``), whole sub-specs (``optim=OptimSpec(...)``) or both; an unknown key is one
        line naming it and the valid keys."""
        values = unflatten(DistillSpec, given, "DistillSpec")
        for f in fields(self):
            object.__setattr__(self, f.name, values.get(f.name, f.default))
        self.__post_init__()

    def __post_init__(self):
        if isinstance(self.schedule, str):  # DistillSpec(schedule="linear:100") in Python, as in YAML and the CLI
            object.__setattr__(self, "schedule", Schedule.parse(self.schedule))
        as_mixtures(self, ("data", "eval_data"))
        check_types(self)
        _require(
            [
                (
                    (self.steps is None) != (self.max_tokens is None),
                    "give exactly one training budget: --steps N or --max-tokens N (recipe: steps or max_tokens)",
                ),
                *_positive(self, ("steps", "max_tokens", "batch_size", "grad_accum")),
                *_at_most(self, ("steps",), MAX_STEPS),
                *_at_most(self, ("max_tokens",), MAX_TOKENS),
                (self.seq_len >= 2, f"seq_len must be at least 2, got {self.seq_len}"),
            ]
        )
        self._check_on_policy()
        self._check_local()
        if self.steps is not None:
            self.optim.check_steps(self.steps)

    def _check_on_policy(self) -> None:
        """On-policy rows fit a block; the options that shape them (gen_tokens, ...) do nothing with on_policy 0, so
        one given then is a run meant to be on-policy (or a stale flag): refused rather than ignored."""
        on, prompt, default = self.gkd, self.gkd.prompt_len(self.seq_len), OnPolicySpec()
        given = [
            f"{key}={getattr(on, where[1])}"
            for key, where in self.KEYS.items()
            if where[0] == "gkd" and getattr(on, where[1]) != getattr(default, where[1])
        ]
        _require(
            [
                (
                    bool(on.fraction) or not given,
                    f"on-policy options given with on_policy 0 (no on-policy micro-batches): {', '.join(given)}; "
                    "give --on-policy F in (0, 1] (recipe: on_policy) or drop them",
                ),
                (
                    not on.fraction or (prompt >= 1 and prompt + on.gen_tokens <= self.seq_len),
                    f"on-policy rows are prompt_tokens + gen_tokens = {prompt} + {on.gen_tokens} tokens, which must "
                    f"fit in seq_len={self.seq_len} with a prompt of at least 1; lower --gen-tokens or --prompt-tokens",
                ),
            ]
        )

    def _check_local(self) -> None:
        """The block-local stage trains blocks on hidden states alone: a logit term in the same run is a mistake;
        a hidden-state term needs micro-batches of the data (it does not run on the student's samples)."""
        _require(
            [
                (
                    not (self.hidden.weight and self.gkd.fraction == 1),
                    f"hidden_weight={self.hidden.weight} matches hidden states on the data's micro-batches, and "
                    "on_policy=1 leaves none; lower --on-policy or drop --hidden-weight",
                )
            ]
        )
        if not self.hidden.local:
            return
        given = [
            f"{key}={value}"
            for key, value in (
                ("ce_weight", self.kd.ce_weight),
                ("chat_loss", self.kd.chat_loss if self.kd.chat_loss != "kd" else 0),
                ("on_policy", self.gkd.fraction),
                ("hidden_weight", self.hidden.weight),
            )
            if value
        ]
        _require(
            [
                (
                    not given,
                    f"--local trains each block on the teacher's hidden states alone, without logits; drop "
                    f"{', '.join(given)} (run global KD after it, e.g. a recipe's distill.local stage)",
                )
            ]
        )

    @property
    def teacher_skips_chat_rows(self) -> bool:
        """Whether live teachers run on the text rows alone: under ``chat_loss`` "ce" the chat rows train by CE
        alone and nothing reads the teacher there, unless hidden-state losses read it on every row or sharded
        teachers make each forward collective (every rank must call it alike). The loop and the plan ask this."""
        return self.kd.chat_loss == "ce" and not self.hidden.weight and not self.compute.shard_teachers

    def flat(self) -> dict:
        """``{key: value}`` by the flat keys of ``KEYS`` (a sub-spec-valued key as ``asdict``): what a run's
        identity (``run.json``) and report record, as they did before the sub-specs."""
        return {key: _plain(value) for key, value in flatten(self).items()}


def check_on_policy(live_weights: list[float], spec: DistillSpec) -> None:
    """On-policy micro-batches need a live teacher with a positive weight: a cache holds logits of the data's tokens
    and cannot score the student's samples."""
    if spec.gkd.fraction and not any(live_weights):
        raise WhelpError(
            f"on_policy={spec.gkd.fraction} needs a live teacher (--teacher MODEL) with a positive weight: "
            "cached logits score only the data's tokens, not the student's samples; add a live teacher "
            "(caches still serve the off-policy micro-batches) or set --on-policy 0"
        )


def check_mixture(live: int, caches: int, sources: int, spec: DistillSpec) -> None:
    """``--mixture dynamic`` re-weights the data's ``sources`` by the student's excess loss over the first of the
    ``live`` teachers on held-out blocks (``whelp.distillation.dynamic``): it needs two sources or more and a live
    teacher, and refuses ``caches``, which hold the logits of the given rows in the given order only."""
    if spec.mix.kind != "dynamic":
        return
    _require(
        [
            (
                sources >= 2,
                f"mixture=dynamic re-weights the sources of a mixture, and the data has {sources}; give a mixture "
                "(--data a:0.5,b:0.5) or use --mixture static",
            ),
            (
                not caches,
                "mixture=dynamic draws other rows than a teacher-logit cache holds (its rows and order are fixed); "
                "distil from live teachers (--teacher) or use --mixture static",
            ),
            (
                live >= 1,
                "mixture=dynamic measures the student's excess loss over the first live teacher, and none is given; "
                "add --teacher MODEL or use --mixture static",
            ),
        ]
    )


def check_local(n_live: int, n_caches: int, spec: DistillSpec) -> None:
    """The block-local stage learns from one live teacher's hidden states: more teachers or caches would be loaded
    and ignored."""
    if spec.hidden.local and (n_live != 1 or n_caches):
        raise WhelpError(
            f"--local learns from one live teacher's hidden states; this run has {n_live} live teacher(s) and "
            f"{n_caches} cache(s): pass exactly one --teacher (the one the student was pruned from) and no --cache"
        )


def check_teacher_weights(weights: list[float], spec: DistillSpec) -> None:
    """Teacher weights: finite, >= 0, and not all zero unless the CE term carries the loss."""
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise WhelpError(f"teacher weights must be finite numbers >= 0, got {weights}")
    if not any(weights) and spec.kd.ce_weight == 0:
        what = "every teacher weight is 0" if weights else "no teacher or cache is given"
        raise WhelpError(
            f"nothing to distil from: {what}; pass --teacher MODEL[:WEIGHT] and/or --cache DIR[:WEIGHT] "
            "with a positive weight (or --ce-weight 1 for a plain CE baseline)"
        )
