"""whelp's storage rules: it deletes only what it made, records are sealed, temporaries of dead writers go."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from whelp import store
from whelp.errors import WhelpError


def dead_tag() -> str:
    """The ``HOST-PID`` tag of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return store.tag().rsplit("-", 1)[0] + f"-{proc.pid}"


def test_sealed_record_round_trip_and_any_edit_is_refused(tmp_path):
    path = store.write_record(tmp_path / "r.json", {"k": 8, "shards": [{"file": "a", "bytes": 3}]})
    assert store.read_record(path, "fix it") == {"k": 8, "shards": [{"file": "a", "bytes": 3}]}
    raw = json.loads(path.read_text())
    for edit in ({"k": 16}, {"shards": []}, {"extra": 1}):
        path.write_text(json.dumps({**raw, **edit}))
        with pytest.raises(WhelpError, match=r"r.json was edited or is corrupted.*fix it"):
            store.read_record(path, "fix it")
    path.write_text(path.read_text()[:20])
    with pytest.raises(WhelpError, match="corrupted \\(not JSON\\); fix it"):
        store.read_record(path, "fix it")
    path.write_text(json.dumps({"k": 8}))
    with pytest.raises(WhelpError, match="not a whelp record"):
        store.read_record(path, "fix it")
    with pytest.raises(WhelpError, match="missing; fix it"):
        store.read_record(tmp_path / "none.json", "fix it")


def test_check_writable_by_marker_kind_and_force(tmp_path):
    assert store.check_writable(tmp_path / "new", False, "model") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert store.check_writable(tmp_path / "empty", False, "model") == tmp_path / "empty"
    (tmp_path / "file").write_text("x")
    with pytest.raises(WhelpError, match="is a file"):
        store.check_writable(tmp_path / "file", True, "model")
    user = tmp_path / "user"
    user.mkdir()
    (user / "whelp.json").write_text('{"kind": "model"}')  # looks like a marker, is not a sealed one
    for force in (False, True):
        with pytest.raises(WhelpError, match="not made by whelp"):
            store.check_writable(user, force, "model")
    with store.atomic_dir(tmp_path / "mine", kind="eval", stage_key="abc") as tmp:
        (tmp / "metrics.json").write_text("{}")
    assert store.marker(tmp_path / "mine")["stage_key"] == "abc"
    with pytest.raises(WhelpError, match="holds a whelp eval output, not a model output"):
        store.check_writable(tmp_path / "mine", True, "model")
    with pytest.raises(WhelpError, match="already holds a whelp eval; pass --force"):
        store.check_writable(tmp_path / "mine", False, "eval")
    assert store.check_writable(tmp_path / "mine", True, "eval") == tmp_path / "mine"


def test_atomic_dir_keeps_the_old_output_until_the_new_one_is_complete(tmp_path):
    out = tmp_path / "out"
    with store.atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with store.atomic_dir(out, force=True) as tmp:
            (tmp / "a.txt").write_text("new, half written")
            raise KeyboardInterrupt
    assert (out / "a.txt").read_text() == "old"
    store.release(out)  # the lock file beside it goes with the claim
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~store._umask())  # the user's umask, not 0700


def test_stale_temporaries_of_dead_writers_are_cleaned_and_a_half_commit_is_undone(tmp_path):
    dead, live = dead_tag(), store.tag()
    out = tmp_path / "out"
    for name in (f".out.tmp-{dead}-x1", f".out.tmp-{live}-x2", f".other.tmp-{dead}-x3"):
        (tmp_path / name).mkdir()
    (tmp_path / f".out.json.tmp-{dead}").write_text("{")
    (tmp_path / f".out.old-{dead}").mkdir()  # killed between commit_dir's two renames: out is missing
    (tmp_path / f".out.old-{dead}" / "a.txt").write_text("the committed output")
    store.write_marker(tmp_path / f".out.old-{dead}", "model")
    store.check_writable(out, True, "model")
    store.release(out)
    assert (out / "a.txt").read_text() == "the committed output"
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["out", f".out.tmp-{live}-x2", f".other.tmp-{dead}-x3", f".out.json.tmp-{dead}"])
    store.clean_stale(tmp_path)  # every output's leftovers, as a run directory's cleaning does
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", f".out.tmp-{live}-x2"])


@pytest.mark.parametrize("name", ["..", ".", "", "../x", "a/b", ".hidden", "-x", "a\0b", "x" * 129, "/abs"])
def test_names_that_become_paths_must_be_one_plain_component(name):
    with pytest.raises(WhelpError, match="cannot name a directory"):
        store.check_name(name, "recipe.name")


def test_inside_refuses_paths_that_escape(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "link").symlink_to(tmp_path)
    assert store.inside(tmp_path / "runs", tmp_path / "runs" / "a", "x") == (tmp_path / "runs" / "a").resolve()
    for bad in (tmp_path / "runs" / "..", tmp_path / "runs" / "link", tmp_path / "runs"):
        with pytest.raises(WhelpError, match="outside"):
            store.inside(tmp_path / "runs", bad, "x")


def test_a_directory_that_appears_during_a_write_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(WhelpError, match="not made by whelp"):
        with store.atomic_dir(out) as tmp:
            (tmp / "model.safetensors").write_text("new")
            out.mkdir()  # the user made it while whelp was writing (a prune can take hours)
            (out / "thesis.tex").write_text("mine")
    store.release(out)
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_symlinks_and_the_current_directory_are_refused_as_outputs(tmp_path, monkeypatch):
    with store.atomic_dir(tmp_path / "real") as tmp:
        (tmp / "a.txt").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(WhelpError, match="is a symbolic link"):
        store.check_writable(tmp_path / "link", True, "model")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "a.txt").exists()
    monkeypatch.chdir(tmp_path / "real")
    for out in (".", "..", "/"):
        with pytest.raises(WhelpError, match="the current directory or holds it"):
            store.check_writable(out, True, "model")


def test_path_identity_changes_with_any_data_file_it_reads(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    before = store.path_identity(tmp_path)
    (tmp_path / "b.txt").write_text("two")
    added = store.path_identity(tmp_path)
    (tmp_path / "a.txt").write_text("one, longer")
    assert len({json.dumps(x) for x in (before, added, store.path_identity(tmp_path))}) == 3
    (tmp_path / ".hidden.txt").write_text("neither read as data nor counted")
    assert store.path_identity(tmp_path) == store.path_identity(tmp_path)


def test_a_changed_record_is_named_by_its_first_differing_leaf():
    old = {"seed": 3, "top_p": 1.0, "nested": {"a": [1, 2]}}
    assert store.first_change(old, {**old, "seed": 4}, "generation") == "generation.seed: 3 there, 4 now"
    assert store.first_change(old, {**old, "nested": {"a": [1]}}, "g") == "g.nested.a: [1, 2] there, [1] now"
    assert store.first_change("ab" * 32, "cd" * 32, "source") == "source: the files it was made from changed since"
    assert store.first_change(2, 3, "seq_len") == "seq_len: 2 there, 3 now"
