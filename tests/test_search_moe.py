"""``whelp search`` over an MoE teacher's experts (whelp/pruning/space.py): the closed-form count against stock
transformers' models, enumeration against brute force, refusals, and a whole search on a tiny Mixtral."""

from __future__ import annotations

import itertools
import json

import pytest
from conftest import run_cli, save_tiny, tiny_config, tiny_tokenizer

from whelp.errors import WhelpError
from whelp.pruning import moe, space, targets
from whelp.pruning.space import Budget, Counter

MOE = {"mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32),
       "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)}
AXES = ("layers", "hidden", "mlp", "experts")


def brute_force(cfg, multiple: int) -> dict[tuple, tuple[int, int]]:
    """Every shape of the grid over AXES, sized by building its pruned config's model (moe.count_moe_params)."""
    counter = Counter(cfg)
    teacher, keys = counter.teacher, counter.keys
    values = space.axis_values(teacher, AXES, multiple, keys)
    sizes = {}
    for layers, hidden, mlp, experts in itertools.product(*(values[a] for a in AXES)):
        shape = {**teacher, keys["layers"]: layers, keys["hidden"]: hidden, keys["mlp"]: mlp,
                 keys["experts"]: experts}
        counts = moe.count_moe_params(moe.moe_config(cfg, shape))
        sizes[(layers, hidden, mlp, experts)] = (counts["params"], counts["non_embedding_params"])
    return sizes


@pytest.mark.parametrize("family", MOE)
def test_enumerate_equals_brute_force_over_experts(family):
    cfg = tiny_config(family, **MOE[family])
    counter = Counter(cfg)
    assert counter.keys["experts"] == moe.MOE_FAMILIES[family].experts_key
    assert counter.keys["mlp"] == moe.MOE_FAMILIES[family].ffn_key  # no dense layers: the experts' FFN is mlp
    sizes = brute_force(cfg, 16)
    assert len({k[3] for k in sizes}) == 7  # 2..8 experts: never below num_experts_per_tok
    budget = int(0.6 * counter.params(counter.teacher)[1])
    # largest first, ties by enumerate_shapes' column order (hidden, layers, mlp, ..., experts)
    want = sorted((k for k, v in sizes.items() if 0.8 * budget <= v[1] <= budget),
                  key=lambda k: (-sizes[k][1], k[1], k[0], k[2], k[3]))
    got = space.enumerate_shapes(cfg, Budget(non_embedding=budget), AXES, 0.2, 16, 64)
    keys = counter.keys
    assert [(s[keys["layers"]], s[keys["hidden"]], s[keys["mlp"]], s[keys["experts"]]) for s in got] == want
    assert len({s[keys["experts"]] for s in got}) > 1
    for shape in got:
        assert list(counter.params(shape)) == list(sizes[(shape[keys["layers"]], shape[keys["hidden"]],
                                                           shape[keys["mlp"]], shape[keys["experts"]])])
        spec = ",".join(f"{k}={str(v).lower()}" for k, v in shape.items())
        assert targets.parse_target(cfg, spec).shape == shape


def test_experts_axis_on_a_dense_teacher_is_refused_in_one_line(tmp_path):
    save_tiny(tmp_path / "dense", tiny_tokenizer())
    result = run_cli("search", str(tmp_path / "dense"), "--out", str(tmp_path / "o"), "--budget",
                     "non_embedding=60%", "--axes", "layers,experts", "--dry-run")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "search axis 'experts' needs a mixture-of-experts teacher" in result.stderr


def test_uneven_moe_layers_are_refused_in_one_line():
    """Qwen2-MoE with a dense layer: its layers differ, so no closed-form count per layer exists."""
    cfg = tiny_config("qwen2_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, mlp_only_layers=[1])
    with pytest.raises(WhelpError, match="its layers are not uniform") as err:
        Counter(cfg)
    assert "\n" not in str(err.value)


def test_a_search_over_experts_picks_a_winner_that_loads_in_stock_transformers(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from whelp.pruning.search import search_run
    from whelp.specs import SearchSpec

    monkeypatch.setenv("WHELP_HOME", str(tmp_path / "home"))
    save_tiny(tmp_path / "teacher", tiny_tokenizer(), family="mixtral", **MOE["mixtral"])
    spec = SearchSpec(budget="non_embedding=60%", axes="layers,mlp,experts", tolerance=0.2, multiple=8, pool=3,
                      candidates=2, score_steps=2, calib_samples=4, eval_blocks=2, seq_len=16, batch_size=2, lr=1e-3)
    result = search_run(str(tmp_path / "teacher"), spec, tmp_path / "out", progress=False)
    winner = result["winner"]
    assert {row["shape"]["num_local_experts"] for row in result["pool"]} >= {winner["shape"]["num_local_experts"]}
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "winner", output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    assert moe.shape_of(loaded.config) == winner["shape"]
    assert winner["params"][0] == sum(p.numel() for p in loaded.parameters())
    assert " E" in (tmp_path / "out" / "search.md").read_text()  # the leaderboard names each shape's experts
    done = run_cli("prune", str(tmp_path / "teacher"), "--target", str(tmp_path / "out" / "target.json"), "--out",
                   str(tmp_path / "pruned"), "--calib-samples", "4", "--seq-len", "16")
    assert done.exit_code == 0, done.stderr
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["num_local_experts"] == winner["shape"]["num_local_experts"]
