"""Every frozen spec of whelp, in one module that imports no torch: the one source of defaults, ranges and help.

A spec holds parsed values (``Schedule``, not ``"linear:100"``); its ``__post_init__`` is the only range check of
its fields. The CLI builds its options from these fields (``help`` in each field's metadata), recipes are built
from them by ``whelp.schema``, and the library verbs take them as arguments, so a knob is spelled once. Importing
this module costs milliseconds, which keeps ``whelp show`` and ``whelp validate`` as fast as ``whelp --help``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import ClassVar, Literal, NamedTuple

from whelp.errors import WhelpError
from whelp.schema import check_types, flatten, unflatten

IMPORTANCE = ("activation", "magnitude", "taylor", "random")
LAYER_IMPORTANCE = ("block", "loss")
TIE = ("embedding", "lm_head", "mean")
ROPE = ("auto", "teacher", "target")
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")
LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")
ON_POLICY_LOSSES = ("reverse_kl", "jsd", "forward_kl")  # GKD's divergences
SCHEDULES = ("constant", "linear", "cosine")
TEACHER = "teacher"  # in a recipe's distill.teachers / distill.caches: the recipe's teacher


def opt(default, help: str, **meta):
    """A field with its CLI help (and ``flag``/``cli`` metadata read by ``whelp.cli``)."""
    return field(default=default, metadata={"help": help, **meta})


def _require(checks) -> None:
    for ok, message in checks:
        if not ok:
            raise WhelpError(message)


def _choice(name: str, value: str, valid: tuple[str, ...]) -> tuple[bool, str]:
    return value in valid, f"unknown {name} '{value}'; choose one of {', '.join(valid)}"


def _device(device: str) -> tuple[bool, str]:
    return device == "cpu" or device.split(":")[0] == "cuda", f"unknown device '{device}'; choose cpu, cuda or cuda:N"


def _positive(spec, names) -> list:
    return [
        (getattr(spec, n) is None or getattr(spec, n) >= 1, f"{n} must be positive, got {getattr(spec, n)}")
        for n in names
    ]


def _non_negative(spec, names) -> list:
    return [(getattr(spec, n) >= 0, f"{n} must be >= 0, got {getattr(spec, n)}") for n in names]


def parse_weighted(text: str) -> tuple[str, float]:
    """``NAME[:WEIGHT]`` -> (name, weight); the weight defaults to 1 (names may contain ':' e.g. pydoc:...)."""
    name, sep, weight = text.rpartition(":")
    if sep:
        try:
            value = float(weight)
        except ValueError:
            return text, 1.0
        if value < 0 or not math.isfinite(value):
            raise WhelpError(f"weight must be a finite number >= 0 in '{text}'")
        return name, value
    return text, 1.0


class Source(NamedTuple):
    """One source of a ``Mixture``: a token store, a file or directory, ``pydoc:SPLIT``, ``licenses``, ``hf:...``,
    or a recipe's ``generated``; ``weight`` is its share of the mixture (normalised)."""

    name: str
    weight: float = 1.0


def _is_path(text: str) -> bool:
    try:
        return Path(text).expanduser().exists()
    except (OSError, ValueError):  # a name too long for the filesystem, a NUL byte: not a path
        return False


def _normalised(parts: list[tuple[str, float]], text: str) -> tuple[Source, ...]:
    if not parts or any(w <= 0 for _, w in parts) or any(not s for s, _ in parts):
        raise WhelpError(f"bad data mixture '{text}': write SOURCE:WEIGHT,SOURCE:WEIGHT with positive weights")
    total = sum(w for _, w in parts)
    return tuple(Source(s, w / total) for s, w in parts)


