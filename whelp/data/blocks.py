"""Fixed-length blocks over token stores: the one way every stage reads data (calibration, caches, training, eval).

Block *b* of length L of a store is tokens ``[b·L, (b+1)·L)`` of its concatenated shards (the tail that does not
fill a block is dropped), read from memory maps; nothing per token is ever held in RAM. ``Blocks`` presents
*rows*: for one source, row r is block ``perm[r]`` with ``perm = randperm(n_blocks, seed)`` (8 bytes per block),
exactly the order of the in-memory ``pack`` + shuffle path, so results stay comparable. For a weighted mixture
``a:0.7,b:0.3`` (Llama pretraining is a mix of sources) rows come in windows of ``WINDOW`` rows (or all rows, if
fewer): each window holds each source's share of rows by largest remainder, in a seeded order, and the k-th row of
source i is its block ``perm_i[k mod n_i]``; so the share of every source is exact to one row per window, the order
is a function of the seed, and any row is computed from its index alone (resume state is the step). An epoch of a
mixture reads every block of the source that lasts longest at its weight once (``rows = max_i ceil(n_i / w_i)``) and
repeats the others in their order: with ``min_i`` instead, a 50/50 mix of a 24-block and a 300-block source trained
on the same 24 blocks of the larger one every epoch, and a 20B-token source beside a small one would never be read
past a sliver. ``max_tokens`` bounds the tokens read from each source (its weight's share of them for a mixture).
The training loop visits rows in a fresh seeded permutation per epoch (``schedule.step_blocks``).

A raw source (a file, a directory, ``pydoc:``, ``hf:``) is tokenized once into ``$WHELP_HOME/stores``, keyed by the
source's identity, the tokenizer and the options, and reused afterwards, so small runs stay one command.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch

import whelp.data.tokenstore as tokenstore
from whelp import store
from whelp.data.sources import BUILTIN, check_source, source_identity
from whelp.errors import WhelpError
from whelp.specs import Mixture

WINDOW = 8192


def check_data(mixture: Mixture) -> None:
    """Refuse an unreadable source before anything is loaded."""
    for source in mixture.names:
        check_source(source)


def data_identity(mixture: Mixture) -> list:
    """What a mixture reads, without reading it: each source's identity (files, sizes, mtimes) and weight. A file
    edited in place changes it."""
    return [[source_identity(source), weight] for source, weight in mixture.sources]


def _allocation(weights: list[float], total: int) -> list[int]:
    """Largest-remainder split of ``total`` rows by ``weights`` (sums to ``total`` exactly)."""
    raw = [w * total for w in weights]
    counts = [math.floor(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: counts[i] - raw[i])[: total - sum(counts)]:
        counts[i] += 1
    return counts


class Blocks:
    """Rows of ``seq_len`` tokens from weighted token stores; ``blocks[idx]`` -> LongTensor [len(idx), seq_len]."""

    def __init__(
        self,
        sources: list[tuple[tokenstore.TokenStore, float]],
        seq_len: int,
        seed: int,
        max_tokens: int | None,
        mixture: Mixture,
    ):
        if seq_len < 2:
            raise WhelpError(f"seq_len must be at least 2, got {seq_len}")
        self.sources, self.seq_len, self.seed, self.source = sources, seq_len, seed, mixture
        self.n_blocks = []
        for st, weight in sources:
            usable = len(st) if max_tokens is None else min(len(st), math.ceil(max_tokens * weight))
            if usable // seq_len == 0:
                raise WhelpError(
                    f"only {usable} tokens of {st.manifest['source']}: not enough for one block of seq_len={seq_len}"
                )
            self.n_blocks.append(usable // seq_len)
        self.perms = [
            torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1_000_003 * i))
            for i, n in enumerate(self.n_blocks)
        ]
        weights = [w for _, w in sources]
        # an epoch reads every block of the source that lasts longest at its share; smaller ones repeat (upsampled)
        self.rows = (
            self.n_blocks[0] if len(sources) == 1 else max(math.ceil(n / w) for n, w in zip(self.n_blocks, weights))
        )
        self.window = min(WINDOW, self.rows)  # one window when the rows are fewer: exact shares
        self.window_counts = _allocation(weights, self.window)
        self.fingerprint = store.content_id(
            [[st.fingerprint, w] for st, w in sources] + [seq_len, seed, max_tokens, "epoch=largest"]
        )

    def __len__(self) -> int:
        return self.rows

    def _window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        """Source of each row of window ``w`` and the row's rank among that source's rows in the window."""
        order = np.repeat(np.arange(len(self.sources)), self.window_counts)
        order = order[
            torch.randperm(self.window, generator=torch.Generator().manual_seed(self.seed * 7919 + w)).numpy()
        ]
        rank = np.zeros(self.window, dtype=np.int64)
        for i in range(len(self.sources)):
            rank[order == i] = np.arange(int((order == i).sum()))
        return order, rank

    def locate(self, rows: torch.Tensor) -> list[tuple[int, int]]:
        """``(source, block)`` of each row."""
        if len(self.sources) == 1:
            return [(0, int(self.perms[0][r])) for r in rows.tolist()]
        out, cache = [], {}
        for r in rows.tolist():
            w, p = divmod(r, self.window)
            if w not in cache:
                cache = {w: self._window(w)}
            order, rank = cache[w]
            i = int(order[p])
            k = w * self.window_counts[i] + int(rank[p])
            out.append((i, int(self.perms[i][k % self.n_blocks[i]])))
        return out

    def _rows(self, rows) -> list[tuple[int, int]]:
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= len(self)):
            raise WhelpError(f"rows outside the data's {len(self)} blocks")
        return self.locate(rows)

    def __getitem__(self, rows) -> torch.Tensor:
        return self.read(self._rows(rows))

    def read(self, located: list[tuple[int, int]]) -> torch.Tensor:
        """The tokens of ``(source, block)`` pairs: LongTensor [len(located), seq_len]."""
        L = self.seq_len
        out = [self.sources[i][0].read(b * L, (b + 1) * L) for i, b in located]
        return torch.from_numpy(np.stack(out)) if out else torch.zeros(0, L, dtype=torch.long)

    @property
    def has_mask(self) -> bool:
        """Whether a source carries a loss mask (a chat store's assistant turns, ``whelp generate --chat``)."""
        return any(st.has_mask for st, _ in self.sources)

    def mask(self, rows) -> torch.Tensor | None:
        """BoolTensor [len(rows), seq_len], True where the token is a training target (the loss at the position
        before it counts): a masked store's own mask, every token of a source without one; None when no source has
        a mask. 1 bit per token on disk, read like the tokens (a conversation cut at a block edge keeps its mask)."""
        return self.read_mask(self._rows(rows)) if self.has_mask else None

    def chat_rows(self, rows) -> torch.Tensor:
        """BoolTensor [len(rows)]: whether each row comes from a source with a loss mask (chat data)."""
        return self.located_chat(self._rows(rows))

    def located_chat(self, located: list[tuple[int, int]]) -> torch.Tensor:
        return torch.tensor([self.sources[i][0].has_mask for i, _ in located], dtype=torch.bool)

    def read_mask(self, located: list[tuple[int, int]]) -> torch.Tensor:
        """The loss mask of ``(source, block)`` pairs (``mask``): BoolTensor [len(located), seq_len]."""
        L = self.seq_len
        out = [
            self.sources[i][0].read_mask(b * L, (b + 1) * L) if self.sources[i][0].has_mask else np.ones(L, bool)
            for i, b in located
        ]
        return torch.from_numpy(np.stack(out)) if out else torch.zeros(0, L, dtype=torch.bool)

    def head(self, n: int | None = None) -> torch.Tensor:
        """The first ``n`` rows (all when None) as one tensor: for small uses (calibration)."""
        if n is not None and n < 1:
            raise WhelpError(f"the number of blocks must be positive, got {n}")
        return self[torch.arange(len(self) if n is None else min(n, len(self)))]


class TensorBlocks:
    """Rows given as a tensor [n, seq_len] (a notebook's own tokens, random tokens in a benchmark) and optionally
    their loss mask (bool, same shape) with the interface of ``Blocks``; the fingerprint is the sha256 of the token
    ids (and mask)."""

    def __init__(self, tokens: torch.Tensor, source: str = "tensor", mask: torch.Tensor | None = None):
        self.tokens, self.seq_len, self.source = tokens.long(), tokens.shape[1], source
        if mask is not None and mask.shape != tokens.shape:
            raise WhelpError(
                f"the mask has shape {list(mask.shape)}, the tokens {list(tokens.shape)}; give one per token"
            )
        self._mask = None if mask is None else mask.bool()
        digest = hashlib.sha256(self.tokens.contiguous().numpy().tobytes())
        if self._mask is not None:
            digest.update(self._mask.contiguous().numpy().tobytes())
        self.fingerprint = digest.hexdigest()

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, rows) -> torch.Tensor:
        return self.tokens[torch.as_tensor(rows, dtype=torch.long)]

    @property
    def has_mask(self) -> bool:
        return self._mask is not None

    def mask(self, rows) -> torch.Tensor | None:
        return None if self._mask is None else self._mask[torch.as_tensor(rows, dtype=torch.long)]

    def chat_rows(self, rows) -> torch.Tensor:
        """BoolTensor [len(rows)]: every row is chat data when the tensor came with a loss mask."""
        return torch.full((len(torch.as_tensor(rows).reshape(-1)),), self._mask is not None)

    def head(self, n: int | None = None) -> torch.Tensor:
        return self.tokens[:n]


