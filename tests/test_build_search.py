"""A recipe whose prune target is a shape search: the build searches, prunes the teacher to the winner's shape and
distils it; a re-run is a no-op, a changed search re-runs it and everything after; plan prices the search."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from conftest import CHATML, assistant_of, run_cli, save_tiny, stop_at, tiny_tokenizer

from whelp import architecture, build, models, plan, recipe
from whelp.errors import WhelpError

SEARCH = (
    "{budget: non_embedding=50%, pool: 2, candidates: 2, score_steps: 1, multiple: 16, tolerance: 0.1, eval_blocks: 2}"
)
RECIPE = f"""
name: searched
teacher: {{model: TEACHER}}
data: {{seq_len: 16}}
prune:
  target:
    search: {SEARCH}
  calib_samples: 2
distill: {{steps: 2, batch_size: 2, eval_tokens: 64}}
eval: {{max_tokens: 256, speed: {{prompt_len: 4, new_tokens: 1, repeats: 1}}}}
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    chat = copy.deepcopy(tiny_tokenizer())
    chat.chat_template = {"default": CHATML, "tool_use": "{{ messages[0]['content'] }} <tools>"}
    save_tiny(root / "teacher", chat)  # transformers 5's layout: additional_chat_templates/tool_use.jinja
    stop_at(root / "teacher", [0, 5])  # <eos> and one more id
    (root / "searched.yaml").write_text(RECIPE.replace("TEACHER", str(root / "teacher")))
    final = build.build(recipe.load(str(root / "searched.yaml")), root / "out")
    return root, final


def stage(root, name: str):
    return next((root / "out" / "stages").glob(f"{name}-*[0-9a-f]"))


def test_the_prune_stage_prunes_to_the_search_winner(built):
    root, final = built
    names = sorted(p.name.rsplit("-", 1)[0] for p in (root / "out" / "stages").iterdir() if "." not in p.name)
    assert names == ["01-search", "02-prune", "03-distill", "04-eval"]
    searched = stage(root, "01-search")
    assert all((searched / name).exists() for name in ("search.json", "search.md", "winner", "target.json"))
    winner = json.loads((searched / "search.json").read_text())["winner"]["shape"]
    report = json.loads((stage(root, "02-prune") / "prune_report.json").read_text())
    assert report["target"] == str(searched / "target.json")
    assert architecture.shape(models.load_config(str(stage(root, "02-prune")))) == winner == report["shape"]["target"]
    assert architecture.shape(models.load_config(str(final))) == winner
    assert "pruned to `the winner of a shape search (non_embedding=50%" in (final / "README.md").read_text()


def test_the_winner_every_stage_and_the_final_student_keep_the_teachers_assistant(built):
    """The teacher's chat templates (a named one too), special tokens and every stop id (whelp/assistant.py) through
    search, prune and distill into final/."""
    root, final = built
    want = assistant_of(root / "teacher")
    for directory in (stage(root, "01-search") / "winner", stage(root, "02-prune"), stage(root, "03-distill"), final):
        assert assistant_of(directory) == want, directory
        assert (directory / "additional_chat_templates" / "tool_use.jinja").is_file(), directory


def test_a_rerun_does_nothing_and_a_changed_search_reruns_it_and_what_follows(built, capsys):
    root, _ = built
    path = str(root / "searched.yaml")
    capsys.readouterr()
    build.build(recipe.load(path), root / "out")
    assert "nothing to do" in capsys.readouterr().err
    keys = [s.key for s in build.plan_stages(recipe.load(path), root / "out")[0]]
    later = [s.key for s in build.plan_stages(recipe.load(path, ("distill.lr=0.01",)), root / "out")[0]]
    assert later[:2] == keys[:2] and later[2] != keys[2]  # a distill change keeps the search and the prune
    old = stage(root, "01-search").name
    build.build(recipe.load(path, ("prune.target.search.seed=1",)), root / "out")
    log = capsys.readouterr().err
    assert all(f"> {name}" in log for name in ("01-search", "02-prune", "03-distill", "04-eval"))
    assert stage(root, "01-search").name != old
    assert not (root / "out" / "stages" / old).exists() and not (root / "out" / "stages" / f"{old}.search").exists()


