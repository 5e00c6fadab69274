"""Teacher-logit cache: bit packing, encode/decode fidelity, manifest checks, damaged shards, resume, CLI."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli, tiny_model

from whelp.data import TensorBlocks
from whelp.distillation.cache import decode, encode, open_cache, pack_bits, sparse_targets, unpack_bits
from whelp.distillation.capture import Teacher, write_cache
from whelp.distillation.losses import LiveTarget, LossSpec, kd_loss
from whelp.errors import WhelpError
from whelp.specs import CacheSpec

VOCAB, SEQ = 512, 16


class StubTokenizer:
    """Enough of a tokenizer for the cache's identity: a vocab map and special ids."""

    def __init__(self, vocab=VOCAB, shift=0):
        self.vocab = {f"t{i + shift}": i for i in range(vocab)}
        self.bos_token_id, self.eos_token_id, self.pad_token_id = 0, 1, None

    def get_vocab(self):
        return self.vocab

    def __len__(self):
        return len(self.vocab)


@pytest.fixture(scope="module")
def teacher():
    return tiny_model(vocab_size=VOCAB, seed=3)


def blocks(n=5, seed=0):
    return TensorBlocks(torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed)), "random")


@pytest.mark.parametrize("bits", [1, 7, 16, 17, 31, 32, 40])
def test_pack_bits_round_trip(bits):
    values = torch.randint(0, 2**bits, (9, 13), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (9, (13 * bits + 7) // 8)
    assert torch.equal(unpack_bits(packed, 13, bits), values)


def test_encode_decode_topk_and_bytes_per_token():
    logits = torch.randn(50, 128256) * 3
    target = sparse_targets(logits, "topk", 64, 1.0)
    stored = encode(target)
    assert sum(t[0].numel() * t.element_size() for t in stored.values()) + 4 <= 264  # + int32 token id
    back = decode(stored, "topk", 64, 1.0, 128256)
    assert torch.equal(back.ids, target.ids)
    assert torch.allclose(back.logp, target.logp, rtol=1e-3, atol=1e-6)
    assert torch.allclose(back.tail, target.tail, rtol=1e-3, atol=1e-7)
    sampled = sparse_targets(logits, "sample", 16, 1.0, torch.Generator().manual_seed(0))
    stored = encode(sampled)
    assert sum(t[0].numel() * t.element_size() for t in stored.values()) + 4 <= 48
    assert torch.equal(decode(stored, "sample", 16, 1.0, 128256).ids, sampled.ids)


def test_cached_topk_with_k_equal_v_reproduces_dense_loss():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(12, 8, generator=g), torch.randn(VOCAB, 8, generator=g)
    live = LiveTarget(torch.randn(12, 10, generator=g), torch.randn(VOCAB, 10, generator=g))
    stored = encode(sparse_targets(live.hidden @ live.weight.T, "topk", VOCAB, 2.0))
    cached = decode(stored, "topk", VOCAB, 2.0, VOCAB)
    spec = LossSpec(temperature=2.0, chunk_size=5)
    dense, sparse = (kd_loss(h, w, [t], (1.0,), spec).loss for t in (live, cached))
    assert abs(float(sparse) / float(dense) - 1) <= 1e-3  # fp16 log-probs


def test_cache_targets_align_with_teacher_logits(teacher, tmp_path):
    data = blocks()
    cache = open_cache(
        write_cache(
            Teacher(teacher, StubTokenizer(), "tiny"),
            data,
            tmp_path / "c",
            CacheSpec("topk", 4, 1.0, shard_tokens=2 * SEQ),
        ),
        student_vocab_size=VOCAB,
        data_fingerprint=data.fingerprint,
    )
    assert torch.equal(cache.tokens(torch.arange(5)), data.tokens) and len(cache.manifest["shards"]) == 3
    idx = torch.tensor([4, 0, 3])
    got = cache.targets(idx)
    with torch.no_grad():
        logp = F.log_softmax(teacher(input_ids=data.tokens[idx]).logits.flatten(0, 1), -1)
    assert torch.equal(got.ids[:, 0], logp.argmax(-1))  # position t holds the prediction of token t + 1
    assert torch.allclose(got.logp, logp.gather(1, got.ids), rtol=1e-3, atol=1e-5)
    assert torch.allclose(got.tail, 1 - got.logp.exp().sum(-1), atol=2e-3)


def test_manifest_mismatch_is_named(teacher, tmp_path):
    data = blocks()
    path = write_cache(Teacher(teacher, StubTokenizer(), "tiny"), data, tmp_path / "c", CacheSpec("sample", 8, 1.0))
    with pytest.raises(WhelpError, match="vocabularies differ"):
        open_cache(path, student_vocab_size=VOCAB - 1)
    with pytest.raises(WhelpError, match="different tokenizer"):
        open_cache(path, tokenizer=StubTokenizer(shift=1))
    with pytest.raises(WhelpError, match="other data"):
        open_cache(path, data_fingerprint=blocks(seed=1).fingerprint)
    with pytest.raises(WhelpError, match="temperature: 1.0 there, 2.0 now"):
        write_cache(Teacher(teacher, StubTokenizer(), "tiny"), data, path, CacheSpec("sample", 8, 2.0))
    with pytest.raises(WhelpError, match="already holds this complete cache"):
        write_cache(Teacher(teacher, StubTokenizer(), "tiny"), data, path, CacheSpec("sample", 8, 1.0))
    target = open_cache(path).targets(torch.tensor([1]))
    with pytest.raises(WhelpError, match="cached at temperature 1.0"):
        kd_loss(torch.randn(SEQ, 8), torch.randn(VOCAB, 8), [target], (1.0,), LossSpec(temperature=2.0))


def test_truncated_and_corrupted_shards_are_named(teacher, tmp_path):
    path = write_cache(
        Teacher(teacher, StubTokenizer(), "tiny"),
        blocks(),
        tmp_path / "c",
        CacheSpec("topk", 4, 1.0, shard_tokens=2 * SEQ),
    )
    shard = path / "blocks-000000000002-000000000004.safetensors"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-10])
    with pytest.raises(WhelpError, match="blocks-000000000002-000000000004.safetensors is truncated"):
        open_cache(path)
    shard.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(WhelpError, match="blocks-000000000002-000000000004.safetensors is corrupted"):
        open_cache(path)
    write_cache(
        Teacher(teacher, StubTokenizer(), "tiny"), blocks(), path, CacheSpec("topk", 4, 1.0, shard_tokens=2 * SEQ)
    )
    assert shard.read_bytes() == raw  # rerunning rewrote exactly the damaged shard


