"""Surgery and importance against exact references; prune_checkpoint round trips; the demo teacher."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import logits, run_cli, save_tiny, tiny_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from whelp import architecture, data, models
from whelp.errors import WhelpError
from whelp.pruning import arch, importance, surgery
from whelp.pruning import scores as saved
from whelp.pruning.api import prune_checkpoint
from whelp.pruning.keep import Keep, head_dim_of, identity_keep, rope_exact_dims
from whelp.specs import PruneSpec

FAMILIES = tuple(f for f, row in arch.FAMILIES.items() if not row.experts_key)  # MoE rows: test_prune_moe.py
IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 10000.0,
}


def pruned(model, keep, rope=None):
    family = arch.family_of(model.config)
    return surgery.prune_model(model, keep, family, surgery.target_config(model.config, keep, rope))


def with_keep(model, **axes):
    return Keep(**{**identity_keep(model.config).__dict__, **axes})


def complement(n, kept):
    mask = torch.ones(n, dtype=torch.bool)
    mask[kept] = False
    return mask.nonzero().flatten()


@pytest.mark.parametrize("family", FAMILIES)
def test_noop_prune_reproduces_logits_exactly(family):
    model = tiny_model(family)
    scores = importance.calibrate(model, arch.family_of(model.config), IDS, "activation")
    keep = importance.select(scores, model.config, architecture.shape(model.config))
    assert torch.equal(logits(pruned(model, keep), IDS), logits(model, IDS))


@pytest.mark.parametrize(
    "family",
    [
        f
        for f in FAMILIES  # OLMo 2: heads are not exact (tests/test_prune_families.py)
        if {"num_attention_heads", "num_key_value_heads"} <= arch.FAMILIES[f].exact
    ],
)
def test_pruning_heads_groups_and_neurons_equals_zeroing_them(family):
    model = tiny_model(family, hidden_size=96, num_attention_heads=6, num_key_value_heads=3, intermediate_size=96)
    d = head_dim_of(model.config)
    kv_heads = (torch.tensor([0, 2]), torch.tensor([1, 2]))  # drop one KV group (with its 2 query heads)
    q_heads = (torch.tensor([[1], [0]]), torch.tensor([[0], [1]]))  # one query head per kept group
    mlp = (torch.tensor([3, 7, 50, 90]), torch.arange(0, 96, 24))
    small = pruned(model, with_keep(model, kv_heads=kv_heads, q_heads=q_heads, mlp=mlp))
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(zeroed.model.layers):
            kept_cols = surgery.q_rows(kv_heads[i], q_heads[i], 2, torch.arange(d), d)
            layer.self_attn.o_proj.weight[:, complement(6 * d, kept_cols)] = 0
            layer.mlp.down_proj.weight[:, complement(96, mlp[i])] = 0
    assert small.config.num_attention_heads == 2 and small.config.num_key_value_heads == 2
    torch.testing.assert_close(logits(small, IDS), logits(zeroed, IDS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,rope", [("llama", None), ("llama", LLAMA3_ROPE), ("mistral", None), ("qwen2", None)])
def test_rope_exact_head_dim_equals_attention_restricted_to_kept_dims(family, rope):
    overrides = {"rope_parameters": rope} if rope else {}
    model = tiny_model(family, **overrides)
    d, kept = 16, rope_exact_dims(16, 4)  # s = 4: pairs 0, 4 -> frequencies of pairs 0, 1 of d' = 4
    restricted = copy.deepcopy(model)
    with torch.no_grad():
        for layer in restricted.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                dropped = complement(d, kept) + torch.arange(0, proj.out_features, d)[:, None]
                proj.weight[dropped.flatten()] = 0
                if proj.bias is not None:
                    proj.bias[dropped.flatten()] = 0
    small = pruned(model, with_keep(model, head_dims=kept))
    assert small.config.head_dim == 4
    torch.testing.assert_close(logits(small, IDS), logits(restricted, IDS), rtol=1e-5, atol=1e-5)


def test_qwen3_head_dim_scale_goes_into_q_norm():
    model = tiny_model("qwen3")
    small = pruned(model, with_keep(model, head_dims=rope_exact_dims(16, 8)))
    for big, little in zip(model.model.layers, small.model.layers):
        expected = big.self_attn.q_norm.weight[rope_exact_dims(16, 8)] * math.sqrt(8 / 16)
        torch.testing.assert_close(little.self_attn.q_norm.weight, expected)
        torch.testing.assert_close(
            little.self_attn.q_proj.weight,
            big.self_attn.q_proj.weight[
                surgery.q_rows(torch.arange(2), torch.arange(2).repeat(2, 1), 2, rope_exact_dims(16, 8), 16)
            ],
        )


def test_dropping_a_layer_equals_skipping_it_and_matches_skip_loss():
    model = tiny_model("llama", num_hidden_layers=3)
    skipped = copy.deepcopy(model)
    skipped.model.layers[1].register_forward_hook(lambda m, args, kwargs, out: args[0], with_kwargs=True)
    small = pruned(
        model,
        with_keep(
            model,
            layers=(0, 2),
            mlp=identity_keep(model.config).mlp[:2],
            kv_heads=identity_keep(model.config).kv_heads[:2],
            q_heads=identity_keep(model.config).q_heads[:2],
        ),
    )
    torch.testing.assert_close(logits(small, IDS), logits(skipped, IDS), rtol=1e-5, atol=1e-5)
    losses = importance.skip_losses(model, IDS, batch_size=2)
    with torch.no_grad():
        base = model(input_ids=IDS, labels=IDS).loss
        expected = small(input_ids=IDS, labels=IDS).loss - base
    torch.testing.assert_close(losses[1], expected, rtol=1e-4, atol=1e-5)


def test_activation_scores_match_naive_minitron_aggregation():
    model = tiny_model("llama")
    captured = {}
    layer = model.model.layers[0]
    layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: captured.setdefault("mlp", args[0]))
    layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args: captured.setdefault("o", args[0]))
    scores = importance.calibrate(model, arch.family_of(model.config), IDS, "activation", batch_size=2)
    naive_mlp = torch.stack([captured["mlp"][b].abs().mean(0) for b in range(2)]).pow(2).sum(0)
    o_weight = layer.self_attn.o_proj.weight.detach()  # [H, heads * head_dim]
    heads = torch.stack(
        [captured["o"][..., h * 16 : (h + 1) * 16] @ o_weight[:, h * 16 : (h + 1) * 16].T for h in range(4)], dim=2
    ).norm(dim=-1)  # each head's share of o_proj's output [B, T, heads]
    torch.testing.assert_close(scores["mlp.0"], naive_mlp)
    torch.testing.assert_close(scores["heads.0"], heads.mean(1).pow(2).sum(0))
    assert scores["layers.block"].shape == (2,) and bool((scores["layers.block"] > 0).all())


def test_magnitude_scores_sum_every_weight_of_a_structure():
    model = tiny_model("llama")
    scores = importance.calibrate(model, arch.family_of(model.config), IDS, "magnitude")
    mlp = model.model.layers[1].mlp
    expected = (mlp.gate_proj.weight**2).sum(1) + (mlp.up_proj.weight**2).sum(1) + (mlp.down_proj.weight**2).sum(0)
    torch.testing.assert_close(scores["mlp.1"], expected.detach())
    attn = model.model.layers[0].self_attn
    q = (attn.q_proj.weight**2).sum(1).view(4, 16).sum(1) + (attn.o_proj.weight**2).sum(0).view(4, 16).sum(1)
    torch.testing.assert_close(scores["heads.0"], q.detach())


def test_taylor_scores_are_weight_times_gradient():
    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    reference(input_ids=IDS, labels=IDS).loss.backward()
    down = reference.model.layers[0].mlp.down_proj.weight
    gate, up = reference.model.layers[0].mlp.gate_proj.weight, reference.model.layers[0].mlp.up_proj.weight
    expected = sum((w * w.grad).abs().sum(dim) for w, dim in ((gate, 1), (up, 1), (down, 0)))
    scores = importance.calibrate(model, arch.family_of(model.config), IDS, "taylor", batch_size=2)
    torch.testing.assert_close(scores["mlp.0"], expected.detach(), rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())


def test_select_keeps_top_scores_per_group_with_equal_counts():
    model = tiny_model("llama", hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    scores = {
        "hidden": torch.arange(96.0),
        "layers.block": torch.tensor([0.5, 0.1]),
        "mlp.0": -torch.arange(128.0),
        "heads.0": torch.tensor([1.0, 2.0, 9.0, 0.0, 5.0, 4.0]),
    }
    shape = {
        **architecture.shape(model.config),
        "num_hidden_layers": 1,
        "hidden_size": 3,
        "intermediate_size": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
    }
    keep = importance.select(scores, model.config, shape)
    assert keep.layers == (0,) and keep.hidden.tolist() == [93, 94, 95] and keep.mlp[0].tolist() == [0, 1]
    assert keep.kv_heads[0].tolist() == [1, 2] and keep.q_heads[0].tolist() == [[0], [0]]


ALL_AXES = (
    "hidden_size=48,num_hidden_layers=1,intermediate_size=64,num_attention_heads=2,num_key_value_heads=1,"
    "head_dim=8,tie_word_embeddings=true"
)


@pytest.mark.demo
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_loads_in_stock_transformers_with_identical_logits(family, tmp_path, demo_tokenizer, monkeypatch):
    monkeypatch.setattr(saved, "cache_path", lambda meta, real=saved.cache_path: tmp_path / "cache" / real(meta).name)
    teacher = save_tiny(tmp_path / "teacher", demo_tokenizer, family=family)
    spec = PruneSpec(
        calib_samples=2, seq_len=16, tie="mean", reconstruct="none"
    )  # exact slicing; refits: test_reconstruct
    report = prune_checkpoint(str(tmp_path / "teacher"), ALL_AXES, tmp_path / "out", spec)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    kept = report["kept"]
    keep = Keep(
        layers=tuple(kept["layers"]),
        hidden=torch.tensor(kept["hidden"]),
        mlp=tuple(map(torch.tensor, kept["mlp"])),
        kv_heads=tuple(map(torch.tensor, kept["kv_heads"])),
        q_heads=tuple(map(torch.tensor, kept["q_heads"])),
        head_dims=torch.tensor(kept["head_dims"]),
        tie="mean",
    )
    in_memory = pruned(teacher, keep)
    assert torch.equal(logits(loaded, IDS), logits(in_memory, IDS))
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(loaded.config).state_dict().items()}
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert stored == {k: v for k, v in expected.items() if k != "lm_head.weight"}
    embed, head = teacher.model.embed_tokens.weight, teacher.lm_head.weight
    scale = math.sqrt(64 / 48) if arch.FAMILIES[family].embed_multiplier == arch.SQRT_HIDDEN else 1.0  # surgery.py
    torch.testing.assert_close(loaded.lm_head.weight, ((embed + head) / 2)[:, keep.hidden] * scale)
    assert report["params"]["after"] == architecture.count_params(loaded.config)[0]
    assert set(report["tie"]["kl"]) == {"embedding", "lm_head", "mean"}
    assert all(math.isfinite(v) and v >= 0 for v in report["tie"]["kl"].values())
    assert json.loads((tmp_path / "out" / "prune_report.json").read_text())["kept"] == kept


@pytest.mark.demo
def test_second_prune_reuses_scores_and_mismatched_scores_are_refused(tmp_path, demo_tokenizer, monkeypatch):
    monkeypatch.setattr(saved, "cache_path", lambda meta, real=saved.cache_path: tmp_path / "cache" / real(meta).name)
    save_tiny(tmp_path / "teacher", demo_tokenizer, family="llama")
    spec = PruneSpec(calib_samples=2, seq_len=16)
    first = prune_checkpoint(str(tmp_path / "teacher"), "intermediate_size=64", tmp_path / "a", spec)
    assert not first["scores_reused"]
    # the scores are beside the model, not among the files a loader that globs *.safetensors reads as weights
    assert [p.name for p in (tmp_path / "a").glob("*.safetensors")] == ["model.safetensors"]
    assert (tmp_path / "a" / "scores" / "importance.safetensors").is_file()

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated again")

    monkeypatch.setattr(importance, "calibrate", no_calibration)
    second = prune_checkpoint(str(tmp_path / "teacher"), "num_hidden_layers=1", tmp_path / "b", spec)
    assert second["scores_reused"] and second["calibration"]["fingerprint"] == first["calibration"]["fingerprint"]
    other = PruneSpec(calib_samples=1, seq_len=16, scores=str(tmp_path / "a" / saved.SCORES_FILE))
    with pytest.raises(WhelpError, match="was computed with fingerprint="):
        prune_checkpoint(str(tmp_path / "teacher"), "num_hidden_layers=1", tmp_path / "c", other)
    save_tiny(tmp_path / "other", demo_tokenizer, family="llama", seed=5)
    foreign = PruneSpec(calib_samples=2, seq_len=16, scores=str(tmp_path / "a" / saved.SCORES_FILE))
    cached = sorted((tmp_path / "cache").iterdir())
    with pytest.raises(WhelpError, match="computed with another teacher"):
        prune_checkpoint(str(tmp_path / "other"), "num_hidden_layers=1", tmp_path / "d", foreign)
    assert sorted((tmp_path / "cache").iterdir()) == cached  # the shared cache holds no foreign scores
    with pytest.raises(WhelpError, match="already holds a whelp model; pass --force"):
        prune_checkpoint(str(tmp_path / "teacher"), "num_hidden_layers=1", tmp_path / "b", spec)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(WhelpError, match="not made by whelp"):  # before any calibration or loading
        prune_checkpoint(str(tmp_path / "teacher"), "num_hidden_layers=1", tmp_path / "mine", spec, force=True)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


@pytest.mark.demo
def test_cli_prune_writes_checkpoint_and_report(tmp_path, demo_tokenizer, monkeypatch):
    monkeypatch.setattr(saved, "cache_path", lambda meta, real=saved.cache_path: tmp_path / "cache" / real(meta).name)
    save_tiny(tmp_path / "teacher", demo_tokenizer, family="qwen2")
    result = run_cli(
        *[
            "prune",
            str(tmp_path / "teacher"),
            "--target",
            "num_attention_heads=2",
            "--out",
            str(tmp_path / "out"),
            "--importance",
            "random",
            "--layer-importance",
            "loss",
            "--calib-samples",
            "2",
            "--seq-len",
            "16",
        ]
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    assert report["importance"] == "random" and report["layer_importance"] == "loss"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_attention_heads == 2


@pytest.mark.demo
@pytest.mark.slow
def test_demo_teacher_pruned_to_preset_keeps_finite_perplexity(demo_dir, demo_tokenizer, tmp_path, monkeypatch):
    from whelp.evals.perplexity import perplexity

    monkeypatch.setattr(saved, "cache_path", lambda meta, real=saved.cache_path: tmp_path / "cache" / real(meta).name)
    spec = PruneSpec(calib_samples=4, seq_len=128)
    report = prune_checkpoint(str(demo_dir), "smollm2-half", tmp_path / "half", spec)
    assert report["shape"]["target"]["num_hidden_layers"] == 24 and report["path"] == "in-memory"
    student, _ = models.load_model(str(tmp_path / "half"))
    ids = data.token_stream(data.read_documents("pydoc:eval"), demo_tokenizer, max_tokens=1024)
    ppl = perplexity(student, ids, seq_len=256).ppl
    with torch.no_grad():  # stock transformers: the mean label loss of each 256-token window (255 predictions each)
        stock = [
            float(student(input_ids=w[None], labels=w[None]).loss) for w in ids[: len(ids) // 256 * 256].split(256)
        ]
    assert ppl == pytest.approx(math.exp(sum(stock) / len(stock)), rel=1e-3)  # fp32, batched vs one by one
    teacher_ppl = perplexity(models.load_model(str(demo_dir))[0], ids, seq_len=256).ppl
    # finite, worse than the teacher it lost half its weights from, better than a uniform guess over the vocabulary
    assert math.isfinite(ppl) and teacher_ppl < ppl < student.config.vocab_size