def test_plan_shows_the_search_row_and_estimates_what_follows(built, monkeypatch):
    from whelp.search.run import plan_search

    root, _ = built
    loaded = recipe.load(str(root / "searched.yaml"))
    planned = plan.plan_recipe(loaded)
    search, prune, distill = planned["stages"]
    expected = plan_search(models.load_config(str(root / "teacher")), loaded.search())
    assert search["kind"] == "search" and search["candidates"] == expected["candidates"] >= 2
    assert len(search["pool"]) == 2 and search["flops"] == expected["cost"]["total"] > 0
    assert all(search["largest"][k] == expected["largest"][k] for k in architecture.SHAPE_KEYS)
    assert prune["shape"] == search["largest"] and prune["estimate"] and distill["estimate"]
    assert "estimate" not in search and planned["student"] == prune["shape"]
    monkeypatch.setenv("COLUMNS", "300")
    shown = run_cli("plan", str(root / "searched.yaml"))
    assert shown.exit_code == 0, shown.stderr
    assert any(line.lstrip("│ ").startswith("search") for line in shown.stdout.splitlines())
    assert "estimate" in shown.stdout


def test_a_search_target_takes_the_steps_defaults_and_round_trips(built, tmp_path, monkeypatch):
    root, _ = built
    loaded = recipe.load(str(root / "searched.yaml"))
    spec = loaded.search()
    assert (spec.seq_len, spec.calib_samples, str(spec.data), str(spec.eval_data), spec.pool) == (
        16,
        2,
        "pydoc:train",
        "pydoc:eval",
        2,
    )
    assert recipe.from_dict(recipe.Recipe, yaml.safe_load(recipe.dump(loaded))) == loaded
    monkeypatch.chdir(tmp_path)
    shown = run_cli("show", str(root / "searched.yaml"), "--set", "prune.target.search.pool=3")
    assert shown.exit_code == 0 and yaml.safe_load(shown.stdout)["prune"][0]["target"]["search"]["pool"] == 3
    ok = run_cli("validate", str(root / "searched.yaml"))
    assert ok.exit_code == 0 and ok.stdout.startswith("ok: searched"), ok.stderr


@pytest.mark.parametrize(
    "old, new, message",
    [
        (
            "prune:\n  target:\n    search: " + SEARCH + "\n  calib_samples: 2\ndistill: {steps: 2, batch_size: 2, "
            "eval_tokens: 64}",
            "prune: [{target: 'num_hidden_layers=1'}, {target: {search: " + SEARCH + "}}]\n"
            "distill: [{steps: 1}, {steps: 1}]",
            r"recipe.prune\[1\].target: a search runs from the teacher, so only prune\[0\] may search",
        ),
        (
            "eval_blocks: 2}",
            "eval_blocks: 2, pooll: 3}",
            r"recipe.prune\[0\].target.search.pooll: unknown key; valid keys: budget, axes",
        ),
        ("    search:", "    serch:", r"recipe.prune\[0\].target.serch: unknown key; valid keys: search"),
        ("budget: non_embedding=50%, ", "", r"recipe.prune\[0\].target.search: give a budget"),
        (
            "candidates: 2",
            "candidates: 3",
            r"recipe.prune\[0\].target.search: candidates \(3\) are the best of the pool",
        ),
        (
            "eval_blocks: 2}",
            "eval_blocks: 2, data: generated}",
            r"recipe.prune\[0\].target.search.data: 'generated' reads the teacher text",
        ),
    ],
)
def test_bad_search_targets_are_one_line_naming_the_key(tmp_path, old, new, message):
    text = RECIPE.replace("TEACHER", str(tmp_path / "teacher"))
    assert old in text
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace(old, new))
    with pytest.raises(WhelpError, match=message) as caught:
        recipe.load(str(path))
    assert "\n" not in str(caught.value)
    bad = run_cli("validate", str(path))
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: recipe.prune[")
