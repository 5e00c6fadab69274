"""The data a stage reads: ``Source`` and ``Mixture`` (parsed once where data enters), ``as_mixtures`` (a spec's
text fields parsed) and ``record`` (a spec as the plain data that identities and reports record)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import NamedTuple

from whelp.errors import WhelpError
from whelp.specs.base import parse_weighted

BUILTIN = {"licenses": Path(__file__).resolve().parent.parent / "evals" / "tasks" / "licenses.jsonl"}  # name -> file


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
