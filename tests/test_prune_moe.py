"""MoE expert pruning (whelp/pruning/moe.py): stock loading, exactness for never-routed experts, REAP against a naive
reference, top-k validity, and plan's total / active parameter counts."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import MOE, logits, run_cli, save_tiny, tiny_model, tiny_tokenizer, zeroed_equivalents
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from whelp import architecture, models
from whelp.errors import WhelpError
from whelp.pruning import moe
from whelp.pruning import scores as saved
from whelp.pruning.api import prune, prune_checkpoint
from whelp.pruning.keep import identity_keep
from whelp.pruning.surgery import prune_moe_model
from whelp.pruning.targets import moe_config, parse_target
from whelp.specs import PruneSpec

IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
FAMILIES = tuple(MOE)


def experts_key(family):
    return moe.MOE_FAMILIES[family].experts_key


def stored_shapes(path) -> dict:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


@pytest.fixture
def scores_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(saved, "cache_path", lambda meta, real=saved.cache_path: tmp_path / "cache" / real(meta).name)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ffn", [False, True])
def test_pruned_checkpoint_loads_in_stock_transformers_and_config_matches_tensors(family, ffn, tmp_path, scores_cache):
    save_tiny(tmp_path / "teacher", tiny_tokenizer(), family=family, **MOE[family])
    ffn_key = moe.MOE_FAMILIES[family].ffn_key
    target = "num_local_experts=3" + (f",{ffn_key}=16" if ffn else "")
    report = prune_checkpoint(
        str(tmp_path / "teacher"), target, tmp_path / "out", PruneSpec(calib_samples=2, seq_len=16)
    )
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    cfg = loaded.config
    assert getattr(cfg, experts_key(family)) == 3 and cfg.num_experts_per_tok == 2
    assert getattr(cfg, ffn_key) == (16 if ffn else 32)
    # the config describes exactly the stored tensors: a fresh model of it saves the same names and shapes
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "fresh")
    assert stored_shapes(tmp_path / "out") == stored_shapes(tmp_path / "fresh")
    layers = moe.moe_blocks(loaded)
    assert list(map(int, report["kept"]["experts"])) == list(layers)
    assert all(len(v) == 3 for v in report["kept"]["experts"].values())
    assert report["params"]["after"] == sum(p.numel() for p in loaded.parameters())
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher").eval()
    for index, block in layers.items():  # the router's rows follow the kept experts
        kept = torch.tensor(report["kept"]["experts"][str(index)])
        torch.testing.assert_close(block.gate.weight, moe.moe_blocks(teacher)[index].gate.weight[kept])
    assert torch.isfinite(logits(loaded.eval(), IDS)).all()


def router_inputs(model, block, ids: torch.Tensor) -> torch.Tensor:
    """What ``block``'s router sees when ``model`` runs on ``ids``: [tokens, 64]."""
    captured = []
    handle = block.gate.register_forward_pre_hook(lambda m, args: captured.append(args[0].reshape(-1, 64)))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return captured[0]


def kill_experts(model, dead: list[int], ids: torch.Tensor) -> None:
    """Make ``dead`` experts of every MoE layer unreachable on ``ids``: their router rows give logit -1000 for
    every token there (solved layer by layer on the router inputs, fewer tokens than hidden channels)."""
    for block in moe.moe_blocks(model).values():
        x = router_inputs(model, block, ids).double()
        u = torch.linalg.pinv(x) @ torch.ones(len(x), dtype=torch.double)  # x @ u == 1 for every token
        with torch.no_grad():
            block.gate.weight[dead] = (-1000 * u).float()


@pytest.mark.parametrize("family", FAMILIES)
def test_dropping_experts_the_router_never_selects_leaves_logits_unchanged(family):
    model = tiny_model(family, **MOE[family])
    dead = [1, 4, 6]
    kill_experts(model, dead, IDS)
    small = prune(model, "num_local_experts=5", IDS, PruneSpec(calib_samples=2, batch_size=2))
    for index, kept in small.whelp_kept["experts"].items():
        routed = small.whelp_scores[f"experts.{index}.tokens"]
        assert routed[dead].sum() == 0 and set(routed.nonzero().flatten().tolist()) <= set(kept), index
    assert getattr(small.config, experts_key(family)) == 5
    torch.testing.assert_close(logits(small, IDS), logits(model, IDS), rtol=1e-5, atol=1e-5)


