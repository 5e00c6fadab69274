"""The divergence guard (whelp.distillation.guard): each signal fires on a hand-made sequence and healthy recorded
curves never do; on a tiny run an absurd learning rate stops with one line and the last good checkpoint kept, a
usual one trains exactly as without the guard, and a resumed run carries what the guard had seen."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace

import pytest
import torch
from conftest import LOOP_SPEC, Crash, fail_at, tiny_model, tiny_tokenizer
from safetensors.torch import load_file

import whelp
from whelp.data import open_blocks
from whelp.distillation import checkpoint, guard
from whelp.distillation.api import distill_run as distill
from whelp.errors import WhelpError

UNIFORM = math.log(49152)  # the demo student's vocabulary
SHARD = "shard-00001-model-00001-of-00001.safetensors"  # DCP's file of rank 0

# (loss, gradient norm) of each step of recorded healthy runs: the demo's distillation of a pruned SmolLM2-135M
# (forward KL + CE, lr 4e-4, 4 warmup steps), a chat distillation, and a block-local stage (nmse, tiny gradients)
DEMO = [
    (2.059, 3.876), (1.86, 3.377), (1.722, 2.582), (1.944, 2.307), (1.796, 2.741), (1.733, 2.095), (1.503, 1.971),
    (1.198, 1.61), (1.302, 1.281), (1.291, 1.624), (1.438, 1.703), (1.431, 1.62), (1.034, 1.597), (0.98, 1.504),
    (1.234, 1.629), (1.104, 1.341), (0.887, 1.078), (1.133, 1.18), (0.811, 1.044), (0.897, 0.833), (0.955, 0.802),
    (0.947, 0.772), (0.999, 1.017), (0.851, 0.749), (0.822, 0.804), (0.927, 0.641), (0.912, 0.785), (0.666, 0.536),
    (0.834, 0.603), (0.789, 0.645), (0.966, 0.604), (0.716, 0.563),
]  # fmt: skip
CHAT = [
    (3.363, 11.756), (3.663, 11.024), (3.152, 5.322), (3.0, 6.461), (2.556, 5.214), (2.384, 3.741), (2.385, 2.83),
    (2.551, 2.769), (1.754, 2.965), (1.532, 2.221), (1.578, 2.18), (1.667, 2.148), (1.513, 2.178), (1.484, 2.258),
    (1.564, 3.752), (1.475, 2.296), (1.109, 1.939), (0.835, 1.546), (0.833, 1.773), (0.914, 1.726), (0.881, 1.713),
    (0.826, 1.662), (0.864, 1.72), (0.811, 1.663), (0.598, 1.492), (0.606, 1.255), (0.664, 1.746), (0.463, 1.139),
    (0.581, 1.344), (0.576, 1.26), (0.431, 1.232), (0.565, 1.272),
]  # fmt: skip
LOCAL = [
    (0.014, 0.0087), (0.017, 0.0701), (0.015, 0.0146), (0.017, 0.0328), (0.017, 0.0286), (0.015, 0.0184),
    (0.015, 0.006), (0.015, 0.0087), (0.015, 0.0071), (0.014, 0.0091), (0.013, 0.0083), (0.015, 0.0053),
]  # fmt: skip


def run(steps, h=None, kind=0, uniform=UNIFORM):
    """Judge ``steps`` of (loss, grad_norm, weights' norm) in turn: the history and the first verdict with its 0-based
    step, or None."""
    h = h or guard.History()
    for i, (loss, grad_norm, norm) in enumerate(steps):
        h, verdict = guard.judge(h, i, kind, loss, grad_norm, norm, uniform)
        if verdict is not None:
            return h, (i, verdict)
    return h, None


def long_healthy_curve(n=3000, warmup=300, seed=0):
    """A long run shaped as the recorded ones: a flat, noisy lr warmup, then a slow fall with +-30% step noise and
    the odd rough batch at 1.6x, gradient norms shrinking and the weights' norm growing a few percent."""
    rng = random.Random(seed)
    steps = []
    for i in range(n):
        level = 2.2 if i < warmup else 0.6 + 1.6 * math.exp(-(i - warmup) / 800)
        noise = 1.6 if rng.random() < 0.01 else rng.uniform(0.7, 1.3)
        steps.append((level * noise, rng.uniform(0.5, 4.0) * level, 100.0 * (1 + 0.05 * i / n)))
    return steps


@pytest.mark.parametrize(
    "steps",
    [
        [(loss, g, 100.0) for loss, g in DEMO],
        [(loss, g, 100.0) for loss, g in CHAT],
        [(loss, g, 50.0) for loss, g in LOCAL],
        long_healthy_curve(),
        long_healthy_curve(seed=1, warmup=1000),
    ],
    ids=["demo", "chat", "local", "long", "long-warmup"],
)
def test_healthy_curves_never_fire(steps):
    h, fired = run(steps)
    assert fired is None
    assert len(h.recent[0]) == min(len(steps), guard.WINDOW) and h.first[0] == steps[0][0]


def test_on_policy_steps_are_judged_against_their_own_kind():
    """A run that turns on-policy after 30 data steps (KL ~1): its on-policy steps (reverse KL on the student's own
    samples, ~3) are judged by their own median, not the data's, so they do not fire; one at over 3x theirs does."""
    h = guard.History()
    for i in range(50):
        kind, loss = (0, 1.0) if i < 30 else (64, 3.0)
        h, verdict = guard.judge(h, i, kind, loss, 1.0, 10.0, UNIFORM)
        assert verdict is None
    _, verdict = guard.judge(h, 50, 64, 9.5, 1.0, 10.0, UNIFORM)
    assert verdict.what == "the loss spiked to 9.5, over 3x its median 3 of the last 20 steps"


def test_a_loss_worse_than_a_uniform_student_fires_from_the_first_steps():
    ceiling = UNIFORM + guard.MARGIN
    assert run([(2.0, 1.0, 10.0), (2.0, 1.0, 10.0), (ceiling - 0.01, 1.0, 10.0)])[1] is None
    _, (step, verdict) = run([(2.0, 1.0, 10.0), (2.0, 1.0, 10.0), (ceiling + 0.01, 1.0, 10.0)])
    assert step == 2 and verdict.bad_from == 2 and "over 1 nat above a uniform student's 10.8" in verdict.what
    # a loss that starts above the uniform one (reverse KL of a fresh student) may stay within 3x its start
    assert run([(40.0, 1.0, 10.0), (100.0, 1.0, 10.0)])[1] is None
    assert run([(40.0, 1.0, 10.0), (121.0, 1.0, 10.0)])[1] is not None
    assert guard.uniform_loss(512, 2.0, True) == pytest.approx(4 * math.log(512))
    assert guard.uniform_loss(512, 2.0, False) == guard.uniform_loss(512, 0.5, True) == math.log(512)


def test_a_spike_over_the_running_median_fires_once_there_is_enough_history():
    small = 6.0  # a vocabulary of ~400: a spike counts over half its uniform loss, 3
    base = [(1.5 + 0.1 * (i % 3), 1.0, 10.0) for i in range(guard.MIN_HISTORY)]  # median 1.6
    assert run(base[:-1] + [(5.0, 1.0, 10.0)], uniform=small)[1] is None  # 9 steps: too few to judge a median by
    assert run(base + [(4.79, 1.0, 10.0)], uniform=small)[1] is None
    _, (step, verdict) = run(base + [(4.81, 1.0, 10.0)], uniform=small)
    assert step == guard.MIN_HISTORY and verdict.bad_from == step
    assert verdict.what == f"the loss spiked to 4.81, over 3x its median 1.6 of the last {guard.MIN_HISTORY} steps"
    # the median is of the last WINDOW steps: a curve that fell is judged by where it is now
    fallen = [(3.0, 1.0, 10.0)] * 100 + [(1.0, 1.0, 10.0)] * guard.WINDOW
    assert run(fallen + [(3.1, 1.0, 10.0)], uniform=small)[1] is not None
    assert run([(0.001, 1.0, 10.0)] * 20 + [(0.01, 1.0, 10.0)])[1] is None  # ratios of a ~0 loss are noise
    # a small KL that triples on one batch of a harder source is noise too: far below a uniform student's
    assert run([(0.05, 1.0, 10.0)] * 20 + [(0.16, 1.0, 10.0)])[1] is None
    assert run([(0.05, 1.0, 10.0)] * 20 + [(0.16, 1.0, 10.0)], uniform=0.3)[1] is not None


def test_a_vanished_gradient_fires_after_a_few_steps_and_condemns_them_all():
    healthy = [(2.0, 1.0, 10.0)] * 5
    flat = [(8.3, 0.0, 10.0)] * guard.FLAT_STEPS
    _, (step, verdict) = run(healthy + flat)
    assert step == 5 + guard.FLAT_STEPS - 1 and verdict.bad_from == 5  # the first flat step's weights on
    assert f"for {guard.FLAT_STEPS} steps in a row, from step 6, while the loss is 8.3" in verdict.what
    assert run(healthy + flat[:-1])[1] is None
    assert run(healthy + flat[:-1] + [(8.3, 0.5, 10.0)] + flat[:-1])[1] is None  # a gradient again: the count restarts
    assert run(healthy + [(0.0, 0.0, 10.0)] * 10)[1] is None  # a student equal to its teacher: loss and gradient 0


def test_weights_that_blow_up_fire_and_a_nan_condemns_only_ruined_weights():
    grown = [(2.0, 1.0, 15.0), (2.0, 1.0, 15.0 * guard.BLOWUP)]
    assert run(grown)[1] is None
    _, (step, verdict) = run(grown + [(2.0, 1.0, 15.0 * guard.BLOWUP * 1.01)])
    assert (
        step == 2 and verdict.bad_from == 2 and "the weights blew up: their norm 151.5 is 10.1x its 15" in verdict.what
    )
    _, (_, verdict) = run([(2.0, 1.0, 15.0), (float("nan"), 1.0, 15.0)])
    assert verdict.bad_from == 2 and "not finite" in verdict.what  # a bad batch's NaN: the weights' checkpoint stays
    _, (_, verdict) = run([(2.0, 1.0, 15.0), (float("nan"), float("nan"), float("nan"))])
    assert verdict.bad_from == 1 and "blew up" in verdict.what


def test_the_history_round_trips_exactly_through_a_checkpoint_record():
    h, _ = run(long_healthy_curve(n=80) + [(2.0, 0.0, 106.0)] * 2)
    back = guard.History.of(json.loads(json.dumps(h.state())))
    assert back == h and back.flat == 2
    assert guard.judge(back, 82, 0, 2.0, 0.0, 106.0, UNIFORM) == guard.judge(h, 82, 0, 2.0, 0.0, 106.0, UNIFORM)


def test_an_unusual_learning_rate_is_named_but_zero_is_left_to_the_spec():
    assert all(guard.unusual_lr(lr) is None for lr in (0.0, 1e-7, 1e-5, 1e-4, 3e-3, 1e-2))
    assert "lr 1e+06 is far outside" in guard.unusual_lr(1e6) and guard.unusual_lr(1e6).endswith("may diverge")
    assert guard.unusual_lr(1e-9).endswith("may not move")


def norm(weights: dict) -> float:
    """The global L2 norm of a state dict's tensors."""
    return math.sqrt(sum(w.double().square().sum() for w in weights.values()))


def rows(rdir) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (rdir / "metrics.jsonl").read_text().splitlines()]


