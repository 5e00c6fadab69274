"""Command-line options made from the specs' fields, so each knob is spelled once (in ``whelp.specs``).

``@with_spec("spec", PruneSpec)`` adds one typer option per field that carries ``help`` metadata (``--calib-samples``
for ``calib_samples``; a nested spec's fields get its name as prefix, ``--speed-repeats``) and hands the command a
built ``PruneSpec`` as its ``spec`` argument. The spec's own ``__post_init__`` checks the values, so the CLI, recipes
and the Python API share one set of defaults and range checks. Torch-free, like the specs.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from typing import Literal, Union

import typer

from whelp.schema import flat_keys, leaf


def _cli_type(tp):
    """The type typer parses a field's text into (Literal and text-form specs as str; the spec checks them)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _cli_type(inner[0]) | None
    if origin is Literal or hasattr(tp, "parse"):
        return str
    if origin in (tuple, list):
        return list[str]
    return tp


def _fields(cls, prefix: str = ""):
    """``(cli name, field, type, nested path)`` of every CLI-visible field of ``cls``, by the keys of
    ``whelp.schema.flat_keys`` (a ``DistillSpec``'s ``--lr`` sets ``optim.lr``); a nested spec that is not
    flattened gives its fields with its name as prefix (``--speed-repeats``)."""
    for key, where in flat_keys(cls).items():
        f, tp = leaf(cls, where)
        if dataclasses.is_dataclass(tp) and not hasattr(tp, "parse"):
            for name, inner, inner_tp, path in _fields(tp, f"{prefix}{key}_"):
                yield name, inner, inner_tp, (*where, *path)
        elif "help" in f.metadata:
            yield prefix + key, f, tp, where


def _option(name: str, f, tp) -> inspect.Parameter:
    flag = f.metadata.get("flag") or "--" + name.replace("_", "-")
    if _cli_type(tp) in (bool, bool | None):
        flag = f"{flag}/--no-{flag[2:]}"  # --stream / --no-stream: an unset Optional[bool] keeps its None
    default = f.default
    if f.metadata.get("cli") == "csv":
        cli_tp, default = str, ",".join(default)
    else:
        cli_tp = _cli_type(tp)
        default = (
            [str(v) for v in default]
            if isinstance(default, tuple)
            else str(default)
            if hasattr(default, "parse")
            else default
        )
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        annotation=cli_tp,
        default=typer.Option(default, flag, help=f.metadata["help"]),
    )


def _value(f, tp, raw):
    if f.metadata.get("cli") == "csv":
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if isinstance(raw, list):
        return tuple(raw)
    if isinstance(raw, str) and hasattr(tp, "parse"):
        return tp.parse(raw)
    return raw


def build_spec(cls, given: dict, path: tuple[str, ...] = ()):
    """``cls`` from the parsed options ``given`` (by CLI name); nested specs built from their prefixed options."""
    kwargs = {}
    for name, f, tp, where in _fields(cls):
        node = kwargs
        for part in where[:-1]:
            node = node.setdefault(part, {})
        node[where[-1]] = _value(f, tp, given[name])
    return _built(cls, kwargs)


def _built(cls, kwargs: dict):
    hints = typing.get_type_hints(cls)
    return cls(**{k: _built(hints[k], v) if isinstance(v, dict) else v for k, v in kwargs.items()})


def with_spec(arg: str, cls, skip: tuple[str, ...] = ()):
    """Decorate a command so that it takes ``cls``'s fields as options and receives the built spec as ``arg``."""

    def decorate(fn):
        hints = typing.get_type_hints(fn, include_extras=True)
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in inspect.signature(fn).parameters.values()
            if p.name != arg
        ]
        added = [_option(name, f, tp) for name, f, tp, _ in _fields(cls) if name not in skip]
        names = {p.name for p in added}
        fixed = {name: f.default for name, f, _, _ in _fields(cls) if name in skip}

        @functools.wraps(fn)
        def command(**kwargs):
            given = {name: kwargs.pop(name) for name in list(kwargs) if name in names}
            return fn(**kwargs, **{arg: build_spec(cls, {**fixed, **given})})

        params = own + added
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # typer must read the new signature, not the function's own
        return command

    return decorate
