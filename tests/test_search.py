"""``whelp search`` end to end on a tiny teacher: outputs, determinism, kill-and-resume, dry runs, latency budgets."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import assistant_of, make_chat_teacher, run_cli, save_tiny, tiny_tokenizer

from whelp import architecture, models
from whelp.errors import WhelpError
from whelp.search import run as search_mod
from whelp.search.run import search_run
from whelp.specs import SearchSpec

SPEC = SearchSpec(
    budget="non_embedding=60%",
    tolerance=0.2,
    multiple=16,
    pool=3,
    candidates=2,
    score_steps=2,
    calib_samples=4,
    eval_blocks=2,
    seq_len=16,
    batch_size=2,
    lr=1e-3,
)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("search") / "teacher"
    save_tiny(path, tiny_tokenizer(), seed=1)
    make_chat_teacher(path, [0, 5])  # stops at <eos> and one more id
    return path


@pytest.fixture(scope="module")
def searched(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("searched") / "out"
    return out, search_run(str(teacher), SPEC, out, progress=False)


def test_search_writes_a_leaderboard_a_winner_and_a_target(teacher, searched, tmp_path):
    from transformers import AutoModelForCausalLM

    out, result = searched
    assert sorted(p.name for p in out.iterdir()) == [
        "search.json",
        "search.md",
        "search.png",
        "target.json",
        "whelp.json",
        "winner",
    ]
    board = result["leaderboard"]
    assert [c["rank"] for c in board] == [1, 2] and board[0]["trained"]["kl"] <= board[1]["trained"]["kl"]
    assert sorted(c["one_shot_rank"] for c in board) == [1, 2]
    assert len(result["pool"]) == 3 and json.loads((out / "search.json").read_text()) == result
    assert "| 1 |" in (out / "search.md").read_text()
    teacher_ne = architecture.count_params(models.load_config(str(teacher)))[1]
    for row in result["pool"]:  # every pool shape meets the budget: within 20% below 60% of the teacher
        assert 0.8 * 0.6 * teacher_ne <= row["params"][1] <= 0.6 * teacher_ne
    winner = AutoModelForCausalLM.from_pretrained(out / "winner")
    total, non_embedding = architecture.count_params(winner.config)
    assert [total, non_embedding] == board[0]["params"] == [sum(p.numel() for p in winner.parameters()), non_embedding]
    assert architecture.shape(winner.config) == board[0]["shape"]
    assert assistant_of(out / "winner") == assistant_of(teacher)  # its chat template and every stop id
    pruned = tmp_path / "pruned"
    result_cli = run_cli(
        "prune",
        str(teacher),
        "--target",
        str(out / "target.json"),
        "--out",
        str(pruned),
        "--calib-samples",
        "4",
        "--seq-len",
        "16",
    )
    assert result_cli.exit_code == 0, result_cli.stderr
    assert architecture.shape(models.load_config(str(pruned))) == board[0]["shape"]


def test_a_killed_search_resumes_to_the_uninterrupted_result(teacher, searched, tmp_path, monkeypatch):
    """Killed in the second candidate's training, re-run: the first candidate and the pool are not redone, and the
    leaderboard equals an uninterrupted run's number for number (the search is deterministic by seed)."""
    import whelp.distillation.inprocess as inprocess

    real, calls = inprocess.distill, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(inprocess, "distill", dying)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        search_run(str(teacher), SPEC, out, progress=False)
    assert not out.exists() and (search_mod.work_dir(out) / "candidates" / "00" / "result.json").is_file()
    monkeypatch.setattr(inprocess, "distill", real)
    pool_scores = []
    monkeypatch.setattr(
        search_mod.Trial, "score", lambda self, m, f=search_mod.Trial.score: pool_scores.append(1) or f(self, m)
    )
    resumed = search_run(str(teacher), SPEC, out, progress=False)
    assert len(pool_scores) == 1  # only the second candidate was trained (and scored) again
    untimed = lambda board: [{k: v for k, v in c.items() if k != "train_s"} for c in board]  # noqa: E731
    assert untimed(resumed["leaderboard"]) == untimed(searched[1]["leaderboard"])
    assert resumed["pool"] == searched[1]["pool"]


def test_another_search_in_the_same_place_is_refused(tmp_path):
    """OUT.search holds one search's stages, keyed by its inputs: another search there needs --force."""
    work = search_mod._work(tmp_path / "out", "key-1", force=False)
    (work / "proxy.json").write_text("{}")
    assert search_mod._work(tmp_path / "out", "key-1", force=False) == work and (work / "proxy.json").exists()
    with pytest.raises(WhelpError, match="holds a search with other settings or inputs; pass --force"):
        search_mod._work(tmp_path / "out", "key-2", force=False)
    assert not (search_mod._work(tmp_path / "out", "key-2", force=True) / "proxy.json").exists()


