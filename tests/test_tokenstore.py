"""Token stores: the same blocks as the in-memory path bit for bit, identical shards for 1 and 2 workers, resume,
damage named on read, tokenizer mismatch refused, mixtures drawn by weight, rank slices of every global batch."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import torch
from conftest import tiny_tokenizer

from whelp import data
from whelp.data import encode, tokenstore
from whelp.distillation import schedule
from whelp.errors import WhelpError


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A jsonl of pydoc's documents, each cut into paragraphs: a few hundred documents of varied length."""
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    docs = [p for d in data.read_documents("pydoc:train") for p in d.split("\n\n") if p.strip()]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def in_memory(spec, tok, seq_len, seed, max_tokens=None):
    """The reference: every document tokenized, joined with EOS, packed, blocks shuffled by ``seed``."""
    blocks = data.pack(data.read_documents(spec), tok, seq_len, max_tokens)
    return blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize("seq_len, seed, max_tokens", [(32, 0, None), (100, 3, 5000), (256, 1, None)])
def test_store_blocks_equal_the_in_memory_path_bit_for_bit(tok, corpus, tmp_path, seq_len, seed, max_tokens):
    store = tokenstore.tokenize(str(corpus), tok, tmp_path / "s", num_proc=1, shard_tokens=4096, progress=False)
    rows = data.open_blocks(str(store), tok, seq_len, seed=seed, max_tokens=max_tokens)
    assert torch.equal(rows.head(), in_memory(str(corpus), tok, seq_len, seed, max_tokens))
    assert len(tokenstore.open_store(store).manifest["shards"]) > 3
    raw = data.open_blocks(str(corpus), tok, seq_len, seed=seed, max_tokens=max_tokens)  # tokenized once, cached
    assert torch.equal(raw.head(), rows.head())
    assert torch.equal(
        data.stream_tokens(str(store), tok, 3000), data.token_stream(data.read_documents(str(corpus)), tok, 3000)
    )


def test_one_and_two_workers_write_identical_shards_and_max_tokens_cuts_exactly(tok, corpus, tmp_path):
    one = tokenstore.tokenize(str(corpus), tok, tmp_path / "one", num_proc=1, shard_tokens=4096, progress=False)
    two = tokenstore.tokenize(str(corpus), tok, tmp_path / "two", num_proc=2, shard_tokens=4096, progress=False)
    a, b = tokenstore.open_store(one).manifest, tokenstore.open_store(two).manifest
    assert a["shards"] == b["shards"] and a["fingerprint"] == b["fingerprint"]
    for s in a["shards"]:
        assert (one / s["file"]).read_bytes() == (two / s["file"]).read_bytes()
    assert a["dtype"] == "uint16" and all(s["bytes"] == 2 * s["tokens"] for s in a["shards"])
    cut = tokenstore.tokenize(
        str(corpus), tok, tmp_path / "cut", num_proc=2, max_tokens=10_001, shard_tokens=4096, progress=False
    )
    assert len(tokenstore.open_store(cut)) == 10_001
    assert np.array_equal(tokenstore.open_store(cut).read(0, 10_001), tokenstore.open_store(one).read(0, 10_001))