def test_an_absurd_lr_stops_with_one_line_and_keeps_the_last_good_checkpoint(tiny_dirs, tmp_path, monkeypatch, capsys):
    teacher, _, student = tiny_dirs
    saved, real_save = {}, checkpoint.save_checkpoint

    def spy(ckpt_dir, step, module, *args):
        saved[step] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        return real_save(ckpt_dir, step, module, *args)

    monkeypatch.setattr(checkpoint, "save_checkpoint", spy)
    spec = replace(LOOP_SPEC, lr=1.0, save_every=1, keep_last=10)
    with pytest.raises(WhelpError) as stop:
        distill(student, tmp_path / "out", spec, teachers=((teacher, 1.0),), progress=False)
    ckpts = tmp_path / "out.distill" / "checkpoints"
    message = str(stop.value)
    advice = f"resume from the last good checkpoint, {ckpts / 'step-00000002'}: e.g. --lr 0.0001"
    assert "\n" not in message and message.startswith("training diverged at step 4: the weights blew up: their norm")
    assert message.endswith(f"; stopped without updating; re-run with a lower --lr to {advice}")
    err = capsys.readouterr().err
    assert "lr 1 is far outside the usual range of AdamW" in err and len(err.strip().splitlines()) == 1
    # step 4 measured the weights of step 3's checkpoint: saved, then removed; step 2's is kept, exactly as saved
    assert sorted(saved) == [1, 2, 3] and sorted(p.name for p in ckpts.iterdir()) == ["step-00000001", "step-00000002"]
    on_disk = load_file(ckpts / "step-00000002" / SHARD)
    assert all(torch.equal(on_disk[f"model/{k}"], v) for k, v in saved[2].items())
    assert norm(saved[2]) <= guard.BLOWUP * norm(saved[1]) < norm(saved[3])  # saved[1]: the start (lr 0 at step 1)
    assert [row["step"] for row in rows(tmp_path / "out.distill")] == [1, 2, 3]
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    lower = replace(spec, lr=1e-4)  # the advice: resumes from step 2 and trains to the end
    report = distill(student, tmp_path / "out", lower, teachers=((teacher, 1.0),), progress=False)
    assert report["history"] == [{"from_step": 2, "changed": {"lr": [1.0, 1e-4]}}] and report["final"]["step"] == 6