def _auto_store(source: str, tokenizer, max_tokens: int | None, text_column: str) -> tuple[Path, int | None]:
    """Where a raw source's store lives in ``$WHELP_HOME/stores``, and the token bound it is read up to (hub
    datasets only; local sources are tokenized whole): keyed by the source's identity, the tokenizer, the text
    column and that bound."""
    bound = max_tokens if source.startswith("hf:") else None
    key = store.content_id([source_identity(source), tokenstore.tokenizer_hash(tokenizer), text_column, bound])
    return store.whelp_home() / "stores" / key[:24], bound


def available_tokens(mixture: Mixture, tokenizer=None) -> int | None:
    """Tokens the stores of a mixture hold, or None when one is not tokenized yet (or no tokenizer)."""
    total = 0
    for source in mixture.names:
        if tokenstore.is_store(source):
            path = Path(source).expanduser()
        elif tokenizer is not None:
            path = _auto_store(source, tokenizer, None, "text")[0]
        else:
            return None
        try:
            total += store.read_record(path / tokenstore.MANIFEST, "")["total_tokens"]
        except (WhelpError, KeyError):  # not tokenized yet, or interrupted (no total)
            return None
    return total


def store_for(source: str, tokenizer, max_tokens: int | None = None, text_column: str = "text"):
    """The token store of one source: the directory itself if it is a store, else the store of the raw source
    in ``$WHELP_HOME/stores`` (tokenized on first use, resumably). A hub dataset is read only up to
    ``max_tokens``; local sources are tokenized whole, once, for every budget."""
    if tokenstore.is_store(source):
        return tokenstore.open_store(source, tokenizer)
    check_source(source)
    path, bound = _auto_store(source, tokenizer, max_tokens, text_column)
    try:
        return tokenstore.open_store(path, tokenizer)
    except WhelpError:  # absent, interrupted or damaged: (re)tokenize; resumes an interrupted one
        pass
    with store.locked(path, f"to tokenize {source}"):
        try:
            return tokenstore.open_store(path, tokenizer)  # tokenized while this process waited
        except WhelpError:
            pass
        small = not source.startswith("hf:") and _local_bytes(source) < 32 << 20
        options = dict(num_proc=1 if small else None, max_tokens=bound, text_column=text_column, progress=not small)
        try:
            tokenstore.tokenize(source, tokenizer, path, **options)  # resumes an interrupted one
        except WhelpError:  # whelp's own cache, of an older format or damaged beyond resuming: made again
            tokenstore.tokenize(source, tokenizer, path, force=True, **options)
    return tokenstore.open_store(path, tokenizer)


