"""Intermediate-state and block-local distillation: the layer map, the projection, the losses against a naive
reference, the local stage's zero on an identical student, resume, misuse in one line."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from conftest import LOOP_SPEC, Crash, load_weights, max_diff, run_cli, save_tiny, tiny_model, tiny_tokenizer
from safetensors.torch import load_file

import whelp
from whelp.distillation import hidden, inprocess, local, parallel, state
from whelp.distillation.api import _pruned_from, distill_run, kept_record
from whelp.distillation.losses import kd_loss
from whelp.errors import WhelpError
from whelp.specs import DistillSpec, HiddenSpec, LossSpec, PruneSpec


def test_layer_map_follows_kept_layers_and_uniform_spreads_them():
    # student layer i ends where the span it replaces ends: just before the next kept teacher layer
    assert hidden.layer_map(4, 8, [0, 2, 3, 5]) == [1, 2, 4, 7]
    assert hidden.layer_map(4, 8, [1, 2, 6, 7]) == [1, 5, 6, 7]
    assert hidden.layer_map(4, 8) == [1, 3, 5, 7]
    assert hidden.layer_map(3, 3) == [0, 1, 2]
    for kept in ([0, 2, 3], [0, 3, 2, 5], [0, 2, 3, 8]):
        with pytest.raises(WhelpError, match="do not fit a 4-layer student of this 8-layer teacher"):
            hidden.layer_map(4, 8, kept)
    with pytest.raises(WhelpError, match="use a teacher at least as deep"):
        hidden.layer_map(5, 4)


def test_projection_starts_as_the_exact_slice_of_the_pruning():
    kept = [5, 0, 3]
    proj = hidden.projection(kept, 3, 6)
    teacher = torch.randn(7, 6)
    mapped = teacher[:, kept] @ proj.T  # a student state equal to the slice, mapped to the teacher's width
    assert torch.equal(mapped[:, kept], teacher[:, kept])
    assert torch.equal(mapped[:, [1, 2, 4]], torch.zeros(7, 3))
    assert hidden.projection(None, 6, 6) is None
    with pytest.raises(WhelpError, match="kept hidden channels"):
        hidden.projection(None, 3, 6)


def naive_term(s: torch.Tensor, t: torch.Tensor, kind: str) -> torch.Tensor:
    """One token at a time in float64."""
    out = []
    for a, b in zip(s.double(), t.double()):
        if kind == "cosine":
            out.append(1 - torch.dot(a, b) / (a.norm() * b.norm()))
        else:
            out.append(sum((x - y) ** 2 for x, y in zip(a, b)) / sum(y**2 for y in b))
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["nmse", "cosine"])
def test_hidden_loss_and_its_gradients_equal_a_naive_reference(kind):
    torch.manual_seed(0)
    s = [torch.randn(9, 4, requires_grad=True) for _ in range(3)]
    t = [torch.randn(9, 6) for _ in range(3)]
    proj = torch.randn(6, 4, requires_grad=True)
    mask = torch.tensor([1, 0, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    got = hidden.hidden_loss(s, t, kind, proj, mask)
    ref = sum(naive_term((a.double() @ proj.double().T)[mask], b[mask], kind).sum() for a, b in zip(s, t)) / 3
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    g_got = torch.autograd.grad(got, s + [proj])
    g_ref = torch.autograd.grad(ref, s + [proj])
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert a.abs().sum() > 0


def test_student_forward_adds_the_weighted_hidden_term_to_the_kd_sum():
    teacher, student = tiny_model(num_hidden_layers=4, seed=1), tiny_model(num_hidden_layers=2, seed=2)
    ids = torch.randint(0, 512, (2, 12))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1).flatten()
    mask = labels != -100
    with torch.no_grad():
        out = teacher(input_ids=ids, output_hidden_states=True)
        pre_norm = {}
        handle = teacher.model.norm.register_forward_pre_hook(lambda m, args: pre_norm.update(x=args[0]))
        teacher(input_ids=ids)
        handle.remove()
    # teacher layers 1 and 3 (the map [1, 3]): layer j's output is the input of layer j + 1, or the final norm's input
    t_states = [out.hidden_states[2].flatten(0, 1), pre_norm["x"].flatten(0, 1)]
    kd = dict(labels=labels, mask=mask, spec=LossSpec(), weights=(1.0,))
    live = state.live_target(teacher, ids)
    model = parallel.KDStudent(student)
    total, _, _, term = model(ids, kd={**kd, "targets": [live], "hidden": (t_states, "nmse", 0.7)})

    hs = student(input_ids=ids, output_hidden_states=True).hidden_states
    s_pre = {}
    handle = student.model.norm.register_forward_pre_hook(lambda m, args: s_pre.update(x=args[0]))
    body = student.model(input_ids=ids).last_hidden_state.flatten(0, 1)
    handle.remove()
    s_states = [hs[1].flatten(0, 1), s_pre["x"].flatten(0, 1)]
    ref_term = sum(naive_term(a[mask], b[mask], "nmse").sum() for a, b in zip(s_states, t_states)) / 2
    ref_kd = kd_loss(body, student.lm_head.weight, [live], (1.0,), LossSpec(), labels, mask).loss
    torch.testing.assert_close(term, ref_term.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total.double(), (ref_kd + 0.7 * ref_term).double(), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def pruned():
    """A 4-layer teacher (peaked lm_head) and its student pruned to 2 layers and hidden 48 by whelp."""
    teacher = tiny_model(num_hidden_layers=4, seed=1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(40)
    calib = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    spec = PruneSpec(calib_samples=8, seq_len=32, reconstruct="none")
    return teacher, whelp.prune(teacher, "num_hidden_layers=2,hidden_size=48", calib, spec)


def test_the_plan_maps_layers_by_the_kept_indices_after_depth_pruning(pruned):
    teacher, student = pruned
    kept = student.whelp_kept
    plan = hidden.plan(student.config, [teacher], kept, HiddenSpec(weight=1.0))
    assert plan.layer_map == [kept["layers"][1] - 1, 3]
    assert plan.channels.tolist() == kept["hidden"] and plan.proj.shape == (64, 48)
    assert hidden.plan(student.config, [teacher], kept, HiddenSpec(weight=1.0, map="uniform")).layer_map == [1, 3]
    with pytest.raises(WhelpError, match="a teacher-logit cache holds logits only"):
        hidden.plan(student.config, [], kept, HiddenSpec(weight=1.0))
    with pytest.raises(WhelpError, match="--hidden-map kept needs the pruning's record"):
        hidden.plan(student.config, [teacher], None, HiddenSpec(weight=1.0, map="kept"))
    with pytest.raises(WhelpError, match="no record of the kept hidden channels"):
        hidden.plan(student.config, [teacher], None, HiddenSpec(weight=1.0))


def test_the_local_stage_on_a_student_identical_to_the_teacher_has_zero_loss(pruned):
    teacher, _ = pruned
    student = copy.deepcopy(teacher).requires_grad_(True)  # a teacher is frozen once distilled from
    before = copy.deepcopy(student.state_dict())
    data = torch.randint(0, 512, (8, 16), generator=torch.Generator().manual_seed(1))
    spec = DistillSpec(steps=2, batch_size=4, seq_len=16, lr=1e-2, local=True)
    log = inprocess.distill(student, [teacher], data, spec, progress=False).whelp_distill["log"]
    assert [row["hidden"] for row in log] == [0.0, 0.0]
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    spec = DistillSpec(steps=1, batch_size=4, seq_len=16, hidden_weight=1.0)
    assert inprocess.distill(
        copy.deepcopy(teacher).requires_grad_(True), [teacher], data, spec, progress=False
    ).whelp_distill["log"][0]["hidden"] == pytest.approx(0.0, abs=1e-6)


def test_local_backward_equals_a_naive_per_block_reference(pruned):
    teacher, student = pruned
    student = copy.deepcopy(student)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    plan = hidden.plan(student.config, [teacher], student.whelp_kept, HiddenSpec(local=True))
    states = local.teacher_states(teacher.model, teacher.model.layers, ids, plan.layer_map)
    kwargs = local.layer_kwargs(student.model, student.model.layers, ids)
    got = local.local_backward(student.model.layers, kwargs, states, plan.layer_map, "nmse", 1.0, None, plan.channels)
    grads = [p.grad.clone() for p in student.model.layers.parameters()]

    with torch.no_grad():
        t_hs = teacher(input_ids=ids, output_hidden_states=True).hidden_states  # [i]: input of teacher layer i
        pre = {}
        handle = teacher.model.norm.register_forward_pre_hook(lambda m, args: pre.update(x=args[0]))
        teacher(input_ids=ids)
        handle.remove()
    after = lambda j: pre["x"] if j == 3 else t_hs[j + 1]  # noqa: E731 - teacher layer j's output
    ref = 0
    student.zero_grad()
    for i, (start, end) in enumerate(local.spans(plan.layer_map)):
        x = (t_hs[0] if start < 0 else after(start))[..., plan.channels]
        y = student.model.layers[i](x, *kwargs[i][0], **kwargs[i][1])
        y = y[0] if isinstance(y, tuple) else y
        ref = ref + naive_term(y.flatten(0, 1), after(end)[..., plan.channels].flatten(0, 1), "nmse").sum() / 2
    ref.backward()
    torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-6)
    for a, p in zip(grads, student.model.layers.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_local_trains_the_blocks_alone_and_lowers_its_loss(pruned):
    teacher, student = pruned
    student = copy.deepcopy(student)
    frozen = {k: v.clone() for k, v in student.state_dict().items() if "layers" not in k}
    data = torch.randint(0, 512, (16, 16), generator=torch.Generator().manual_seed(3))
    spec = DistillSpec(steps=12, batch_size=4, seq_len=16, lr=1e-3, local=True)
    log = inprocess.distill(student, [teacher], data, spec, progress=False).whelp_distill["log"]
    assert log[-1]["hidden"] < 0.8 * log[0]["hidden"]
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in frozen.items())  # no logits, no gradient


def test_in_memory_local_then_global_trains_the_whole_student_again(pruned):
    teacher, student = pruned
    student = copy.deepcopy(student)
    data = torch.randint(0, 512, (8, 16), generator=torch.Generator().manual_seed(4))
    inprocess.distill(
        student, [teacher], data, DistillSpec(steps=1, batch_size=4, seq_len=16, local=True), progress=False
    )
    assert all(p.requires_grad for p in student.parameters())  # the local stage's freeze is undone
    head = student.lm_head.weight.clone()
    inprocess.distill(student, [teacher], data, DistillSpec(steps=1, batch_size=4, seq_len=16, lr=1e-3), progress=False)
    assert not torch.equal(head, student.lm_head.weight)


def test_misuse_is_one_line():
    from whelp.specs import check_local

    with pytest.raises(WhelpError, match="pass exactly one --teacher"):
        check_local(2, 0, DistillSpec(steps=1, local=True))
    with pytest.raises(WhelpError, match="and no --cache"):
        check_local(1, 1, DistillSpec(steps=1, local=True))
    with pytest.raises(WhelpError, match="on_policy=1 leaves none"):
        DistillSpec(steps=1, seq_len=128, hidden_weight=1.0, on_policy=1.0)
    with pytest.raises(WhelpError, match="drop ce_weight=0.5"):
        DistillSpec(steps=1, local=True, ce_weight=0.5)
    with pytest.raises(WhelpError, match="hidden_loss"):
        DistillSpec(steps=1, hidden_weight=1.0, hidden_loss="mse")
    with pytest.raises(WhelpError, match="hidden_weight"):
        DistillSpec(steps=1, hidden_weight=-1.0)


@pytest.fixture(scope="module")
def pruned_dirs(tmp_path_factory, pruned):
    """The teacher and its pruned student saved (the student with its prune_report.json, as whelp prune writes)."""
    root = tmp_path_factory.mktemp("hidden")
    teacher, student = pruned
    tokenizer = tiny_tokenizer()
    for name, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    report = {"source": str(root / "teacher"), "kept": student.whelp_kept}
    (root / "student" / "prune_report.json").write_text(json.dumps(report))
    return str(root / "teacher"), str(root / "student")


def test_distill_with_hidden_states_saves_a_plain_student_carries_the_record_and_resumes_exactly(
    pruned_dirs, tmp_path, monkeypatch
):
    teacher, student = pruned_dirs
    spec = replace(LOOP_SPEC, hidden_weight=0.5, save_every=1)

    def run(out):
        return distill_run(student, out, spec, teachers=((teacher, 1.0),), progress=False)

    report = run(tmp_path / "ref")
    assert set(load_file(tmp_path / "ref" / "model.safetensors")) == set(load_file(f"{student}/model.safetensors"))
    saved = json.loads((tmp_path / "ref" / "distill_report.json").read_text())
    assert saved["kept"]["layers"] == report["kept"]["layers"] and "hidden" in saved["final"]
    # the projection is trained and checkpointed with the student: killed mid-run, the resumed run equals this one
    crashed_and_resumed(monkeypatch, run, tmp_path, parallel, "hidden_loss")


def crashed_and_resumed(monkeypatch, run, tmp_path, module, name: str) -> None:
    """``run(tmp_path / "crashed")`` killed at the third call of ``module.name`` (one per micro-batch), then run
    again to its end: its weights equal those of ``run(tmp_path / "ref")`` (already made) to 1e-6."""
    real, count = getattr(module, name), {"n": 0}

    def crash_on_third(*args, **kwargs):
        count["n"] += 1
        if count["n"] == 3:
            raise Crash()
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, crash_on_third)
    with pytest.raises(Crash):
        run(tmp_path / "crashed")
    monkeypatch.undo()
    run(tmp_path / "crashed")
    assert max_diff(load_weights(tmp_path / "crashed"), load_weights(tmp_path / "ref")) <= 1e-6


def test_the_local_stage_resumes_exactly(pruned_dirs, tmp_path, monkeypatch):
    teacher, student = pruned_dirs
    spec = replace(LOOP_SPEC, local=True, save_every=1)

    def run(out):
        return distill_run(student, out, spec, teachers=((teacher, 1.0),), progress=False)

    run(tmp_path / "ref")
    crashed_and_resumed(monkeypatch, run, tmp_path, local, "local_backward")


def test_cli_refuses_a_map_without_a_record_in_one_line(tiny_dirs, tmp_path):
    teacher, _, student = tiny_dirs  # a student whelp did not prune: no prune_report.json
    result = run_cli(
        "distill", student, "--teacher", teacher, "--out", str(tmp_path / "o"), "--steps", "1",
        "--seq-len", "32", "--hidden-weight", "1", "--hidden-map", "kept",
    )  # fmt: skip
    assert result.exit_code == 2 and "--hidden-map kept needs the pruning's record" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_the_record_maps_layers_only_for_the_teacher_it_was_pruned_from(pruned_dirs, tiny_dirs):
    teacher, student = pruned_dirs
    other = tiny_dirs[0]
    record = kept_record(student)
    assert record["layers"] == json.loads(open(f"{student}/prune_report.json").read())["kept"]["layers"]
    assert record["teacher"] == teacher and _pruned_from(record, ((teacher, 1.0),))
    assert not _pruned_from(record, ((other, 1.0),))  # a chained build's later teacher: not this map
    assert kept_record(other) is None  # a student whelp did not prune


LOCAL_RECIPE = """
name: local
teacher: {model: %s}
data: {seq_len: 16}
prune: [{target: "num_hidden_layers=2,hidden_size=48", calib_samples: 2}]
distill:
  - {steps: 2, batch_size: 2, eval_tokens: 64, hidden_weight: 0.5, local: {steps: 3, lr: 0.001}}
