"""Every family whelp loads, through distillation and evaluation: the fused loss sees the model's own logits (its
backbone's final hidden states, its lm_head and its family's logit transform: Granite's logits_scaling, Cohere's
logit_scale, Gemma 2/3's final soft-capping), FSDP2 finds its decoder layers, and no verb ends in a traceback."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import PLAN_TARGETS, accepted_alike_by_plan_and_prune, run_cli, tiny_config, tiny_tokenizer

from whelp.distillation import inprocess, losses, parallel, state
from whelp.distillation.losses import LossSpec, head_logits, model_transform
from whelp.errors import WhelpError
from whelp.specs import DistillSpec

# family -> tiny_config overrides; None: a family whose config spells the shape otherwise (own_config below).
# Transforms are set large enough to move the logits well beyond 1e-5 (the test checks it does).
FAMILIES = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    "gemma2": {"final_logit_softcapping": 0.1},
    "gemma3_text": {"final_logit_softcapping": 0.1},
    "granite": {"logits_scaling": 0.25},
    "cohere": {"logit_scale": 4.0},
    "olmo2": {},
    "phi3": {"pad_token_id": 0},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48,
        "mlp_only_layers": [1],
    },
    "gpt2": None,
    "gpt_neox": None,
}
TRANSFORMED = ("gemma2", "gemma3_text", "granite", "cohere")
LAYERS = {"llama": "model.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers", "qwen3_moe": "model.layers"}


def config(family: str, **extra):
    from transformers import AutoConfig

    if family == "gpt2":  # n_embd, n_layer, n_head, n_inner: no KV heads, no head_dim
        return AutoConfig.for_model(
            "gpt2",
            **{
                **dict(
                    n_embd=64,
                    n_layer=2,
                    n_head=4,
                    n_inner=128,
                    n_positions=256,
                    vocab_size=512,
                    tie_word_embeddings=False,
                ),
                **extra,
            },
        )
    if family == "gpt_neox":
        return AutoConfig.for_model(
            "gpt_neox",
            **{
                **dict(
                    hidden_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    intermediate_size=128,
                    max_position_embeddings=256,
                    vocab_size=512,
                    tie_word_embeddings=False,
                ),
                **extra,
            },
        )
    return tiny_config(family, **FAMILIES[family], **extra)


def model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config(family)).eval()


def ids(seed: int = 0, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(seed))


def fused_view(lm, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [B * L, V] exactly as the fused loss makes them: the backbone's hidden states, lm_head, transform."""
    hidden = losses.backbone(lm)(input_ids=tokens).last_hidden_state.flatten(0, 1)
    return head_logits(hidden, lm.get_output_embeddings().weight, model_transform(lm))


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_logits_and_their_gradient_equal_the_models(family):
    lm, tokens = model(family), ids()
    ref = lm(input_ids=tokens).logits.flatten(0, 1)
    mine = fused_view(lm, tokens)
    assert (mine - ref).abs().max() <= 1e-5
    raw = losses.backbone(lm)(input_ids=tokens).last_hidden_state.flatten(0, 1) @ lm.get_output_embeddings().weight.T
    assert ((raw - ref).abs().max() > 1e-3) == (family in TRANSFORMED)  # the transform matters where it exists
    probe = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for logits in (lambda: lm(input_ids=tokens).logits.flatten(0, 1), lambda: fused_view(lm, tokens)):
        lm.zero_grad()
        (logits() * probe).sum().backward()
        grads.append({n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def naive_loss(s_logits, t_logits, labels, mask, spec: LossSpec):
    """The fp32 reference on the models' own logits: (1 - ce) * divergence + ce * CE, summed over the mask."""
    s = torch.log_softmax(s_logits[mask] / spec.temperature, -1)
    t = torch.log_softmax(t_logits[mask] / spec.temperature, -1)
    kl = {"forward_kl": (t.exp() * (t - s)).sum(), "reverse_kl": (s.exp() * (s - t)).sum()}[spec.name]
    ce = torch.nn.functional.cross_entropy(s_logits[mask], labels[mask], reduction="sum")
    return (1 - spec.ce_weight) * kl + spec.ce_weight * ce


SPECS = [LossSpec(chunk_size=7), LossSpec(name="reverse_kl", temperature=2.0, ce_weight=0.25, chunk_size=7)]


@pytest.mark.parametrize("spec", SPECS, ids=["forward_kl", "reverse_kl-T2-ce"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_loss_and_gradient_equal_a_naive_kl_on_the_models_logits(family, spec):
    student, teacher, tokens = model(family, 0), model(family, 1).requires_grad_(False), ids(2)
    labels = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -100)], 1).flatten()
    mask = labels != -100
    with torch.no_grad():
        t_logits = teacher(input_ids=tokens).logits.flatten(0, 1).float()
        target = state.live_target(teacher, tokens)
    ref = naive_loss(student(input_ids=tokens).logits.flatten(0, 1), t_logits, labels, mask, spec)
    student.zero_grad()
    ref.backward()
    want = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    loss, _, _, _ = parallel.KDStudent(student)(
        tokens, kd=dict(targets=[target], weights=(1.0,), spec=spec, labels=labels, mask=mask)
    )
    loss.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    for name, grad in want.items():
        torch.testing.assert_close(dict(student.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", list(LAYERS))
def test_fsdp_finds_the_decoder_layers_of_every_layout(family):
    lm = model(family)
    found = parallel.decoder_layers(lm)
    expected = lm
    for part in LAYERS[family].split("."):
        expected = getattr(expected, part)
    assert found is expected and len(found) == 2


def test_fsdp_refuses_a_backbone_without_one_list_of_layers_in_one_line():
    lm = model("llama")
    lm.model.layers = torch.nn.Sequential(*lm.model.layers)  # no ModuleList of num_hidden_layers modules
    with pytest.raises(WhelpError, match="LlamaForCausalLM \\(llama\\): found 0 list of its 2 decoder layers") as err:
        parallel.decoder_layers(lm, "student")
    assert "\n" not in str(err.value) and "run on one process" in str(err.value)


def test_a_head_with_a_bias_is_refused_in_one_line():
    lm = model("llama")
    lm.lm_head.bias = torch.nn.Parameter(torch.zeros(512))
    with pytest.raises(WhelpError, match="lm_head bias") as err:
        state.check_head(lm, ids(shape=(1, 8)), "student")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("family", ["llama", "gemma2", "granite", "gpt2", "gpt_neox", "qwen3_moe"])
def test_in_memory_distill_with_a_live_teacher_and_a_cache(family, tmp_path):
    from whelp.data import TensorBlocks
    from whelp.distillation.cache import open_cache
    from whelp.distillation.capture import Teacher, write_cache
    from whelp.specs import CacheSpec

    data = TensorBlocks(ids(3, (8, 16)))
    teacher = model(family, 1)
    cache = open_cache(
        write_cache(Teacher(teacher, tiny_tokenizer(), "t"), data, tmp_path / "c", CacheSpec("topk", 8, 1.0))
    )
    spec = DistillSpec(steps=2, batch_size=2, seq_len=16, lr=1e-3, eval_tokens=64)
    student = inprocess.distill(model(family, 0), [(teacher, 0.5), (cache, 0.5)], data, spec, progress=False)
    assert [row["step"] for row in student.whelp_distill["log"]] == [1, 2]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in student.whelp_distill["log"])
    if family == "gemma2":  # on-policy: the student samples from its soft-capped distribution
        on = DistillSpec(steps=1, batch_size=2, seq_len=16, on_policy=1.0, gen_tokens=4)
        assert torch.isfinite(
            torch.tensor(
                inprocess.distill(student, [teacher], data, on, progress=False).whelp_distill["log"][0]["loss"]
            )
        )


# --- every verb through the CLI: exit 0 or one `error:` line, never a traceback ----------------------------------

TARGETS = {"qwen3_moe": "moe_intermediate_size=16", "qwen2_moe": "num_experts=2,hidden_size=48"}
SMALL = ("--seq-len", "16", "--batch-size", "4", "--eval-tokens", "64")


def verbs(src, out) -> dict[str, tuple[str, ...]]:
    target = TARGETS.get(src.name, "intermediate_size=64")
    return {
        "plan": ("plan", str(src), "--target", target),
        "prune": (
            "prune",
            str(src),
            "--target",
            target,
            "--out",
            str(out / "pruned"),
            "--calib-samples",
            "2",
            "--seq-len",
            "16",
        ),
        "cache-logits": (
            "cache-logits",
            str(src),
            "--data",
            "pydoc:train",
            "--out",
            str(out / "cache"),
            "--topk",
            "4",
            "--max-tokens",
            "128",
            *SMALL[:4],
        ),
        "distill": ("distill", str(src), "--teacher", str(src), "--out", str(out / "live"), "--steps", "2", *SMALL),
        "distill-cache": (
            "distill",
            str(src),
            "--cache",
            str(out / "cache"),
            "--out",
            str(out / "cached"),
            "--max-tokens",
            "128",
            *SMALL,
        ),
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every family as a tiny checkpoint over the tiny tokenizer: {family: directory}."""
    from transformers import AutoModelForCausalLM

    from whelp.models import save_model

    root, out = tmp_path_factory.mktemp("families"), {}
    for family in FAMILIES:
        torch.manual_seed(0)
        out[family] = save_model(
            AutoModelForCausalLM.from_config(config(family, vocab_size=len(tiny_tokenizer()))),
            tiny_tokenizer(),
            root / family,
        )
    return out


def one_line_or_done(done, names) -> None:
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert done.exit_code == 0 or (
        done.exit_code == 2
        and len(lines) == 1
        and lines[0].startswith("error: ")
        and any(n in lines[0].lower() for n in names)
    ), (done.exit_code, done.stderr)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_verb_works_or_refuses_in_one_line(family, saved, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("WHELP_HOME", str(tmp_path / "home"))
    names = (family, type(AutoModelForCausalLM.from_config(config(family))).__name__[: -len("ForCausalLM")].lower())
    results = {}
    for verb, args in verbs(saved[family], tmp_path / "out").items():
        done = run_cli(*args)
        one_line_or_done(done, names)
        results[verb] = done.exit_code
    # distillation works for every family, from a live teacher and from a cache alike
    assert {v: results[v] for v in ("cache-logits", "distill", "distill-cache")} == dict.fromkeys(
        ("cache-logits", "distill", "distill-cache"), 0
    )


def test_eval_scores_every_family(saved, tmp_path, monkeypatch):
    """One ``whelp eval`` of every family (one speed process for all): perplexity and speed of each."""
    import json

    monkeypatch.setenv("WHELP_HOME", str(tmp_path / "home"))
    done = run_cli(
        "eval",
        *(f"{f}={d}" for f, d in saved.items()),
        "--out",
        str(tmp_path / "eval"),
        "--ppl",
        "pydoc:eval",
        "--max-tokens",
        "128",
        "--seq-len",
        "16",
        "--speed-prompt-len",
        "8",
        "--speed-new-tokens",
        "2",
        "--speed-repeats",
        "1",
    )
    assert done.exit_code == 0, done.stderr
    rows = json.loads((tmp_path / "eval" / "metrics.json").read_text())["models"]
    assert [r["label"] for r in rows] == list(FAMILIES)
    for row in rows:
        assert math.isfinite(row["perplexity"]["pydoc:eval"]["ppl"]), row["label"]
        assert row["speed"]["decode_tokens_per_s"] > 0, row["label"]


def test_gpt_neox_mlp_prunes_exactly_through_the_generic_path():
    """NeoX's fused query_key_value also reads and writes the residual stream: the MLP is told apart by its width,
    and the pruned model equals the teacher with the dropped neurons' down-projection columns zeroed."""
    from whelp.pruning.generic import prune_generic

    teacher, tokens = model("gpt_neox"), ids(4)
    pruned, keep = prune_generic(model("gpt_neox"), {"intermediate_size": 48}, "magnitude")
    assert pruned.config.intermediate_size == 48 and keep.heads is None
    with torch.no_grad():
        for layer, kept in zip(teacher.gpt_neox.layers, keep.mlp):
            dropped = sorted(set(range(128)) - set(kept.tolist()))
            layer.mlp.dense_4h_to_h.weight[:, dropped] = 0
        assert (pruned(input_ids=tokens).logits - teacher(input_ids=tokens).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("extra", [{}, {"n_inner": None, "tie_word_embeddings": True}], ids=["n_inner", "default"])
def test_gpt2_mlp_prunes_exactly_through_its_conv1d_layers(extra, tmp_path):
    """GPT-2's Conv1D layers are traced as the equivalent nn.Linear and written back as Conv1D: the pruned model
    equals the teacher with the dropped neurons zeroed and loads in stock transformers; n_inner=None (4 x hidden)
    becomes explicit. Its hidden size and heads set head_dim, so those axes are refused in one line."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from whelp.pruning.generic import prune_generic

    def gpt2(seed=0):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config("gpt2", **extra)).eval()

    teacher, tokens, width = gpt2(), ids(4), 256 if "n_inner" in extra else 128
    pruned, keep = prune_generic(gpt2(), {"intermediate_size": 48}, "magnitude")
    assert pruned.config.n_inner == 48 and isinstance(pruned.transformer.h[0].mlp.c_fc, Conv1D)
    with torch.no_grad():
        for layer, kept in zip(teacher.transformer.h, keep.mlp):
            layer.mlp.c_proj.weight[sorted(set(range(width)) - set(kept.tolist()))] = 0
        assert (pruned(input_ids=tokens).logits - teacher(input_ids=tokens).logits).abs().max() <= 1e-5
    pruned.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)[1]
    assert not any(loaded.values()), loaded
    for axis in ({"hidden_size": 48}, {"num_attention_heads": 2}):
        with pytest.raises(WhelpError, match="gpt2 cannot express this pruned shape") as err:
            prune_generic(gpt2(), axis, "magnitude")
        assert "\n" not in str(err.value)


MOE_TARGETS = ["num_local_experts=2", "num_experts=2", "num_experts_per_tok=1", "moe_intermediate_size=16"]
SAME = "num_hidden_layers=2"  # these tiny models have 2 layers: a no-op target every family accepts
_EVERY_AXIS = [
    SAME,
    "hidden_size=48",
    "intermediate_size=96",
    "num_attention_heads=2",
    "num_key_value_heads=1,num_attention_heads=2",
    "head_dim=8",
    "num_hidden_layers=2,hidden_size=48,intermediate_size=96,num_attention_heads=1,num_key_value_heads=1,"
    "head_dim=8,tie_word_embeddings=true",
    "tie_word_embeddings=true",
]
ACCEPTED = {  # beyond these, plan and prune refuse alike (test_prune_families covers the dense rows)
    "llama": _EVERY_AXIS,
    "cohere": [SAME, "hidden_size=48", "intermediate_size=96", "num_attention_heads=2"],
    # MoE: every dense axis too (Mixtral's MLP is each expert's FFN; it has no moe_intermediate_size)
    "mixtral": _EVERY_AXIS + ["num_local_experts=2", "num_experts=2", "num_experts_per_tok=1"],
    "qwen3_moe": _EVERY_AXIS
    + ["num_local_experts=2", "num_experts=2", "num_experts_per_tok=1", "moe_intermediate_size=16"],
    "gpt2": [SAME, "intermediate_size=96"],
    "gpt_neox": [SAME, "intermediate_size=96"],
}


@pytest.mark.parametrize("family", ACCEPTED)
def test_plan_and_prune_accept_and_refuse_the_same_targets_off_the_dense_rows(family, tmp_path):
    """Llama (a row since the start), Cohere, the MoE families and the generic path (GPT-2, GPT-NeoX: MLP width
    only) answer every target alike in plan and prune."""
    accepted = accepted_alike_by_plan_and_prune(model(family), tmp_path, PLAN_TARGETS + MOE_TARGETS)
    assert accepted == ACCEPTED[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_and_the_local_stage_are_zero_for_a_student_equal_to_its_teacher(family):
    """Every family's layers are found, hooked and (block-local) called alone with the arguments its forward passes
    them (GPT-2 passes its mask positionally): a student equal to its teacher matches every state exactly."""
    teacher = model(family, 0).requires_grad_(False)
    for extra in (dict(local=True), dict(hidden_weight=1.0)):
        student = copy.deepcopy(teacher).requires_grad_(True)
        for m in student.modules():  # GPT-2 trains with dropout 0.1: an equal student then differs by chance
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        spec = DistillSpec(steps=1, batch_size=4, seq_len=12, **extra)
        log = inprocess.distill(student, [teacher], ids(1, (4, 12)), spec, progress=False).whelp_distill["log"]
        assert log[0]["hidden"] == pytest.approx(0.0, abs=1e-6), extra
