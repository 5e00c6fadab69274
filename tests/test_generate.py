"""``whelp generate``: the same seed writes the same store, a resumed run the store an uninterrupted one writes,
every sequence is its prompt + valid token ids + EOS, and temperature 0 is stock greedy ``generate``."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_model, tiny_tokenizer

from whelp.data import generate as gen
from whelp.data import open_blocks, tokenstore
from whelp.errors import WhelpError
from whelp.specs import GenerateSpec

SPEC = GenerateSpec(max_tokens=700, prompts="pydoc:train", prompt_tokens=6, new_tokens=12, batch_size=4, seed=3)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny random teacher whose EOS row is moved toward its mean final hidden state, so that it samples EOS
    about once in seven tokens (a random model would once in 512) and stopping at EOS is exercised."""
    from whelp.models import save_model

    path, tok = tmp_path_factory.mktemp("gen") / "teacher", tiny_tokenizer()
    model = tiny_model(vocab_size=len(tok), initializer_range=0.2)
    with torch.no_grad():
        hidden = model(torch.randint(len(tok), (4, 32)), output_hidden_states=True).hidden_states[-1]
        direction = hidden.reshape(-1, hidden.shape[-1]).mean(0)
        model.lm_head.weight[tok.eos_token_id] += 2 * direction / direction.norm()
    save_model(model, tok, path)
    return model, path


def run(teacher, out, spec=SPEC, **kw):
    model, path = teacher
    return tokenstore.open_store(
        gen.generate(
            model,
            tiny_tokenizer(),
            out,
            spec,
            "teacher",
            path,
            progress=False,
            shard_tokens=kw.pop("shard_tokens", 150),
            **kw,
        ),
        tiny_tokenizer(),
    )


def stream(s) -> np.ndarray:
    return np.concatenate([np.fromfile(s.path / sh["file"], dtype=s.manifest["dtype"]) for sh in s.manifest["shards"]])


def sequences(ids: np.ndarray, eos: int) -> list[np.ndarray]:
    return np.split(ids, np.flatnonzero(ids == eos) + 1)[:-1]


def test_same_seed_same_store_and_each_sequence_is_its_prompt_then_valid_ids(teacher, tmp_path):
    a, b = run(teacher, tmp_path / "a"), run(teacher, tmp_path / "b")
    assert a.manifest["fingerprint"] == b.manifest["fingerprint"] and a.manifest["total_tokens"] == 700
    other = run(teacher, tmp_path / "c", replace(SPEC, seed=4))
    assert other.manifest["fingerprint"] != a.manifest["fingerprint"]
    ids, eos = stream(a), tiny_tokenizer().eos_token_id
    assert len(ids) == 700 and ids.min() >= 0 and ids.max() < len(tiny_tokenizer())
    prompts = gen.prompt_ids(SPEC, tiny_tokenizer())
    seqs = sequences(ids, eos)
    assert len(a.manifest["shards"]) > 1 and len(seqs) >= 20
    for seq in seqs:
        prompt = next(prompts)
        assert list(seq[: len(prompt)]) == prompt and 1 <= len(seq) - len(prompt) <= SPEC.new_tokens + 1
    assert any(len(s) < 6 + 13 for s in seqs[:-1])  # some sequences stopped at a sampled EOS
    assert open_blocks(str(a.path), tiny_tokenizer(), seq_len=16).head(2).shape == (2, 16)  # usable as DATA