@dataclass(frozen=True)
class Mixture:
    """The data a stage reads: one source, or weighted sources whose weights sum to 1. Parsed once where data enters
    (a CLI option, a recipe, a spec's ``__post_init__`` given text) and carried as this object by every function that
    reads data, so nothing below those edges parses text again.

    Text form (``parse``): ``SOURCE`` or ``SOURCE:WEIGHT,SOURCE:WEIGHT,...``; a text that names an existing file or
    directory is that one source, whole, commas included. Recipes may also write a list
    ``[{source: SOURCE, weight: W}, ...]`` (``from_yaml``), whose sources are taken whole. ``str()`` is the text as
    written (else the canonical ``a:0.7,b:0.3``), which recipes, stage keys and reports record; ``to_yaml`` gives the
    list form instead when a source's name holds a comma, so a dumped recipe loads back to the same mixture.
    """

    sources: tuple[Source, ...]
    text: str = field(default="", compare=False, repr=False)  # as written; "" for the canonical form

    def __post_init__(self):
        sources = tuple(Source(*s) for s in self.sources)
        bad = any(not isinstance(s.name, str) or isinstance(s.weight, bool) for s in sources) or any(
            not isinstance(s.weight, (int, float)) or not math.isfinite(s.weight) for s in sources
        )
        if bad:
            raise WhelpError(f"bad data mixture {sources!r}: each source is a name (text) and a finite weight")
        total = sum(s.weight for s in sources)
        if not sources or any(s.weight <= 0 or not s.name for s in sources) or abs(total - 1) > 1e-9:
            sources = _normalised(list(sources), str(self))  # Mixture((Source("a", 7), Source("b", 3)))
        object.__setattr__(self, "sources", sources)

    @classmethod
    def parse(cls, text: str) -> Mixture:
        """``a:0.7,b:0.3`` (weights normalised to sum 1); a single source, or an existing path, has weight 1."""
        if "," in text and not _is_path(text):
            parts = [parse_weighted(part.strip()) for part in text.split(",")]
        else:
            parts = [(text, 1.0)]
        return cls(_normalised(parts, text), text)

    @classmethod
    def of(cls, data: str | Mixture) -> Mixture:
        """``data`` as a mixture: a Python caller's text parsed (an edge, like a spec's ``__post_init__``)."""
        return cls.parse(data) if isinstance(data, str) else data

    @classmethod
    def from_yaml(cls, value, path: str) -> Mixture:
        """A recipe's data value: text (``parse``) or a list ``[{source: S, weight: W}, ...]``; errors name ``path``."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls.parse(value)
            except WhelpError as exc:
                raise WhelpError(f"{path}: {exc}") from None
        if not isinstance(value, list) or not value:
            raise WhelpError(
                f"{path}: expected a data source (text) or a list of {{source: DATA, weight: W}}, got {value!r}"
            )
        parts = []
        for i, item in enumerate(value):
            where = f"{path}[{i}]"
            if not isinstance(item, dict) or "source" not in item:
                raise WhelpError(f"{where}: write {{source: DATA, weight: W}}, got {item!r}")
            for key in item:
                if key not in ("source", "weight"):
                    raise WhelpError(f"{where}.{key}: unknown key; valid keys: source, weight")
            source, weight = item["source"], item.get("weight", 1.0)
            if not isinstance(source, str) or not source:
                raise WhelpError(f"{where}.source: expected a data source (text), got {source!r}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
                raise WhelpError(f"{where}.weight: expected a positive number, got {weight!r}")
            parts.append((source, weight))
        # the text recipes have always recorded for this form (their stage keys hold it); one source: weight 1
        text = ",".join(f"{s}:{w}" for s, w in parts) if len(parts) > 1 else parts[0][0]
        whole = any("," in s for s, _ in parts)
        return cls(_normalised(parts if len(parts) > 1 else [(parts[0][0], 1.0)], text), "" if whole else text)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sources)

    @property
    def name(self) -> str:
        """The source of a one-source mixture (perplexity and prompts read one source each)."""
        if len(self.sources) != 1:
            raise WhelpError(f"'{self}' mixes {len(self.sources)} sources; give one source here")
        return self.sources[0].name

    def with_source(self, old: str, new: str) -> Mixture:
        """This mixture with source ``old`` read from ``new`` (a recipe's ``generated``: its store's directory)."""
        return Mixture(tuple(Source(new if s.name == old else s.name, s.weight) for s in self.sources))

    def __str__(self) -> str:
        if self.text:
            return self.text
        if len(self.sources) == 1:
            return self.sources[0].name
        return ",".join(f"{s.name}:{s.weight}" for s in self.sources)

    def to_yaml(self):
        """The recipe form: the text, or the list form when a source's name holds a comma (the text could not say
        where it ends)."""
        if not any("," in name for name in self.names):
            return str(self)
        return [{"source": s.name, "weight": s.weight} for s in self.sources]


def as_mixtures(spec, names: tuple[str, ...]) -> None:
    """Parse the data fields ``names`` of ``spec`` given as text (``PruneSpec(calib="a:0.7,b:0.3")`` in Python, as
    in YAML and on the CLI), once, into ``Mixture``s; a tuple field's text items each."""
    for name in names:
        value = getattr(spec, name)
        if isinstance(value, str):
            object.__setattr__(spec, name, Mixture.parse(value))
        elif isinstance(value, (tuple, list)):
            object.__setattr__(spec, name, tuple(Mixture.of(v) for v in value))


