"""Structured OBS selection of MLP neurons (whelp/pruning/obs.py, ``--select obs``): the greedy removal against a
naive re-solve, its block update against a direct inverse, and the prune that uses it in memory and streamed."""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny, tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from whelp import footprint
from whelp.errors import WhelpError
from whelp.pruning import api, arch, obs, shards, streaming
from whelp.pruning.reconstruct import resolve as reconstruct_mode
from whelp.pruning.targets import parse_target
from whelp.specs import PruneSpec


def ridge_error(a: torch.Tensor, t: torch.Tensor, units: list[int], lam: float) -> float:
    """min_W ||T - A_S W||^2 + lam ||W||^2 over the units S, solved from scratch in float64 (the reference)."""
    a_s = a[:, units]
    w = torch.linalg.solve(a_s.T @ a_s + lam * torch.eye(len(units), dtype=a.dtype), a_s.T @ t)
    return float((t - a_s @ w).square().sum() + lam * w.square().sum())


def naive_greedy(a, t, keep: int, damp: float) -> list[int]:
    """Backward elimination by re-solving the ridge for every candidate removal: what obs_keep computes in closed
    form (the ridge lam fixed from the full Gram's diagonal, as obs_keep fixes it)."""
    lam = damp * float((a * a).sum(0).mean())
    units = list(range(a.shape[1]))
    while len(units) > keep:
        units.remove(min(units, key=lambda j: ridge_error(a, t, [u for u in units if u != j], lam)))
    return units


def problem(seed: int, n: int = 10, out: int = 3):
    """Activations [300, n] of graded scale with unit 4 nearly a combination of units 1 and 2, and a noisy linear
    target [300, out] of them (float64)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(300, n, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, n, dtype=torch.float64)
    a[:, 4] = a[:, 1] - 0.5 * a[:, 2] + 0.01 * torch.randn(300, generator=g, dtype=torch.float64)  # near-redundant
    t = a @ torch.randn(n, out, generator=g, dtype=torch.float64) + torch.randn(
        300, out, generator=g, dtype=torch.float64
    )
    return a, t


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("keep", [8, 5, 2])
def test_greedy_removal_equals_re_solving_for_every_candidate(seed, keep):
    a, t = problem(seed)
    got = obs.obs_keep(a.T @ a, a.T @ t, keep, damp=0.05, group=1)
    assert got.tolist() == naive_greedy(a, t, keep, 0.05)


def test_block_removal_equals_the_direct_inverse_of_what_is_left():
    """The exact group update: after removing several units at once, the optimum and the inverse Gram equal those
    solved directly on the units left, which they are reduced to."""
    a, t = problem(3)
    g = a.T @ a + 0.1 * torch.eye(10, dtype=torch.float64)
    inv = torch.linalg.inv(g)
    w, inv_left, left = obs._remove(inv @ (a.T @ t), inv, torch.tensor([7, 1, 4]))
    assert left.tolist() == [0, 2, 3, 5, 6, 8, 9]
    want_inv = torch.linalg.inv(g[left][:, left])
    torch.testing.assert_close(inv_left, want_inv)
    torch.testing.assert_close(w, want_inv @ (a.T @ t)[left])


def test_the_redundant_unit_goes_first_and_groups_stay_close():
    a, t = problem(4)
    dropped = set(range(10)) - set(obs.obs_keep(a.T @ a, a.T @ t, 9, damp=1e-6).tolist())
    assert dropped <= {1, 2, 4}  # one of the three that stand in for one another
    one, three = (obs.obs_keep(a.T @ a, a.T @ t, 4, damp=0.01, group=g).tolist() for g in (1, 3))
    lam = 0.01 * float((a * a).sum(0).mean())
    assert ridge_error(a, t, three, lam) <= 1.5 * ridge_error(a, t, one, lam)
    with pytest.raises(WhelpError, match="0 < keep <= 10"):
        obs.obs_keep(a.T @ a, a.T @ t, 0, damp=0.01)


def duplicated_teacher():
    """A tiny Llama whose 64 MLP neurons are 32 distinct ones, each twice (same gate and up rows, own down column):
    half of them can go with nothing lost once down_proj adds each pair's columns."""
    teacher = tiny_model("llama", num_hidden_layers=2, intermediate_size=64)
    with torch.no_grad():
        for layer in teacher.model.layers:
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
                proj.weight[32:] = proj.weight[:32]
    return teacher


