"""Reconstruction after pruning (whelp/pruning/lsq.py, reconstruct.py, stream_refit.py): the closed forms against
direct computation, the walk over layers in memory and streamed, what it refuses, and its effect on the demo teacher."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MOE, save_tiny, tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from whelp.errors import WhelpError
from whelp.pruning import api, arch, layerwise, lsq, reconstruct, shards, streaming
from whelp.pruning.keep import identity_keep
from whelp.pruning.scores import SCORES_FILE
from whelp.pruning.targets import parse_target
from whelp.specs import PruneSpec

# depth 4 -> 3, hidden 64 -> 48, MLP 128 -> 96, one KV group with 1 of 2 query heads, head_dim 16 -> 8, tied (mean)
TARGET = (
    "num_hidden_layers=3,hidden_size=48,intermediate_size=96,num_attention_heads=1,"
    "num_key_value_heads=1,head_dim=8,tie_word_embeddings=true"
)


def moments(h, x, weight):
    m = lsq.Moments.empty(h.shape[-1], x.shape[-1])
    m.add(h, x, weight)
    return m


def direct_error(weight, v, h, x, bias=None):
    """sum ||W h - V x - b||^2 computed token by token in float64 (the reference of lsq.error)."""
    target = h.double() @ weight.double().T if weight is not None else h.double()
    out = x.double() @ v.double().T + (0 if bias is None else bias.double())
    return float((target - out).square().sum())


def test_error_and_bias_equal_their_direct_computation():
    g = torch.Generator().manual_seed(0)
    h, weight = torch.randn(200, 8, generator=g), torch.randn(5, 8, generator=g)
    x, v, b = h[:, [0, 2, 3]] + 0.1, torch.randn(5, 3, generator=g), torch.randn(5, generator=g)
    m = moments(h, x, weight)
    assert lsq.error(weight, v, m) == pytest.approx(direct_error(weight, v, h, x), rel=1e-9)
    assert lsq.error(weight, v, m, b) == pytest.approx(direct_error(weight, v, h, x, b), rel=1e-9)
    want = (h.double() @ weight.double().T - x.double() @ v.double().T).mean(0)  # FLAP: the mean of what is missed
    torch.testing.assert_close(lsq.flap_bias(weight, v, m), want, rtol=1e-9, atol=1e-12)
    m_id = moments(h[:, :5], x, None)  # the identity map: h is the target itself
    assert lsq.error(None, v, m_id) == pytest.approx(direct_error(None, v, h[:, :5], x), rel=1e-9)


def test_lsq_reproduces_pruned_channels_that_are_combinations_of_kept_ones():
    """Removed inputs that are exact linear combinations of kept ones: the refit recovers the unpruned output."""
    g = torch.Generator().manual_seed(1)
    kept = torch.randn(500, 6, generator=g)
    h = torch.cat([kept, kept @ torch.randn(6, 4, generator=g)], dim=1)  # channels 6..9 depend on 0..5
    weight = torch.randn(7, 10, generator=g)
    m = moments(h, kept, weight)
    v = lsq.lsq(weight, m, damp=0.0)
    torch.testing.assert_close((kept.double() @ v.T), h.double() @ weight.double().T, atol=1e-5, rtol=1e-5)
    fitted, _, report = lsq.refit(weight, weight[:, :6], m, "lsq", damp=1e-9)
    assert report["after"] < 1e-10 < report["before"]
    assert fitted.dtype == weight.dtype


@pytest.mark.parametrize("damp", [1e-3, 0.1, 1.0, 1e6])
def test_refit_never_raises_the_calibration_error(damp):
    g = torch.Generator().manual_seed(2)
    h, weight = torch.randn(64, 12, generator=g), torch.randn(4, 12, generator=g)
    x = h[:, :5] + 0.3 * torch.randn(64, 5, generator=g)
    current = weight[:, :5]
    m = moments(h, x, weight)
    v, _, report = lsq.refit(weight, current, m, "lsq", damp)
    assert direct_error(weight, v, h, x) <= direct_error(weight, current, h, x) * (1 + 1e-9)
    assert report["after"] <= report["before"]
    # a huge damp pulls the refit back to the sliced weights, not to zero
    if damp == 1e6:
        torch.testing.assert_close(v, current, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["lsq", "span", "span_attn"])
@pytest.mark.parametrize("select", [False, True])
def test_a_student_identical_to_its_teacher_is_left_unchanged(mode, select):
    """With OBS selection too: keeping every neuron there is nothing to choose, and the layer keeps the teacher's
    neurons in their order (a wrong copy or order would change the weights)."""
    teacher = tiny_model("llama", num_hidden_layers=3)
    student = tiny_model("llama", num_hidden_layers=3)
    tokens = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(3))
    keep = identity_keep(teacher.config)
    refit, report, kept = reconstruct.reconstruct_model(
        teacher, student, keep, arch.family_of(teacher.config), tokens, 2, mode, select=select
    )
    assert all(torch.equal(a, b) for a, b in zip(kept.mlp, keep.mlp))
    for name, value in teacher.state_dict().items():
        torch.testing.assert_close(refit.state_dict()[name], value, atol=1e-5, rtol=1e-4)
    assert all(r[m]["before"] < 1e-10 for r in report for m in ("o_proj", "down_proj"))


@pytest.mark.parametrize("mode", ["lsq", "span"])
def test_an_attention_that_keeps_every_head_is_not_refit(monkeypatch, mode):
    """Every head kept on every channel: the student's attention is the wide one, so its o_proj refit towards the
    wide output on the same input (``lsq``, ``span``) is the identity; it is skipped (the teacher's o_proj exactly,
    error 0 reported) and the student equals the one the computed refit gives, to float precision."""
    teacher = tiny_model("llama", num_hidden_layers=4)
    tokens = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(4))
    spec = PruneSpec(batch_size=4, reconstruct=mode, select="importance")
    target = parse_target(teacher.config, "num_hidden_layers=3,intermediate_size=96")
    skipped, _, kept, details = api._prune(teacher, target, tokens, spec, None)
    for i, layer in zip(kept["layers"], skipped.model.layers):
        assert torch.equal(layer.self_attn.o_proj.weight, teacher.model.layers[i].self_attn.o_proj.weight)
    assert all(r["o_proj"] == {"before": 0.0, "after": 0.0} for r in details["reconstruct"]["layers"])
    monkeypatch.setattr(reconstruct, "_unchanged", lambda *_: False)
    computed, _, _, details = api._prune(teacher, target, tokens, spec, None)
    assert all(r["o_proj"]["before"] < 1e-10 for r in details["reconstruct"]["layers"])
    for name, value in computed.state_dict().items():
        torch.testing.assert_close(skipped.state_dict()[name], value, atol=1e-6, rtol=1e-5)


def test_span_attn_refits_o_proj_towards_the_teachers_stream_after_its_attention():
    """``span_attn``, every head kept and a layer removed: each student layer's o_proj equals the naive float64 ridge
    towards the teacher's residual stream after the kept teacher layer's attention, minus the student's own stream
    entering the layer (its drift), fed the student's attention: ``V = (C + lam V0)(S + lam I)^-1``, ``C = sum
    (mid - h) x^T``, ``S = sum x x^T``, ``lam = 0.1 mean(diag S)``, ``V0`` the teacher's o_proj. The refit model's
    own forward gives each layer's input (the layers before it are final), and o_proj's input does not depend on
    o_proj. Where the student's stream entering the layer is the teacher's (no drift), the error is zero before;
    elsewhere the refit lowers it."""
    teacher = tiny_model("llama", num_hidden_layers=4)
    tokens = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(6))
    spec = PruneSpec(batch_size=4, reconstruct="span_attn", select="importance")
    target = parse_target(teacher.config, "num_hidden_layers=3,intermediate_size=96")
    student, _, kept, details = api._prune(teacher, target, tokens, spec, None)
    layers = kept["layers"]

    def streams_and_o_inputs(model):
        xs = []
        hooks = [
            layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: xs.append(a[0]))
            for layer in model.model.layers
        ]
        with torch.no_grad():
            out = model(input_ids=tokens, output_hidden_states=True)
        for hook in hooks:
            hook.remove()
        return out.hidden_states, xs

    t_states, _ = streams_and_o_inputs(teacher)
    s_states, xs = streams_and_o_inputs(student)
    for i, j in enumerate(layers):
        t_layer = teacher.model.layers[j]
        with torch.no_grad():
            h_t = t_states[j]
            rope = teacher.model.rotary_emb(h_t, torch.arange(tokens.shape[1])[None])
            mask = torch.full((32, 32), float("-inf")).triu(1)[None, None]
            mid = h_t + t_layer.self_attn(t_layer.input_layernorm(h_t), rope, mask)[0]
        target = (mid - s_states[i]).double().reshape(-1, 64)
        x = xs[i].double().reshape(-1, xs[i].shape[-1])
        gram, cross = x.T @ x, target.T @ x
        lam = 0.1 * gram.diagonal().mean()
        v0 = t_layer.self_attn.o_proj.weight.double()
        want = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), (cross + lam * v0).T).T
        torch.testing.assert_close(student.model.layers[i].self_attn.o_proj.weight.double(), want, atol=1e-5, rtol=1e-4)
        error = details["reconstruct"]["layers"][i]["o_proj"]
        if torch.allclose(s_states[i], t_states[j], atol=1e-6):
            assert error["before"] < 1e-10
        else:
            assert error["after"] < error["before"]
    assert not torch.allclose(s_states[-2], t_states[layers[-1]], atol=1e-3)  # some layer had drift to correct


def test_the_refit_reads_the_first_refit_samples_blocks_in_memory_and_streamed(tmp_path, monkeypatch):
    """``refit_samples``: importance reads every calibration block, the refit the first K of them; the streamed
    prune equals the in-memory one, and both differ from a refit on every block (the scores being the same)."""
    tiny_model("llama", num_hidden_layers=4).save_pretrained(tmp_path / "src", max_shard_size="60KB")
    tokens = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(5))
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "src").eval()
    spec = PruneSpec(batch_size=2, calib_samples=6, refit_samples=4, reconstruct="span", select="obs")
    seen = []
    real = reconstruct.reconstruct_model
    monkeypatch.setattr(
        reconstruct,
        "reconstruct_model",
        lambda t, s, k, f, tok, *a, **kw: seen.append(tok) or real(t, s, k, f, tok, *a, **kw),
    )
    first = api.prune(teacher, TARGET, tokens, spec)
    assert len(seen) == 1 and torch.equal(seen[0], tokens[:4])
    got, _ = streamed(tmp_path / "src", tmp_path / "out", spec, tokens)
    for name, value in first.state_dict().items():
        if name in got:
            torch.testing.assert_close(got[name], value, atol=1e-6, rtol=1e-5)
    every = api.prune(
        teacher, TARGET, tokens, PruneSpec(batch_size=2, calib_samples=6, reconstruct="span", select="obs")
    )
    assert torch.equal(seen[-1], tokens) and not torch.equal(
        every.model.layers[0].mlp.down_proj.weight, first.model.layers[0].mlp.down_proj.weight
    )


@pytest.mark.parametrize(
    "given,message",
    [
        ({"calib_samples": 4, "refit_samples": 8}, r"refit_samples=8 is more than calib_samples=4"),
        ({"refit_samples": 0}, r"refit_samples"),
    ],
)
def test_refit_samples_that_cannot_be_honoured_are_one_line(given, message):
    with pytest.raises(WhelpError, match=message):
        PruneSpec(**given)


def streamed(src, out, spec, tokens):
    target = parse_target(AutoModelForCausalLM.from_pretrained(src).config, TARGET)
    _, _, _, report = streaming.prune_streaming(src, out, target, spec, tokens, shard_bytes=20_000)
    got = {}
    for path in sorted(set(shards.weight_map(out).values())):
        got.update(load_file(path))
    return got, report


@pytest.mark.parametrize(
    "family,mode",
    [
        ("llama", "lsq"),
        ("llama", "span"),
        ("llama", "span_attn"),
        ("llama", "bias"),
        ("qwen3", "span"),
        ("gemma2", "lsq"),
    ],
)
def test_streaming_reconstruction_equals_in_memory(tmp_path, family, mode):
    """Every axis pruned (head_dim too, so the wide layer has its own RoPE) and an untied teacher tied by the mean:
    the streamed refit (layers spilled and written shard by shard) equals the in-memory one, and loads."""
    tiny_model(family, num_hidden_layers=4).save_pretrained(tmp_path / "src", max_shard_size="60KB")
    tokens = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(1))
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "src").eval()
    spec = PruneSpec(tie="mean", batch_size=4, reconstruct=mode, select="importance")  # the refit alone (test_obs)
    in_memory = api.prune(teacher, TARGET, tokens, spec)
    plain = api.prune(teacher, TARGET, tokens, PruneSpec(tie="mean", batch_size=4, reconstruct="none"))
    got, report = streamed(tmp_path / "src", tmp_path / "out", spec, tokens)
    want = {k: v for k, v in in_memory.state_dict().items() if k in got}
    assert set(in_memory.state_dict()) - set(got) <= {"lm_head.weight"}  # tied
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=1e-5)
    before, after = plain.state_dict(), in_memory.state_dict()
    changed = [k for k in after if k not in before or not torch.equal(before[k], after[k])]
    maps = ("o_proj.bias", "down_proj.bias") if mode == "bias" else ("o_proj.weight", "down_proj.weight")
    assert changed and all(k.endswith(maps) or not after[k].any() for k in changed)  # new zero q/k/v/MLP biases
    assert all(after[k].abs().sum() > 0 for k in changed if k.endswith(maps))
    assert report["mode"] == mode and report["down_proj"]["after"] < report["down_proj"]["before"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=tokens).logits, in_memory(input_ids=tokens).logits, atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3_text", "granite", "qwen2_moe"])
def test_layer_inputs_are_what_the_models_own_forward_gives_its_layers(family):
    """The stand-ins that replace the layers while inputs are taken record exactly the first layer's hidden states
    and every layer's keyword arguments of a real forward (sliding and full attention layers, Granite's embedding
    multiplier, an MoE), and leave the model as it was."""
    overrides = MOE.get(family, {})
    model = tiny_model(family, **{"num_hidden_layers": 4, **overrides})
    fam = arch.family_of(model.config)
    tokens = torch.randint(0, 512, (5, 12), generator=torch.Generator().manual_seed(3))
    layers = model.get_submodule(fam.layers)
    seen = [[] for _ in layers]

    def record(i):
        return lambda m, args, kw: seen[i].append((args[0] if args else kw["hidden_states"], kw))

    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    with torch.no_grad():
        want = [model(input_ids=tokens[s : s + 2], use_cache=False).logits for s in range(0, 5, 2)]
    for handle in handles:
        handle.remove()
    batches, kwargs = reconstruct.layer_inputs(model, fam, tokens, 2)
    assert [b.shape[0] for b in batches] == [2, 2, 1]
    for b, batch in enumerate(batches):
        assert torch.equal(batch, seen[0][b][0])
        for i in range(len(layers)):
            real = {k: v for k, v in seen[i][b][1].items() if k != "hidden_states"}
            assert kwargs[i][b].keys() == real.keys()
            for key, value in real.items():
                got = kwargs[i][b][key]
                if isinstance(value, torch.Tensor):
                    assert torch.equal(got, value), key
                elif isinstance(value, tuple):
                    assert all(torch.equal(x, y) for x, y in zip(got, value, strict=True)), key
                else:
                    assert got == value, key
    assert all("forward" not in vars(layer) for layer in layers)  # the stand-ins are gone
    with torch.no_grad():
        again = [model(input_ids=tokens[s : s + 2], use_cache=False).logits for s in range(0, 5, 2)]
    assert all(torch.equal(x, y) for x, y in zip(again, want))


def test_stand_ins_leave_the_modules_own_forward_back_even_when_the_block_fails():
    """``layerwise.standing_in`` swaps each module's forward for its stand-in inside the block only: a Stop or any
    other error raised there still gives the modules their own forward back, and their outputs are what they were."""
    model = tiny_model("llama", num_hidden_layers=2)
    layers = model.get_submodule(arch.family_of(model.config).layers)
    tokens = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=tokens).logits
    calls = []

    def stand_in(*args, **kw):
        calls.append(1)
        raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"), layerwise.standing_in((layer, stand_in) for layer in layers):
        model(input_ids=tokens)
    assert calls == [1] and all("forward" not in vars(layer) for layer in layers)
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, want)


@pytest.mark.parametrize(
    "family,mode",
    [
        ("llama", "span_attn"),
        ("gemma2", "lsq"),
        ("granite", "lsq"),
        ("qwen2_moe", "span_attn"),
        ("mixtral", "span_attn"),
    ],
)
def test_auto_picks_what_the_family_allows(family, mode):
    assert reconstruct.resolve("auto", arch.family_of(tiny_model(family).config)) == mode
    assert reconstruct.resolve("auto", None) == "none" and reconstruct.resolve("bias", None) == "bias"


@pytest.mark.parametrize(
    "family,mode,target,message",
    [
        ("llama", "bias", "config.json", "published shape"),
        ("gemma2", "span", "intermediate_size=64", "normalises or scales it; use --reconstruct lsq"),
        ("olmo2", "span_attn", "intermediate_size=64", "span_attn needs an MLP whose output joins the residual"),
        ("qwen3", "bias", "intermediate_size=64", "no such keys; use --reconstruct lsq"),
        ("qwen2_moe", "bias", "num_experts=4", "experts of qwen2_moe have none in transformers; use --reconstruct lsq"),
    ],
)
def test_misuse_is_one_line_before_any_weight_is_read(tmp_path, monkeypatch, family, mode, target, message):
    save_tiny(tmp_path / "teacher", family=family)
    if target == "config.json":  # a published shape: a smaller model's own config
        tiny_model(family, intermediate_size=64).config.save_pretrained(tmp_path / "small")
        target = str(tmp_path / "small" / "config.json")
    monkeypatch.setattr("whelp.models.load_model", lambda *a, **k: pytest.fail("loaded the teacher"))
    with pytest.raises(WhelpError, match=message):
        api.prune_checkpoint(str(tmp_path / "teacher"), target, tmp_path / "out", PruneSpec(reconstruct=mode))
    assert not (tmp_path / "out").exists()


def test_unknown_mode_names_the_choices():
    with pytest.raises(WhelpError, match="reconstruct.*auto, none, lsq, span, span_attn, bias"):
        PruneSpec(reconstruct="ols")


@pytest.mark.demo
def test_reconstruction_lowers_the_demo_students_held_out_perplexity(demo, tmp_path):
    """On the real demo teacher at the demo's shape: lsq and span each give a lower one-shot perplexity than the
    sliced weights on held-out text that calibration never saw (the licences), span the lowest (the same importance-
    ranked neurons in each: OBS selection is measured in test_obs.py and bench/RESULTS.md)."""
    from whelp.data.blocks import blocks
    from whelp.evals.perplexity import perplexity

    teacher, tokenizer = demo
    calib = blocks("pydoc:calib", tokenizer, 128, n=16)
    ids = blocks("licenses", tokenizer, 256, max_tokens=4096)
    ids = ids.head(len(ids)).flatten()
    target = "num_hidden_layers=24,intermediate_size=1024"
    ppl = {}
    for mode in ("none", "lsq", "span"):
        student = api.prune(
            teacher, target, calib, PruneSpec(reconstruct=mode, select="importance", calib_samples=16, seq_len=128)
        )
        ppl[mode] = perplexity(student, ids, 256, batch_size=8).ppl
    assert ppl["span"] < ppl["lsq"] < ppl["none"], ppl


@pytest.mark.demo
def test_prune_report_records_the_reconstruction(tmp_path, monkeypatch, demo_tokenizer):
    from whelp.pruning import scores as saved

    monkeypatch.setattr(saved, "cache_path", lambda meta, real=saved.cache_path: tmp_path / "cache" / real(meta).name)
    save_tiny(tmp_path / "teacher", demo_tokenizer, family="llama")
    spec = PruneSpec(calib_samples=2, seq_len=16, calib="pydoc:calib")
    api.prune_checkpoint(str(tmp_path / "teacher"), "num_hidden_layers=1,intermediate_size=64", tmp_path / "out", spec)
    report = json.loads((tmp_path / "out" / api.REPORT_FILE).read_text())
    assert report["spec"]["reconstruct"] == "auto" and report["reconstruct"]["mode"] == "span_attn"
    assert len(report["reconstruct"]["layers"]) == 1 and (tmp_path / "out" / SCORES_FILE).is_file()
    assert report["reconstruct"]["down_proj"]["after"] <= report["reconstruct"]["down_proj"]["before"]
    # auto chose the MLP neurons by OBS; the record names the teacher neurons the written weights hold
    assert report["spec"]["select"] == "auto" and report["select"] == "obs"
    layer, kept = report["kept"]["layers"][0], report["kept"]["mlp"][0]
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher")
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(
        student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[layer].mlp.up_proj.weight[kept]
    )