def test_a_run_ruined_by_its_last_update_is_not_written(tiny_dirs, tmp_path):
    """At lr 1 step 4 measures the blow-up of step 3's update (above); a 3-step run has no step 4 to measure it."""
    teacher, _, student = tiny_dirs
    spec = replace(LOOP_SPEC, lr=1.0, save_every=1, keep_last=10, steps=3)
    with pytest.raises(WhelpError, match=r"^training diverged at its last update \(step 3\): the weights blew up"):
        distill(student, tmp_path / "out", spec, teachers=((teacher, 1.0),), progress=False)
    ckpts = tmp_path / "out.distill" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000001", "step-00000002"]
    assert not (tmp_path / "out").exists()
    assert guard.last_update(guard.History(start_norm=2.0), 3, float("nan")).what.startswith("the weights are not")
    assert guard.last_update(guard.History(start_norm=2.0), 3, 19.9) is None


def in_memory_run(spec):
    """The tiny student distilled in this process for ``spec``: its final weights."""
    teacher, student = tiny_model(seed=1), tiny_model(seed=2, intermediate_size=64, num_hidden_layers=1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(40)
    blocks = open_blocks(spec.data, tiny_tokenizer(), spec.seq_len)
    whelp.distill(student, [teacher], blocks, spec, progress=False)
    return student.state_dict()


def test_a_usual_lr_trains_exactly_as_without_the_guard(monkeypatch):
    spec = replace(LOOP_SPEC, steps=40, grad_accum=1, batch_size=4, lr=1e-2, warmup=4, save_every=0)
    guarded = in_memory_run(spec)
    monkeypatch.setattr(guard, "judge", lambda h, *args: (h, None))
    unguarded = in_memory_run(spec)
    assert all(torch.equal(guarded[k], unguarded[k]) for k in guarded)


def test_a_resumed_run_carries_what_the_guard_had_seen(tiny_dirs, tmp_path, monkeypatch):
    teacher, _, student = tiny_dirs
    fail_at(monkeypatch, 2 * 5, lambda result: (_ for _ in ()).throw(Crash()))  # dies in step 5; checkpoint 4
    with pytest.raises(Crash):
        distill(student, tmp_path / "out", LOOP_SPEC, teachers=((teacher, 1.0),), progress=False)
    monkeypatch.undo()
    distill(student, tmp_path / "out", LOOP_SPEC, teachers=((teacher, 1.0),), progress=False)
    rdir = tmp_path / "out.distill"
    losses = tuple(row["loss"] for row in rows(rdir))
    seen = [
        guard.History.of(json.loads((rdir / "checkpoints" / f"step-0000000{s}" / "state.json").read_text())["guard"])
        for s in (4, 6)
    ]
    assert seen[0].recent == {0: losses[:4]} and seen[1].recent == {0: losses}  # steps 1-4 from before the crash
    assert seen[0].start_norm == seen[1].start_norm and seen[1].first == {0: losses[0]}
