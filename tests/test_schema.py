"""Strict recipe data: unknown keys, wrong types, bad choices and ranges name their key path."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from whelp.errors import WhelpError
from whelp.schema import apply_override, from_dict, to_dict


@dataclass(frozen=True)
class Inner:
    name: str
    weight: float = 1.0

    def __post_init__(self):
        if self.weight < 0:
            raise WhelpError(f"weight must be >= 0, got {self.weight}")


@dataclass(frozen=True)
class Outer:
    steps: int = 10
    loss: Literal["forward_kl", "reverse_kl"] = "forward_kl"
    teachers: tuple[Inner, ...] = ()
    note: str | None = None
    flag: bool = False


def test_builds_nested_values_and_round_trips():
    raw = {"steps": 5, "teachers": [{"name": "t", "weight": 2}], "flag": True}
    built = from_dict(Outer, raw)
    assert built == Outer(steps=5, teachers=(Inner("t", 2.0),), flag=True)
    assert isinstance(built.teachers[0].weight, float)
    assert from_dict(Outer, to_dict(built)) == built


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"stepz": 1}, "recipe.stepz: unknown key; valid keys: steps, loss, teachers, note, flag"),
        ({"steps": "ten"}, "recipe.steps: expected an integer, got 'ten'"),
        ({"steps": True}, "recipe.steps: expected an integer"),
        ({"loss": "kl"}, "recipe.loss: 'kl' is not valid; choose one of forward_kl, reverse_kl"),
        ({"teachers": [{"weight": 1}]}, r"recipe.teachers\[0\].name: required key is missing"),
        ({"teachers": [{"name": "t", "weight": -1}]}, r"recipe.teachers\[0\]: weight must be >= 0, got -1.0"),
        ({"flag": "yes"}, "recipe.flag: expected true or false"),
        ({"teachers": "t"}, "recipe.teachers: expected a list"),
    ],
)
def test_errors_name_the_key_path(raw, message):
    with pytest.raises(WhelpError, match=message):
        from_dict(Outer, raw)


def test_overrides_parse_yaml_values_and_index_lists():
    raw = {"steps": 1, "teachers": [{"name": "a"}, {"name": "b"}]}
    apply_override(raw, "teachers.1.weight=0.5")
    apply_override(raw, "steps=20")
    apply_override(raw, "extra.deep=x")
    assert raw == {"steps": 20, "teachers": [{"name": "a"}, {"name": "b", "weight": 0.5}], "extra": {"deep": "x"}}
    with pytest.raises(WhelpError, match="list of 2"):
        apply_override(raw, "teachers.5.weight=1")
    with pytest.raises(WhelpError, match="key.path=value"):
        apply_override(raw, "steps")


@dataclass(frozen=True)
class Step:
    target: str
    options: Inner = field(default=Inner("x"), metadata={"flatten": True})


def test_flattened_fields_share_the_mapping_and_round_trip():
    step = from_dict(Step, {"target": "half", "name": "n", "weight": 3})
    assert step == Step("half", Inner("n", 3.0))
    assert to_dict(step) == {"target": "half", "name": "n", "weight": 3.0}
    assert from_dict(Step, to_dict(step)) == step
    with pytest.raises(WhelpError, match="recipe.bogus: unknown key; valid keys: target, name, weight"):
        from_dict(Step, {"target": "t", "bogus": 1})


def test_a_mixture_field_is_built_from_text_or_the_list_form_and_dumped_back():
    from whelp.specs import DistillSpec, Mixture

    text = from_dict(DistillSpec, {"steps": 1, "data": "a:0.7,b:0.3"}, "step")
    listed = from_dict(
        DistillSpec, {"steps": 1, "data": [{"source": "a", "weight": 0.7}, {"source": "b", "weight": 0.3}]}
    )
    assert text == listed and isinstance(text.data, Mixture) and text.data.names == ("a", "b")
    assert to_dict(text)["data"] == "a:0.7,b:0.3" and to_dict(listed)["data"] == "a:0.7,b:0.3"
    with pytest.raises(WhelpError, match=r"^step.data\[1\].weight: expected a positive number, got 0$"):
        from_dict(DistillSpec, {"steps": 1, "data": [{"source": "a"}, {"source": "b", "weight": 0}]}, "step")