def test_resume_after_interrupt_equals_uninterrupted_run(teacher, tmp_path):
    data, calls = blocks(), []

    def interrupt(n):
        calls.append(n)
        if len(calls) == 2:
            raise KeyboardInterrupt

    args = (teacher, StubTokenizer(), data)
    with pytest.raises(KeyboardInterrupt):
        write_cache(
            Teacher(args[0], args[1], "tiny"),
            args[2],
            tmp_path / "c",
            CacheSpec("sample", 8, 1.0, shard_tokens=SEQ),
            progress=interrupt,
        )
    with pytest.raises(WhelpError, match="incomplete"):
        open_cache(tmp_path / "c")
    first = (tmp_path / "c" / "blocks-000000000000-000000000001.safetensors").stat().st_mtime_ns
    resumed = open_cache(
        write_cache(
            Teacher(args[0], args[1], "tiny"), args[2], tmp_path / "c", CacheSpec("sample", 8, 1.0, shard_tokens=SEQ)
        )
    )
    assert (tmp_path / "c" / "blocks-000000000000-000000000001.safetensors").stat().st_mtime_ns == first
    whole = open_cache(
        write_cache(
            Teacher(args[0], args[1], "tiny"), args[2], tmp_path / "w", CacheSpec("sample", 8, 1.0, shard_tokens=SEQ)
        )
    )
    idx = torch.arange(5)
    assert torch.equal(resumed.targets(idx).ids, whole.targets(idx).ids)
    assert [s["sha256"] for s in resumed.manifest["shards"]] == [s["sha256"] for s in whole.manifest["shards"]]
    assert not list((tmp_path / "c").glob(".*"))  # no temporaries left behind