def test_obs_keeps_one_of_each_duplicate_and_the_refit_recovers_the_layer():
    teacher = duplicated_teacher()
    tokens = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    target = "intermediate_size=32"
    runs = {
        select: api.prune(teacher, target, tokens, PruneSpec(calib_samples=8, reconstruct="lsq", select=select))
        for select in ("importance", "obs")
    }
    for i, kept in enumerate(runs["obs"].whelp_kept["mlp"]):
        assert sorted(k % 32 for k in kept) == list(range(32))  # one of each pair
        layer, source = runs["obs"].model.layers[i], teacher.model.layers[i]
        torch.testing.assert_close(layer.mlp.up_proj.weight, source.mlp.up_proj.weight[kept])  # record == weights
    assert any(sorted(k % 32 for k in kept) != list(range(32)) for kept in runs["importance"].whelp_kept["mlp"])
    x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = teacher(x).logits
        gaps = {s: float((m(x).logits - want).abs().mean()) for s, m in runs.items()}
    assert gaps["obs"] < 0.2 * gaps["importance"], gaps


@pytest.mark.parametrize("mode", ["lsq", "span"])
def test_streamed_selection_equals_in_memory(tmp_path, mode):
    duplicated_teacher().save_pretrained(tmp_path / "src", max_shard_size="60KB")
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "src").eval()
    tokens = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(1))
    target = "num_hidden_layers=1,intermediate_size=40"
    spec = PruneSpec(batch_size=4, reconstruct=mode, select="obs")
    in_memory = api.prune(teacher, target, tokens, spec)
    keep, _, _, _ = streaming.prune_streaming(
        tmp_path / "src", tmp_path / "out", parse_target(teacher.config, target), spec, tokens, shard_bytes=20_000
    )
    assert [m.tolist() for m in keep.mlp] == in_memory.whelp_kept["mlp"]
    got = {}
    for path in sorted(set(shards.weight_map(tmp_path / "out").values())):
        got.update(load_file(path))
    for name, value in in_memory.state_dict().items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=1e-5)
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize(
    "family,mode,message",
    [
        ("llama", "none", "--reconstruct is none; use --reconstruct lsq or span"),
        ("llama", "bias", "--reconstruct is bias"),
        ("phi3", "lsq", "fused gate_up projection; use --select importance"),
        ("qwen2_moe", "span", "has experts; use --select importance"),
    ],
)
def test_misuse_is_one_line_before_any_weight_is_read(tmp_path, monkeypatch, family, mode, message):
    save_tiny(tmp_path / "teacher", family=family)
    monkeypatch.setattr("whelp.models.load_model", lambda *a, **k: pytest.fail("loaded the teacher"))
    spec = PruneSpec(reconstruct=mode, select="obs")
    with pytest.raises(WhelpError, match=message):
        api.prune_checkpoint(str(tmp_path / "teacher"), "num_hidden_layers=1", tmp_path / "out", spec)
    assert not (tmp_path / "out").exists()
    with pytest.raises(WhelpError, match="unknown select 'zip'; choose one of auto, importance, obs"):
        PruneSpec(select="zip")


def test_the_generic_path_refuses_obs_with_its_own_reason(tmp_path, monkeypatch):
    """Outside the family table there is no refit at all, so the advice is importance, not another --reconstruct."""
    save_tiny(tmp_path / "teacher", family="ministral")
    monkeypatch.setattr("whelp.models.load_model", lambda *a, **k: pytest.fail("loaded the teacher"))
    with pytest.raises(
        WhelpError, match="ministral is pruned by the generic path, which has none; use --select importance"
    ):
        api.prune_checkpoint(
            str(tmp_path / "teacher"), "intermediate_size=32", tmp_path / "out", PruneSpec(select="obs")
        )


