"""The distillation loop on tiny models: it learns, resumes exactly, stops on NaN, never clobbers outputs."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import LOOP_SPEC, Crash, fail_at, load_weights, max_diff, run_cli
from safetensors.torch import load_file

from whelp.data import read_documents
from whelp.distillation import schedule
from whelp.distillation.api import distill_run as distill
from whelp.distillation.run import run_dir
from whelp.errors import WhelpError
from whelp.specs import Schedule, parse_weighted


def heldout_kl(student_dir, teacher_dir, blocks) -> float:
    """Naive fp32 reference: mean forward KL(teacher || student) over full logits of held-out blocks."""
    from whelp.models import load_model

    with torch.no_grad():
        zs = load_model(student_dir)[0](input_ids=blocks).logits.float()
        zt = load_model(teacher_dir)[0](input_ids=blocks).logits.float()
    return F.kl_div(
        zs.log_softmax(-1).flatten(0, 1), zt.log_softmax(-1).flatten(0, 1), log_target=True, reduction="batchmean"
    ).item()


def test_distill_lowers_kd_loss_and_heldout_kl(tiny_dirs, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from whelp.data import open_blocks
    from whelp.models import load_model

    teacher, _, student = tiny_dirs
    loaded = []

    def spy(*args, **kwargs):
        loaded.append(load_model(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr("whelp.models.load_model", spy)
    spec = replace(LOOP_SPEC, steps=40, grad_accum=1, batch_size=4, lr=1e-2, warmup=4, save_every=0, eval_every=20)
    report = distill(student, tmp_path / "out", spec, teachers=((teacher, 1.0),), progress=False)
    monkeypatch.undo()

    rows = [json.loads(line) for line in (tmp_path / "out.distill" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.75 * first
    # held-out perplexity is logged (it rises here: the random teacher is a poor language model)
    assert "eval_ppl" in rows[19] and all(
        torch.isfinite(torch.tensor(report[k]["eval_ppl"])) for k in ("eval_start", "eval_end")
    )
    eval_blocks = open_blocks("pydoc:eval", loaded[0][1], 32).head(8)
    assert heldout_kl(tmp_path / "out", teacher, eval_blocks) < 0.8 * heldout_kl(student, teacher, eval_blocks)
    # the teacher object used for training was never updated
    teacher_model = loaded[1][0]
    assert max_diff(dict(teacher_model.state_dict()), load_weights(teacher)) == 0
    # the output is a vanilla HF checkpoint plus the report
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "distill_report.json").read_text())["steps"] == 40
    assert plain.config.num_hidden_layers == 1


def test_exact_resume_after_crash_and_after_sigint(tiny_dirs, tmp_path, monkeypatch):
    teacher, teacher2, student = tiny_dirs
    teachers = ((teacher, 0.0), (teacher2, 1.0))
    spec = replace(LOOP_SPEC, schedule="linear:4")
    distill(student, tmp_path / "ref", spec, teachers=teachers, progress=False)

    def crash(result):
        raise Crash

    fail_at(monkeypatch, 2 * 5, crash)  # dies inside step 5 (2 micro-batches per step); checkpoint of step 4
    with pytest.raises(Crash):
        distill(student, tmp_path / "crash", spec, teachers=teachers, progress=False)
    monkeypatch.undo()
    steps = sorted(p.name for p in (tmp_path / "crash.distill" / "checkpoints").iterdir())
    assert steps == ["step-00000002", "step-00000004"]
    distill(student, tmp_path / "crash", spec, teachers=teachers, progress=False)
    assert max_diff(load_weights(tmp_path / "crash"), load_weights(tmp_path / "ref")) <= 1e-6

    def interrupt(result):
        os.kill(os.getpid(), signal.SIGINT)
        return result

    fail_at(monkeypatch, 2 * 3, interrupt)
    with pytest.raises(WhelpError, match="interrupted at step 3/6"):
        distill(student, tmp_path / "sig", spec, teachers=teachers, progress=False)
    monkeypatch.undo()
    assert (tmp_path / "sig.distill" / "checkpoints" / "step-00000003" / "state.json").exists()
    assert not (tmp_path / "sig").exists()
    distill(student, tmp_path / "sig", spec, teachers=teachers, progress=False, resume=True)
    assert max_diff(load_weights(tmp_path / "sig"), load_weights(tmp_path / "ref")) <= 1e-6
    ref_rows = (tmp_path / "ref.distill" / "metrics.jsonl").read_text().splitlines()
    sig_rows = (tmp_path / "sig.distill" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in sig_rows] == list(range(1, 7))
    assert [json.loads(r)["loss"] for r in sig_rows] == pytest.approx(
        [json.loads(r)["loss"] for r in ref_rows], abs=1e-6
    )


def test_nan_stops_with_last_good_checkpoint(tiny_dirs, tmp_path, monkeypatch):
    teacher, _, student = tiny_dirs
    fail_at(monkeypatch, 2 * 4, lambda r: replace(r, loss=r.loss * float("nan")))
    with pytest.raises(WhelpError, match="at step 4.*step-00000002"):
        distill(student, tmp_path / "out", LOOP_SPEC, teachers=((teacher, 1.0),), progress=False)
    ckpts = tmp_path / "out.distill" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002"]
    weights = load_file(ckpts / "step-00000002" / "shard-00001-model-00001-of-00001.safetensors")  # DCP, rank 0
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert json.loads((ckpts / "step-00000002" / "state.json").read_text())["step"] == 2
    assert not (tmp_path / "out").exists()


def test_never_touches_a_directory_it_did_not_make(tiny_dirs, tmp_path):
    teacher, _, student = tiny_dirs
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    run_dir(tmp_path / "b").mkdir()
    (run_dir(tmp_path / "b") / "notes.txt").write_text("mine too")
    for force in (False, True):
        with pytest.raises(WhelpError, match="not made by whelp.*with or without --force"):
            distill(student, out, LOOP_SPEC, teachers=((teacher, 1.0),), progress=False, force=force)
        with pytest.raises(WhelpError, match="b.distill exists and was not made by whelp"):
            distill(student, tmp_path / "b", LOOP_SPEC, teachers=((teacher, 1.0),), progress=False, force=force)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in run_dir(tmp_path / "b").iterdir()] == ["notes.txt"]
    with pytest.raises(WhelpError, match="--resume: no checkpoint"):
        distill(student, tmp_path / "new", LOOP_SPEC, teachers=((teacher, 1.0),), resume=True, progress=False)
    with pytest.raises(WhelpError, match="exactly one training budget"):
        distill(student, tmp_path / "c", replace(LOOP_SPEC, max_tokens=100), teachers=((teacher, 1.0),))


def test_failed_start_does_not_block_the_corrected_command(tiny_dirs, tmp_path):
    teacher, _, student = tiny_dirs
    with pytest.raises(WhelpError, match="not a teacher-logit cache"):
        distill(student, tmp_path / "out", LOOP_SPEC, caches=((str(tmp_path / "nocache"), 1.0),), progress=False)
    assert not (tmp_path / "out").exists()
    report = distill(
        student, tmp_path / "out", replace(LOOP_SPEC, steps=2, warmup=0), teachers=((teacher, 1.0),), progress=False
    )
    assert report["steps"] == 2 and report["history"] == []


def test_resume_refuses_other_data_settings_but_takes_a_lower_lr_after_nan(tiny_dirs, tmp_path, monkeypatch):
    from transformers import get_cosine_schedule_with_warmup

    teacher, _, student = tiny_dirs
    fail_at(monkeypatch, 2 * 3, lambda r: replace(r, loss=r.loss * float("nan")))  # step 3; checkpoint of step 2
    with pytest.raises(WhelpError, match="step 3.*re-run with a lower --lr to resume from .*step-00000002"):
        distill(student, tmp_path / "out", LOOP_SPEC, teachers=((teacher, 1.0),), progress=False)
    monkeypatch.undo()
    with pytest.raises(WhelpError, match=r"other settings \(seq_len: 32 there, 16 now\) at step-00000002"):
        distill(student, tmp_path / "out", replace(LOOP_SPEC, seq_len=16), teachers=((teacher, 1.0),), progress=False)
    lower = replace(LOOP_SPEC, lr=LOOP_SPEC.optim.lr / 10)
    report = distill(student, tmp_path / "out", lower, teachers=((teacher, 1.0),), progress=False)
    assert report["history"] == [{"from_step": 2, "changed": {"lr": [LOOP_SPEC.optim.lr, lower.optim.lr]}}]
    rows = [json.loads(r) for r in (tmp_path / "out.distill" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    factor = get_cosine_schedule_with_warmup(
        torch.optim.SGD([torch.zeros(1)], lr=1.0), LOOP_SPEC.optim.warmup, LOOP_SPEC.steps
    ).lr_lambdas[0]
    factors = [factor(step) for step in range(1, LOOP_SPEC.steps + 1)]  # the lr logged after step s
    expected = [LOOP_SPEC.optim.lr * f for f in factors[:2]] + [lower.optim.lr * f for f in factors[2:]]
    assert [r["lr"] for r in rows] == pytest.approx(expected, rel=1e-12)


def test_teacher_weight_schedule_and_data_order():
    linear = Schedule.parse("linear:4")
    assert schedule.teacher_weights(linear, (0.0, 1.0), 0) == (1.0, 0.0)
    assert schedule.teacher_weights(linear, (0.0, 1.0), 2) == (0.5, 0.5)
    assert schedule.teacher_weights(linear, (0.0, 1.0), 9) == (0.0, 1.0)
    cosine = Schedule.parse("cosine:10")
    assert schedule.teacher_weights(cosine, (0.2, 0.8), 5) == pytest.approx((0.6, 0.4))
    assert schedule.teacher_weights(Schedule.parse("constant"), (0.3, 0.7), 50) == (0.3, 0.7)
    with pytest.raises(WhelpError, match="positive step count"):
        Schedule.parse("linear")
    assert parse_weighted("pydoc:x:0.5") == ("pydoc:x", 0.5)
    assert parse_weighted("/m/teacher") == ("/m/teacher", 1.0)
    # every block exactly once per epoch, epochs differ, wrap-around across the epoch boundary
    order = torch.cat([schedule.step_blocks(s, 10, 4, seed=0) for s in range(5)])
    assert sorted(order[:10].tolist()) == list(range(10)) and sorted(order[10:20].tolist()) == list(range(10))
    assert not torch.equal(order[:10], order[10:20])
    assert torch.equal(schedule.step_blocks(3, 10, 4, seed=0), order[12:16])


def test_cached_teacher_matches_live_and_mixes(tiny_dirs, tmp_path):
    from whelp.data import open_blocks
    from whelp.distillation.capture import Teacher, write_cache
    from whelp.models import load_model
    from whelp.specs import CacheSpec

    teacher, teacher2, student = tiny_dirs
    spec = replace(LOOP_SPEC, steps=None, max_tokens=3 * 4 * 32, save_every=0)  # 3 steps of 4 blocks; 12 blocks read
    model, tokenizer = load_model(teacher)
    blocks = open_blocks(spec.data, tokenizer, spec.seq_len, max_tokens=spec.max_tokens)
    dense = CacheSpec("topk", 512, 1.0)  # k = V
    write_cache(Teacher(model, tokenizer, teacher), blocks, tmp_path / "cache", dense)
    distill(student, tmp_path / "live", spec, teachers=((teacher, 1.0),), progress=False)
    distill(student, tmp_path / "cached", spec, caches=((str(tmp_path / "cache"), 1.0),), progress=False)
    live, cached = (tmp_path / "live.distill" / "metrics.jsonl"), (tmp_path / "cached.distill" / "metrics.jsonl")
    live_loss = [json.loads(r)["loss"] for r in live.read_text().splitlines()]
    cached_loss = [json.loads(r)["loss"] for r in cached.read_text().splitlines()]
    assert cached_loss == pytest.approx(live_loss, rel=2e-3)  # fp16 log-probs in the cache
    report = distill(
        student,
        tmp_path / "mixed",
        spec,
        teachers=((teacher2, 0.5),),
        caches=((str(tmp_path / "cache"), 0.5),),
        progress=False,
    )
    assert set(report["final"]) >= {f"kl/{teacher2}", f"kl/{tmp_path / 'cache'}"}
    with pytest.raises(WhelpError, match="holds other token blocks .*12 blocks of 32.* than the data pydoc:train"):
        distill(student, tmp_path / "bad", replace(spec, seq_len=16), caches=((str(tmp_path / "cache"), 1.0),))


def test_cli_distill(tiny_dirs, tmp_path):
    teacher, _, student = tiny_dirs
    args = [
        "distill",
        student,
        "--out",
        str(tmp_path / "out"),
        "--teacher",
        f"{teacher}:1",
        "--data",
        "pydoc:train",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--dtype",
        "float32",
        "--tensorboard",
        "--chunk-size",
        "24",
        "--ce-weight",
        "0.5",
    ]
    done = run_cli(*args)
    assert done.exit_code == 0, done.stderr
    assert "distilled 128 tokens in 2 steps" in done.stdout
    report = json.loads((tmp_path / "out" / "distill_report.json").read_text())
    assert report["teachers"] == [[teacher, 1.0]] and report["spec"]["ce_weight"] == 0.5
    assert report["spec"]["chunk_size"] == 24
    assert any((tmp_path / "out.distill" / "tensorboard").glob("events.out.tfevents.*"))
    done = run_cli(*args)
    assert done.exit_code == 2 and done.stderr.startswith("error: ") and "already holds a whelp model" in done.stderr
    done = run_cli(*args[:-2], "--loss", "nope", "--force")
    assert done.exit_code == 2 and done.stderr.startswith("error: ") and "unknown loss 'nope'" in done.stderr


def test_padded_student_lm_head_is_masked_to_the_tokenizer(tiny_dirs, tmp_path):
    """A student whose lm_head has 16 padding rows beyond the shared 512-token tokenizer (as Llama-style
    checkpoints pad to a multiple of 64) distils from the unpadded teacher: the padded ids are masked, so
    the first step's loss equals the unpadded student's exactly, however large the padded logits are."""
    from whelp.models import load_model

    teacher, _, student = tiny_dirs
    model, tokenizer = load_model(student)
    model.resize_token_embeddings(len(tokenizer) + 16)
    with torch.no_grad():
        model.get_output_embeddings().weight[len(tokenizer) :] = 3.0
    model.save_pretrained(tmp_path / "padded-student")
    tokenizer.save_pretrained(tmp_path / "padded-student")
    spec = replace(LOOP_SPEC, steps=1, warmup=0, grad_accum=1, save_every=0)
    losses = []
    for name, path in (("plain", student), ("padded", tmp_path / "padded-student")):
        distill(str(path), tmp_path / name, spec, teachers=((teacher, 1.0),), progress=False)
        losses.append(json.loads((tmp_path / f"{name}.distill" / "metrics.jsonl").read_text())["loss"])
    assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[0])


def test_resume_refuses_changed_data_and_damaged_checkpoint_weights(tiny_dirs, tmp_path, monkeypatch):
    teacher, _, student = tiny_dirs
    text = tmp_path / "train.txt"
    text.write_text("\n\n".join(read_documents("pydoc:train")[:20]))
    spec = replace(LOOP_SPEC, data=str(text))
    fail_at(monkeypatch, 2 * 3, lambda r: (_ for _ in ()).throw(Crash()))  # dies in step 3; checkpoint of step 2
    with pytest.raises(Crash):
        distill(student, tmp_path / "out", spec, teachers=((teacher, 1.0),), progress=False)
    monkeypatch.undo()
    text.write_text("\n\n".join(read_documents("pydoc:train")[20:40]))
    with pytest.raises(WhelpError, match="data files changed since it started.*--force to start over"):
        distill(student, tmp_path / "out", spec, teachers=((teacher, 1.0),), progress=False)
    fail_at(monkeypatch, 2 * 3, lambda r: (_ for _ in ()).throw(Crash()))  # a second run, on pydoc
    with pytest.raises(Crash):
        distill(student, tmp_path / "o2", LOOP_SPEC, teachers=((teacher, 1.0),), progress=False)
    monkeypatch.undo()
    ckpt = tmp_path / "o2.distill" / "checkpoints" / "step-00000002" / "shard-00001-model-00001-of-00001.safetensors"
    raw = bytearray(ckpt.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one byte flipped
    ckpt.write_bytes(bytes(raw))
    with pytest.raises(
        WhelpError, match="shard-00001-model-00001-of-00001.safetensors is missing or corrupted.*delete .*step-00000002"
    ):
        distill(student, tmp_path / "o2", LOOP_SPEC, teachers=((teacher, 1.0),), progress=False)


def test_a_damaged_metrics_log_is_named(tmp_path):
    from whelp.distillation import metrics

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2,\n{"step": 3}\n')
    with pytest.raises(WhelpError, match="metrics.jsonl:2 is not JSON; delete that line"):
        metrics.trim(log, 2)
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    metrics.trim(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
