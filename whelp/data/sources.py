"""Text sources: where documents come from, read lazily in a fixed order (never the whole corpus in RAM).

A source is one of:
  * a local ``.txt`` / ``.jsonl`` / ``.parquet`` file, or a directory of them (read in sorted order);
  * ``pydoc:calib`` | ``pydoc:train`` | ``pydoc:eval`` - the Python language reference shipped with
    CPython (``pydoc_data.topics``), split by topic into three parts that never overlap;
  * ``licenses`` - general English that no recipe trains on: the licence texts Debian ships (Apache-2.0, the GPLs,
    ...; in whelp's lm-eval task data), for perplexity next to the training domain;
  * ``hf:NAME[:CONFIG]:SPLIT[:COLUMN]`` - a Hugging Face dataset (online users; streamed).
``whelp.data.tokenstore`` tokenizes a source once into a token store; ``token_stream`` / ``pack`` are the small
in-memory path (a few thousand tokens: tests, the reference the store is checked against). ``iter_records`` gives
whole rows instead of texts: chat data (``messages``) for ``whelp.data.chat``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from whelp.errors import WhelpError
from whelp.specs.data import BUILTIN
from whelp.store import path_identity

PYDOC_SPLITS = ("calib", "train", "eval")
PYDOC_FRACTIONS = {"eval": 0.10, "calib": 0.10}  # the rest is train
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def _local(source: str) -> str:
    """The file a built-in source name stands for; any other source as it is."""
    return str(BUILTIN[source]) if source in BUILTIN else source


def pydoc_split() -> dict[str, list[str]]:
    """Topic names of each pydoc split: topics ordered by sha256 of their name, then filled greedily
    into eval (10% of characters), calib (10%) and train (the rest). Deterministic, disjoint."""
    from pydoc_data.topics import topics  # noqa: PLC0415 - heavy: the built-in corpus (1 MB of text), read by pydoc: sources only

    total = sum(len(v) for v in topics.values())
    order = sorted(topics, key=lambda name: hashlib.sha256(name.encode()).hexdigest())
    parts: dict[str, list[str]] = {split: [] for split in PYDOC_SPLITS}
    filled = {split: 0 for split in PYDOC_SPLITS}
    for name in order:
        split = next((s for s, frac in PYDOC_FRACTIONS.items() if filled[s] < frac * total), "train")
        parts[split].append(name)
        filled[split] += len(topics[name])
    return parts


def _pydoc_documents(split: str) -> list[str]:
    if split not in PYDOC_SPLITS:
        raise WhelpError(f"unknown pydoc split '{split}'; choose one of {', '.join(PYDOC_SPLITS)}")
    from pydoc_data.topics import topics  # noqa: PLC0415 - heavy: the built-in corpus (1 MB of text), read by pydoc: sources only

    return [topics[name] for name in sorted(pydoc_split()[split])]


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """``(where, row)`` of each non-blank line of a .jsonl file, ``where`` being ``PATH:LINE``."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise WhelpError(f"{path}:{lineno} is not valid JSON") from None
            if not isinstance(row, dict):
                raise WhelpError(f"{path}:{lineno} is not a JSON object (one row per line)")
            yield f"{path}:{lineno}", row


def _jsonl_documents(path: Path, text_column: str) -> Iterator[str]:
    for where, row in _jsonl_rows(path):
        if text_column not in row:
            hint = "; chat rows (messages) need --chat" if "messages" in row else ""
            raise WhelpError(
                f"{where} has no '{text_column}' column (has: {', '.join(row)}); pass the right text column{hint}"
            )
        yield str(row[text_column])


