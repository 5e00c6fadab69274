"""Text sources -> packed token blocks: splits, formats, determinism, clear errors."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from whelp import data
from whelp.errors import WhelpError


class CharTokenizer:
    """One token per character (ord % 250) + EOS 255: exact, dependency-free expectations."""

    eos_token_id = 255

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 250 for c in text]}


def test_pydoc_splits_are_disjoint_cover_everything_and_deterministic():
    from pydoc_data.topics import topics

    parts = data.pydoc_split()
    names = [n for split in data.PYDOC_SPLITS for n in parts[split]]
    assert sorted(names) == sorted(topics) and len(set(names)) == len(names)
    assert parts == data.pydoc_split()
    sizes = {s: sum(len(topics[n]) for n in parts[s]) for s in data.PYDOC_SPLITS}
    total = sum(sizes.values())
    assert sizes["eval"] >= 0.1 * total and sizes["calib"] >= 0.1 * total and sizes["train"] > 0.6 * total


def test_pack_joins_documents_with_eos_and_drops_the_tail():
    blocks = data.pack(["ab", "cde"], CharTokenizer(), seq_len=3)
    assert blocks.tolist() == [[97, 98, 255], [99, 100, 101]]
    stream = data.token_stream(["ab", "cde"], CharTokenizer())
    assert stream.tolist() == [97, 98, 255, 99, 100, 101, 255]
    assert data.token_stream(["abcdef"], CharTokenizer(), max_tokens=4).tolist() == [97, 98, 99, 100]


def test_local_formats_and_directories(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x1"}) + "\n\n" + json.dumps({"text": "x2"}) + "\n")
    pq.write_table(pa.table({"body": ["p1", "p2"]}), tmp_path / "c.parquet")
    assert data.read_documents(str(tmp_path / "a.txt")) == ["hello"]
    assert data.read_documents(str(tmp_path / "b.jsonl")) == ["x1", "x2"]
    assert data.read_documents(str(tmp_path / "c.parquet"), text_column="body") == ["p1", "p2"]
    (tmp_path / "c.parquet").unlink()
    assert data.read_documents(str(tmp_path)) == ["hello", "x1", "x2"]


def test_blocks_are_deterministic_for_a_seed():
    from conftest import tiny_tokenizer

    tok = tiny_tokenizer()
    a, b, c = (data.open_blocks("pydoc:eval", tok, seq_len=64, seed=s).head() for s in (3, 3, 4))
    assert (
        torch.equal(a, b)
        and data.open_blocks("pydoc:eval", tok, 64, seed=3).fingerprint
        == data.open_blocks("pydoc:eval", tok, 64, seed=3).fingerprint
    )
    assert not torch.equal(a, c)
    assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, c.tolist()))
    assert data.open_blocks("pydoc:eval", tok, seq_len=64).head(5).shape == (5, 64)


def test_the_builtin_general_english_source_is_the_licence_texts():
    from whelp.evals.tasks import whelp_data

    docs = data.read_documents("licenses")
    assert docs == [row["text"] for row in map(json.loads, whelp_data.LICENSES.read_text().splitlines())]
    assert "Apache License" in docs[0] and sum(map(len, docs)) > 40_000
    assert data.source_identity("licenses")[0] == "licenses" and data.source_identity("licenses")[1]


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(WhelpError, match="no such data file"):
        data.read_documents(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(WhelpError, match="holds no text"):
        data.read_documents(str(tmp_path / "empty.txt"))
    (tmp_path / "rows.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(WhelpError, match="no 'text' column.*content"):
        data.read_documents(str(tmp_path / "rows.jsonl"))
    with pytest.raises(WhelpError, match="unknown pydoc split 'test'"):
        data.read_documents("pydoc:test")
    with pytest.raises(WhelpError, match="hf:NAME:SPLIT"):
        data.read_documents("hf:only-a-name")
    for name, raw in (("latin1.txt", "café\n".encode("latin-1")), ("latin1.jsonl", b'{"text": "caf\xe9"}\n')):
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(WhelpError, match=rf"{name} is not UTF-8 text \(byte 0xe9 .*iconv"):
            data.read_documents(str(tmp_path / name))
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(WhelpError, match="unsupported data file"):
        data.read_documents(str(tmp_path / "notes.md"))
    with pytest.raises(WhelpError, match="not enough for one block"):
        data.pack(["ab"], CharTokenizer(), seq_len=8)


@pytest.mark.demo
def test_demo_tokenizer_packs_pydoc_eval(demo_tokenizer):
    blocks = data.open_blocks("pydoc:eval", demo_tokenizer, seq_len=256).head()
    assert blocks.shape[1] == 256 and blocks.shape[0] >= 40
    eos = demo_tokenizer.eos_token_id
    assert (blocks == eos).any()
    assert int(blocks.max()) < demo_tokenizer.vocab_size


def test_hidden_files_are_not_data_and_a_directory_without_text_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("visible")
    (tmp_path / ".extra.txt").write_text("hidden")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "notes.txt").write_text("hidden too")
    assert data.read_documents(str(tmp_path)) == ["visible"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README").write_text("no suffix")
    with pytest.raises(WhelpError, match="holds no .txt, .jsonl, .parquet files"):
        data.check_source(str(tmp_path / "empty"))


def test_a_mixture_is_parsed_once_and_round_trips_as_text():
    from dataclasses import replace

    from whelp.specs import DistillSpec, EvalSpec, Mixture, PruneSpec, Source, record

    mixture = Mixture.parse("generated:0.25,pydoc:calib:0.75")
    assert mixture.sources == (Source("generated", 0.25), Source("pydoc:calib", 0.75))
    assert mixture.names == ("generated", "pydoc:calib")
    spec = DistillSpec(steps=1, data=mixture)
    assert spec.data is mixture and replace(spec, lr=1e-3).data is mixture  # carried, never parsed again
    assert DistillSpec(steps=1, data="generated:0.25,pydoc:calib:0.75").data == mixture  # the Python edge parses
    assert PruneSpec(calib="a:7,b:3").calib == Mixture.parse("a:0.7,b:0.3") == Mixture((Source("a", 7), Source("b", 3)))
    assert EvalSpec(ppl=("pydoc:eval",)).ppl == (Mixture.parse("pydoc:eval"),)
    for text in ("pydoc:train", "a:0.7,b:0.3", "generated:0.25,pydoc:calib:0.75", "a:7,b:3", "x.txt:0.5"):
        assert str(Mixture.parse(text)) == text and Mixture.parse(str(Mixture.parse(text))) == Mixture.parse(text)
    canonical = Mixture((Source("a", 7), Source("b", 3)))
    assert str(canonical) == "a:0.7,b:0.3" and Mixture.parse(str(canonical)) == canonical
    assert record(DistillSpec(steps=1, data="a:7,b:3"))["data"] == "a:7,b:3"  # run identities record the text


def test_a_path_with_a_comma_is_one_source(tmp_path):
    from conftest import tiny_tokenizer

    from whelp.specs import DistillSpec, Mixture, PruneSpec

    path = tmp_path / "notes, part 1" / "a,b.txt"
    path.parent.mkdir()
    path.write_text("def f(x):\n    return x + 1\n" * 400)
    for given in (str(path), str(path.parent)):
        assert Mixture.parse(given).names == (given,) and str(Mixture.parse(given)) == given
    assert PruneSpec(calib=str(path)).calib.names == (str(path),)
    # not a path as a whole: split at every ','; such a path joins a mixture through the recipes' list form
    assert len(Mixture.parse(f"{path}:0.5,pydoc:train:0.5").sources) == 4
    data.check_data(Mixture.parse(str(path)))
    rows = data.open_blocks(DistillSpec(steps=1, data=str(path)).data, tiny_tokenizer(), seq_len=16)
    assert rows.head(2).shape == (2, 16) and data.stream_tokens(Mixture.parse(str(path)), tiny_tokenizer(), 64).numel()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a:-1,b:1", "weight must be a finite number >= 0 in 'a:-1'"),
        ("a:0,b:1", "bad data mixture 'a:0,b:1': write SOURCE:WEIGHT,SOURCE:WEIGHT with positive weights"),
        (",pydoc:train", "bad data mixture ',pydoc:train'"),
        ("", "bad data mixture ''"),
    ],
)
def test_a_bad_mixture_is_one_line(text, message):
    from whelp.specs import Mixture, PruneSpec

    for parse in (Mixture.parse, lambda t: PruneSpec(calib=t)):
        with pytest.raises(WhelpError, match=re.escape(message)) as info:
            parse(text)
        assert "\n" not in str(info.value)