def test_an_interrupted_run_resumes_to_the_same_store(teacher, tmp_path, monkeypatch):
    whole = run(teacher, tmp_path / "whole")
    real, calls = gen.sample, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 9:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(gen, "sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(teacher, tmp_path / "out")
    monkeypatch.setattr(gen, "sample", real)
    with pytest.raises(WhelpError, match="incomplete .* re-run the same whelp generate command"):
        tokenstore.open_store(tmp_path / "out")
    kept = len(tokenstore.store.read_record(tmp_path / "out" / tokenstore.MANIFEST, "")["shards"])
    assert kept >= 1
    resumed = run(teacher, tmp_path / "out")
    assert resumed.manifest["fingerprint"] == whole.manifest["fingerprint"]
    with pytest.raises(WhelpError, match=r"other settings \(generation\.top_p: 1\.0 there, 0\.5 now\); pass") as exc:
        run(teacher, tmp_path / "out", replace(SPEC, top_p=0.5))
    assert len(str(exc.value)) < 300  # the field that changed, not the settings dict


def test_temperature_zero_is_stock_greedy_generate_of_each_prompt_alone(teacher, tmp_path):
    model, _ = teacher
    spec = replace(SPEC, temperature=0.0, max_tokens=300)
    ids, eos = stream(run(teacher, tmp_path / "greedy", spec)), tiny_tokenizer().eos_token_id
    prompts = gen.prompt_ids(spec, tiny_tokenizer())
    for seq in sequences(ids, eos)[:8]:  # left-padded batches of 4 against one prompt at a time, no padding
        prompt = next(prompts)
        with torch.no_grad():
            want = model.generate(
                torch.tensor([prompt]),
                do_sample=False,
                max_new_tokens=spec.new_tokens,
                eos_token_id=eos,
                pad_token_id=eos,
            )[0, len(prompt) :].tolist()
        got = seq[len(prompt) :].tolist()
        assert got == (want[: want.index(eos) + 1] if eos in want else want + [eos])


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_by_topk_masks_what_transformers_warper_masks(top_p, monkeypatch):
    """``sampling.TopP`` keeps exactly the ids ``TopPLogitsWarper`` keeps, on peaked rows (the nucleus within the
    top K) and flat ones (past it: the sorted fallback, forced here with a small K too); on a row of ties, as many
    (which of the tied ids is the sort's arbitrary choice in both)."""
    from transformers import TopPLogitsWarper

    from whelp.data import sampling

    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.1, 1.0, 4.0, 12.0]).repeat_interleave(8)[:, None]
    scores = torch.randn(32, 3000, generator=g) * scale
    scores[3] = 0.0  # every id equally likely
    ids = torch.zeros(32, 1, dtype=torch.long)
    want = TopPLogitsWarper(top_p)(ids, scores.clone())
    rows = torch.arange(32) != 3
    for k in (sampling.TOP_K, 7):
        monkeypatch.setattr(sampling, "TOP_K", k)
        got = sampling.TopP(top_p)(ids, scores.clone())
        assert torch.equal(got[rows].isinf(), want[rows].isinf())
        assert torch.equal(got[~got.isinf()], scores[~got.isinf()])  # the kept scores as they were
        assert (~got[3].isinf()).sum() == (~want[3].isinf()).sum()


@pytest.mark.parametrize("top_k", [0, 5])
def test_sampling_with_the_topk_nucleus_is_stock_top_p_generate(teacher, top_k):
    """The same seed samples the same tokens through ``chatgen.continuations`` (``sampling.nucleus``) as stock
    ``generate`` with transformers' own warpers: temperature, top-k when set, then top-p on what top-k left."""
    from whelp.data import chatgen

    model, tok = teacher[0], tiny_tokenizer()
    spec = replace(SPEC, temperature=0.8, top_p=0.6, top_k=top_k, new_tokens=16)
    config = gen.generation_config(spec, tok)
    prompts = [next(gen.prompt_ids(spec, tok))[:5] for _ in range(1)] * 3
    torch.manual_seed(11)
    got = chatgen.continuations(model, prompts, config)
    torch.manual_seed(11)
    with torch.no_grad():
        stock = model.generate(
            torch.tensor(prompts), attention_mask=torch.ones(3, 5, dtype=torch.long), generation_config=config
        )
    for (ids, ended), row in zip(got, stock[:, 5:].tolist()):
        cut = row.index(tok.eos_token_id) if tok.eos_token_id in row else len(row)
        assert ids.tolist() == row[:cut] and ended == (cut < len(row))
    assert len({tuple(ids.tolist()) for ids, _ in got}) > 1  # the rows sampled apart: the test sees sampling


def test_cli_generates_from_bos_and_refuses_bad_settings_before_loading(teacher, tmp_path):
    _, path = teacher
    done = run_cli(
        "generate",
        str(path),
        "--out",
        str(tmp_path / "s"),
        "--max-tokens",
        "64",
        "--new-tokens",
        "8",
        "--batch-size",
        "2",
    )
    assert done.exit_code == 0 and "wrote 64 tokens" in done.stdout, done.stderr
    first = stream(tokenstore.open_store(tmp_path / "s"))[0]
    assert first == tiny_tokenizer().eos_token_id  # no BOS in this tokenizer: sequences start from EOS
    again = run_cli(
        "generate",
        str(path),
        "--out",
        str(tmp_path / "s"),
        "--max-tokens",
        "64",
        "--new-tokens",
        "8",
        "--batch-size",
        "2",
    )
    assert again.exit_code == 2 and "already holds this complete token store" in again.stderr
    for args, message in (
        (["--max-tokens", "0"], "max_tokens must be positive"),
        ([], "give --max-tokens N"),
        (["--max-tokens", "9", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["--max-tokens", "300", "--prompts", "pydoc:trian"], "unknown pydoc split"),
        (["--max-tokens", "9", "--temperature", "-1"], "temperature must be >= 0"),
    ):
        bad = run_cli("generate", str(path), "--out", str(tmp_path / "t"), *args)
        assert bad.exit_code == 2 and message in bad.stderr and len(bad.stderr.splitlines()) == 1, bad.stderr
    assert not (tmp_path / "t").exists()
