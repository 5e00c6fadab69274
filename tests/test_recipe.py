"""Recipes: shipped ones validate and plan offline; bad ones fail with their key path."""

from __future__ import annotations

import re

import pytest
import yaml
from conftest import run_cli

from whelp import plan, recipe
from whelp.errors import WhelpError

SHIPPED = sorted(p.stem for p in recipe.RECIPES_DIR.glob("*.yaml"))
DEMO_TEACHER = sorted(
    p.stem
    for p in recipe.RECIPES_DIR.glob("*.yaml")  # planning these resolves smollm2-135m
    if yaml.safe_load(p.read_text())["teacher"]["model"] == "smollm2-135m"
)


def test_shipped_recipes_are_the_documented_ones():
    assert SHIPPED == ["llama-3.2-1b", "llama-3.2-3b", "smollm2-demo", "tiny"]
    assert DEMO_TEACHER == ["smollm2-demo", "tiny"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.demo) if n in DEMO_TEACHER else n for n in SHIPPED])
def test_shipped_recipes_validate_plan_and_round_trip(name):
    loaded = recipe.load(name)
    planned = plan.plan_recipe(loaded)
    assert planned["student"]["params"] < planned["teacher"]["shape"]["params"]
    assert recipe.from_dict(recipe.Recipe, yaml.safe_load(recipe.dump(loaded))) == loaded


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return str(path)


BASE = """
name: t
teacher: {model: %s}
prune: {target: %s}
distill: {steps: 2%s}
"""