def naive_reap(block, x: torch.Tensor, norm_topk: bool, k: int, width: int):
    """Per token, per chosen expert, by hand: REAP sums and routed-token counts [E]."""
    w = block.gate.weight.detach()
    n = w.shape[0]
    reap, count = torch.zeros(n), torch.zeros(n)
    for token in x:
        probs = torch.softmax(w @ token, dim=-1)
        values, chosen = torch.topk(probs, k)
        if norm_topk:
            values = values / values.sum()
        for g, e in zip(values.tolist(), chosen.tolist()):
            gate_up, down = block.experts.gate_up_proj[e].detach(), block.experts.down_proj[e].detach()
            out = down @ (F.silu(gate_up[:width] @ token) * (gate_up[width:] @ token))
            reap[e] += g * out.norm()
            count[e] += 1
    return reap, count


@pytest.mark.parametrize("family", FAMILIES)
def test_reap_saliency_equals_a_naive_per_token_reference(family):
    model = tiny_model(family, **MOE[family])
    blocks = moe.moe_blocks(model)
    inputs = {}
    for index, block in blocks.items():
        block.register_forward_pre_hook(lambda m, args, index=index: inputs.setdefault(index, []).append(args[0]))
    scores = moe.calibrate_experts(model, IDS, "activation", batch_size=1)
    freq = moe.calibrate_experts(model, IDS, "frequency", batch_size=2)
    norm_topk = family == "mixtral" or model.config.norm_topk_prob
    for index, block in blocks.items():
        x = torch.cat([t.reshape(-1, 64) for t in inputs[index][:2]])  # the two batches of the REAP pass
        reap, count = naive_reap(block, x, norm_topk, 2, 32)
        expected = torch.where(count > 0, reap / count.clamp(min=1), torch.zeros(()))
        torch.testing.assert_close(scores[f"experts.{index}"], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(scores[f"experts.{index}.tokens"], count)
        torch.testing.assert_close(freq[f"experts.{index}"], count)
        assert count.sum() == 2 * IDS.numel()


@pytest.mark.parametrize("family", FAMILIES)
def test_fewer_experts_than_top_k_is_refused_in_one_line(family, tmp_path):
    cfg = tiny_model(family, **MOE[family]).config
    with pytest.raises(WhelpError, match="fewer than num_experts_per_tok=2") as err:
        parse_target(cfg, f"{experts_key(family)}=1")
    assert "\n" not in str(err.value)
    assert parse_target(cfg, "num_local_experts=1,num_experts_per_tok=1").shape[experts_key(family)] == 1
    with pytest.raises(WhelpError, match="is a dense Llama shape and this teacher is") as err:
        parse_target(cfg, "llama-3.2-1b")
    assert "\n" not in str(err.value)
    cfg.save_pretrained(tmp_path)
    result = run_cli("plan", str(tmp_path / "config.json"), "--target", "num_local_experts=1")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "num_experts_per_tok=2" in result.stderr


def counted(model) -> tuple[int, int]:
    """Total and active (per token) parameters counted on a real model's tensors."""
    total = sum(p.numel() for p in model.parameters())
    idle = 0
    for block in moe.moe_blocks(model).values():
        per_expert = block.experts.gate_up_proj[0].numel() + block.experts.down_proj[0].numel()
        idle += (block.experts.gate_up_proj.shape[0] - model.config.num_experts_per_tok) * per_expert
    return total, total - idle


@pytest.mark.parametrize("family", FAMILIES)
def test_plan_reports_total_and_active_params_of_the_pruned_checkpoint(family, tmp_path, scores_cache):
    teacher = save_tiny(tmp_path / "teacher", tiny_tokenizer(), family=family, **MOE[family])
    result = run_cli("plan", str(tmp_path / "teacher"), "--target", "num_local_experts=4", "--json")
    assert result.exit_code == 0, result.stderr
    planned = json.loads(result.stdout)
    prune_checkpoint(
        str(tmp_path / "teacher"), "num_local_experts=4", tmp_path / "out", PruneSpec(calib_samples=2, seq_len=16)
    )
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert (planned["source"]["params"], planned["source"]["active_params"]) == counted(teacher)
    assert (planned["target"]["params"], planned["target"]["active_params"]) == counted(student)
    assert planned["target"][experts_key(family)] == 4 and planned["source"][experts_key(family)] == 8
    routers = 4 * 64 * len(moe.moe_blocks(student))  # top-2 either way: only the dropped router rows differ
    assert planned["source"]["active_params"] - planned["target"]["active_params"] == routers


@pytest.mark.parametrize("family", FAMILIES)
def test_shrinking_expert_ffns_equals_zeroing_the_dropped_neurons(family):
    model = tiny_model(family, **MOE[family])
    gen = torch.Generator().manual_seed(1)
    blocks = moe.moe_blocks(model)
    ffn = {i: torch.sort(torch.rand(8, 32, generator=gen).argsort(dim=1)[:, :12], dim=1).values for i in blocks}
    keep = moe.ExpertKeep(experts={i: torch.arange(8) for i in blocks}, ffn=ffn)
    shape = {**moe.moe_shape(model.config), moe.MOE_FAMILIES[family].ffn_key: 12}
    small = prune_moe_model(model, keep, moe_config(model.config, shape))
    zeroed = tiny_model(family, **MOE[family])
    with torch.no_grad():
        for i, block in moe.moe_blocks(zeroed).items():
            for e in range(8):
                dropped = torch.ones(32, dtype=torch.bool)
                dropped[ffn[i][e]] = False
                block.experts.down_proj[e][:, dropped] = 0
    torch.testing.assert_close(logits(small, IDS), logits(zeroed, IDS), rtol=1e-5, atol=1e-5)


def test_a_recipe_plan_prunes_the_experts_of_an_moe_teacher(tmp_path):
    import yaml

    from whelp import recipe

    save_tiny(tmp_path / "teacher", tiny_tokenizer(), family="mixtral", **MOE["mixtral"])
    raw = yaml.safe_load((recipe.RECIPES_DIR / "tiny.yaml").read_text())
    raw["teacher"]["model"] = str(tmp_path / "teacher")
    raw["prune"]["target"] = "num_local_experts=4"
    raw["distill"]["caches"] = []
    raw.pop("eval", None)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    result = run_cli("plan", str(tmp_path / "recipe.yaml"), "--json")
    assert result.exit_code == 0, result.stderr
    planned = json.loads(result.stdout)
    target = moe_config(
        tiny_model("mixtral", **MOE["mixtral"]).config,
        {**moe.moe_shape(tiny_model("mixtral", **MOE["mixtral"]).config), "num_local_experts": 4},
    )
    assert planned["stages"][0]["shape"]["num_local_experts"] == planned["student"]["num_local_experts"] == 4
    assert planned["student"]["params"] == architecture.count_params(target, active=True)[0]
    # FLOPs are priced at the parameters a token runs through: the top-2 of 4 experts, not all of them
    active = architecture.count_params(target, active=True)[2]
    assert planned["student"]["active_params"] == active < planned["student"]["params"]
    distill = next(stage for stage in planned["stages"] if stage["kind"] == "distill")
    assert distill["flops_per_token"]["student_train"] == 6 * active
    teacher_active = architecture.count_params(tiny_model("mixtral", **MOE["mixtral"]).config, active=True)[2]
    assert distill["flops_per_token"]["live_teachers"] == 2 * teacher_active


# --- the dense axes of MoE teachers (the family table rows of arch.py), in memory and streaming -------------------

TOKENS = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(1))