def _plain(value):
    if isinstance(value, Mixture):
        return value.to_yaml()
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def record(spec) -> dict:
    """``dataclasses.asdict`` with each ``Mixture`` as its recipe form (``to_yaml``): the plain data that run
    identities, manifests and reports record (the same as when data was text)."""

    return _plain(spec)


def key_values(text: str, what: str, valid, example: str, canonical=lambda key: key) -> list[tuple[str, str]]:
    """``"a=1, b=2"`` -> ``[("a", "1"), ("b", "2")]`` (stripped; keys through ``canonical``): the one parser of
    ``--target`` overrides and ``--budget``, refusing an item without ``=``, a key not in ``valid`` and a key given
    twice, each in one line naming ``what`` ("target", "budget")."""
    pairs, seen = [], set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = canonical(key.strip())
        if not sep:
            raise WhelpError(f"{what} item '{item}' is not key=value; write e.g. {example}")
        if key not in valid:
            raise WhelpError(f"unknown {what} key '{key}'; valid keys: {', '.join(valid)}")
        if key in seen:
            raise WhelpError(f"{what} key '{key}' is given twice in '{text}'; give each key once")
        seen.add(key)
        pairs.append((key, value.strip()))
    return pairs


@dataclass(frozen=True)
class LoadPolicy:
    """What loading a model may do; passed explicitly from the CLI to every verb that loads one."""

    allow_pickle: bool = False  # read .bin/.pt weights: pickle can run arbitrary code
    trust_remote_code: bool = False  # run model code shipped with a checkpoint

    def __post_init__(self):
        check_types(self)


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
class PruneSpec:
    """How to prune: importance method, calibration data, tie init, RoPE policy, execution path."""

    importance: Literal["activation", "magnitude", "taylor", "random"] = opt(
        "activation", "Neuron/head/channel importance: activation | magnitude | taylor | random"
    )
    layer_importance: Literal["block", "loss"] = opt("block", "Layer importance: block (1 - cos) | loss (skip a layer)")
    calib: Mixture = opt(
        Mixture.parse("pydoc:calib"), "Calibration data (store, file, dir, pydoc:calib, hf:..., a:0.7,b:0.3)"
    )
    calib_samples: int = opt(16, "Calibration blocks")
    seq_len: int = opt(256, "Tokens per calibration block")
    batch_size: int = opt(4, "Calibration blocks per forward")
    tie: Literal["embedding", "lm_head", "mean"] = opt(
        "embedding", "Init of the shared matrix when an untied teacher becomes tied: embedding | lm_head | mean"
    )
    rope: Literal["auto", "teacher", "target"] = opt(
        "auto",
        "RoPE of the pruned model: auto (a preset's or config.json target's own, else the teacher's) | "
        "teacher | target",
    )
    stream: bool | None = opt(
        None, "Prune from the shards layer by layer (default: only when the teacher does not fit in memory)"
    )
    scores: str | None = opt(None, "Reuse saved scores (a pruned model's scores/importance.safetensors)")
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "dtype of the written weights: auto (what the source model stores) | float32 | bfloat16 | float16"
    )
    seed: int = opt(0, "Seed of the calibration blocks and of random importance")

    def __post_init__(self):
        as_mixtures(self, ("calib",))
        check_types(self)
        _require(
            [
                _choice("importance", self.importance, IMPORTANCE),
                _choice("layer importance", self.layer_importance, LAYER_IMPORTANCE),
                _choice("tie", self.tie, TIE),
                _choice("rope", self.rope, ROPE),
                _choice("save_dtype", self.save_dtype, SAVE_DTYPES),
                *_positive(self, ("calib_samples", "batch_size")),
                (self.seq_len >= 2, f"seq_len must be at least 2, got {self.seq_len}"),
            ]
        )