def test_interrupted_tokenize_resumes_to_the_same_store(tok, corpus, tmp_path, monkeypatch):
    whole = tokenstore.tokenize(str(corpus), tok, tmp_path / "whole", num_proc=1, shard_tokens=4096, progress=False)
    real, calls = tokenstore.flush, []

    def killed_after_two(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(tokenstore, "flush", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        tokenstore.tokenize(str(corpus), tok, tmp_path / "r", num_proc=2, shard_tokens=4096, progress=False)
    monkeypatch.undo()
    with pytest.raises(WhelpError, match="incomplete .*2 shards.*resume"):
        tokenstore.open_store(tmp_path / "r")
    first = (tmp_path / "r" / "tokens-00000.bin").stat().st_mtime_ns
    resumed = tokenstore.tokenize(str(corpus), tok, tmp_path / "r", num_proc=2, shard_tokens=4096, progress=False)
    assert (resumed / "tokens-00000.bin").stat().st_mtime_ns == first
    assert tokenstore.open_store(resumed).manifest["shards"] == tokenstore.open_store(whole).manifest["shards"]
    with pytest.raises(WhelpError, match="already holds this complete token store"):
        tokenstore.tokenize(str(corpus), tok, tmp_path / "r", num_proc=1, shard_tokens=4096, progress=False)


def test_damage_and_mismatches_are_one_clear_line_and_nothing_is_overwritten(tok, corpus, tmp_path):
    path = tokenstore.tokenize(str(corpus), tok, tmp_path / "s", num_proc=1, shard_tokens=4096, progress=False)
    shard = path / "tokens-00001.bin"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-2])
    with pytest.raises(WhelpError, match="tokens-00001.bin is truncated"):
        data.open_blocks(str(path), tok, 32)
    shard.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    rows = data.open_blocks(str(path), tok, 32)  # sizes are right: the sha256 is checked when the shard is read
    with pytest.raises(WhelpError, match="tokens-00001.bin is corrupted"):
        rows.head()
    shard.unlink()
    with pytest.raises(WhelpError, match="tokens-00001.bin is missing"):
        data.open_blocks(str(path), tok, 32)
    tokenstore.tokenize(str(corpus), tok, path, num_proc=1, shard_tokens=4096, progress=False)  # rewrites from there
    assert shard.read_bytes() == raw
    manifest = path / "manifest.json"
    original = manifest.read_text()
    edited = json.loads(original)
    edited["dtype"] = "uint32"
    manifest.write_text(json.dumps(edited))
    with pytest.raises(WhelpError, match="manifest.json was edited or is corrupted"):
        data.open_blocks(str(path), tok, 32)
    manifest.write_text(original)
    with pytest.raises(WhelpError, match="was tokenized with .* not with .*tokenize the source with the model's"):
        data.open_blocks(str(path), tiny_other_tokenizer(), 32)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(WhelpError, match="not made by whelp"):
            tokenstore.tokenize(str(corpus), tok, mine, num_proc=1, force=force, progress=False)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def tiny_other_tokenizer():
    """The tiny BPE with two ids swapped: the same vocabulary size, other ids."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    base = tiny_tokenizer()
    spec = json.loads(base.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab)[100], sorted(vocab)[200]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<eos>")


def test_a_mixture_draws_each_source_by_weight_deterministically(tok, corpus, tmp_path):
    a = tokenstore.tokenize(str(corpus), tok, tmp_path / "a", num_proc=1, progress=False)
    b = tokenstore.tokenize("pydoc:eval", tok, tmp_path / "b", num_proc=1, progress=False)
    spec = f"{a}:0.7,{b}:0.3"
    rows = data.open_blocks(spec, tok, 8, seed=0)
    n = min(len(rows), 10_000)
    assert n == 10_000
    located = rows.locate(torch.arange(n))
    share = collections.Counter(i for i, _ in located)
    assert abs(share[0] / n - 0.7) <= 0.02 and abs(share[1] / n - 0.3) <= 0.02
    again = data.open_blocks(spec, tok, 8, seed=0)
    assert again.locate(torch.arange(n)) == located and torch.equal(again[torch.arange(50)], rows[torch.arange(50)])
    assert data.open_blocks(spec, tok, 8, seed=1).locate(torch.arange(n)) != located
    blocks_of_a = [blk for i, blk in located if i == 0]
    assert len(set(blocks_of_a)) == len(blocks_of_a)  # within one pass no block is drawn twice
    with pytest.raises(WhelpError, match="bad data mixture"):
        data.open_blocks(f"{a}:0.7,{b}:0", tok, 8)


def test_an_epoch_of_a_mixture_reads_all_of_its_longest_source_and_repeats_the_shorter(tok, corpus, tmp_path):
    """50/50 of two stores of different sizes: one epoch holds every block of the larger once (rows = max n_i / w_i);
    the smaller source's blocks all come, repeated. (With rows = min, the larger was read only as far as the smaller
    lasted, every epoch.)"""
    large = tokenstore.tokenize(str(corpus), tok, tmp_path / "a", num_proc=1, progress=False)
    small = tokenstore.tokenize("pydoc:eval", tok, tmp_path / "b", num_proc=1, progress=False)
    rows = data.open_blocks(f"{small}:0.5,{large}:0.5", tok, 64, seed=0)
    n_small, n_large = rows.n_blocks
    assert 2 * n_small < n_large and len(rows) == 2 * n_large
    located = rows.locate(torch.arange(len(rows)))
    large_blocks = [b for i, b in located if i == 1]
    assert sorted(large_blocks) == list(range(n_large))
    small_blocks = collections.Counter(b for i, b in located if i == 0)
    assert set(small_blocks) == set(range(n_small)) and max(small_blocks.values()) > 1


def test_ranks_read_disjoint_slices_that_cover_each_global_batch_and_epochs_differ():
    n_blocks, batch, accum, world = 37, 3, 2, 2
    per_step = batch * accum * world
    for step in range(8):
        idx = schedule.step_blocks(step, n_blocks, per_step, seed=5).view(accum, world, batch)
        ranks = [set(idx[:, r].flatten().tolist()) for r in range(world)]
        assert not ranks[0] & ranks[1]
        assert ranks[0] | ranks[1] == set(schedule.step_blocks(step, n_blocks, per_step, seed=5).tolist())
    order = torch.cat([schedule.step_blocks(s, n_blocks, per_step, 5) for s in range(7)])  # 84 rows: 2+ epochs
    assert sorted(order[:n_blocks].tolist()) == list(range(n_blocks))
    assert not torch.equal(order[:n_blocks], order[n_blocks : 2 * n_blocks])


def test_cli_tokenize_then_plan_counts_the_store(tok, corpus, tmp_path):
    from conftest import run_cli, save_tiny

    from whelp.plan import data_plan
    from whelp.specs import Mixture

    model_dir = tmp_path / "m"
    save_tiny(model_dir, tok)
    args = ["tokenize", str(corpus), "--tokenizer", str(model_dir), "--out", str(tmp_path / "s"), "--num-proc", "2"]
    done = run_cli(*args)
    assert done.exit_code == 0, done.stderr
    total = tokenstore.open_store(tmp_path / "s").manifest["total_tokens"]
    assert f"wrote {total:,} tokens" in done.stdout
    again = run_cli(*args)
    assert again.exit_code == 2 and "already holds this complete token store" in again.stderr
    mixed = run_cli(
        "tokenize", f"{corpus}:0.5,pydoc:eval:0.5", "--tokenizer", str(model_dir), "--out", str(tmp_path / "x")
    )
    assert mixed.exit_code == 2 and "one source into one store" in mixed.stderr
    planned = data_plan(Mixture.parse(str(tmp_path / "s")), 3 * total, 512, None)
    assert planned["tokens_available"] == total and planned["epochs"] == 3 and planned["store_bytes"] == 2 * total
    assert data_plan(Mixture.parse("pydoc:train"), 10, 128_256, None) == {
        "source": "pydoc:train",
        "tokens_needed": 10,
        "tokens_available": None,
        "epochs": None,
        "store_bytes": 40,
    }


def test_huge_documents_are_encoded_in_pieces_cut_at_line_breaks(tok, monkeypatch):
    monkeypatch.setattr(encode, "MAX_DOC_CHARS", 1000)
    doc = "\n".join(f"line {i} of a long document" for i in range(400))  # ~10,000 characters
    pieces = encode._pieces(doc)
    assert "".join(pieces) == doc and len(pieces) > 5 and all(len(p) <= 1000 for p in pieces)
    assert all(p.endswith("\n") for p in pieces[:-1])
    _, ids = encode._encode(["short", doc], "uint16", tok)
    whole = tok(doc, add_special_tokens=False)["input_ids"]
    assert list(ids[-len(whole) - 1 : -1]) == whole  # cut at line breaks: this tokenizer gives the same ids


def test_a_second_process_waits_for_the_store_being_made_and_reuses_it(tok, corpus, tmp_path, monkeypatch):
    """Two whelp processes sharing $WHELP_HOME make a raw source's store once: while this test holds the lock (as a
    process tokenizing would), another process asking for the store says it waits, then opens the store made here."""
    import subprocess
    import sys

    from whelp import store
    from whelp.data import blocks

    monkeypatch.setenv("WHELP_HOME", str(tmp_path / "home"))
    tok.save_pretrained(tmp_path / "tok")
    path, _ = blocks._auto_store(str(corpus), tok, None, "text")
    script = (
        "import sys; from transformers import AutoTokenizer; from whelp.data import blocks; "
        "s = blocks.store_for(sys.argv[1], AutoTokenizer.from_pretrained(sys.argv[2])); print(s.fingerprint)"
    )
    with store.locked(path, "to tokenize"):
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(corpus), str(tmp_path / "tok")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stderr.readline().startswith(f"whelp: waiting for another whelp process to tokenize {corpus}")
        made = tokenstore.open_store(tokenstore.tokenize(str(corpus), tok, path, num_proc=1, progress=False), tok)
        shards = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.strip() == made.fingerprint
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == shards  # opened, not tokenized again