def deep(family, **extra):
    """A 3-layer MoE teacher (Qwen2-MoE: layer 1 dense, ``mlp_only_layers``) with attention biases where the family
    has them."""
    kw = {**MOE[family], "num_hidden_layers": 3, **extra}
    if family != "mixtral":
        kw["attention_bias"] = family == "qwen3_moe" or kw.get("attention_bias", False)
    return tiny_model(family, **kw)


def axis_targets(family) -> dict[str, str]:
    ffn = moe.MOE_FAMILIES[family].ffn_key
    every = (
        f"num_hidden_layers=2,hidden_size=48,num_attention_heads=1,num_key_value_heads=1,head_dim=8,"
        f"num_local_experts=3,num_experts_per_tok=1,{ffn}=16,tie_word_embeddings=true"
    )
    out = {
        "layers": "num_hidden_layers=2",
        "hidden": "hidden_size=48",
        "heads": "num_attention_heads=2",
        "kv_heads": "num_key_value_heads=1,num_attention_heads=2",
        "head_dim": "head_dim=8",
        "experts": "num_local_experts=3",
        "top_k": "num_experts_per_tok=1",
        "expert_ffn": f"{ffn}=16",
        "every": every,
    }
    if family == "qwen2_moe":  # its dense layer's MLP
        out["mlp"] = "intermediate_size=96"
        out["every"] += ",intermediate_size=96"
    return out


