"""A recipe whose first stage samples teacher text that calibration and distillation then read as ``generated``."""

from __future__ import annotations

import json

import pytest
from conftest import save_tiny, tiny_tokenizer

from whelp import build, pricing, recipe
from whelp.data.generate import generate_store
from whelp.errors import WhelpError
from whelp.plan import plan_recipe
from whelp.specs import Mixture

RECIPE = """
name: gen
teacher: {model: %s}
data:
  seq_len: 16
  calib: generated
  train: [{source: generated, weight: 0.5}, {source: pydoc:train, weight: 0.5}]
generate: {max_tokens: 600, new_tokens: 24, batch_size: 8}
prune: {target: "num_hidden_layers=1", calib_samples: 2}
distill: {steps: 2, batch_size: 2, eval_tokens: 64, on_policy: 0.5, gen_tokens: 4}
eval: {max_tokens: 256, ppl: [pydoc:eval, licenses], speed: {prompt_len: 4, new_tokens: 1, repeats: 1}}
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    save_tiny(root / "teacher", tiny_tokenizer())
    (root / "gen.yaml").write_text(RECIPE % (root / "teacher"))
    final = build.build(recipe.load(str(root / "gen.yaml")), root / "out")
    return root, final


def stage(root, name: str):
    return next((root / "out" / "stages").glob(f"{name}-*[0-9a-f]"))


def test_the_generate_stage_is_whelp_generate_and_feeds_calibration_and_training(built, tmp_path):
    root, final = built
    names = sorted(p.name.rsplit("-", 1)[0] for p in (root / "out" / "stages").iterdir() if p.suffix != ".distill")
    assert names == ["01-generate", "02-prune", "03-distill", "04-eval"]
    store = stage(root, "01-generate")
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["complete"] and manifest["total_tokens"] == 600 and manifest["generation"]["new_tokens"] == 24
    direct = generate_store(
        str(root / "teacher"), tmp_path / "direct", recipe.load(str(root / "gen.yaml")).generate[0].options
    )
    assert json.loads((direct / "manifest.json").read_text())["fingerprint"] == manifest["fingerprint"]
    pruned = json.loads((stage(root, "02-prune") / "prune_report.json").read_text())
    assert pruned["spec"]["calib"] == str(store)
    distilled = json.loads((stage(root, "03-distill") / "distill_report.json").read_text())
    assert distilled["spec"]["data"] == f"{store}:0.5,pydoc:train:0.5" and distilled["spec"]["on_policy"] == 0.5
    card = (final / "README.md").read_text()
    assert f"**teacher text** (the data source `generated`): 600 tokens sampled from `{root / 'teacher'}`" in card
    assert "evaluation `licenses` (never trained on)" in card


def test_a_second_build_reuses_everything_and_a_changed_seed_samples_again(built, capsys):
    root, _ = built
    capsys.readouterr()
    build.build(recipe.load(str(root / "gen.yaml")), root / "out")
    assert "nothing to do" in capsys.readouterr().err
    old = stage(root, "01-generate").name
    build.build(recipe.load(str(root / "gen.yaml"), ("generate.seed=1",)), root / "out")
    log = capsys.readouterr().err
    assert all(f"> {name}" in log for name in ("01-generate", "02-prune", "03-distill", "04-eval"))
    assert stage(root, "01-generate").name != old and not (root / "out" / "stages" / old).exists()


def test_plan_prices_the_teacher_text_and_bad_uses_are_refused(built, tmp_path):
    root, _ = built
    planned = plan_recipe(recipe.load(str(root / "gen.yaml")))
    first = planned["stages"][0]
    assert (
        first["stage"] == "generate[0]"
        and first["name"] == "generated"
        and first["tokens"] == 600
        and first["store_bytes"] == 1200
    )
    assert planned["stages"][1]["data"]["tokens_available"] is None  # made by the build
    text = (root / "gen.yaml").read_text()
    cases = [
        (
            text.replace("generate: {max_tokens: 600, new_tokens: 24, batch_size: 8}\n", ""),
            r"recipe.prune\[0\].calib: 'generated' reads the teacher text .* add generate: \{max_tokens: N\}",
        ),
        (
            text.replace("ppl: [pydoc:eval, licenses]", "ppl: [generated]"),
            r"recipe.eval.ppl\[0\]: 'generated' is teacher text the build makes to train on",
        ),
        (
            text.replace("batch_size: 8}", "batch_size: 8, temprature: 1}"),
            r"recipe.generate\[0\].temprature: unknown key",
        ),
        (text.replace("max_tokens: 600, ", ""), r"give --max-tokens N"),
    ]
    for i, (bad, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(bad)
        with pytest.raises(WhelpError, match=message):
            recipe.load(str(path))


def test_a_one_source_list_is_that_source_and_a_comma_in_the_build_path_is_read_whole(built, tmp_path):
    root, _ = built
    text = (
        (root / "gen.yaml")
        .read_text()
        .replace(
            "train: [{source: generated, weight: 0.5}, {source: pydoc:train, weight: 0.5}]",
            "train: [{source: generated, weight: 1}]",
        )
    )
    (tmp_path / "one.yaml").write_text(text)
    assert str(recipe.load(str(tmp_path / "one.yaml")).distill[0].options.data) == "generated"
    (tmp_path / "none.yaml").write_text(
        text.replace("generate: {max_tokens: 600, new_tokens: 24, batch_size: 8}\n", "").replace(
            "calib: generated", "calib: pydoc:calib"
        )
    )
    with pytest.raises(WhelpError, match=r"recipe.distill\[0\].data: 'generated' reads the teacher text"):
        recipe.load(str(tmp_path / "none.yaml"))
    stages, _ = build.plan_stages(recipe.load(str(tmp_path / "one.yaml")), tmp_path / "a,b")  # no refusal
    store = str(tmp_path / "a,b" / "stages" / stages[0].dirname)
    gen = build.Generated({"generated": (store, stages[0].key)})
    mixture = Mixture.parse("generated:0.5,pydoc:train:0.5")
    assert gen.resolve(mixture).names == (store, "pydoc:train")  # the store's directory, whole
    assert gen.identity(mixture)[0] == [stages[0].key, 0.5]  # keyed by the stage, not by where the build is


TWO = """
name: two
teacher: {model: %s}
data: {seq_len: 16, calib: [{source: generated, weight: 0.5}, {source: bos, weight: 0.5}]}
generate:
  - {max_tokens: 300, new_tokens: 24, batch_size: 8, prompts: pydoc:train, prompt_tokens: 8}
  - {name: bos, max_tokens: 200, new_tokens: 20, batch_size: 4}
