"""Strict construction of frozen dataclasses from YAML-like data, naming the key path on every error.

Recipes are frozen data; this is the one place raw mappings become typed values. Unknown keys,
wrong types and values outside a ``Literal`` raise ``WhelpError`` with the full key path and the valid
choices; range checks live in each dataclass's ``__post_init__`` and get the path prefixed here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from typing import Any, Literal, Union

from whelp.errors import WhelpError

FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, path: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, path)
            except WhelpError as exc:
                errors.append(str(exc))
        raise WhelpError(
            errors[0]
            if len(errors) == 1
            else f"{path}: expected one of {' | '.join(_type_name(a) for a in args)}, got {value!r}"
        )
    if origin is Literal:
        if value not in args:
            raise WhelpError(f"{path}: {value!r} is not valid; choose one of {', '.join(map(str, args))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise WhelpError(f"{path}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise WhelpError(f"{path}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1] if args else Any, f"{path}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and hasattr(tp, "from_yaml"):  # data: text or a list of {source, weight}
        return tp.from_yaml(value, path)
    if isinstance(tp, type) and hasattr(tp, "parse") and isinstance(value, str):  # a spec written as text
        try:
            return tp.parse(value)
        except WhelpError as exc:
            raise WhelpError(f"{path}: {exc}") from None
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise WhelpError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            floaty = isinstance(value, float) or (isinstance(value, str) and FLOAT.fullmatch(value.strip()))
            hint = " (a number with a point or an exponent is not one: write its digits)" if floaty else ""
            raise WhelpError(f"{path}: expected an integer, got {value!r}{hint}")
        return value
    if tp is float:
        if isinstance(value, str) and FLOAT.fullmatch(value.strip()):  # YAML 1.1 reads 1e-3 as a string
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise WhelpError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise WhelpError(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp} at {path}")


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _fits(value, tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is Literal or tp is str:
        return isinstance(value, str)
    if origin is tuple:
        return isinstance(value, tuple) and all(_fits(v, args[0]) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, tp)


def check_types(spec) -> None:
    """Every field holds a value of its declared type (numbers finite): what the CLI and recipes get from parsing,
    checked here for Python callers (``DistillSpec(lr="1e-3")``, ``steps=1.5``, ``allow_pickle="no"``)."""
    for f in dataclasses.fields(spec):
        value, tp = getattr(spec, f.name), _hints(type(spec))[f.name]
        if not _fits(value, tp):
            raise WhelpError(
                f"{f.name} must be {getattr(tp, '__name__', str(tp).replace('typing.', ''))}"
                f"{' (finite)' if tp is float else ''}, got {value!r}"
            )


@functools.cache
def flat_keys(cls) -> dict[str, tuple[str, ...]]:
    """``{key: field path}`` of every key ``cls`` is written with at one level of a mapping (a recipe section, the
    CLI's options, flat keywords), in the order it is written: the one flattening map of nested specs.

    A class lists its keys itself in a ``KEYS`` class attribute (``DistillSpec``: ``lr`` sets ``optim.lr``), or
    they are its init fields, a field declared with ``metadata={"flatten": True}`` giving its type's keys in its
    place (a prune step is ``{target: ..., importance: ...}``, not nested).
    """
    own = getattr(cls, "KEYS", None)
    if own is not None:
        return dict(own)
    out: dict[str, tuple[str, ...]] = {}
    for f in dataclasses.fields(cls):
        if f.init and f.metadata.get("flatten"):
            out.update({key: (f.name, *where) for key, where in flat_keys(_hints(cls)[f.name]).items()})
        elif f.init:
            out[f.name] = (f.name,)
    return out


def leaf(cls, where: tuple[str, ...]) -> tuple[dataclasses.Field, Any]:
    """The field at path ``where`` of ``cls`` and its type."""
    f = next(f for f in dataclasses.fields(cls) if f.name == where[0])
    tp = _hints(cls)[f.name]
    return (f, tp) if len(where) == 1 else leaf(tp, where[1:])


def flatten(obj) -> dict:
    """``{key: value}`` of a (nested) dataclass by its flat keys (``flat_keys``), values as they are."""
    out = {}
    for key, where in flat_keys(type(obj)).items():
        value = obj
        for part in where:
            value = getattr(value, part)
        out[key] = value
    return out


def unflatten(cls, given: dict, where: str) -> dict:
    """The init arguments of ``cls`` from ``given`` flat keys and/or whole fields: each key moves into the field
    its path names, built as that field's type over its default (or over the value given whole). An unknown key
    raises one line naming ``where.key`` and the valid keys."""
    keys = flat_keys(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [key for key in given if key not in keys and key not in fields]
    if unknown:
        raise WhelpError(f"{where}.{unknown[0]}: unknown key; valid keys: {', '.join(keys)}")
    out = {name: value for name, value in given.items() if name in fields and keys.get(name, (name,)) == (name,)}
    nested: dict[str, dict] = {}
    for key, value in given.items():
        if key in keys and len(keys[key]) > 1:
            nested.setdefault(keys[key][0], {})[keys[key][1:]] = value
    for name, parts in nested.items():
        tp, inner = _hints(cls)[name], {path: key for key, path in flat_keys(_hints(cls)[name]).items()}
        args = unflatten(tp, {inner[path]: value for path, value in parts.items()}, where)
        base = out.get(name, fields[name].default)
        out[name] = tp(**args) if base is dataclasses.MISSING else dataclasses.replace(base, **args)
    for name, f in fields.items():  # a required flattened field none of whose keys is given: its own defaults
        if name not in out and f.default is dataclasses.MISSING and any(p[0] == name for p in keys.values() if p[1:]):
            out[name] = _hints(cls)[name]()
    return out


def from_dict(cls, raw: Any, path: str = "recipe"):
    """An instance of dataclass ``cls`` from mapping ``raw``: unknown keys, missing required keys, wrong
    types and invalid values raise ``WhelpError`` naming ``path.key`` and what is valid. The keys are those of
    ``flat_keys`` (a nested spec's fields written at this level)."""
    if isinstance(raw, cls):
        return raw
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise WhelpError(f"{path}: expected a mapping, got {raw!r}")
    keys = flat_keys(cls)
    unknown = sorted(set(map(str, raw)) - set(keys))
    if unknown:
        raise WhelpError(f"{path}.{unknown[0]}: unknown key; valid keys: {', '.join(keys)}")
    values = {}
    for key, where in keys.items():
        field, tp = leaf(cls, where)
        if key in raw:
            values[key] = _coerce(raw[key], tp, f"{path}.{key}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise WhelpError(f"{path}.{key}: required key is missing")
    try:
        return cls(**unflatten(cls, values, path))
    except (WhelpError, ValueError) as exc:
        message = str(exc)
        raise WhelpError(message if message.startswith(path) else f"{path}: {message}") from None


def to_dict(obj) -> Any:
    """Plain YAML-safe data of a (nested) dataclass: the resolved recipe as written to recipe.yaml."""
    if hasattr(type(obj), "to_yaml"):  # a mixture: its text, or its list form
        return obj.to_yaml()
    if hasattr(type(obj), "parse"):  # a spec with a text form (Schedule): written as that text
        return str(obj)
    if dataclasses.is_dataclass(obj):
        return {key: to_dict(value) for key, value in flatten(obj).items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def load_yaml(text: str, where: str):
    """``yaml.safe_load`` that refuses a key written twice in one mapping (PyYAML keeps the last, silently)."""
    import yaml  # noqa: PLC0415 - start-up: whelp --help imports the specs, which read no YAML

    class Strict(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *base``: its keys may be overridden here
                continue
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise WhelpError(
                    f"{where}: key '{key}' is written twice (again on line {key_node.start_mark.line + 1}); keep one"
                )
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep)

    Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        return yaml.load(text, Strict)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise WhelpError(f"{where} is not valid YAML{at}: {problem}") from None


def apply_overrides(raw: dict, assignments) -> dict:
    """Apply each ``--set key.path=value`` in order; a key given twice is refused (which value was meant?)."""
    seen = set()
    for assignment in assignments:
        key = assignment.split("=", 1)[0].strip()
        if key in seen:
            raise WhelpError(f"--set {key} is given twice; give each key once")
        seen.add(key)
        apply_override(raw, assignment)
    return raw


def apply_override(raw: dict, assignment: str) -> dict:
    """Apply one ``--set a.b.c=value`` (value parsed as YAML; list items by index: ``stages.1.x=3``)."""
    if "=" not in assignment:
        raise WhelpError(f"--set {assignment!r}: write key.path=value")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise WhelpError(f"--set {assignment!r}: the key path has an empty part; write key.path=value")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list) and len(node) == 1 and not part.isdigit():
            node = node[0]  # one step: distill.lr means distill.0.lr
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise WhelpError(f"--set {key}: '{where}' is a list of {len(node)}; use an index below {len(node)}")
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise WhelpError(f"--set {key}: '{where}' is not a mapping")
    last = parts[-1]
    value = load_yaml(text, f"--set {key}")
    if isinstance(node, list) and len(node) == 1 and not last.isdigit():
        node = node[0]
    if not isinstance(node, (dict, list)):
        raise WhelpError(f"--set {key}: '{'.'.join(parts[:-1])}' is a value, not a mapping")
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            where = ".".join(parts[:-1])
            raise WhelpError(
                f"--set {key}: '{where}' is a list of {len(node)} steps; write {where}.I.{last} with I "
                f"below {len(node)}"
                if not last.isdigit()
                else f"--set {key}: index {last} out of range for a list of {len(node)}"
            )
        node[int(last)] = value
    else:
        node[last] = value
    return raw