@pytest.mark.parametrize("family,axis", [(f, axis) for f in FAMILIES for axis in axis_targets(f)])
def test_every_axis_loads_in_stock_transformers_with_a_config_that_matches_its_tensors(family, axis, tmp_path):
    targets = axis_targets(family)
    teacher = deep(family)
    small = prune(teacher, targets[axis], TOKENS)
    want = parse_target(teacher.config, targets[axis]).shape
    assert moe.shape_of(small.config) == want
    small.save_pretrained(tmp_path / "out")
    loaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", output_loading_info=True, attn_implementation="eager"
    )
    assert {k: v for k, v in info.items() if v} == {}
    assert moe.shape_of(loaded.config) == want
    assert torch.equal(logits(loaded.eval(), IDS), logits(small, IDS))
    AutoModelForCausalLM.from_config(loaded.config).save_pretrained(tmp_path / "fresh")
    assert stored_shapes(tmp_path / "out") == stored_shapes(tmp_path / "fresh")  # config == tensors, on disk
    if family == "qwen2_moe":  # the dense layer stays dense where it is kept
        dense = [small.whelp_kept["layers"].index(1)] if 1 in small.whelp_kept["layers"] else []
        assert [i for i, layer in enumerate(loaded.model.layers) if not hasattr(layer.mlp, "experts")] == dense


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_equals_zeroing_on_every_exact_axis(family):
    from whelp.pruning import arch, surgery

    model = deep(family)
    row = arch.family_of(model.config)
    cases = zeroed_equivalents(model)  # layers, heads, KV heads, head_dim and Qwen2-MoE's dense MLP (layer 1)
    assert ("intermediate_size" in cases) == (family == "qwen2_moe")
    for axis, (keep, zeroed) in cases.items():
        small = surgery.prune_model(model, keep, row, surgery.target_config(model.config, keep))
        small_logits, reference = logits(small, IDS), logits(zeroed, IDS)
        if axis in row.exact:
            torch.testing.assert_close(small_logits, reference, rtol=1e-5, atol=1e-5, msg=f"{family} {axis}")
        else:  # Qwen3-MoE's per-head q/k norms: head_dim is not exact, and the table says so
            assert not torch.allclose(small_logits, reference, rtol=1e-5, atol=1e-5), f"{family} {axis} is exact"