SEARCH_AXES = ("layers", "hidden", "mlp", "heads", "kv_heads", "head_dim", "experts")  # experts: MoE teachers


@dataclass(frozen=True)
class SearchSpec:
    """How ``whelp search`` looks for a student shape: the budget, the space of shapes, and how hard it tries each
    (one-shot KL for a pool, then short distillation for the best K: ModelOpt's and DarwinLM's two-step ranking)."""

    budget: str = opt(
        "",
        "params=N | non_embedding=N | active=N (MoE: params per token) | memory=BYTES | latency=MS, "
        "comma-separated; N as 60M, 1.2B or 50% (of the teacher's), BYTES as 300MB or 2GiB, MS as 20ms",
    )
    axes: str = opt(
        "layers,hidden,mlp,heads",
        "Axes the search may shrink, of " + ",".join(SEARCH_AXES) + "; the "
        "others keep the teacher's size (default: Minitron's depth and width axes; KV heads and head_dim "
        "are opt-in)",
    )
    tolerance: float = opt(0.05, "Size budgets are met from below, within this fraction of them")
    multiple: int = opt(64, "hidden and MLP sizes are multiples of this (hardware-friendly)")
    context: int = opt(2048, "memory budget: KV-cache tokens (batch 1, bf16) counted beside the bf16 weights")
    pool: int = opt(16, "Candidates pruned one-shot and scored by their KL to the teacher")
    candidates: int = opt(4, "The best K of the pool, each distilled --score-steps steps and ranked after")
    score_steps: int = opt(8, "Distillation steps per candidate")
    calib: Mixture = opt(Mixture.parse("pydoc:calib"), "Calibration data of the one importance pass")
    calib_samples: int = opt(16, "Calibration blocks")
    data: Mixture = opt(
        Mixture.parse("pydoc:train"), "Distillation data of the short runs (the same tokens for every candidate)"
    )
    eval_data: Mixture = opt(Mixture.parse("pydoc:eval"), "Held-out data of the one-shot and post-training scores")
    eval_blocks: int = opt(8, "Held-out blocks scored per candidate")
    seq_len: int = opt(256, "Tokens per block")
    batch_size: int = opt(4, "Blocks per calibration forward and per distillation step")
    lr: float = opt(1e-4, "Peak learning rate of the short runs")
    importance: Literal["activation", "magnitude", "taylor", "random"] = opt(
        "activation", "Neuron/head/channel importance: activation | magnitude | taylor | random"
    )
    layer_importance: Literal["block", "loss"] = opt("block", "Layer importance: block (1 - cos) | loss (skip a layer)")
    seed: int = opt(0, "Seed of calibration, data order and ties")

    def __post_init__(self):
        as_mixtures(self, ("calib", "data", "eval_data"))
        check_types(self)
        _require(
            [
                (
                    bool(self.budget.strip()),
                    "give a budget: --budget params=N, non_embedding=N, memory=BYTES or "
                    "latency=MS (comma-separated to combine)",
                ),
                (0 < self.tolerance < 1, f"tolerance is a fraction in (0, 1), got {self.tolerance}"),
                *_positive(
                    self,
                    (
                        "multiple",
                        "context",
                        "pool",
                        "candidates",
                        "score_steps",
                        "calib_samples",
                        "eval_blocks",
                        "batch_size",
                    ),
                ),
                (
                    self.candidates <= self.pool,
                    f"candidates ({self.candidates}) are the best of the pool, so at most --pool ({self.pool})",
                ),
                (self.seq_len >= 2, f"seq_len must be at least 2, got {self.seq_len}"),
                (self.lr > 0, f"lr must be > 0, got {self.lr}"),
                _choice("importance", self.importance, IMPORTANCE),
                _choice("layer importance", self.layer_importance, LAYER_IMPORTANCE),
            ]
        )
        for axis in self.axes.split(","):
            _require([_choice("search axis", axis.strip(), SEARCH_AXES)])


