"""Teacher-logit capture: chunked on-device logits equal the model's own, the same cache from 1 process, 2 processes
(data parallel) and 2 processes sharing one tensor-parallel teacher, and a capture killed on one rank resumed on
another number of processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli, save_tiny, tiny_model, tiny_tokenizer, whelp_env

from whelp.data import TensorBlocks
from whelp.distillation import capture, head
from whelp.distillation.cache import open_cache
from whelp.distillation.losses import backbone
from whelp.errors import WhelpError
from whelp.specs import CacheSpec

FAMILIES = [
    ("llama", {}),
    ("granite", dict(logits_scaling=4.0)),
    ("gemma2", dict(final_logit_softcapping=3.0)),
    ("cohere", dict(logit_scale=0.25)),
]


@pytest.mark.parametrize("family,extra", FAMILIES, ids=[f for f, _ in FAMILIES])
def test_chunked_logits_equal_the_models_own(family, extra):
    model = tiny_model(family, seed=1, **extra)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)  # logits of tens: the soft-cap and the scale matter
        ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
        ref = model(input_ids=ids).logits.flatten(0, 1)
        hidden = backbone(model)(input_ids=ids).last_hidden_state.flatten(0, 1)
        mine = torch.cat([head.chunk_logits(model, hidden[c : c + 5], 512) for c in range(0, len(hidden), 5)])
    assert ref.abs().max() > 2.5
    torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)
    head.check_logits(model, ids[:1], "teacher", "cached", 512)


def test_a_family_with_an_unknown_logit_transform_is_refused(monkeypatch):
    import whelp.architecture

    model = tiny_model("granite", seed=1, logits_scaling=4.0)
    monkeypatch.setattr(whelp.architecture, "logit_transform", lambda config: lambda z: z)
    with pytest.raises(WhelpError, match=r"GraniteForCausalLM \(granite\) computes its logits in a way whelp"):
        head.check_logits(model, torch.arange(10).view(1, -1), "teacher", "cached", 512)


def test_targets_come_back_per_chunk_and_do_not_depend_on_its_size(monkeypatch):
    """Only [CHUNK, V] logits exist at a time, on the teacher's device; top-k targets are the same for any chunk."""
    model, seen = tiny_model(seed=1), []
    real = capture.sparse_targets

    def spy(logits, *args):
        seen.append(tuple(logits.shape))
        return real(logits, *args)

    tokens = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(0))
    spec = {"seed": 0, "vocab_size": 512, "mode": "topk", "k": 8, "temperature": 1.0}
    whole = capture.teacher_shard(model, tokens, spec, 0, 2)
    monkeypatch.setattr(capture, "CHUNK", 5)
    monkeypatch.setattr(capture, "sparse_targets", spy)
    chunked = capture.teacher_shard(model, tokens, spec, 0, 2)
    assert max(n for n, _ in seen) == 5 and {v for _, v in seen} == {512}
    for key in whole:
        assert torch.equal(whole[key], chunked[key]), key


def test_content_fingerprint_is_over_blocks_not_shards(tmp_path):
    """Two shard layouts of the same blocks: other files, the same content_sha256; other data: another one."""
    model = tiny_model(seed=1)
    data = TensorBlocks(torch.randint(0, 512, (6, 16), generator=torch.Generator().manual_seed(0)))
    digests = []
    for name, per in (("a", 16), ("b", 48)):
        path = capture.write_cache(
            capture.Teacher(model, tiny_tokenizer(), "t"),
            data,
            tmp_path / name,
            CacheSpec("sample", 4, 1.0, shard_tokens=per),
        )
        digests.append(open_cache(path).manifest["content_sha256"])
    other = TensorBlocks(data.tokens.roll(1, 0))
    path = capture.write_cache(
        capture.Teacher(model, tiny_tokenizer(), "t"),
        other,
        tmp_path / "c",
        CacheSpec("sample", 4, 1.0, shard_tokens=16),
    )
    assert len(list((tmp_path / "a").glob("blocks-*"))) == 6 and len(list((tmp_path / "b").glob("blocks-*"))) == 2
    assert digests[0] == digests[1] != open_cache(path).manifest["content_sha256"]