@pytest.mark.parametrize(
    "text, message",
    [
        (
            BASE % ("llama-3.1-8b", "llama-3.2-1b", ", stepz: 3"),
            r"recipe.distill\[0\].stepz: unknown key; valid keys: data, steps, max_tokens",
        ),
        (
            BASE % ("llama-3.1-8b", "llama-3.2-1b", ", lr: fast"),
            r"recipe.distill\[0\].lr: expected a number, got 'fast'",
        ),
        (
            BASE % ("llama-3.1-8b", "llama-3.2-1b", "") + "data: {seq_len: 1}\n",
            "recipe.data: seq_len must be at least 2",
        ),
        (
            BASE % ("llama-3.1-8b", "hidden_size=9000", ""),
            r"recipe.prune\[0\].target: .*hidden_size=9000 is out of range",
        ),
        (
            BASE % ("/no/such/teacher", "llama-3.2-1b", ""),
            "recipe.teacher.model: no such model directory: /no/such/teacher",
        ),
        (BASE % ("llama-3.1-8b", "llama-3.2-1b", "") + "colour: red\n", "recipe.colour: unknown key"),
        (BASE % ("llama-3.1-8b", "llama-3.2-1b", "") + "eval: {tasks: mmlu}\n", "recipe.eval.tasks: expected a list"),
        ("name: t\nteacher: {model: llama-3.1-8b}\n", "needs at least one prune step"),
        (
            BASE.replace("steps: 2", "lr: 0.1") % ("llama-3.1-8b", "llama-3.2-1b", ""),
            r"recipe.distill\[0\]: give exactly one training budget",
        ),
        (
            BASE % ("llama-3.1-8b", "llama-3.2-1b", ", loss: kl"),
            r"recipe.distill\[0\].loss: 'kl' is not valid; choose one of forward_kl",
        ),
        (
            BASE.replace("prune: {target: %s}", "prune: {target: %s, importance: fisher}")
            % ("llama-3.1-8b", "llama-3.2-1b", ""),
            r"recipe.prune\[0\].importance: 'fisher' is not valid; choose one of activation",
        ),
        (
            BASE % ("llama-3.1-8b", "llama-3.2-1b", "") + "eval: {tasks: [whelp_pydocc]}\n",
            "recipe.eval.tasks: unknown lm-eval task 'whelp_pydocc': did you mean whelp_pydoc",
        ),
        (BASE % ("llama-3.1-8b", "llama-3.2-1b", ", steps: 3"), "key 'steps' is written twice"),
        (
            "name: t\nname: u\nteacher: {model: llama-3.1-8b}\nprune: {target: llama-3.2-1b}\n",
            "key 'name' is written twice",
        ),
        (
            BASE % ("llama-3.1-8b", "llama-3.2-1b", ", schedule: linear"),
            r"recipe.distill\[0\].schedule: .*positive step count",
        ),
        (
            BASE % ("llama-3.1-8b", "llama-3.2-1b", ", beta: 1.5, loss: jsd"),
            r"recipe.distill\[0\]: jsd beta must be in \(0, 1\)",
        ),
        (BASE % ("llama-3.1-8b", "llama-3.2-1b", "") + "data: {train: 'a:0,b:1'}\n", "bad data mixture"),
        ("- just\n- a list\n", "a recipe is a mapping"),
        ("name: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_recipes_name_the_problem(tmp_path, text, message):
    with pytest.raises(WhelpError, match=message):
        plan.plan_recipe(recipe.load(_write(tmp_path, text)))


def test_yaml_1_1_floats_loss_parameters_and_one_step_overrides(tmp_path):
    """``lr: 1e-3`` is a string to YAML 1.1 and a number to every user; every loss parameter is a recipe key; with
    one distill step, ``--set distill.lr`` means its only step."""
    path = _write(
        tmp_path,
        BASE
        % (
            "llama-3.1-8b",
            "llama-3.2-1b",
            ", lr: 1e-3, loss: jsd, beta: 0.3, alpha: 0.2, t2_scale: true, schedule: 'cosine:10'",
        ),
    )
    step = recipe.load(path).distill[0].options
    assert (step.optim.lr, step.kd.name, step.kd.beta, step.kd.alpha, step.kd.t2_scale, str(step.schedule)) == (
        1e-3,
        "jsd",
        0.3,
        0.2,
        True,
        "cosine:10",
    )
    assert recipe.load(path, ("distill.lr=2e-4",)).distill[0].options.optim.lr == 2e-4
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(recipe.dump(recipe.load(path)))
    assert recipe.load(str(dumped)) == recipe.load(path)
    chained = _write(
        tmp_path,
        "name: c\nteacher: {model: llama-3.1-8b}\nprune: [{target: llama-3.2-3b}, "
        "{target: llama-3.2-1b}]\ndistill: [{steps: 1}, {steps: 1}]\n",
    )
    with pytest.raises(WhelpError, match=r"'distill' is a list of 2 steps; write distill.I.lr"):
        recipe.load(chained, ("distill.lr=1",))


def test_overrides_and_stage_defaults(tmp_path):
    path = _write(tmp_path, BASE % ("llama-3.1-8b", "llama-3.2-1b", "") + "data: {train: pydoc:eval, seq_len: 128}\n")
    loaded = recipe.load(path, ("distill.0.lr=0.01", "seed=7"))
    step = loaded.distill[0].options
    assert (step.optim.lr, step.seed, str(step.data), step.seq_len) == (0.01, 7, "pydoc:eval", 128)
    assert loaded.prune[0].options.seq_len == 128 and loaded.prune[0].options.seed == 7
    with pytest.raises(WhelpError, match="no recipe file"):
        recipe.load(str(tmp_path / "missing.yaml"))


def test_chained_steps_plan_through_the_intermediate_shape(tmp_path):
    text = """
name: chain
teacher: {model: llama-3.1-8b}
prune: [{target: llama-3.2-3b}, {target: "hidden_size=2048,num_hidden_layers=16,head_dim=64,num_attention_heads=16"}]
distill: [{steps: 1}, {steps: 1}]
"""
    planned = plan.plan_recipe(recipe.load(_write(tmp_path, text)))
    assert [s["stage"] for s in planned["stages"]] == ["prune[0]", "distill[0]", "prune[1]", "distill[1]"]
    assert planned["stages"][0]["shape"]["params"] == 3_212_749_824
    assert planned["student"]["hidden_size"] == 2048 and planned["student"]["intermediate_size"] == 8192
    with pytest.raises(WhelpError, match="one distill step per prune step"):
        recipe.load(_write(tmp_path, text.replace("distill: [{steps: 1}, {steps: 1}]", "distill: [{steps: 1}]")))


def test_cli_validate_show_and_plan_a_recipe(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ok = run_cli("validate", "llama-3.2-3b")
    assert ok.exit_code == 0 and ok.stdout.startswith("ok: llama-3.2-3b")
    shown = run_cli("show", "tiny", "--set", "distill.0.lr=0.5")
    assert shown.exit_code == 0 and yaml.safe_load(shown.stdout)["distill"][0]["lr"] == 0.5
    planned = run_cli("plan", "llama-3.2-1b", "--json")
    assert planned.exit_code == 0 and json.loads(planned.stdout)["student"]["params"] == 1_235_814_400
    bad = run_cli("validate", _write(tmp_path, BASE % ("llama-3.1-8b", "llama-3.2-1b", ", stepz: 3")))
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and "recipe.distill[0].stepz" in bad.stderr
    assert bad.stderr.startswith("error: ") and bad.stdout == ""


@pytest.mark.parametrize("name", ["..", "../../x", "a/b", ".hidden", ""])
def test_a_recipe_name_that_is_not_one_path_component_is_refused_by_validate_and_build(tmp_path, name, monkeypatch):
    path = tmp_path / "r.yaml"
    path.write_text(f"name: {name!r}\nteacher: {{model: smollm2-135m}}\nprune: {{target: smollm2-half}}\n")
    (tmp_path / "keep.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    for args in (["validate", str(path)], ["build", str(path), "--force"]):
        done = run_cli(*args)
        assert done.exit_code == 2 and done.stderr.startswith("error: "), done.stderr
        assert "recipe.name" in done.stderr and "cannot name a directory" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "r.yaml"]


def test_build_never_deletes_a_directory_it_did_not_make(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    for extra in ([], ["--force"]):
        done = run_cli("build", "tiny", "--out", str(out), *extra)
        assert done.exit_code == 2 and done.stderr.startswith("error: "), done.stderr
        message = done.stderr
        assert "not a whelp build" in message and "with or without --force" in message
        assert "pass --force" not in message
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    (tmp_path / "notes.txt").write_text("mine")
    for taken in (out, tmp_path / "notes.txt"):  # validate says so too, before any build
        refused = run_cli("validate", "llama-3.2-1b", "--set", f"out={taken}")
        assert refused.exit_code == 2 and "not a whelp build" in refused.stderr, refused.stderr


@pytest.mark.demo  # the tiny recipe's teacher is resolved first
@pytest.mark.parametrize(
    "key, value, where",
    [
        ("data.train", "pydoc:trian", "recipe.distill[0].data"),
        ("data.calib", "/no/such/dir", "recipe.prune[0].calib"),
        ("eval.ppl", "[pydoc:evl]", "recipe.eval.ppl[0]"),
    ],
)
def test_validate_refuses_an_unreadable_data_source_before_anything_runs(key, value, where):
    loaded = recipe.load("tiny", (f"{key}={value}",))
    with pytest.raises(WhelpError, match=re.escape(where) + r": .*(unknown pydoc split|no such)"):
        plan.plan_recipe(loaded)


def test_a_teacher_config_of_another_shape_than_the_local_teacher_is_refused(tmp_path):
    from conftest import save_tiny, tiny_tokenizer

    save_tiny(tmp_path / "teacher", tiny_tokenizer())
    text = (
        "name: t\nteacher: {model: %s, config: %s}\ndata: {seq_len: 64}\n"
        "prune: {target: num_hidden_layers=1, calib_samples: 2}\n"
    )
    ok = recipe.load(_write(tmp_path, text % (tmp_path / "teacher", tmp_path / "teacher" / "config.json")))
    assert plan.plan_recipe(ok)["student"]["num_hidden_layers"] == 1
    wrong = recipe.load(_write(tmp_path, text % (tmp_path / "teacher", "llama-3.1-8b")))
    with pytest.raises(
        WhelpError,
        match=r"recipe.teacher.config \(llama-3.1-8b\) is not the shape of the teacher "
        r".*hidden_size=4096 vs 64",
    ):
        plan.plan_recipe(wrong)


def test_the_list_form_of_a_mixture_equals_its_text_and_takes_paths_whole(tmp_path):
    from whelp.specs import Mixture

    text = BASE % ("llama-3.1-8b", "llama-3.2-1b", "")
    listed = _write(
        tmp_path, text + "data: {train: [{source: pydoc:train, weight: 7}, {source: licenses, weight: 3}]}\n"
    )
    loaded = recipe.load(listed)
    assert (
        loaded.distill[0].options.data
        == recipe.load(_write(tmp_path, text + "data: {train: 'pydoc:train:0.7,licenses:0.3'}\n"))
        .distill[0]
        .options.data
    )
    assert str(loaded.data.train) == "pydoc:train:7,licenses:3"  # the text recipes recorded for this form
    path = tmp_path / "a,b" / "notes, v2.txt"
    path.parent.mkdir()
    path.write_text("some text\n")
    data = f"data: {{calib: '{path}', train: [{{source: '{path}', weight: 0.7}}, {{source: pydoc:train, weight: 0.3}}], eval: '{path}'}}\n"
    loaded = recipe.load(_write(tmp_path, text + data))
    assert loaded.prune[0].options.calib == Mixture.parse(str(path)) and loaded.eval.ppl == (Mixture.parse(str(path)),)
    assert loaded.distill[0].options.data.names == (str(path), "pydoc:train")
    dumped = recipe.dump(loaded)
    assert yaml.safe_load(dumped)["data"]["train"] == [
        {"source": str(path), "weight": 0.7},
        {"source": "pydoc:train", "weight": 0.3},
    ]  # a name with a ',' is written back in the list form
    assert recipe.from_dict(recipe.Recipe, yaml.safe_load(dumped)) == loaded


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[{source: pydoc:train, weight: -1}]", r"recipe.data.train\[0\].weight: expected a positive number, got -1"),
        ("[{source: '', weight: 1}]", r"recipe.data.train\[0\].source: expected a data source \(text\), got ''"),
        ("[{source: a, wieght: 1}]", r"recipe.data.train\[0\].wieght: unknown key; valid keys: source, weight"),
        ("[]", r"recipe.data.train: expected a data source \(text\) or a list of \{source: DATA, weight: W\}"),
        ("{a: 1}", r"recipe.data.train: expected a data source \(text\) or a list"),
        ("'a:-1,b:1'", r"recipe.data.train: weight must be a finite number >= 0 in 'a:-1'"),
        ("',b'", r"recipe.data.train: bad data mixture ',b'"),
    ],
)
def test_a_bad_mixture_in_a_recipe_is_one_line_naming_its_key(tmp_path, value, message):
    path = _write(tmp_path, BASE % ("llama-3.1-8b", "llama-3.2-1b", "") + f"data: {{train: {value}}}\n")
    with pytest.raises(WhelpError, match=message) as info:
        recipe.load(path)
    assert "\n" not in str(info.value)


def test_yaml_merge_keys_are_read_and_may_be_overridden(tmp_path):
    text = """
name: t
teacher: {model: llama-3.1-8b}
prune:
  - &target {target: llama-3.2-1b}
  - <<: *target
distill:
  - &first {steps: 2, lr: 0.001, warmup: 1}
  - <<: *first
    lr: 0.0002
"""
    first, second = recipe.load(_write(tmp_path, text)).distill
    assert (first.options.steps, first.options.optim.lr) == (2, 0.001)
    assert (second.options.steps, second.options.optim.warmup, second.options.optim.lr) == (2, 1, 0.0002)