@dataclass(frozen=True)
class LossSpec:
    """How student and teacher distributions are compared (``whelp.distillation.divergences``).

    loss = (1 - ce_weight) * sum_i w_i * c * KD_i + ce_weight * CE, with c = T^2 if ``t2_scale`` (Hinton et al.
    2015: keeps gradient magnitudes comparable across temperatures) else 1. CE uses the untempered student.
    ``vocab_size``: the tokenizer's vocabulary when an lm_head is padded (e.g. 49152 real ids in 49216 rows);
    ids at or above it are excluded from every softmax, which is exactly masking their logits to -inf.
    """

    name: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"] = opt(
        "forward_kl", "Divergence: forward_kl | reverse_kl | jsd | skew_kl | tvd"
    )
    temperature: float = opt(1.0, "Softmax temperature of student and teachers")
    t2_scale: bool = opt(False, "Scale the KD term by T^2 (Hinton et al. 2015)")
    beta: float = opt(0.5, "jsd: mixture weight of the teacher, in (0, 1)")
    alpha: float = opt(0.1, "skew_kl: skew toward the teacher, in [0, 1)")
    ce_weight: float = opt(0.0, "Weight of the next-token CE in [0, 1]")
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
                *_positive(self, ("chunk_size", "vocab_size")),
            ]
        )