def test_edited_manifest_is_refused_not_trained_on(teacher, tmp_path):
    import json

    path = write_cache(Teacher(teacher, StubTokenizer(), "tiny"), blocks(), tmp_path / "c", CacheSpec("topk", 8, 1.0))
    manifest = path / "manifest.json"
    original = manifest.read_text()
    for edit in ('"k": 16', '"temperature": 2.0', '"complete": false'):
        key = edit.split(":")[0]
        raw = json.loads(original)
        raw[key.strip('"')] = json.loads(edit.split(": ")[1])
        manifest.write_text(json.dumps(raw))
        with pytest.raises(WhelpError, match="manifest.json was edited or is corrupted.*--force"):
            open_cache(path)
    manifest.write_text(original)
    assert open_cache(path).manifest["k"] == 8
    manifest.write_text(original.replace('"k": 8', '"k": 16'))
    write_cache(
        Teacher(teacher, StubTokenizer(), "tiny"), blocks(), path, CacheSpec("topk", 8, 1.0), force=True
    )  # --force mends it
    assert open_cache(path).manifest["k"] == 8


def test_force_replaces_only_a_cache_and_keeps_it_until_the_new_one_is_complete(teacher, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.json").write_text("{}")  # a user's file of the same name is not whelp's manifest
    for force in (False, True):
        with pytest.raises(WhelpError, match="not made by whelp"):
            write_cache(
                Teacher(teacher, StubTokenizer(), "tiny"), blocks(), mine, CacheSpec("topk", 4, 1.0), force=force
            )
    assert [p.name for p in mine.iterdir()] == ["manifest.json"]
    path = write_cache(
        Teacher(teacher, StubTokenizer(), "tiny"), blocks(), tmp_path / "c", CacheSpec("topk", 4, 1.0, shard_tokens=SEQ)
    )
    old = open_cache(path).targets(torch.arange(5)).ids

    def interrupt(n):
        raise KeyboardInterrupt

    other = blocks(seed=1)
    with pytest.raises(KeyboardInterrupt):
        write_cache(
            Teacher(teacher, StubTokenizer(), "tiny"),
            other,
            path,
            CacheSpec("topk", 4, 1.0, shard_tokens=SEQ),
            force=True,
            progress=interrupt,
        )
    assert torch.equal(open_cache(path).targets(torch.arange(5)).ids, old)  # the old cache is intact
    write_cache(
        Teacher(teacher, StubTokenizer(), "tiny"), other, path, CacheSpec("topk", 4, 1.0, shard_tokens=SEQ), force=True
    )
    assert open_cache(path, data_fingerprint=other.fingerprint).manifest["complete"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "mine"]


@pytest.mark.demo
def test_cache_logits_cli_on_demo_teacher(demo, tmp_path):
    out = tmp_path / "cache"
    args = [
        "cache-logits",
        "smollm2-135m",
        "--data",
        "pydoc:calib",
        "--out",
        str(out),
        "--topk",
        "8",
        "--seq-len",
        "32",
        "--max-tokens",
        "96",
    ]
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    model, tokenizer = demo
    cache = open_cache(out, student_vocab_size=model.config.vocab_size, tokenizer=tokenizer)
    m = cache.manifest
    assert (m["teacher"], m["mode"], m["k"], m["seq_len"], m["n_blocks"], m["vocab_size"]) == (
        "smollm2-135m",
        "topk",
        8,
        32,
        3,
        49152,
    )
    target = cache.targets(torch.tensor([1]))
    with torch.no_grad():
        logits = model(input_ids=cache.tokens(torch.tensor([1]))).logits[0]
    assert torch.equal(target.ids[:, 0], logits.argmax(-1))
    again = run_cli(*args)
    assert again.exit_code == 2 and again.stderr.startswith("error: ") and "--force" in again.stderr