def _local_bytes(source: str) -> int:
    if source.startswith("pydoc:") or source in BUILTIN:
        return 0
    path = Path(source).expanduser()
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def open_blocks(
    mixture: str | Mixture,
    tokenizer,
    seq_len: int,
    seed: int = 0,
    max_tokens: int | None = None,
    text_column: str = "text",
) -> Blocks:
    """The rows of a source or a weighted mixture of sources (store directories or raw sources); text from a Python
    caller (``"pydoc:eval"``) is parsed here, the only parse of this module."""
    mixture = Mixture.of(mixture)
    sources = [
        (store_for(s, tokenizer, None if max_tokens is None else math.ceil(max_tokens * w), text_column), w)
        for s, w in mixture.sources
    ]
    return Blocks(sources, seq_len, seed, max_tokens, mixture)


def stream_tokens(mixture: str | Mixture, tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """The first ``max_tokens`` tokens of one source's stream (documents joined with EOS): LongTensor [T]."""
    st = store_for(Mixture.of(mixture).name, tokenizer, max_tokens)
    n = len(st) if max_tokens is None else min(len(st), max_tokens)
    return torch.from_numpy(st.read(0, n))


def blocks(
    data: str | Mixture, tokenizer, seq_len: int, n: int | None = None, seed: int = 0, max_tokens: int | None = None
):
    """The rows of ``seq_len`` tokens of ``data`` (a store, a raw source or a mixture ``a:0.7,b:0.3``, as text or a
    ``Mixture``), read lazily from token stores; with ``n``, only the first ``n`` rows, held as one tensor
    (calibration, a notebook's batch). The Python API's way to give data to ``prune`` and ``distill``."""
    data = Mixture.of(data)
    rows = open_blocks(data, tokenizer, seq_len, seed=seed, max_tokens=max_tokens)
    if n is not None and n > len(rows):
        raise WhelpError(
            f"{data} has {len(rows)} blocks of {seq_len} tokens, fewer than n={n}; ask for at most "
            f"{len(rows)} or give more data"
        )
    if n is None:
        return rows
    return TensorBlocks(rows.head(n), source=str(data), mask=rows.mask(torch.arange(min(n, len(rows)))))