def test_dense_layers_follow_the_kept_layers_whatever_the_sparse_step():
    """Qwen2-MoE with decoder_sparse_step 2 (layers 1, 3 sparse) and layer 3 in mlp_only_layers: dropping layer 0
    keeps the function of the other three exactly, their dense / sparse kinds said by mlp_only_layers alone."""
    from dataclasses import replace

    from whelp.pruning import arch, surgery

    model = tiny_model(
        "qwen2_moe", **{**MOE["qwen2_moe"], "num_hidden_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    )
    assert [hasattr(layer.mlp, "experts") for layer in model.model.layers] == [False, True, False, False]
    ident = identity_keep(model.config)
    keep = replace(ident, layers=(1, 2, 3), mlp=ident.mlp[1:], kv_heads=ident.kv_heads[1:], q_heads=ident.q_heads[1:])
    cfg = surgery.target_config(model.config, keep)
    assert (cfg.mlp_only_layers, cfg.decoder_sparse_step) == ([1, 2], 1)
    small = surgery.prune_model(model, keep, arch.family_of(model.config), cfg)
    assert [hasattr(layer.mlp, "experts") for layer in small.model.layers] == [True, False, False]
    model.model.layers[0].register_forward_hook(lambda m, args, kwargs, o: args[0], with_kwargs=True)
    torch.testing.assert_close(logits(small, IDS), logits(model, IDS), rtol=1e-5, atol=1e-5)


def tensors(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from whelp.pruning import shards

    out = {}
    for path in sorted(set(shards.weight_map(model_dir).values())):
        out.update(load_file(path))
    return out


@pytest.mark.parametrize("method", ["activation", "magnitude"])
@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_equals_in_memory(family, method, tmp_path):
    """Every axis at once, from a checkpoint whose per-expert tensors spread over many shards."""
    from whelp.pruning import arch, importance, streaming, surgery

    deep(family).save_pretrained(tmp_path / "src", max_shard_size="40KB")
    assert len(list((tmp_path / "src").glob("*.safetensors"))) > 5
    src = AutoModelForCausalLM.from_pretrained(tmp_path / "src").eval()
    row = arch.family_of(src.config)
    target = parse_target(src.config, axis_targets(family)["every"])
    scores_mem = importance.calibrate(src, row, TOKENS, method=method, batch_size=8)
    keep_mem = importance.select(scores_mem, src.config, target.shape, tie="mean")
    models.save_model(
        surgery.prune_model(src, keep_mem, row, surgery.target_config(src.config, keep_mem)), None, tmp_path / "mem"
    )
    keep, _, scores, _ = streaming.prune_streaming(
        tmp_path / "src",
        tmp_path / "stream",
        target,
        PruneSpec(importance=method, tie="mean", batch_size=8, reconstruct="none"),  # the slicing alone
        TOKENS,
        shard_bytes=20_000,
    )
    assert scores.keys() == scores_mem.keys() and any(k.startswith("experts.") for k in scores)
    assert [k for k in scores if not torch.equal(scores[k], scores_mem[k])] == []
    assert keep.layers == keep_mem.layers and keep.experts.experts.keys() == keep_mem.experts.experts.keys()
    got, want = tensors(tmp_path / "stream"), tensors(tmp_path / "mem")
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    assert json.loads((tmp_path / "stream" / "config.json").read_text()) == json.loads(
        (tmp_path / "mem" / "config.json").read_text()
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_prune_streams_to_the_checkpoint_it_writes_in_memory(family, tmp_path, monkeypatch):
    monkeypatch.setenv("WHELP_HOME", str(tmp_path / "home"))
    kw = {**MOE[family], "num_hidden_layers": 3}
    save_tiny(tmp_path / "src", tiny_tokenizer(), family=family, **kw)
    reports = {}
    for mode in ("memory", "stream"):
        result = run_cli(
            "prune",
            str(tmp_path / "src"),
            "--target",
            axis_targets(family)["every"],
            "--out",
            str(tmp_path / mode),
            "--calib",
            "pydoc:calib",
            "--calib-samples",
            "2",
            "--seq-len",
            "16",
            *(["--stream"] if mode == "stream" else []),
        )
        assert result.exit_code == 0, result.stderr
        reports[mode] = json.loads((tmp_path / mode / "prune_report.json").read_text())
    assert reports["stream"]["path"] == "streaming" and reports["memory"]["path"] == "in-memory"
    assert reports["stream"]["kept"] == reports["memory"]["kept"] and reports["memory"]["kept"]["experts"]
    got, want = tensors(tmp_path / "stream"), tensors(tmp_path / "memory")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert reports["memory"]["shape"]["target"][experts_key(family)] == 3


def test_taylor_importance_is_refused_before_any_pass(tmp_path, monkeypatch):
    model = tiny_model("mixtral", **MOE["mixtral"])
    monkeypatch.setattr(type(model), "forward", lambda *a, **k: pytest.fail("calibrated before refusing"))
    with pytest.raises(
        WhelpError,
        match=r"mixtral \(MoE\) experts are scored by --importance activation \(REAP\), "
        "magnitude or random, not taylor",
    ):
        prune(model, "num_local_experts=4", IDS, PruneSpec(importance="taylor"))
    monkeypatch.undo()
    save_tiny(tmp_path / "teacher", tiny_tokenizer(), family="mixtral", **MOE["mixtral"])
    result = run_cli(
        "prune",
        str(tmp_path / "teacher"),
        "--target",
        "num_local_experts=4",
        "--out",
        str(tmp_path / "out"),
        "--importance",
        "taylor",
    )
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "not taylor" in result.stderr
