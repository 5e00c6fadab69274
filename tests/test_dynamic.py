"""``--mixture dynamic`` (whelp.distillation.dynamic): Sheared-LLaMA's re-weighting against a hand-computed example, the
sampler's determinism and held-out dev blocks, static left as it was, every misuse one line, exact resume, and a
tiny distillation whose lagging source gains weight."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import LOOP_SPEC, killed_and_resumed, run_cli, tiny_model, tiny_tokenizer

from whelp.data import TensorBlocks, open_blocks, tokenstore
from whelp.distillation import dynamic, inprocess, loop, parallel, state
from whelp.distillation.api import distill_run
from whelp.errors import WhelpError
from whelp.schema import from_dict
from whelp.specs import DistillSpec, check_mixture

DYNAMIC = dict(mixture="dynamic", mixture_every=2, mixture_dev_blocks=2)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two token stores of the tiny tokenizer: ``lag``, one phrase over and over (what a teacher trained on it
    predicts and a fresh student does not), and ``other``, Python's documentation."""
    from whelp.data import read_documents

    root = tmp_path_factory.mktemp("stores")
    texts = {
        "lag": "\n\n".join(["the cat sat on the mat and the dog sat on the log"] * 120),
        "other": "\n\n".join(read_documents("pydoc:train")[:40]),
    }
    out = {}
    for name, text in texts.items():
        (root / f"{name}.txt").write_text(text)
        out[name] = str(tokenstore.tokenize(str(root / f"{name}.txt"), tiny_tokenizer(), root / name, progress=False))
    return out


@pytest.fixture(scope="module")
def teacher(stores):
    """A tiny teacher trained (CE alone) on the repeated phrase: it predicts the phrase, and on Python's documentation
    it does worse than a fresh student (its guesses are the phrase's), so a student's excess loss is on the phrase."""
    model = tiny_model(seed=1)
    phrase = open_blocks(stores["lag"], tiny_tokenizer(), 32)
    spec = DistillSpec(steps=20, batch_size=8, seq_len=32, lr=1e-2, ce_weight=1.0, dtype="float32")
    inprocess.distill(model, [], phrase, spec, progress=False)
    return model.eval()


def mixture(stores, seq_len: int = 32):
    return open_blocks(f"{stores['lag']}:0.5,{stores['other']}:0.5", tiny_tokenizer(), seq_len)


def test_reweight_follows_a_hand_computed_example():
    # Delta = max(student - reference, 0) = (1.0, 0, 1.5); alpha = w * exp(Delta) = (0.5 e, 0.3, 0.2 e^1.5)
    # = (1.3591409, 0.3, 0.8963378), sum 2.5554787; w = alpha / sum = (0.5318537, 0.1173948, 0.3507514)
    w = dynamic.reweight(
        torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
        torch.tensor([3.0, 2.0, 4.5], dtype=torch.float64),
        torch.tensor([2.0, 2.5, 3.0], dtype=torch.float64),
    )
    assert w.dtype == torch.float64
    assert w.tolist() == pytest.approx([0.5318537, 0.1173948, 0.3507514], abs=1e-7)
    assert w.tolist() == pytest.approx([0.5 * math.e / 2.5554787, 0.3 / 2.5554787, 0.2 * math.e**1.5 / 2.5554787])
    # no excess anywhere: the weights stay; an excess of 800 nats would overflow exp, not the log-space update
    same = torch.tensor([0.25, 0.75], dtype=torch.float64)
    assert torch.equal(dynamic.reweight(same, torch.ones(2), torch.full((2,), 2.0)), same.log().softmax(0))
    assert dynamic.reweight(same, torch.tensor([800.0, 0.0]), torch.zeros(2)).tolist() == pytest.approx([1.0, 0.0])