prune: {target: "num_hidden_layers=1", calib_samples: 4}
eval: {max_tokens: 128, ppl: [licenses], speed: {prompt_len: 4, new_tokens: 1, repeats: 1}}
"""


def test_two_named_generate_steps_make_two_stores_each_read_as_its_name(tmp_path):
    """A step per store, numbered in order; the prune reads each by its name, keyed by its own stage; the plan
    prices each once; the card names both; renaming a step keeps its store; the resolved recipe loads back equal."""
    save_tiny(tmp_path / "teacher", tiny_tokenizer())
    (tmp_path / "two.yaml").write_text(TWO % (tmp_path / "teacher"))
    loaded = recipe.load(str(tmp_path / "two.yaml"))
    assert [s.name for s in loaded.generate] == ["generated", "bos"]
    final = build.build(loaded, tmp_path / "out")
    stages = {p.name.rsplit("-", 1)[0]: p for p in (tmp_path / "out" / "stages").iterdir()}
    assert sorted(stages) == ["01-generate", "02-generate", "03-prune", "04-eval"]
    for name, tokens, step in (("01-generate", 300, loaded.generate[0]), ("02-generate", 200, loaded.generate[1])):
        manifest = json.loads((stages[name] / "manifest.json").read_text())
        direct = generate_store(str(tmp_path / "teacher"), tmp_path / f"direct-{name}", step.options)
        assert manifest["total_tokens"] == tokens
        assert json.loads((direct / "manifest.json").read_text())["fingerprint"] == manifest["fingerprint"]
    pruned = json.loads((stages["03-prune"] / "prune_report.json").read_text())
    assert pruned["spec"]["calib"] == f"{stages['01-generate']}:0.5,{stages['02-generate']}:0.5"
    card = (final / "README.md").read_text()
    assert "(the data source `generated`): 300 tokens sampled from" in card
    assert "(the data source `bos`): 200 tokens sampled from" in card and "after BOS alone" in card
    planned = plan_recipe(loaded)
    rows = [(s["stage"], s["name"], s["store_bytes"]) for s in planned["stages"][:2]]
    assert rows == [("generate[0]", "generated", 600), ("generate[1]", "bos", 400)]
    priced = pricing.price(planned, pricing.GPUS["h100"], 1)
    others = sum(b for s in planned["stages"] for k, b in s["disk_bytes"].items() if k != "store")
    calib = planned["stages"][2]["disk_bytes"]["store"]  # the mixture's blocks, priced as a store of their own
    assert priced["totals"]["disk_bytes"] == 600 + 400 + calib + others  # two stores, not one named 'generated'
    renamed = (tmp_path / "two.yaml").read_text().replace("bos", "from_bos")
    (tmp_path / "renamed.yaml").write_text(renamed)
    again, _ = build.plan_stages(recipe.load(str(tmp_path / "renamed.yaml")), tmp_path / "out")
    assert [s.dirname for s in again[:2]] == [stages[n].name for n in ("01-generate", "02-generate")]
    (tmp_path / "resolved.yaml").write_text(recipe.dump(loaded))
    assert recipe.load(str(tmp_path / "resolved.yaml")) == loaded


@pytest.mark.parametrize(
    "change, message",
    [
        (("name: bos", "name: generated"), r"recipe.generate\[1\].name: 'generated' also names generate\[0\]"),
        (("name: bos", "name: licenses"), r"recipe.generate\[1\]: name 'licenses' cannot name teacher text"),
        (("name: bos", "name: 'pydoc:train'"), r"'pydoc:train' cannot name teacher text; use lower-case letters"),
        (("{source: bos, weight: 0.5}", "{source: pydoc:calib, weight: 0.5}"), r"generate\[1\]: no stage reads its"),
        (("ppl: [licenses]", "ppl: [bos]"), r"recipe.eval.ppl\[0\]: 'bos' is teacher text the build makes to train"),
        (("prompts: pydoc:train", "prompts: bos"), r"recipe.generate\[0\].prompts: bos is teacher text this recipe"),
        (
            ("- {max_tokens: 300", "- {name: chat, max_tokens: 300"),
            r"recipe.prune\[0\].calib: 'generated' names no generate step; read one of chat, bos, or name a step "
            "'generated'$",
        ),
    ],
)
def test_a_bad_generate_step_name_is_one_line(tmp_path, change, message):
    (tmp_path / "bad.yaml").write_text((TWO % (tmp_path / "teacher")).replace(*change))
    with pytest.raises(WhelpError, match=message) as err:
        recipe.load(str(tmp_path / "bad.yaml"))
    assert "\n" not in str(err.value)


def test_set_makes_a_generate_step_where_the_recipe_has_none(tmp_path):
    text = (RECIPE % (tmp_path / "teacher")).replace("generate: {max_tokens: 600, new_tokens: 24, batch_size: 8}\n", "")
    (tmp_path / "none.yaml").write_text(text)
    with pytest.raises(WhelpError, match=r"'generated' reads the teacher text of the recipe's generate section, which"):
        recipe.load(str(tmp_path / "none.yaml"))
    made = recipe.load(str(tmp_path / "none.yaml"), ("generate.max_tokens=600",))
    assert [(s.name, s.options.max_tokens) for s in made.generate] == [("generated", 600)]
    with pytest.raises(WhelpError, match=r"--set generate.0.max_tokens: 'generate.0' is a list of 0"):
        recipe.load(str(tmp_path / "none.yaml"), ("generate.0.max_tokens=600",))
