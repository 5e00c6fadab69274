"""The family table rows beyond the Llama four (whelp/pruning/arch.py): Granite (scalar multipliers), OLMo 2
(q/k norms over the full projection, post-norms), Gemma (sqrt(hidden) embedding scale, (1 + w) norms), Gemma 2
(sandwich norms, soft-caps, query_pre_attn_scalar, sliding-window layers) and Gemma 3 text (+ per-head q/k norms,
a RoPE per layer type) and Phi-3 (fused qkv_proj / gate_up_proj), each pruned on every axis in memory and streaming, planned as pruned, and the README's
families x axes table rendered from the table itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import (
    ALL_AXES,
    AXIS_TARGETS,
    PLAN_TARGETS,
    TOKENS,
    accepted_alike_by_plan_and_prune,
    logits,
    run_cli,
    tiny_model,
    with_keep,
    zeroed_equivalents,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from whelp import architecture, models
from whelp.errors import WhelpError
from whelp.pruning import arch, importance, shards, streaming, surgery
from whelp.pruning.api import prune
from whelp.pruning.keep import rope_exact_dims
from whelp.pruning.targets import parse_target
from whelp.specs import PruneSpec

ROWS = ("granite", "olmo2", "gemma", "gemma2", "gemma3_text", "phi3")
# non-trivial multipliers, soft-caps, attention scalars and a sliding window shorter than the calibration rows,
# so that keeping them (and not rescaling q for head_dim where the scale is a config constant) is tested
_GEMMA2 = dict(attn_logit_softcapping=5.0, final_logit_softcapping=3.0, query_pre_attn_scalar=20, sliding_window=8)
OVERRIDES = {
    "granite": dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=4.0),
    "olmo2": {},
    "gemma": {},
    "gemma2": _GEMMA2,
    "gemma3_text": dict(_GEMMA2, sliding_window_pattern=2),
    "phi3": dict(sliding_window=8),
}
IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))


def teacher(family, **extra):
    return tiny_model(family, **{"num_hidden_layers": 3, **OVERRIDES[family], **extra})


def pruned(model, keep):
    family = arch.family_of(model.config)
    return surgery.prune_model(model, keep, family, surgery.target_config(model.config, keep))


def tensors(model_dir) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(set(shards.weight_map(Path(model_dir)).values())):
        out.update(load_file(path))
    return out


@pytest.mark.parametrize("family", ROWS)
def test_rows_are_in_the_table_and_noop_prune_is_exact(family):
    model = teacher(family)
    assert arch.family_of(model.config).name == family
    scores = importance.calibrate(model, arch.family_of(model.config), IDS, "activation")
    keep = importance.select(scores, model.config, architecture.shape(model.config))
    assert torch.equal(logits(pruned(model, keep), IDS), logits(model, IDS))


@pytest.mark.parametrize("axis", list(AXIS_TARGETS) + ["all"])
@pytest.mark.parametrize("family", ROWS)
def test_each_axis_loads_in_stock_transformers_with_a_config_that_matches_its_tensors(family, axis, tmp_path):
    model = teacher(family)
    target = ALL_AXES if axis == "all" else AXIS_TARGETS[axis]
    small = prune(model, target, TOKENS)
    want = parse_target(model.config, target).shape
    assert architecture.shape(small.config) == want
    models.write_model(small, None, tmp_path / "out")
    loaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", output_loading_info=True, attn_implementation="eager"
    )
    assert {k: v for k, v in info.items() if v} == {}  # no missing, unexpected or mismatched keys, no errors
    assert architecture.shape(loaded.config) == want
    assert torch.equal(logits(loaded.eval(), IDS), logits(small, IDS))
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(loaded.config).state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in tensors(tmp_path / "out").items()}
    if loaded.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    assert stored == expected
    for key in (
        "embedding_multiplier",
        "residual_multiplier",
        "attention_multiplier",
        "logits_scaling",
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "query_pre_attn_scalar",
        "sliding_window",
    ):
        assert getattr(loaded.config, key, None) == getattr(model.config, key, None)  # scalars stay
    if getattr(model.config, "layer_types", None) is not None:  # each kept layer keeps its attention type
        types = [model.config.layer_types[i] for i in small.whelp_kept["layers"]]
        assert loaded.config.layer_types == types and len(set(model.config.layer_types)) == 2
        assert [layer.self_attn.sliding_window for layer in loaded.model.layers] == [
            8 if t == "sliding_attention" else None for t in types
        ]


@pytest.mark.parametrize("family", ROWS)
def test_pruning_equals_zeroing_on_every_exact_axis(family):
    model = teacher(family, attention_bias=True)
    exact = arch.family_of(model.config).exact
    for axis, (keep, zeroed) in zeroed_equivalents(model).items():
        small, reference = logits(pruned(model, keep), IDS), logits(zeroed, IDS)
        if axis in exact:
            torch.testing.assert_close(small, reference, rtol=1e-5, atol=1e-5, msg=f"{family} {axis}")
        else:  # the table says it is not exact (OLMo 2's norms over the projection): keep that claim honest
            assert not torch.allclose(small, reference, rtol=1e-5, atol=1e-5), f"{family} {axis} is exact"


def test_olmo2_q_and_k_norms_follow_the_q_and_kv_rows():
    model = teacher("olmo2")
    keep = with_keep(
        model,
        kv_heads=tuple(torch.tensor([1]) for _ in range(3)),
        q_heads=tuple(torch.tensor([[0]]) for _ in range(3)),
        head_dims=rope_exact_dims(16, 8),
    )
    small = pruned(model, keep)
    rows_q = surgery.q_rows(torch.tensor([1]), torch.tensor([[0]]), 2, keep.head_dims, 16)
    rows_kv = surgery.kv_rows(torch.tensor([1]), keep.head_dims, 16)
    for big, little in zip(model.model.layers, small.model.layers):
        torch.testing.assert_close(
            little.self_attn.q_norm.weight, big.self_attn.q_norm.weight[rows_q] * (8 / 16) ** 0.5
        )
        torch.testing.assert_close(little.self_attn.k_norm.weight, big.self_attn.k_norm.weight[rows_kv])
        torch.testing.assert_close(little.self_attn.q_proj.weight, big.self_attn.q_proj.weight[rows_q])


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3_text"])
def test_gemma_hidden_keeps_the_scaled_embedding_and_tied_logits(family, tied):
    """Gemma multiplies embeddings by sqrt(hidden_size): pruned, the kept rows keep the teacher's residual values,
    and a tied lm_head (the same matrix) is compensated in the final (1 + w) norm."""
    model = teacher(family, tie_word_embeddings=tied)
    hidden = torch.arange(0, 64, 2)
    small = pruned(model, with_keep(model, hidden=hidden))
    assert small.config.hidden_size == 32
    with torch.no_grad():
        torch.testing.assert_close(small.model.embed_tokens(IDS), model.model.embed_tokens(IDS)[..., hidden])
        x = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
        norm = model.model.norm  # the teacher's final norm restricted to the kept channels
        reference = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * (1 + norm.weight[hidden])
        torch.testing.assert_close(small.lm_head(small.model.norm(x)), reference @ model.lm_head.weight[:, hidden].T)
    assert (small.lm_head.weight is small.model.embed_tokens.weight) == tied


def test_composite_configs_stay_off_the_table():
    """A multimodal Gemma 3 keeps its text layers under other names: not routed to the gemma3_text row."""
    from transformers import Gemma3Config

    assert arch.family_of(Gemma3Config()) is None
    assert arch.family_of(Gemma3Config().get_text_config()) is arch.FAMILIES["gemma3_text"]


def test_phi3_fused_projections_are_sliced_as_blocks():
    model = teacher("phi3")
    mlp = tuple(torch.tensor([2, 9, 40, 127]) for _ in range(3))
    kv, q = tuple(torch.tensor([1]) for _ in range(3)), tuple(torch.tensor([[0]]) for _ in range(3))
    dims = rope_exact_dims(16, 8)
    small = pruned(model, with_keep(model, mlp=mlp, kv_heads=kv, q_heads=q, head_dims=dims))
    big, little = model.model.layers[0], small.model.layers[0]
    rows_q = surgery.q_rows(kv[0], q[0], 2, dims, 16)
    rows_kv = surgery.kv_rows(kv[0], dims, 16)
    w = big.self_attn.qkv_proj.weight
    expected = torch.cat([w[rows_q] * (8 / 16) ** 0.5, w[64 + rows_kv], w[64 + 32 + rows_kv]])
    torch.testing.assert_close(little.self_attn.qkv_proj.weight, expected)
    gate_up = big.mlp.gate_up_proj.weight
    torch.testing.assert_close(little.mlp.gate_up_proj.weight, torch.cat([gate_up[mlp[0]], gate_up[128 + mlp[0]]]))
    scores = importance.calibrate(model, arch.family_of(model.config), IDS, "magnitude")
    expected_mlp = (gate_up[:128] ** 2).sum(1) + (gate_up[128:] ** 2).sum(1) + (big.mlp.down_proj.weight**2).sum(0)
    torch.testing.assert_close(scores["mlp.0"], expected_mlp.detach())
    heads = (w[:64] ** 2).sum(1).view(4, 16).sum(1) + (big.self_attn.o_proj.weight**2).sum(0).view(4, 16).sum(1)
    torch.testing.assert_close(scores["heads.0"], heads.detach())


def test_head_dim_is_refused_alike_by_plan_and_prune_without_full_rotary(tmp_path):
    for rope in (
        {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0] * 8,
            "long_factor": [2.0] * 8,
            "original_max_position_embeddings": 64,
        },
    ):
        model = teacher("phi3", rope_parameters=rope)
        with pytest.raises(WhelpError, match="head_dim=8: this teacher"):
            prune(model, "head_dim=8", TOKENS[:2])
        model.save_pretrained(tmp_path / rope["rope_type"])
        # transformers validates Phi-3's longrope factors against hidden_size / num_attention_heads: heads refused too
        for target, ok in (
            ("head_dim=8", False),
            ("intermediate_size=64", True),
            ("num_attention_heads=2", rope["rope_type"] != "longrope"),
        ):
            result = run_cli("plan", str(tmp_path / rope["rope_type"]), "--target", target)
            try:
                prune(model, target, TOKENS[:2])
            except WhelpError as exc:
                assert not ok and result.stderr == f"error: {exc}\n", target
            else:
                assert ok and result.exit_code == 0, target


def test_granite_head_dim_keeps_its_attention_multiplier_and_q_rows():
    model = teacher("granite")
    dims = rope_exact_dims(16, 8)
    small = pruned(model, with_keep(model, head_dims=dims))
    rows = surgery.q_rows(torch.arange(2), torch.arange(2).repeat(2, 1), 2, dims, 16)
    assert small.config.attention_multiplier == 0.3 and small.config.head_dim == 8
    torch.testing.assert_close(
        small.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight[rows]
    )


@pytest.mark.parametrize("method", ["activation", "magnitude"])
@pytest.mark.parametrize("family", ROWS)
def test_streaming_equals_in_memory(family, method, tmp_path):
    model = teacher(family, num_hidden_layers=4)
    model.save_pretrained(tmp_path / "src", max_shard_size="60KB")
    assert len(list((tmp_path / "src").glob("*.safetensors"))) > 3
    src = AutoModelForCausalLM.from_pretrained(tmp_path / "src").eval()
    fam = arch.family_of(src.config)
    target = parse_target(src.config, ALL_AXES)
    scores_mem = importance.calibrate(src, fam, TOKENS, method=method, batch_size=8)
    keep_mem = importance.select(scores_mem, src.config, target.shape, tie="mean")
    models.save_model(
        surgery.prune_model(src, keep_mem, fam, surgery.target_config(src.config, keep_mem)), None, tmp_path / "mem"
    )
    keep, _, scores, _ = streaming.prune_streaming(
        tmp_path / "src",
        tmp_path / "stream",
        target,
        PruneSpec(importance=method, tie="mean", batch_size=8, reconstruct="none"),
        TOKENS,
        shard_bytes=20_000,
    )
    assert scores.keys() == scores_mem.keys()
    assert [k for k in scores if not torch.equal(scores[k], scores_mem[k])] == []
    assert keep.layers == keep_mem.layers
    got, want = tensors(tmp_path / "stream"), tensors(tmp_path / "mem")
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    assert json.loads((tmp_path / "stream" / "config.json").read_text()) == json.loads(
        (tmp_path / "mem" / "config.json").read_text()
    )


@pytest.mark.parametrize("family", ROWS)
def test_cli_prune_streams_to_the_checkpoint_it_writes_in_memory(family, tmp_path, monkeypatch):
    from conftest import save_tiny, tiny_tokenizer

    monkeypatch.setenv("WHELP_HOME", str(tmp_path / "home"))
    save_tiny(tmp_path / "src", tiny_tokenizer(), family, **{"num_hidden_layers": 3, **OVERRIDES[family]})
    reports = {}
    for mode in ("memory", "stream"):
        result = run_cli(
            "prune",
            str(tmp_path / "src"),
            "--target",
            ALL_AXES,
            "--out",
            str(tmp_path / mode),
            "--calib",
            "pydoc:calib",
            "--calib-samples",
            "2",
            "--seq-len",
            "16",
            "--tie",
            "mean",
            *(["--stream"] if mode == "stream" else []),
        )
        assert result.exit_code == 0, result.stderr
        reports[mode] = json.loads((tmp_path / mode / "prune_report.json").read_text())
    assert reports["stream"]["path"] == "streaming" and reports["memory"]["path"] == "in-memory"
    assert reports["stream"]["kept"] == reports["memory"]["kept"]
    got, want = tensors(tmp_path / "stream"), tensors(tmp_path / "memory")
    assert got.keys() == want.keys()
    for k in want:  # the default reconstruction: equal up to the float noise of the two paths' rotary embeddings
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5)
    assert json.loads((tmp_path / "stream" / "config.json").read_text()) == json.loads(
        (tmp_path / "memory" / "config.json").read_text()
    )


@pytest.mark.parametrize("family", ROWS)
def test_plan_accepts_exactly_the_targets_prune_accepts(family, tmp_path):
    accepted = accepted_alike_by_plan_and_prune(teacher(family), tmp_path, PLAN_TARGETS)
    assert accepted == list(AXIS_TARGETS.values()) + [ALL_AXES, "tie_word_embeddings=true"]


def test_readme_families_table_is_the_rendered_family_table():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    begin, end = (
        "<!-- families-table: begin (generated by whelp.pruning.arch.families_table) -->\n",
        "<!-- families-table: end -->",
    )
    assert begin in readme and end in readme, "README.md lacks the families table markers"
    assert readme.split(begin, 1)[1].split(end, 1)[0] == arch.families_table(), (
        "README.md's families table is stale: replace the lines between its markers with the output of "
        "python -c 'from whelp.pruning.arch import families_table; print(families_table(), end=\"\")'"
    )
    for name in arch.FAMILIES:
        assert f"| {name} |" in arch.families_table()
