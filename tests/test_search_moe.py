"""``whelp search`` over an MoE teacher's experts (whelp/search/space.py): the closed-form count against stock
transformers' models, enumeration against brute force, refusals, and a whole search on a tiny Mixtral."""

from __future__ import annotations

import itertools
import json

import pytest
from conftest import run_cli, save_tiny, tiny_config, tiny_tokenizer

from whelp import architecture
from whelp.errors import WhelpError
from whelp.pruning import moe, targets
from whelp.search import space
from whelp.search.budget import Budget, parse_budget
from whelp.search.space import Counter

MOE = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32),
}
AXES = ("layers", "hidden", "mlp", "experts")


def brute_force(cfg, multiple: int) -> dict[tuple, tuple[int, int]]:
    """Every shape of the grid over AXES, sized by building its pruned config's model (architecture.count_params)."""
    counter = Counter(cfg)
    teacher, keys = counter.teacher, counter.keys
    values = space.axis_values(teacher, AXES, multiple, keys)
    sizes = {}
    for layers, hidden, mlp, experts in itertools.product(*(values[a] for a in AXES)):
        shape = {**teacher, keys["layers"]: layers, keys["hidden"]: hidden, keys["mlp"]: mlp, keys["experts"]: experts}
        sizes[(layers, hidden, mlp, experts)] = architecture.count_params(targets.moe_config(cfg, shape), active=True)
    return sizes


@pytest.fixture(scope="module", params=list(MOE))
def brute(request):
    cfg = tiny_config(request.param, **MOE[request.param])
    return request.param, cfg, brute_force(cfg, 16)


@pytest.mark.parametrize("kind", ["non_embedding", "active"])
def test_enumerate_equals_brute_force_over_experts(brute, kind):
    family, cfg, sizes = brute
    counter = Counter(cfg)
    assert counter.keys["experts"] == moe.MOE_FAMILIES[family].experts_key
    assert counter.keys["mlp"] == moe.MOE_FAMILIES[family].ffn_key  # no dense layers: the experts' FFN is mlp
    assert len({k[3] for k in sizes}) == 7  # 2..8 experts: never below num_experts_per_tok
    column = {"non_embedding": 1, "active": 2}[kind]
    budget = int(0.6 * max(v[column] for v in sizes.values()))
    # largest non-embedding first, ties by enumerate_shapes' column order (hidden, layers, mlp, ..., experts)
    want = sorted(
        (k for k, v in sizes.items() if 0.8 * budget <= v[column] <= budget),
        key=lambda k: (-sizes[k][1], k[1], k[0], k[2], k[3]),
    )
    assert want
    got = space.enumerate_shapes(cfg, Budget(**{kind: budget}), AXES, 0.2, 16, 64)
    keys = counter.keys
    assert [(s[keys["layers"]], s[keys["hidden"]], s[keys["mlp"]], s[keys["experts"]]) for s in got] == want
    assert len({s[keys["experts"]] for s in got}) > 1
    for shape in got:
        key = (shape[keys["layers"]], shape[keys["hidden"]], shape[keys["mlp"]], shape[keys["experts"]])
        assert (*counter.params(shape), counter.active(shape)) == sizes[key]
        spec = ",".join(f"{k}={str(v).lower()}" for k, v in shape.items())
        assert targets.parse_target(cfg, spec).shape == shape


def test_experts_axis_and_active_budget_on_a_dense_teacher_are_refused_in_one_line(tmp_path):
    save_tiny(tmp_path / "dense", tiny_tokenizer())
    for budget, axes, message in (
        ("non_embedding=60%", "layers,experts", "search axis 'experts' needs a mixture-of-experts teacher"),
        ("active=60%", "layers", "budget active counts the parameters an MoE's router"),
    ):
        result = run_cli(
            "search",
            str(tmp_path / "dense"),
            "--out",
            str(tmp_path / "o"),
            "--budget",
            budget,
            "--axes",
            axes,
            "--dry-run",
        )
        assert result.exit_code == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_an_active_budget_is_a_percentage_of_the_teachers_active_params():
    cfg = tiny_config("mixtral", **MOE["mixtral"])
    counter = Counter(cfg)
    active = architecture.count_params(cfg, active=True)[2]
    assert counter.active(counter.teacher) == active < counter.params(counter.teacher)[0]
    assert parse_budget("active=50%", counter.teacher, counter) == Budget(active=active // 2)


def test_uneven_moe_layers_are_refused_in_one_line():
    """Qwen2-MoE with a dense layer: its layers differ, so no closed-form count per layer exists."""
    cfg = tiny_config(
        "qwen2_moe",
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        mlp_only_layers=[1],
    )
    with pytest.raises(WhelpError, match="its layers are not uniform") as err:
        Counter(cfg)
    assert "\n" not in str(err.value)


def test_a_search_over_experts_picks_a_winner_that_loads_in_stock_transformers(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from whelp.search.run import search_run
    from whelp.specs import SearchSpec

    monkeypatch.setenv("WHELP_HOME", str(tmp_path / "home"))
    save_tiny(tmp_path / "teacher", tiny_tokenizer(), family="mixtral", **MOE["mixtral"])
    spec = SearchSpec(
        budget="non_embedding=60%",
        axes="layers,mlp,experts",
        tolerance=0.2,
        multiple=8,
        pool=3,
        candidates=2,
        score_steps=2,
        calib_samples=4,
        eval_blocks=2,
        seq_len=16,
        batch_size=2,
        lr=1e-3,
    )
    result = search_run(str(tmp_path / "teacher"), spec, tmp_path / "out", progress=False)
    winner = result["winner"]
    assert {row["shape"]["num_local_experts"] for row in result["pool"]} >= {winner["shape"]["num_local_experts"]}
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "winner", output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    assert moe.shape_of(loaded.config) == winner["shape"]
    assert winner["params"][0] == sum(p.numel() for p in loaded.parameters())
    assert " E" in (tmp_path / "out" / "search.md").read_text()  # the leaderboard names each shape's experts
    done = run_cli(
        "prune",
        str(tmp_path / "teacher"),
        "--target",
        str(tmp_path / "out" / "target.json"),
        "--out",
        str(tmp_path / "pruned"),
        "--calib-samples",
        "4",
        "--seq-len",
        "16",
    )
    assert done.exit_code == 0, done.stderr
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["num_local_experts"] == winner["shape"]["num_local_experts"]