def test_tensor_parallel_needs_a_multiple_of_its_processes(tmp_path):
    teacher = tmp_path / "t"
    save_tiny(teacher, tiny_tokenizer(), seed=1)
    result = run_cli(
        "cache-logits",
        str(teacher),
        "--data",
        "pydoc:train",
        "--out",
        str(tmp_path / "c"),
        "--topk",
        "4",
        "--seq-len",
        "16",
        "--max-tokens",
        "64",
        "--tp-size",
        "2",
    )
    assert result.exit_code == 2
    assert (
        "error: --tp-size 2 needs a multiple of 2 processes (torchrun --nproc_per_node), this run has 1"
        in result.stderr
    )


# --- under torchrun (gloo on CPU) --------------------------------------------------------------------------------

CAPTURE = ["--data", "pydoc:train", "--seq-len", "16", "--max-tokens", "512", "--shard-tokens", "32"]  # 16 shards

KILL_DRIVER = """
import os, signal, sys
from whelp.distillation import capture
capture.MANIFEST_EVERY_S = 0.0  # record every round, so the kill lands after exactly two recorded rounds
real, calls = capture.teacher_shard, {"n": 0}
def dying(*a, **k):
    calls["n"] += 1
    if os.environ["RANK"] == "1" and calls["n"] == 3:  # rank 1 dies in its third round, rank 0 goes on
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
capture.teacher_shard = dying
from whelp.cli import app
app(args=sys.argv[1:], prog_name="whelp")
"""


def torchrun(*args: str, nproc: int = 2, driver: Path | None = None) -> subprocess.CompletedProcess:
    launcher = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(nproc)]
    target = [str(driver)] if driver else ["-m", "whelp"]
    return subprocess.run(
        launcher + target + list(args), capture_output=True, text=True, timeout=300, env=whelp_env(OMP_NUM_THREADS="1")
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny teacher and its 1-process sample cache (16 shards of 2 blocks)."""
    root = tmp_path_factory.mktemp("capture")
    save_tiny(root / "teacher", tiny_tokenizer(), seed=1)
    result = run_cli("cache-logits", str(root / "teacher"), "--out", str(root / "one"), "--sample", "8", *CAPTURE)
    assert result.exit_code == 0, result.stderr
    return root


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


@pytest.mark.slow
def test_one_and_two_process_captures_are_identical(reference, tmp_path):
    done = torchrun(
        "cache-logits", str(reference / "teacher"), "--out", str(tmp_path / "two"), "--sample", "8", *CAPTURE
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote the") == 1  # one closing line, from rank 0
    one, two = manifest(reference / "one"), manifest(tmp_path / "two")
    assert one["content_sha256"] == two["content_sha256"] and len(two["shards"]) == 16
    for shard in one["shards"]:  # bit-equal entries, shard by shard
        assert (reference / "one" / shard["file"]).read_bytes() == (tmp_path / "two" / shard["file"]).read_bytes()


@pytest.mark.slow
def test_a_capture_killed_on_one_rank_resumes_on_one_process(reference, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_DRIVER)
    out = tmp_path / "cut"
    died = torchrun(
        "cache-logits", str(reference / "teacher"), "--out", str(out), "--sample", "8", *CAPTURE, driver=driver
    )
    assert died.returncode != 0
    cut = manifest(out)
    assert not cut["complete"] and len(cut["shards"]) == 4  # the two whole rounds of two ranks before the kill
    result = run_cli("cache-logits", str(reference / "teacher"), "--out", str(out), "--sample", "8", *CAPTURE)
    assert result.exit_code == 0, result.stderr
    assert manifest(out)["content_sha256"] == manifest(reference / "one")["content_sha256"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # the dead ranks' temporaries are gone


@pytest.mark.slow
def test_a_tensor_parallel_teacher_captures_what_one_process_does(reference, tmp_path):
    args = ["--topk", "8", *CAPTURE]
    assert run_cli("cache-logits", str(reference / "teacher"), "--out", str(tmp_path / "one"), *args).exit_code == 0
    done = torchrun("cache-logits", str(reference / "teacher"), "--out", str(tmp_path / "tp"), "--tp-size", "2", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    one, tp = open_cache(tmp_path / "one"), open_cache(tmp_path / "tp")
    rows = torch.arange(32)
    a, b = one.targets(rows), tp.targets(rows)
    assert torch.equal(a.ids, b.ids)  # the sharded matmuls reorder sums: equal ranks, fp16-equal values
    torch.testing.assert_close(b.logp, a.logp, atol=2e-3, rtol=0)
    torch.testing.assert_close(b.tail, a.tail, atol=2e-3, rtol=0)