def test_the_sampler_is_deterministic_holds_out_dev_blocks_and_follows_the_weights(stores):
    blocks = mixture(stores)
    view = dynamic.Reweighted(blocks, dev_blocks=3, seed=5)
    n_lag, n_other = blocks.n_blocks
    assert len(view) == n_lag + n_other and view.names == [stores["lag"], stores["other"]]
    # a flat id is (source, block): the rows are the stores' own blocks, the mask absent as in the Blocks
    L = blocks.seq_len
    assert torch.equal(view[torch.tensor([1, n_lag + 2])][1], torch.from_numpy(blocks.sources[1][0].read(2 * L, 3 * L)))
    assert view.mask(torch.tensor([0])) is None and not view.has_mask
    dev = torch.cat([view.dev(0), view.dev(1)])
    assert torch.equal(view.dev(1), n_lag + blocks.perms[1][:3])

    w, start = torch.tensor([0.8, 0.2], dtype=torch.float64), torch.zeros(2, dtype=torch.long)
    ids, positions = view.draw(7, 64, w, start)
    again, _ = dynamic.Reweighted(blocks, 3, seed=5).draw(7, 64, w.clone(), start.clone())
    assert torch.equal(ids, again)  # a function of (seed, step, weights, positions) alone
    assert not torch.equal(ids, view.draw(8, 64, w, start)[0])
    assert int(positions.sum()) == 64 and torch.equal(start, torch.zeros(2, dtype=torch.long))

    drawn, positions = [], start
    for step in range(200):
        ids, positions = view.draw(step, 50, w, positions)
        drawn.append(ids)
    drawn = torch.cat(drawn)
    assert not torch.isin(drawn, dev).any()  # dev blocks are never trained on
    share = (drawn < n_lag).double().mean().item()
    assert share == pytest.approx(0.8, abs=0.02)  # 10,000 draws: 4 standard deviations
    # each source is a stream: every training block once per epoch, no repeat before the source is used up
    lag, other = drawn[drawn < n_lag], drawn[drawn >= n_lag]
    assert len(lag) > 2 * n_lag and len(other) < n_other - 3
    not_dev = sorted(set(range(n_lag)) - set(view.dev(0).tolist()))
    assert sorted(lag[: n_lag - 3].tolist()) == not_dev == sorted(lag[n_lag - 3 : 2 * (n_lag - 3)].tolist())
    assert not torch.equal(lag[: n_lag - 3], lag[n_lag - 3 : 2 * (n_lag - 3)])  # a fresh order per epoch
    assert len(other.unique()) == len(other)


def test_static_is_the_default_and_leaves_the_data_order_alone(stores):
    assert DistillSpec(steps=2) == DistillSpec(steps=2, mixture="static") and DistillSpec(steps=2).mix.kind == "static"
    blocks = mixture(stores)
    rows = torch.arange(len(blocks))
    L = blocks.seq_len
    assert torch.equal(
        blocks[rows],
        torch.stack([torch.from_numpy(blocks.sources[i][0].read(b * L, (b + 1) * L)) for i, b in blocks.locate(rows)]),
    )
    teacher, student = tiny_model(seed=1), tiny_model(seed=2, num_hidden_layers=1)
    world = parallel.World(0, 1, torch.device("cpu"), owns_group=False)
    t = state.setup(student, [teacher], [], [1.0], ["t"], blocks, LOOP_SPEC, world)
    assert t.blocks is blocks and t.mixing is None
    assert "mixture/" not in json.dumps(loop.optimizer_step(t, 0, None))


def test_every_misuse_is_one_line(stores, tmp_path):
    spec = DistillSpec(steps=2, seq_len=32, **DYNAMIC)
    for bad, message in [
        (dict(mixture="dyn"), "unknown mixture 'dyn'; choose one of static, dynamic"),
        (dict(mixture_every=0), "mixture_every is the optimizer steps between re-weightings, >= 1; got 0"),
        (dict(mixture_dev_blocks=0), "mixture_dev_blocks is the blocks held out of each source, >= 1; got 0"),
    ]:
        with pytest.raises(WhelpError, match=f"^{message}$"):
            DistillSpec(steps=2, **bad)
    with pytest.raises(WhelpError, match=r"^recipe.distill: mixture_every is the optimizer steps"):
        from_dict(DistillSpec, {"steps": 2, "mixture_every": -1}, "recipe.distill")
    with pytest.raises(WhelpError, match=r"^mixture=dynamic re-weights the sources of a mixture, and the data has 1;"):
        check_mixture(1, 0, 1, spec)
    with pytest.raises(WhelpError, match=r"^mixture=dynamic draws other rows than a teacher-logit cache holds"):
        check_mixture(1, 1, 2, spec)
    with pytest.raises(WhelpError, match=r"^mixture=dynamic measures .* over the first live teacher, and none"):
        check_mixture(0, 0, 2, spec)
    check_mixture(0, 1, 1, replace(spec, mixture="static"))  # static: anything goes, as before
    teacher, student = tiny_model(seed=1), tiny_model(seed=2, num_hidden_layers=1)
    with pytest.raises(WhelpError, match="the data has 1; give a mixture"):
        inprocess.distill(student, [teacher], TensorBlocks(torch.zeros(8, 32, dtype=torch.long)), spec, progress=False)
    with pytest.raises(WhelpError, match=r"^source .*lag has \d+ blocks of 32 tokens, and mixture_dev_blocks=999"):
        dynamic.Reweighted(mixture(stores), dev_blocks=999, seed=0)
    twice = open_blocks(f"{stores['lag']}:0.5,{stores['lag']}:0.5", tiny_tokenizer(), 32)
    with pytest.raises(WhelpError, match="lists .*lag twice; list each source once"):
        dynamic.Reweighted(twice, dev_blocks=1, seed=0)
    result = run_cli("distill", "student", "--out", str(tmp_path / "o"), "--steps", "1", "--mixture", "sometimes")
    assert (
        result.exit_code == 2 and result.stderr == "error: unknown mixture 'sometimes'; choose one of static, dynamic\n"
    )