def test_the_plan_prices_the_selection_only_where_it_chooses():
    """Per student layer: the Gram over the calibration tokens (2 T n^2) and the removal (4 n^2 per neuron), four
    float64 n x n matrices of host memory and, under span, one layer's fp32 activations of every neuron over the
    calibration tokens; a layer that keeps every neuron gathers nothing (select_mlp)."""
    assert footprint.select_flops(256, 2, 128, 96) == 2 * (2 * 256 * 128**2 + 4 * 128**2 * 32)
    assert [p["bytes"] for p in footprint.select_memory(128, 96)] == [4 * 128 * 128 * 8]
    assert [p["bytes"] for p in footprint.select_memory(128, 96, tokens=256)] == [4 * 128 * 128 * 8, 4 * 256 * 128]
    assert footprint.select_flops(256, 2, 128, 128) == 0 and footprint.select_memory(128, 128, tokens=256) == []


@pytest.mark.parametrize(
    "family,reconstruct,want",
    [
        ("llama", "auto", "obs"),
        ("gemma2", "auto", "obs"),  # lsq: its MLP output is normed before the residual
        ("llama", "none", "importance"),
        ("llama", "bias", "importance"),
        ("phi3", "auto", "importance"),  # fused gate_up
        ("qwen2_moe", "auto", "importance"),  # experts
    ],
)
def test_auto_selects_by_obs_where_a_refit_follows_on_a_plain_mlp(family, reconstruct, want):
    found = arch.family_of(tiny_model(family).config)
    assert obs.resolve_select("auto", reconstruct_mode(reconstruct, found), found) == want
    assert obs.resolve_select("auto", "none", None) == "importance"  # the generic path
    assert obs.resolve_select("importance", "span", found) == "importance"


def test_a_layer_that_keeps_every_neuron_gathers_no_moments(monkeypatch):
    """Depth only: each student layer keeps all the teacher's neurons, in the teacher's order, with no Gram built."""
    teacher = tiny_model("llama", num_hidden_layers=3)
    monkeypatch.setattr(obs, "mlp_moments", lambda *a: pytest.fail("gathered moments for a layer that keeps all"))
    tokens = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    student = api.prune(teacher, "num_hidden_layers=2", tokens, PruneSpec(reconstruct="span", select="obs"))
    width = teacher.config.intermediate_size
    assert student.whelp_kept["mlp"] == [list(range(width))] * 2
    for i, layer in zip(student.whelp_kept["layers"], student.model.layers):
        torch.testing.assert_close(layer.mlp.up_proj.weight, teacher.model.layers[i].mlp.up_proj.weight)


@pytest.mark.parametrize("mode", ["lsq", "span"])
@pytest.mark.parametrize("dropped", ["moments", "parts", "both"])
def test_the_refit_reads_the_selections_moments_as_a_pass_over_the_kept_neurons_would(monkeypatch, mode, dropped):
    """The down_proj refit after a selection uses the sub-block of the selection's moments (kept_moments) instead of
    running the layer again over the kept neurons, and (``span``) the layer's output is made from the selection's
    pass instead of running the refit layer: the same student to float precision as the fresh passes (forced here
    by dropping the moments, the parts, or both)."""
    from whelp.pruning import reconstruct

    teacher = tiny_model("llama", num_hidden_layers=3)
    tokens = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(2))
    spec = PruneSpec(batch_size=4, reconstruct=mode, select="obs")
    target = "num_hidden_layers=2,intermediate_size=40"
    shared = api.prune(teacher, target, tokens, spec)
    chosen = reconstruct.select_mlp

    def dropping(*args, **kw):
        kept, moments, parts = chosen(*args, **kw)
        if mode == "span":
            assert parts is not None and len(parts) == 2  # two batches of 4 and 2 rows
        return kept, None if dropped in ("moments", "both") else moments, None if dropped != "moments" else parts

    monkeypatch.setattr(reconstruct, "select_mlp", dropping)
    fresh = api.prune(teacher, target, tokens, spec)
    assert shared.whelp_kept["mlp"] == fresh.whelp_kept["mlp"]
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(shared.state_dict()[name], value, atol=1e-6, rtol=1e-5)