def _file_documents(path: Path, text_column: str) -> Iterator[str]:
    """The documents of one file, streamed: a .txt is one document, a .jsonl one per line, a .parquet one per row."""
    try:
        if path.suffix == ".txt":
            yield path.read_text(encoding="utf-8")
            return
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text_column)
            return
    except UnicodeDecodeError as exc:
        raise WhelpError(
            f"{path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start} of a "
            "chunk); convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None
    import pyarrow as pa  # noqa: PLC0415 - optional: only .parquet sources need pyarrow
    import pyarrow.parquet as pq  # noqa: PLC0415 - optional: only .parquet sources need pyarrow

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise WhelpError(f"{path} is not a readable parquet file ({str(exc).splitlines()[0]})") from None
    if text_column not in table.schema_arrow.names:
        raise WhelpError(
            f"{path} has no '{text_column}' column (has: {', '.join(table.schema_arrow.names)}); "
            "pass the right text column"
        )
    for batch in table.iter_batches(columns=[text_column], batch_size=1024):
        yield from (str(v) for v in batch.column(0).to_pylist())


def _hf_stream(source: str):
    """``(name, column, rows)``: a Hugging Face dataset streamed, and the text column its spec names."""
    parts = source.split(":")[1:]
    if len(parts) not in (2, 3, 4):
        raise WhelpError(
            f"bad dataset spec '{source}'; write hf:NAME:SPLIT, hf:NAME:CONFIG:SPLIT or "
            "hf:NAME:CONFIG:SPLIT:COLUMN (CONFIG may be empty)"
        )
    if len(parts) == 2:
        parts = [parts[0], "", parts[1]]
    name, config, split = parts[:3]
    column = parts[3] if len(parts) == 4 else "text"
    config = config or None
    import datasets  # noqa: PLC0415 - heavy: only hf: sources need datasets

    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:  # datasets raises many types for offline / missing datasets
        raise WhelpError(f"could not open dataset '{source}': {str(exc).splitlines()[0]}") from None
    return name, column, stream


def _hf_documents(source: str, max_chars: int | None) -> Iterator[str]:
    name, column, stream = _hf_stream(source)
    chars = 0
    for row in stream:
        if column not in row:
            raise WhelpError(f"dataset '{name}' has no '{column}' column (has: {', '.join(row)})")
        yield str(row[column])
        chars += len(str(row[column]))
        if max_chars is not None and chars >= max_chars:
            return


def _local_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if not path.exists():
        raise WhelpError(
            f"no such data file or directory: {source} "
            "(use a .txt/.jsonl/.parquet path, pydoc:calib|train|eval, licenses, or hf:NAME:SPLIT)"
        )
    if path.is_file() and path.suffix not in TEXT_SUFFIXES:
        raise WhelpError(f"unsupported data file {path}: expected one of {', '.join(TEXT_SUFFIXES)}")
    if path.is_file():
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.suffix in TEXT_SUFFIXES  # hidden files are not data
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files and not (path / "whelp.json").exists():
        raise WhelpError(f"directory {source} holds no {', '.join(TEXT_SUFFIXES)} files (nor is it a token store)")
    return files


def check_source(source: str) -> None:
    """Refuse a source that cannot be read (missing path, unknown format or pydoc split) without reading it."""
    if source.startswith("pydoc:"):
        if source.split(":", 1)[1] not in PYDOC_SPLITS:
            raise WhelpError(
                f"unknown pydoc split '{source.split(':', 1)[1]}'; choose one of {', '.join(PYDOC_SPLITS)}"
            )
    elif source.startswith("hf:"):
        if len(source.split(":")) not in (3, 4, 5):
            raise WhelpError(
                f"bad dataset spec '{source}'; write hf:NAME:SPLIT, hf:NAME:CONFIG:SPLIT or "
                "hf:NAME:CONFIG:SPLIT:COLUMN (CONFIG may be empty)"
            )
    else:
        _local_files(_local(source))


def iter_documents(source: str, text_column: str = "text", max_chars: int | None = None) -> Iterator[str]:
    """The non-empty documents of a source, streamed in a fixed order."""
    check_source(source)
    if source.startswith("pydoc:"):
        docs: Iterator[str] = iter(_pydoc_documents(source.split(":", 1)[1]))
    elif source.startswith("hf:"):
        docs = _hf_documents(source, max_chars)
    else:
        docs = (doc for f in _local_files(_local(source)) for doc in _file_documents(f, text_column))
    return (d for d in docs if d.strip())


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq  # noqa: PLC0415 - optional: only .parquet sources need pyarrow

    at = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield f"{path} row {at}", row
            at += 1


def iter_records(source: str) -> Iterator[tuple[str, dict]]:
    """``(where, row)`` of every row of a source of rows, in a fixed order: a .jsonl or .parquet file, a directory of
    them, or ``hf:NAME:SPLIT``. Chat data lives in such rows (a ``messages`` list, not one text); ``where`` names the
    row in errors (``PATH:LINE``)."""
    check_source(source)
    if source.startswith("hf:"):
        yield from ((f"{source} row {i}", row) for i, row in enumerate(_hf_stream(source)[2]))
        return
    files = [] if source.startswith("pydoc:") or source in BUILTIN else _local_files(source)
    if not files or any(f.suffix == ".txt" for f in files):
        raise WhelpError(
            f"{source} holds plain text, not rows: chat data is .jsonl or .parquet rows (or hf:NAME:SPLIT)"
        )
    for f in files:
        yield from _jsonl_rows(f) if f.suffix == ".jsonl" else _parquet_rows(f)


def read_documents(source: str, text_column: str = "text", max_chars: int | None = None) -> list[str]:
    """The documents of a small source as a list. Raises WhelpError if missing or empty."""
    docs = list(iter_documents(source, text_column, max_chars))
    if not docs:
        raise WhelpError(f"data source '{source}' holds no text")
    return docs


def source_identity(source: str) -> object:
    """What a source is, without reading it: file names, sizes and mtimes for local paths and the built-in corpus
    (an edit changes it), the source itself otherwise (a hub dataset or model: its revision is the hub's)."""
    if source.startswith("pydoc:"):
        import pydoc_data.topics  # noqa: PLC0415 - heavy: the built-in corpus (1 MB of text), read by pydoc: sources only

        return [source, path_identity(Path(pydoc_data.topics.__file__))]
    path = Path(_local(source)).expanduser()
    return [source, path_identity(path)] if path.exists() else source  # a hub dataset, or model


def pack(docs: list[str], tokenizer, seq_len: int, max_tokens: int | None = None):
    """Tokenize documents, join them with EOS and cut into full blocks: LongTensor [n_blocks, seq_len].

    The tail that does not fill a block is dropped. ``max_tokens`` bounds the tokens read.
    """
    if seq_len < 2:
        raise WhelpError(f"seq_len must be at least 2, got {seq_len}")
    ids = token_stream(docs, tokenizer, max_tokens)
    n_blocks = len(ids) // seq_len
    if n_blocks == 0:
        raise WhelpError(f"only {len(ids)} tokens of text: not enough for one block of seq_len={seq_len}")
    return ids[: n_blocks * seq_len].view(n_blocks, seq_len)


def token_stream(docs: list[str], tokenizer, max_tokens: int | None = None):
    """All documents tokenized, each followed by EOS: LongTensor [T], at most ``max_tokens`` long."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise WhelpError("the tokenizer has no EOS token to separate documents")
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            ids = ids[:max_tokens]
            break
    return torch.tensor(ids, dtype=torch.long)
