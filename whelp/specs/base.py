"""The floor of the specs: the names of every choice, ``opt`` (a field with its CLI help), the range checks
the specs' ``__post_init__`` share, the parsers of ``NAME[:WEIGHT]`` and ``key=value,...``, and ``LoadPolicy``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from whelp.errors import WhelpError
from whelp.schema import check_types

IMPORTANCE = ("activation", "magnitude", "taylor", "random")
LAYER_IMPORTANCE = ("block", "loss")
TIE = ("embedding", "lm_head", "mean")
ROPE = ("auto", "teacher", "target")
RECONSTRUCT = ("auto", "none", "lsq", "span", "span_attn", "bias")
SPAN_MODES = ("span", "span_attn")  # the reconstructions refit towards the teacher's residual stream, beside it
SELECT = ("auto", "importance", "obs")
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")
LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")
ON_POLICY_LOSSES = ("reverse_kl", "jsd", "forward_kl")  # GKD's divergences
SCHEDULES = ("constant", "linear", "cosine")
HIDDEN_LOSSES = ("nmse", "cosine")  # per-token distances of hidden states (whelp.distillation.hidden)
HIDDEN_MAPS = ("auto", "kept", "uniform")
TEACHER = "teacher"  # in a recipe's distill.teachers / distill.caches: the recipe's teacher
MAX_STEPS = 10**9  # optimizer steps: decades of training at any speed; more is a typo (steps: 1e23)
MAX_TOKENS = 10**15  # tokens: 25 times the largest pretraining runs (~4e13); more is a typo


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


def _at_most(spec, names, limit: int) -> list:
    """Counts past any real run (a typo such as 1e23) refused with the valid range, before they overflow a
    tensor's int64 or a schedule runs for ever; None (not given) passes."""
    return [
        (
            getattr(spec, n) is None or getattr(spec, n) <= limit,
            f"{n} must be from 1 to {limit:,}, got {getattr(spec, n)}",
        )
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
