"""Reconstruction of MoE students (whelp/pruning/moe_refit.py): the block refit against direct computation, exact
recovery where the target is reachable, the walk over an MoE teacher's layers in memory and streamed."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import MOE, tiny_model
from transformers import AutoModelForCausalLM

from whelp.pruning import api, arch, moe, moe_refit, reconstruct, streaming
from whelp.pruning.keep import identity_keep
from whelp.pruning.targets import parse_target
from whelp.specs import PruneSpec

TARGETS = {
    "mixtral": "num_local_experts=5,intermediate_size=24,hidden_size=48",
    "qwen2_moe": "num_experts=5,moe_intermediate_size=24,hidden_size=48,intermediate_size=96",
    "qwen3_moe": "num_experts=5,moe_intermediate_size=24,hidden_size=48",
}
TOKENS = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(1))


def block_of(family: str, **overrides):
    model = tiny_model(family, **{**MOE[family], **overrides})
    return next(layer.mlp for layer in model.model.layers if moe.is_moe(layer))


def inputs(n_batches: int = 3, n: int = 40, hidden: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(n, hidden, generator=g) for _ in range(n_batches)]


def error(block, xs, targets) -> float:
    with torch.no_grad():
        got = [block(x[None]).reshape(x.shape) for x in xs]
    return sum(float((t - y).double().square().sum()) for t, y in zip(targets, got)) / sum(
        float(t.double().square().sum()) for t in targets
    )


@pytest.mark.parametrize("family", list(MOE))
def test_block_refit_lowers_the_error_it_reports(family):
    """Targets from another block (other weights everywhere): the refit's reported errors equal the block's actual
    errors before and after (its running output is the block's), and the error falls."""
    block, other = block_of(family), block_of(family, seed=1)
    xs = inputs()
    with torch.no_grad():
        targets = [other(x[None]).reshape(x.shape) for x in xs]
    before = error(block, xs, targets)
    report = moe_refit.refit_block(block, xs, targets)
    assert report["before"] == pytest.approx(before, rel=1e-5)
    assert report["after"] == pytest.approx(error(block, xs, targets), rel=1e-4)
    assert report["after"] < report["before"]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_block_refit_recovers_down_projections_that_fit_exactly(family):
    """Top-1 routing (each token one expert, so the experts' problems are independent) and a target made by the
    same block with other down projections: one sweep finds those projections, for every expert routed to."""
    block = block_of(family, num_experts_per_tok=1)
    truth = copy.deepcopy(block)
    truth.experts.down_proj.data.normal_(generator=torch.Generator().manual_seed(7))
    xs = inputs(n=200)
    with torch.no_grad():
        targets = [truth(x[None]).reshape(x.shape) for x in xs]
    report = moe_refit.refit_block(block, xs, targets, damp=1e-10)
    assert report["after"] < 1e-8 < report["before"]
    routed = torch.cat([block.gate(x)[2].flatten() for x in xs]).unique()
    assert len(routed) >= 4
    torch.testing.assert_close(block.experts.down_proj[routed], truth.experts.down_proj[routed], atol=1e-4, rtol=1e-4)


def test_an_expert_no_token_reaches_keeps_its_weights():
    block = block_of("mixtral")
    block.gate.weight.data.abs_()
    block.gate.weight.data[3] *= -1  # positive inputs: expert 3's router logit is the only negative one
    kept = block.experts.down_proj[3].clone()
    xs = [x.abs() for x in inputs()]
    targets = [torch.randn_like(x) for x in xs]
    moe_refit.refit_block(block, xs, targets)
    assert torch.equal(block.experts.down_proj[3], kept)


@pytest.mark.parametrize("family", list(MOE))
@pytest.mark.parametrize("mode", ["lsq", "span", "span_attn"])
def test_a_student_identical_to_its_moe_teacher_is_left_unchanged(family, mode):
    teacher, student = tiny_model(family, **MOE[family]), tiny_model(family, **MOE[family])
    refit, report, _ = reconstruct.reconstruct_model(
        teacher, student, identity_keep(teacher.config), arch.family_of(teacher.config), TOKENS, 2, mode
    )
    for name, value in teacher.state_dict().items():
        torch.testing.assert_close(refit.state_dict()[name], value, atol=1e-5, rtol=1e-4)
    assert all(layer["experts"]["before"] < 1e-10 for layer in report if "experts" in layer)
    assert sum("experts" in layer for layer in report) == 2  # Qwen2-MoE's middle layer is dense


@pytest.mark.parametrize("family", list(MOE))
@pytest.mark.parametrize("mode", ["lsq", "span", "span_attn"])
def test_moe_streaming_reconstruction_equals_in_memory(tmp_path, family, mode):
    """Experts, expert FFN and hidden channels pruned (and Qwen2-MoE's dense layer's MLP): the streamed refit equals
    the in-memory one, the experts' and shared expert's down projections are what changed, and it loads."""
    tiny_model(family, **MOE[family]).save_pretrained(tmp_path / "src", max_shard_size="60KB")
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "src").eval()
    spec = PruneSpec(batch_size=4, reconstruct=mode)
    in_memory = api.prune(teacher, TARGETS[family], TOKENS, spec)
    plain = api.prune(teacher, TARGETS[family], TOKENS, PruneSpec(batch_size=4, reconstruct="none"))
    target = parse_target(teacher.config, TARGETS[family])
    _, _, _, report = streaming.prune_streaming(
        tmp_path / "src", tmp_path / "out", target, spec, TOKENS, shard_bytes=20_000
    )
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, in_memory.state_dict()[name], atol=1e-5, rtol=1e-4)
    before, after = plain.state_dict(), in_memory.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")) for k in changed)
    assert any(k.endswith("experts.down_proj") for k in changed)
    if family == "qwen2_moe":
        assert any("shared_expert.down_proj" in k for k in changed)
    assert report["mode"] == mode and report["experts"]["after"] < report["experts"]["before"]
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=TOKENS).logits, in_memory(input_ids=TOKENS).logits, atol=1e-4, rtol=1e-4
        )
