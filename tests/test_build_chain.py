"""A chained build (Minitron's 8B -> 3B -> 1B, in miniature) in process, and a recipe edit that reruns only the
stages downstream of it."""

from __future__ import annotations

import json

import pytest
from conftest import save_tiny, tiny_tokenizer
from transformers import AutoModelForCausalLM

from whelp import build, recipe

RECIPE = """
name: chain
teacher: {model: %s}
data: {seq_len: 16}
prune:
  - {target: "num_hidden_layers=3", calib_samples: 2}
  - {target: "num_hidden_layers=2,intermediate_size=64", calib_samples: 2}
distill:
  - {steps: 2, batch_size: 2, eval_tokens: 64}
  - {steps: 2, batch_size: 2, eval_tokens: 64}
eval: {max_tokens: 256, speed: {prompt_len: 4, new_tokens: 1, repeats: 1}}
"""


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    save_tiny(root / "teacher", tiny_tokenizer(), num_hidden_layers=4)
    (root / "chain.yaml").write_text(RECIPE % (root / "teacher"))
    final = build.build(recipe.load(str(root / "chain.yaml")), root / "out")
    return root, final


def test_a_chained_build_prunes_and_distils_twice(chain):
    root, final = chain
    model = AutoModelForCausalLM.from_pretrained(final)
    assert (model.config.num_hidden_layers, model.config.intermediate_size) == (2, 64)
    metrics = json.loads((final / "metrics.json").read_text())
    assert [m["label"] for m in metrics["models"]] == ["teacher", "pruned-1", "distilled-1", "pruned-2", "distilled-2"]
    stages = sorted(p.name.rsplit("-", 1)[0] for p in (root / "out" / "stages").iterdir() if p.suffix != ".distill")
    assert stages == ["01-prune", "02-distill", "03-prune", "04-distill", "05-eval"]
    second = json.loads(next((root / "out" / "stages").glob("03-prune-*/prune_report.json")).read_text())
    assert second["source"].split("/")[-1].startswith("02-distill-")  # the second prune reads the first student
    card = (final / "README.md").read_text()
    assert "**pruned-2**: pruned to `num_hidden_layers=2,intermediate_size=64`" in card


def test_a_recipe_edit_reruns_only_the_stages_after_it(chain, capsys):
    root, final = chain
    before = {p.name for p in (root / "out" / "stages").iterdir()}
    capsys.readouterr()
    build.build(recipe.load(str(root / "chain.yaml"), ("distill.1.lr=0.001",)), root / "out")
    log = capsys.readouterr().err
    for name in ("01-prune", "02-distill", "03-prune"):
        assert f"= {name}: up to date" in log
    assert "> 04-distill" in log and "> 05-eval" in log
    after = {p.name for p in (root / "out" / "stages").iterdir()}
    assert {n for n in before if n[:2] in ("01", "02", "03")} == {n for n in after if n[:2] in ("01", "02", "03")}
    assert not {n for n in before if n[:2] in ("04", "05")} & after  # the old downstream outputs are gone
    assert json.loads((final / "distill_report.json").read_text())["spec"]["lr"] == 0.001