eval: {max_tokens: 256, speed: {prompt_len: 4, new_tokens: 1, repeats: 1}}
"""


def test_a_recipe_runs_the_local_stage_before_global_kd(tmp_path):
    from transformers import AutoModelForCausalLM

    from whelp import build, recipe

    save_tiny(tmp_path / "teacher", tiny_tokenizer(), num_hidden_layers=4)
    (tmp_path / "r.yaml").write_text(LOCAL_RECIPE % (tmp_path / "teacher"))
    final = build.build(recipe.load(str(tmp_path / "r.yaml")), tmp_path / "out")
    stages = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "out" / "stages").iterdir() if p.suffix != ".distill")
    assert stages == ["01-prune", "02-local", "03-distill", "04-eval"]
    local_dir = next(p for p in (tmp_path / "out" / "stages").glob("02-local-*") if p.suffix != ".distill")
    local_report = json.loads((local_dir / "distill_report.json").read_text())
    assert local_report["spec"]["local"] and local_report["steps"] == 3 and local_report["spec"]["ce_weight"] == 0
    assert (
        local_report["kept"]["layers"]
        == json.loads(next((tmp_path / "out" / "stages").glob("01-prune-*/prune_report.json")).read_text())["kept"][
            "layers"
        ]
    )
    report = json.loads(next((tmp_path / "out" / "stages").glob("03-distill-*/distill_report.json")).read_text())
    assert report["student"] == str(local_dir) and "hidden" in report["final"]
    assert AutoModelForCausalLM.from_pretrained(final).config.hidden_size == 48
    (tmp_path / "bad.yaml").write_text(LOCAL_RECIPE.replace("steps: 3, ", "") % (tmp_path / "teacher"))
    with pytest.raises(WhelpError, match="distill.local: give exactly one budget"):
        recipe.load(str(tmp_path / "bad.yaml"))


def test_a_run_recorded_before_the_hidden_settings_existed_resumes_and_a_changed_one_is_named():
    from whelp.distillation.run import _changes

    def identity(**spec):
        return {"student": "s", "world_size": 1, "spec": DistillSpec(steps=4, **spec).flat()}

    old = identity()
    for key in ("hidden_weight", "hidden_loss", "hidden_map", "local"):
        del old["spec"][key]
    assert _changes(old, identity()) == ({}, {})
    assert _changes(old, identity(hidden_weight=0.5)) == ({}, {"hidden_weight": [0.0, 0.5]})


def test_plan_prices_the_local_stage_on_one_process_without_the_heads(tmp_path):
    from whelp import recipe
    from whelp.plan.stages import plan_recipe

    save_tiny(tmp_path / "teacher", tiny_tokenizer(), num_hidden_layers=4)
    (tmp_path / "r.yaml").write_text(LOCAL_RECIPE % (tmp_path / "teacher"))
    stages = {s["stage"]: s for s in plan_recipe(recipe.load(str(tmp_path / "r.yaml")))["stages"]}
    local, glob = stages["local[0]"], stages["distill[0]"]
    assert not local["parallel"] and glob["parallel"]
    assert local["tokens"] == 3 * 2 * 16  # its steps x batch x seq_len
    head = 512 * 48  # the student's lm_head: vocabulary x hidden
    assert glob["flops_per_token"]["student_train"] - local["flops_per_token"]["student_train"] == 6 * head
    assert any("hidden-state loss" in p["what"] for p in glob["memory"])  # hidden_weight 0.5 in the recipe


@pytest.mark.slow
def test_fsdp2_trains_the_projection_as_one_process_does(pruned_dirs, tmp_path):
    """Under torchrun (gloo, FSDP2 student) the hidden-state projection lives in the sharded root: two processes
    match one with the same global batch (losses, hidden term, saved student)."""
    from test_loop_dist import losses_of, torchrun

    teacher, student = pruned_dirs
    spec = replace(LOOP_SPEC, hidden_weight=0.5, save_every=0)  # 2 x 2 x 2 rows a step
    torchrun(tmp_path, student, [[teacher, 1.0]], tmp_path / "two", spec)
    distill_run(student, tmp_path / "one", replace(spec, grad_accum=4), teachers=((teacher, 1.0),), progress=False)
    assert losses_of(tmp_path / "two") == pytest.approx(losses_of(tmp_path / "one"), abs=1e-5)
    rows = {
        name: [
            json.loads(r)["hidden"] for r in (tmp_path / f"{name}.distill" / "metrics.jsonl").read_text().splitlines()
        ]
        for name in ("two", "one")
    }
    assert rows["two"] == pytest.approx(rows["one"], abs=1e-5) and rows["one"][-1] != rows["one"][0]
    assert max_diff(load_weights(tmp_path / "two"), load_weights(tmp_path / "one")) <= 1e-4
