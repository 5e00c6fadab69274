"""Every frozen spec of whelp, in one package that imports no torch: the one source of defaults, ranges and help.

A spec holds parsed values (``Schedule``, not ``"linear:100"``); its ``__post_init__`` is the only range check of
its fields. The CLI builds its options from these fields (``help`` in each field's metadata), recipes are built
from them by ``whelp.schema``, and the library verbs take them as arguments, so a knob is spelled once. Importing
this package costs milliseconds, which keeps ``whelp show`` and ``whelp validate`` as fast as ``whelp --help``.

Its floors (``[tool.importlinter]``): ``distill`` (``DistillSpec`` and the checks of its teachers) > ``training``
(its sub-specs and ``Schedule``) | ``prune`` (``PruneSpec``, ``SearchSpec``) | ``evals`` (``EvalSpec``,
``SpeedSpec``) | ``teacher`` (``CacheSpec``, ``GenerateSpec``) > ``data`` (``Source``, ``Mixture``, ``record``) >
``base`` (the choices, ``opt``, the shared checks and parsers, ``LoadPolicy``). Import every name from here.
"""

from whelp.specs.base import (
    HIDDEN_LOSSES,
    HIDDEN_MAPS,
    IMPORTANCE,
    LAYER_IMPORTANCE,
    LOSSES,
    ON_POLICY_LOSSES,
    RECONSTRUCT,
    ROPE,
    SAVE_DTYPES,
    SCHEDULES,
    SELECT,
    SPAN_MODES,
    TEACHER,
    TIE,
    LoadPolicy,
    key_values,
    opt,
    parse_weighted,
)
from whelp.specs.data import BUILTIN, Mixture, Source, as_mixtures, record
from whelp.specs.distill import DistillSpec, check_local, check_mixture, check_on_policy, check_teacher_weights
from whelp.specs.evals import CHAT_SETS, EvalSpec, SpeedSpec
from whelp.specs.prune import SEARCH_AXES, PruneSpec, SearchSpec
from whelp.specs.teacher import CacheSpec, GenerateSpec
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

__all__ = [
    "BUILTIN",
    "CHAT_SETS",
    "IMPORTANCE",
    "LAYER_IMPORTANCE",
    "HIDDEN_LOSSES",
    "HIDDEN_MAPS",
    "LOSSES",
    "ON_POLICY_LOSSES",
    "RECONSTRUCT",
    "SPAN_MODES",
    "SELECT",
    "ROPE",
    "SAVE_DTYPES",
    "SCHEDULES",
    "SEARCH_AXES",
    "TEACHER",
    "TIE",
    "CacheSpec",
    "ComputeSpec",
    "DistillSpec",
    "EvalSpec",
    "GenerateSpec",
    "HiddenSpec",
    "LoadPolicy",
    "LossSpec",
    "Mixture",
    "MixtureSpec",
    "MonitorSpec",
    "OnPolicySpec",
    "OptimSpec",
    "PruneSpec",
    "SaveSpec",
    "Schedule",
    "SearchSpec",
    "Source",
    "SpeedSpec",
    "as_mixtures",
    "check_local",
    "check_mixture",
    "check_on_policy",
    "check_teacher_weights",
    "key_values",
    "opt",
    "parse_weighted",
    "record",
]