def test_a_resumed_dynamic_run_equals_an_uninterrupted_one(stores, teacher, tmp_path, monkeypatch):
    for name, model in (("teacher", teacher), ("student", tiny_model(seed=2, num_hidden_layers=1))):
        model.save_pretrained(tmp_path / name)
        tiny_tokenizer().save_pretrained(tmp_path / name)
    student = str(tmp_path / "student")
    spec = replace(LOOP_SPEC, data=f"{stores['lag']}:0.5,{stores['other']}:0.5", **DYNAMIC)

    def run(out):
        return distill_run(student, out, spec, teachers=((str(tmp_path / "teacher"), 1.0),), progress=False)

    # kd_loss calls: 2 micro-batches a step, and 2 (one batch of dev blocks per source) at the start of steps 2
    # and 4 (0-based): steps 0-3 make 10; the 14th is inside step 4, after its re-weighting; checkpoint of step 4
    killed_and_resumed(monkeypatch, run, tmp_path / "ref", tmp_path / "crashed", call=14)
    rows = {
        name: [json.loads(r) for r in (tmp_path / f"{name}.distill" / "metrics.jsonl").read_text().splitlines()]
        for name in ("ref", "crashed")
    }
    mixed = [{k: v for k, v in r.items() if k.startswith(("mixture/", "excess/"))} for r in rows["ref"]]
    assert mixed == [{k: v for k, v in r.items() if k.startswith(("mixture/", "excess/"))} for r in rows["crashed"]]
    assert [sorted(k.split("/")[0] for k in m) for m in mixed][1:3] == [
        ["mixture"] * 2,
        ["excess"] * 2 + ["mixture"] * 2,
    ]
    assert mixed[-1][f"mixture/{stores['lag']}"] != 0.5  # it moved
    saved = json.loads((tmp_path / "ref.distill" / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert saved["mixture"]["weights"] == [mixed[-1][f"mixture/{s}"] for s in (stores["lag"], stores["other"])]


def test_the_lagging_source_gains_weight_in_a_tiny_distillation(stores, teacher):
    # the student's excess loss over the teacher is all on the phrase, which must gain weight
    student = tiny_model(seed=2, num_hidden_layers=1, intermediate_size=64)
    spec = DistillSpec(steps=6, batch_size=4, seq_len=32, lr=1e-3, dtype="float32", chunk_size=64, **DYNAMIC)
    inprocess.distill(student, [teacher], mixture(stores), spec, progress=False)
    log = student.whelp_distill["log"]
    lag, other = (f"mixture/{stores[s]}" for s in ("lag", "other"))
    assert all(r[lag] + r[other] == pytest.approx(1.0) for r in log)
    assert [r[lag] for r in log[:2]] == [0.5, 0.5] and "excess/" not in json.dumps(log[:2])
    assert log[2][f"excess/{stores['lag']}"] > 1.0 and log[2][f"excess/{stores['other']}"] == 0.0
    assert log[2][lag] > 0.9 and log[-1][lag] >= log[2][lag]


@pytest.mark.slow
def test_two_processes_draw_and_reweight_as_one(stores, teacher, tmp_path):
    """Under torchrun (gloo, FSDP2 student) every rank evaluates the dev blocks and draws the same rows: the run
    matches one process with the same global batch, weights included."""
    from test_loop_dist import losses_of, torchrun

    for name, model in (("teacher", teacher), ("student", tiny_model(seed=2, num_hidden_layers=1))):
        model.save_pretrained(tmp_path / name)
        tiny_tokenizer().save_pretrained(tmp_path / name)
    student, teachers = str(tmp_path / "student"), [[str(tmp_path / "teacher"), 1.0]]
    spec = replace(LOOP_SPEC, data=f"{stores['lag']}:0.5,{stores['other']}:0.5", **DYNAMIC)  # 2 x 2 x 2 rows a step
    torchrun(tmp_path, student, teachers, tmp_path / "two", spec)
    distill_run(
        student, tmp_path / "one", replace(spec, grad_accum=4), teachers=((teachers[0][0], 1.0),), progress=False
    )
    assert losses_of(tmp_path / "two") == pytest.approx(losses_of(tmp_path / "one"), abs=1e-5)
    rows = {
        name: [json.loads(r) for r in (tmp_path / f"{name}.distill" / "metrics.jsonl").read_text().splitlines()]
        for name in ("two", "one")
    }
    lag = f"mixture/{stores['lag']}"
    assert [r[lag] for r in rows["two"]] == pytest.approx([r[lag] for r in rows["one"]], abs=1e-6)
    assert rows["two"][-1][lag] > 0.9