def test_dry_run_lists_candidates_and_cost_without_loading_weights(teacher, monkeypatch, tmp_path):
    def no(*a, **k):
        raise AssertionError("a dry run loaded weights")

    monkeypatch.setattr(models, "load_model", no)
    result = run_cli(
        "search",
        str(teacher),
        "--out",
        str(tmp_path / "o"),
        "--budget",
        "non_embedding=60%",
        "--tolerance",
        "0.2",
        "--multiple",
        "16",
        "--pool",
        "3",
        "--candidates",
        "2",
        "--dry-run",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    shown = json.loads(result.stdout)
    assert len(shown["pool"]) == 3 and len(shown["candidates"]) >= 3 and shown["cost"]["total"] > 0
    assert all(row["shape"] in shown["candidates"] for row in shown["pool"])
    assert not (tmp_path / "o").exists() and not search_mod.work_dir(tmp_path / "o").exists()


def test_bad_budgets_are_one_line(teacher, tmp_path):
    for budget, message in [
        ("weight=5", "unknown budget key 'weight'"),
        ("latency=5ms", "latency"),
        ("non_embedding=1", "no shape"),
    ]:
        result = run_cli("search", str(teacher), "--out", str(tmp_path / "o"), "--budget", budget, "--dry-run")
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert message in result.stderr, result.stderr


def test_a_latency_budget_is_measured_per_shape_and_cached(teacher, tmp_path, monkeypatch):
    import whelp.evals.speed as speed

    monkeypatch.setenv("WHELP_HOME", str(tmp_path / "home"))
    real, timed = speed.measure_speed, []
    monkeypatch.setattr(speed, "measure_speed", lambda m, s: timed.append(1) or real(m, s))
    spec = replace(SPEC, budget="non_embedding=60%,latency=10s", candidates=1, score_steps=1)
    result = search_run(str(teacher), spec, tmp_path / "a", progress=False)
    assert len(timed) == 3 and all(row["latency_ms"] > 0 for row in result["pool"])
    search_run(str(teacher), spec, tmp_path / "b", progress=False)
    assert len(timed) == 3  # the second search found every shape's speed in the cache
    with pytest.raises(WhelpError, match="no pool shape decodes within 1e-06 ms/token"):
        search_run(
            str(teacher), replace(spec, budget="non_embedding=60%,latency=0.000001ms"), tmp_path / "c", progress=False
        )


def test_a_dry_run_refuses_what_the_real_run_refuses(teacher, tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's directory")
    base = ["search", str(teacher), "--budget", "non_embedding=60%", "--multiple", "16", "--pool", "3"]
    base += ["--candidates", "2", "--tolerance", "0.2"]
    for extra, message in [
        (["--out", str(tmp_path / "o"), "--calib", "no-such-source"], "no-such-source"),
        (["--out", str(tmp_path / "o"), "--eval-data", str(tmp_path / "missing.txt")], "missing.txt"),
        (["--out", str(tmp_path / "file")], "is a file"),
        (["--out", str(tmp_path / "mine")], "not made by whelp"),
    ]:
        for dry in (["--dry-run"], []):
            result = run_cli(*base, *extra, *dry)
            assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
            assert message in result.stderr, (dry, result.stderr)
    assert not (tmp_path / "o").exists() and not search_mod.work_dir(tmp_path / "o").exists()


def test_an_impossible_latency_fails_before_the_teacher_loads_and_does_not_block_the_fix(
    teacher, tmp_path, monkeypatch
):
    monkeypatch.setenv("WHELP_HOME", str(tmp_path / "home"))
    real = models.load_model

    def no(*a, **k):
        raise AssertionError("the teacher's weights were loaded for an impossible budget")

    monkeypatch.setattr(models, "load_model", no)
    spec = replace(SPEC, budget="non_embedding=60%,latency=0.000001ms", candidates=1, score_steps=1)
    with pytest.raises(WhelpError, match="no pool shape decodes within 1e-06 ms/token"):
        search_run(str(teacher), spec, tmp_path / "o", progress=False)
    monkeypatch.setattr(models, "load_model", real)
    fixed = search_run(
        str(teacher), replace(spec, budget="non_embedding=60%,latency=10s"), tmp_path / "o", progress=False
    )
    assert fixed["leaderboard"] and all(row["latency_ms"] > 0 for row in fixed["pool"])
