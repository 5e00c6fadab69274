"""Training checkpoints on one process (no process group): DCP in safetensors only, verified, complete or absent, the
old format refused, and the grad_accum rescaling of a run resumed on another number of processes.

The same files written and read by 2 FSDP2 processes, and resumed across 1 <-> 2 processes, are in test_loop_dist.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import LOOP_SPEC, tiny_model
from safetensors import safe_open

from whelp import store
from whelp.distillation import checkpoint, parallel, run
from whelp.errors import WhelpError

SHARD = "shard-00001-model-00001-of-00001.safetensors"  # rank 0's DCP file


def trained(seed: int):
    """A tied tiny student after one AdamW step, its optimizer and scheduler."""
    model = parallel.KDStudent(tiny_model(seed=seed, tie_word_embeddings=True)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    model(torch.arange(16).view(2, 8)).logits.square().mean().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return model, optimizer, scheduler


def save(root: Path, step: int = 1, keep_last: int = 2):
    model, optimizer, scheduler = trained(seed=1)
    torch.manual_seed(7)
    path = checkpoint.save_checkpoint(root, step, model, optimizer, scheduler, {"tokens_seen": 5}, keep_last)
    return path, model, optimizer, scheduler


def test_a_checkpoint_is_safetensors_and_json_only_and_restores_everything(tmp_path):
    path, model, optimizer, scheduler = save(tmp_path)
    expected = torch.rand(3)  # what the restored RNG must draw next
    assert sorted(p.name for p in path.iterdir()) == sorted([SHARD, checkpoint.RNG, checkpoint.STATE, store.MARKER])
    for name in (SHARD, checkpoint.RNG):  # safetensors: a JSON header and raw bytes, nothing to unpickle
        with safe_open(path / name, framework="pt") as f:
            assert f.keys()
    with safe_open(path / SHARD, framework="pt") as f:
        assert "model/lm.lm_head.weight" not in f.keys()  # tied to the embedding: stored once
        assert json.loads(f.metadata()["DCP_SHARDING_INFO"])["model/lm.model.embed_tokens.weight"]
    meta = json.loads((path / checkpoint.STATE).read_text())
    assert (
        meta["format"] == checkpoint.FORMAT
        and meta["world_size"] == 1
        and set(meta["sha256"]) == {SHARD, checkpoint.RNG}
    )

    fresh, fresh_opt, fresh_sched = trained(seed=2)
    torch.manual_seed(0)
    assert checkpoint.load_checkpoint(path, fresh, fresh_opt, fresh_sched)["tokens_seen"] == 5
    assert torch.equal(torch.rand(3), expected)
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    assert fresh.lm.lm_head.weight is fresh.lm.model.embed_tokens.weight
    for param, fresh_param in zip(model.parameters(), fresh.parameters()):
        for key, value in optimizer.state[param].items():
            assert torch.equal(fresh_opt.state[fresh_param][key], value)
    assert fresh_sched.state_dict() == scheduler.state_dict()
    assert fresh_opt.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_the_newest_keep_last_are_kept(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step, keep_last=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]


@pytest.mark.parametrize("name", [SHARD, checkpoint.RNG])
def test_a_corrupted_or_missing_file_is_refused_naming_it(tmp_path, name):
    path = save(tmp_path)[0]
    raw = bytearray((path / name).read_bytes())
    raw[-1] ^= 0xFF  # same size, one byte of tensor data flipped
    (path / name).write_bytes(bytes(raw))
    with pytest.raises(WhelpError, match=f"{name} is missing or corrupted.*delete .*step-00000001 to resume"):
        checkpoint.load_checkpoint(path, *trained(seed=2))
    (path / name).unlink()
    with pytest.raises(WhelpError, match=f"{name} is missing or corrupted"):
        checkpoint.load_checkpoint(path, *trained(seed=2))


KILLED = """
import os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from test_checkpoint import save
from whelp.distillation import checkpoint
checkpoint.store.write_record = lambda *a: os._exit(9)  # killed after the shards, before state.json and the rename
save(Path(sys.argv[1]), step=2)
"""


def test_a_killed_write_is_cleaned_and_never_resumed_from(tmp_path, monkeypatch):
    save(tmp_path, step=1)
    done = subprocess.run(
        [sys.executable, "-c", KILLED, str(tmp_path), str(Path(__file__).parent)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 9, done.stderr[-2000:]
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".step-00000002.tmp-")]
    assert len(left) == 1 and (tmp_path / left[0] / SHARD).is_file()  # the dead writer's half-written temporary
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]

    def fail(*args):  # a failure in this process: the temporary goes at once
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.store, "write_record", fail)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, step=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]


def test_a_checkpoint_of_the_old_gathered_format_is_refused(tmp_path):
    path = tmp_path / "step-00000004"
    path.mkdir()
    for name in ("model.safetensors", "optimizer.safetensors"):
        (path / name).write_bytes(b"")
    store.write_record(path / checkpoint.STATE, {"step": 4, "world_size": 1, "sha256": {}})
    with pytest.raises(
        WhelpError,
        match=r"earlier whelp \(one gathered model.safetensors.*--force to start the run "
        "over",
    ):
        checkpoint.load_checkpoint(path, *trained(seed=2))


def test_grad_accum_is_rescaled_to_keep_the_global_batch():
    assert run.rescale_grad_accum(1, 2, 1, 0.0) == 2
    assert run.rescale_grad_accum(4, 1, 2, 0.0) == 2
    assert run.rescale_grad_accum(3, 2, 2, 0.5) == 3  # the same number of processes: on-policy resumes
    with pytest.raises(
        WhelpError,
        match=r"6 micro-batches \(--grad-accum 3 x 2 processes\), which 4 processes "
        "cannot split evenly: relaunch it on 2 processes",
    ):
        run.rescale_grad_accum(3, 2, 4, 0.0)
    with pytest.raises(
        WhelpError,
        match=r"on-policy \(on_policy=0.5\).*cannot resume on 1 processes: relaunch "
        "it on 2 .*--nproc_per_node 2",
    ):
        run.rescale_grad_accum(1, 2, 1, 0.5)


def identity(spec, world: int) -> dict:
    return {"student": "s", "teachers": [], "caches": [], "spec": spec.flat(), "world_size": world, "inputs": "x"}


def test_a_run_resumed_on_another_number_of_processes_compares_its_global_micro_batches(tmp_path):
    out = tmp_path / "out"
    run._prepare(out, identity(LOOP_SPEC, 2), force=False, resume=False)  # grad_accum 2 x 2 processes
    (run.run_dir(out) / "checkpoints" / "step-00000002").mkdir()
    rdir, changed, grad_accum = run._prepare(out, identity(LOOP_SPEC, 1), force=False, resume=False)
    assert grad_accum == 4 and changed == {"world_size": [2, 1], "grad_accum": [2, 4]}
    assert run.history(rdir)[-1] == {"from_step": 2, "changed": changed}
    # the rescaled run is the one compared next: back on 2 processes with the command's grad_accum 2 (or 4 on 1)
    assert run._prepare(out, identity(LOOP_SPEC, 2), force=False, resume=False)[1:] == (
        {"world_size": [1, 2], "grad_accum": [4, 2]},
        2,
    )
    assert run._prepare(out, identity(replace(LOOP_SPEC, grad_accum=4), 1), force=False, resume=False)[2] == 4
    with pytest.raises(WhelpError, match=r"other settings \(micro_batches_per_step: 4 there, 8 now\)"):
        run._prepare(out, identity(replace(LOOP_SPEC, grad_accum=8), 1), force=False, resume=False)
    with pytest.raises(WhelpError, match="cannot split evenly"):
        run._prepare(out, identity(LOOP_SPEC, 3), force=False, resume=False)
