"""Text sources -> tokenized, packed blocks of ``seq_len`` tokens.

A source spec is one of:
  * a local ``.txt`` / ``.jsonl`` / ``.parquet`` file, or a directory of them (read in sorted order);
  * ``pydoc:calib`` | ``pydoc:train`` | ``pydoc:eval`` - the Python language reference shipped with
    CPython (``pydoc_data.topics``), split by topic into three parts that never overlap;
  * ``hf:NAME[:CONFIG]:SPLIT[:COLUMN]`` - a Hugging Face dataset (online users; streamed).
Documents are joined with the tokenizer's EOS and packed; blocks are shuffled by ``seed`` only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from whelp.errors import WhelpError

PYDOC_SPLITS = ("calib", "train", "eval")
PYDOC_FRACTIONS = {"eval": 0.10, "calib": 0.10}  # the rest is train
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def pydoc_split() -> dict[str, list[str]]:
    """Topic names of each pydoc split: topics ordered by sha256 of their name, then filled greedily
    into eval (10% of characters), calib (10%) and train (the rest). Deterministic, disjoint."""
    from pydoc_data.topics import topics

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
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(pydoc_split()[split])]


def _file_documents(path: Path, text_column: str) -> list[str]:
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8", errors="replace")]
    if path.suffix == ".jsonl":
        docs = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise WhelpError(f"{path}:{lineno} is not valid JSON") from None
            if text_column not in row:
                raise WhelpError(f"{path}:{lineno} has no '{text_column}' column (has: {', '.join(row)}); "
                                 "pass the right text column")
            docs.append(str(row[text_column]))
        return docs
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if text_column not in table.column_names:
        raise WhelpError(f"{path} has no '{text_column}' column (has: {', '.join(table.column_names)}); "
                         "pass the right text column")
    return [str(v) for v in table.column(text_column).to_pylist()]


def _hf_documents(spec: str, max_chars: int | None) -> list[str]:
    parts = spec.split(":")[1:]
    if len(parts) not in (2, 3, 4):
        raise WhelpError(f"bad dataset spec '{spec}'; write hf:NAME:SPLIT, hf:NAME:CONFIG:SPLIT or "
                         "hf:NAME:CONFIG:SPLIT:COLUMN (CONFIG may be empty)")
    if len(parts) == 2:
        parts = [parts[0], "", parts[1]]
    name, config, split = parts[:3]
    column = parts[3] if len(parts) == 4 else "text"
    config = config or None
    import datasets

    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:  # datasets raises many types for offline / missing datasets
        raise WhelpError(f"could not open dataset '{spec}': {str(exc).splitlines()[0]}") from None
    docs, chars = [], 0
    for row in stream:
        if column not in row:
            raise WhelpError(f"dataset '{name}' has no '{column}' column (has: {', '.join(row)})")
        docs.append(str(row[column]))
        chars += len(docs[-1])
        if max_chars is not None and chars >= max_chars:
            break
    return docs


def read_documents(spec: str, text_column: str = "text", max_chars: int | None = None) -> list[str]:
    """The documents of a source spec, in a fixed order. Raises WhelpError if missing or empty."""
    if spec.startswith("pydoc:"):
        docs = _pydoc_documents(spec.split(":", 1)[1])
    elif spec.startswith("hf:"):
        docs = _hf_documents(spec, max_chars)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise WhelpError(f"no such data file or directory: {spec} "
                             "(use a .txt/.jsonl/.parquet path, pydoc:calib|train|eval, or hf:NAME:SPLIT)")
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
        if path.is_file() and path.suffix not in TEXT_SUFFIXES:
            raise WhelpError(f"unsupported data file {path}: expected one of {', '.join(TEXT_SUFFIXES)}")
        docs = [doc for f in files for doc in _file_documents(f, text_column)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise WhelpError(f"data source '{spec}' holds no text")
    return docs


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
    import torch

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


@dataclass(frozen=True)
class Blocks:
    """Packed token blocks [n, seq_len] plus the fingerprint that identifies exactly these tokens."""

    tokens: "object"  # torch.LongTensor [n, seq_len]
    source: str
    fingerprint: str


def fingerprint(tokens) -> str:
    """sha256 of the token ids (int64, row-major): identifies data independent of where it came from."""
    return hashlib.sha256(tokens.contiguous().numpy().tobytes()).hexdigest()


def load_blocks(spec: str, tokenizer, seq_len: int, n_blocks: int | None = None, max_tokens: int | None = None,
                seed: int | None = 0, text_column: str = "text") -> Blocks:
    """Packed blocks of a source, shuffled by ``seed`` (None keeps the text order), first ``n_blocks`` kept."""
    import torch

    max_chars = None if max_tokens is None else 8 * max_tokens
    tokens = pack(read_documents(spec, text_column, max_chars), tokenizer, seq_len, max_tokens)
    if seed is not None:
        tokens = tokens[torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed))]
    if n_blocks is not None:
        if n_blocks < 1:
            raise WhelpError(f"the number of blocks must be positive, got {n_blocks}")
        tokens = tokens[:n_blocks]
    return Blocks(tokens=tokens, source=spec, fingerprint=fingerprint(tokens))
