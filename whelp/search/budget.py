"""The budgets of ``whelp search``: what a student must not exceed, parsed from ``--budget`` against its teacher.

Sizes (total, non-embedding and, for an MoE teacher, active parameters; bytes of bf16 weights + KV cache) are
solved for exactly by space.enumerate_shapes; latency is measured per pool shape by run.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

from whelp.errors import WhelpError
from whelp.specs import key_values

BUDGET_KEYS = ("params", "non_embedding", "active", "memory", "latency")
SIZE_KEYS = ("params", "non_embedding", "active", "memory")
_UNITS = {
    "count": {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9},
    "bytes": {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30},
    "ms": {"": 1, "ms": 1, "s": 1000},
}
_KIND = {"params": "count", "non_embedding": "count", "active": "count", "memory": "bytes", "latency": "ms"}
_HOW = {
    "count": "a count as 60000000, 60M or 1.2B (units k, M, B/G) or 50% (of the teacher's)",
    "bytes": "bytes as 300000000, 300MB or 2GiB (units B, KB, MB, GB, KiB, MiB, GiB) or 50% (of the teacher's)",
    "ms": "milliseconds per decoded token as 20ms or 0.02s",
}
_NUMBER = re.compile(r"\s*([-+]?(?:\d+\.?\d*|\.\d+))\s*([A-Za-z%]*)\s*")


@dataclass(frozen=True)
class Budget:
    """Upper bounds a student must meet; None: unconstrained. Sizes are met from below within a tolerance."""

    params: int | None = None  # total parameters (tied lm_head counted once)
    non_embedding: int | None = None  # total minus token embedding and an untied lm_head (Kaplan et al. 2020)
    active: int | None = None  # an MoE's parameters per token: all but the experts its router leaves out
    memory: int | None = None  # bytes: bf16 weights (2 B/param) + bf16 KV cache of `context` tokens, batch 1
    latency_ms: float | None = None  # decode ms per token, measured by the caller (not used by enumerate_shapes)

    def sizes(self) -> dict[str, int]:
        """The size budgets that are set, by key: what enumerate_shapes solves for."""
        return {key: getattr(self, key) for key in SIZE_KEYS if getattr(self, key) is not None}


def parse_budget(text: str, teacher_shape: dict, counter, context: int = 2048) -> Budget:
    """``"non_embedding=50%,latency=20ms"`` -> Budget. % is of the teacher's own value (``context`` tokens of KV
    cache for memory; ``counter``: the teacher's space.Counter); counts and bytes are floored to integers, which
    keeps an upper bound on integers exact. ``active`` is for MoE teachers (a dense one's equals params)."""
    total, non_embedding = counter.params(teacher_shape)
    own = {
        "params": total,
        "non_embedding": non_embedding,
        "active": counter.active(teacher_shape),
        "memory": counter.memory(teacher_shape, context),
    }
    seen: dict = {}
    for key, value in key_values(text, "budget", BUDGET_KEYS, "non_embedding=50%,latency=20ms"):
        if key == "active" and own["active"] == total:
            raise WhelpError(
                "budget active counts the parameters an MoE's router picks per token, and this teacher "
                "is dense (its active parameters are all of them); use params= or non_embedding="
            )
        seen[key] = _bound(key, value, own)
    if not seen:
        raise WhelpError(
            "give a budget: params=N, non_embedding=N, active=N (MoE), memory=BYTES or latency=MS, comma-separated"
        )
    if "latency" in seen and len(seen) == 1:
        raise WhelpError(
            "budget latency alone cannot be searched: shapes are enumerated by size, then filtered "
            "by measured latency; add params=, non_embedding= or memory= "
            "(e.g. non_embedding=50%,latency=20ms)"
        )
    return Budget(latency_ms=seen.pop("latency", None), **seen)


def _bound(key: str, value: str, own: dict):
    """One budget value: ms as a float, a count or bytes as an int below the teacher's ``own[key]``."""
    kind, match = _KIND[key], _NUMBER.fullmatch(value)
    if match is None or (match[2] != "%" and match[2] not in _UNITS[kind]):
        raise WhelpError(f"budget {key}={value} is not a valid number; write {_HOW[kind]}")
    if match[2] == "%" and kind == "ms":
        raise WhelpError(
            f"budget latency={value}: latency is measured, not known beforehand, so it cannot be a "
            f"percentage of the teacher's; write {_HOW[kind]}"
        )
    number = Decimal(match[1])  # exact: 1.2B is 1,200,000,000, not a float's neighbour of it
    if number <= 0:
        raise WhelpError(f"budget {key}={value} must be > 0")
    if kind == "ms":
        return float(number * _UNITS[kind][match[2]])
    teacher = own[key]
    bound = int(number * teacher / 100 if match[2] == "%" else number * _UNITS[kind][match[2]])
    if bound >= teacher:
        raise WhelpError(
            f"budget {key}={value} ({bound:,}) is one the teacher already meets: the teacher itself "
            f"has {teacher:,}; a search shrinks — give less than {teacher:,}"
        )
    return bound