@dataclass(frozen=True)
class OptimSpec:
    """AdamW and its learning-rate schedule (linear warmup, then cosine decay to 0): what may change on resume."""

    lr: float = opt(1e-4, "Peak learning rate (AdamW)")
    warmup: int = opt(0, "Linear warmup steps before cosine decay to 0")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm")

    def __post_init__(self):
        check_types(self)
        _require(_non_negative(self, ("lr", "warmup", "weight_decay", "max_grad_norm")))

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

    def __post_init__(self):
        check_types(self)
        _require(
            [
                (
                    0 <= self.fraction <= 1,
                    f"on_policy is the fraction of on-policy micro-batches, in [0, 1]; got {self.fraction}",
                ),
                *_positive(self, ("gen_tokens", "prompt_tokens")),
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
    """What the run writes: checkpoints (cadence, how many kept) and the dtype of the final weights."""

    save_every: int = opt(0, "Checkpoint every N steps (0: only at the end)")
    keep_last: int = opt(2, "Checkpoints kept")
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "dtype of the written weights: auto (what the source model stores) | float32 | bfloat16 | float16"
    )

    def __post_init__(self):
        check_types(self)
        _require(
            [
                *_positive(self, ("keep_last",)),
                *_non_negative(self, ("save_every",)),
                _choice("save_dtype", self.save_dtype, SAVE_DTYPES),
            ]
        )


@dataclass(frozen=True, init=False)
class DistillSpec:
    """Hyper-parameters of a distillation run. Budget: exactly one of ``steps`` / ``max_tokens``.

    The run's own fields (budget, batch, data, schedule, seed) and one frozen sub-spec per concern, each handed to
    the code that acts on it: ``optim`` (AdamW and warmup), ``kd`` (the ``LossSpec``), ``gkd`` (on-policy, GKD),
    ``compute``, ``monitor`` and ``save``. Users write the flat keys of ``KEYS`` (``--lr``, recipe ``lr:``,
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
        "on_policy": ("gkd", "fraction"),
        "gen_tokens": ("gkd", "gen_tokens"),
        "prompt_tokens": ("gkd", "prompt_tokens"),
        "on_policy_loss": ("gkd", "loss"),
        "shard_teachers": ("compute", "shard_teachers"),
        "chunk_size": ("kd", "chunk_size"),
        "schedule": ("schedule",),
        "eval_every": ("monitor", "eval_every"),
        "eval_data": ("eval_data",),
        "eval_tokens": ("monitor", "eval_tokens"),
        "seed": ("seed",),
        "dtype": ("compute", "dtype"),
        "save_dtype": ("save", "save_dtype"),
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
                (self.seq_len >= 2, f"seq_len must be at least 2, got {self.seq_len}"),
            ]
        )
        self._check_on_policy()
        if self.steps is not None:
            self.optim.check_steps(self.steps)

    def _check_on_policy(self) -> None:
        on, prompt = self.gkd, self.gkd.prompt_len(self.seq_len)
        _require(
            [
                (
                    not on.fraction or (prompt >= 1 and prompt + on.gen_tokens <= self.seq_len),
                    f"on-policy rows are prompt_tokens + gen_tokens = {prompt} + {on.gen_tokens} tokens, which must "
                    f"fit in seq_len={self.seq_len} with a prompt of at least 1; lower --gen-tokens or --prompt-tokens",
                )
            ]
        )

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
    tokens read from each perplexity source; ``limit`` caps the documents of each lm-eval task."""

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
    batch_size: int = opt(4, "Windows / lm-eval requests per forward")
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
                *_positive(self, ("limit", "max_tokens", "batch_size", "max_length")),
                _choice("dtype", self.dtype, ("float32", "bfloat16", "float16")),
                _device(self.device),
            ]
        )
        for source in self.ppl:
            if len(source.sources) > 1:
                raise WhelpError(f"perplexity is measured per source; give '{source}' as separate sources")


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
                _choice("dtype", self.dtype, ("float32", "bfloat16")),
            ]
        )


@dataclass(frozen=True)
class GenerateSpec:
    """What ``whelp generate`` samples: ``max_tokens`` tokens of the teacher's own text, as sequences of up to
    ``prompt_tokens`` tokens cut from the start of a document of ``prompts`` (or a lone BOS) and up to
    ``new_tokens`` sampled ones (Kim & Rush 2016's sequence-level KD data; Qwen3's strong-to-weak stage 1)."""

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

    def __post_init__(self):
        as_mixtures(self, ("prompts",))
        check_types(self)
        _require(
            [
                (self.max_tokens is not None, "give --max-tokens N: how many tokens to generate"),
                *_positive(self, ("max_tokens", "prompt_tokens", "new_tokens", "batch_size")),
                (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
                (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
                *_non_negative(self, ("top_k",)),
                _choice("dtype", self.dtype, ("float32", "bfloat16")),
                _device(self.device),
                (
                    self.prompts is None or len(self.prompts.sources) == 1,
                    "--prompts takes one text source (its documents' first tokens prompt the teacher)",
                ),
            ]
        )
