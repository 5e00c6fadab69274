"""Token stores: a corpus tokenized once into contiguous little-endian token shards, read through memory maps.

The pre-tokenized layout of torchtitan (``PreTokenizedTextDataset``), Megatron (``.bin``/``.idx``), OLMo-core and
datatrove: documents are tokenized, each followed by EOS, and concatenated; the stream is cut into shards at
document boundaries once a shard holds ``shard_tokens`` tokens (so the cut depends on the text alone, not on the
number of workers). A store directory holds ``whelp.json`` (its marker), ``manifest.json`` (sealed: tokenizer
identity and hash, vocab size, EOS id, dtype, source, per-shard token and document counts and sha256, totals,
fingerprint) and ``tokens-NNNNN.bin`` (uint16 when the vocabulary fits in 65,536 ids, else uint32: 2 or 4
bytes per token on disk, nothing else).

Tokenizing streams the source (memory independent of its size) through N worker processes that run the fast
tokenizer's batch encoding on chunks of documents, in order; each shard is written to a temporary name,
fsynced, renamed and then recorded in the manifest, so an interrupted run resumes at the first missing shard.
Reading checks every shard's size when the store is opened and the sha256 of each 1M-token chunk the first time
a read touches it (a random batch at 20B tokens touches a few MiB, not whole shards), so a truncated or altered
shard is named and never used. The fingerprint is the sha256 of the shards' sha256s: the
corpus is never hashed in RAM.

One module: writing and reading are both the on-disk format (manifest keys, shard names, dtype, chunk hashes), which
must change in one place.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np

from whelp import store
from whelp.data.sources import iter_documents, source_identity
from whelp.errors import WhelpError
from whelp.output import Progress

FORMAT = 2
MANIFEST = store.SHARD_MANIFEST
SHARD_TOKENS = 1 << 26  # 64M tokens: 128 MiB at uint16
CHUNK_TOKENS = 1 << 20  # a sha256 per 1M tokens: a read verifies only the chunks it touches
CHUNK_DOCS = 128  # documents per worker task
MAX_DOC_CHARS = 1 << 20  # longer documents are encoded in pieces cut at line breaks (bounded memory)
_TOKENIZER = None  # the worker processes' tokenizer (inherited through fork)


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the token -> id map and the special ids: equal hashes mean identical token ids."""
    specials = {name: getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return store.content_id([sorted(tokenizer.get_vocab().items()), specials])


def token_dtype(vocab_size: int) -> np.dtype:
    """The store's token dtype, the one place the rule is written: uint16 when every id fits (``vocab_size`` <=
    65,536), else uint32; ``.itemsize`` is a token's bytes on disk (``whelp plan`` prices stores by it)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _pieces(doc: str) -> list[str]:
    """A document cut at line breaks into pieces of at most MAX_DOC_CHARS characters (one piece if it is shorter):
    the Rust tokenizer holds ~150 bytes per character of what it encodes at once, so a 15 MB document would
    take 2.4 GB. Tokens can differ from whole-document encoding only across a cut (never for shorter documents)."""
    pieces = []
    while len(doc) > MAX_DOC_CHARS:
        cut = doc.rfind("\n", 0, MAX_DOC_CHARS) + 1 or MAX_DOC_CHARS
        pieces.append(doc[:cut])
        doc = doc[cut:]
    return pieces + [doc]


def _encode(docs: list[str], dtype: str, tokenizer=None) -> tuple[int, np.ndarray]:
    """``(len(docs), ids)``: the token ids of ``docs``, each followed by EOS, concatenated, in the store's dtype
    (2 bytes a token back from a worker, not 8). A fast tokenizer's Rust batch encoding is called directly: the
    ids of ``tokenizer(doc, add_special_tokens=False)``, without building a BatchEncoding."""
    tokenizer = tokenizer or _TOKENIZER
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: no offsets (tokenizers >= 0.21)

        def batch(texts):
            return [e.ids for e in encode(texts, add_special_tokens=False)]
    else:

        def batch(texts):
            return tokenizer(texts, add_special_tokens=False)["input_ids"]

    short = iter(batch([d for d in docs if len(d) <= MAX_DOC_CHARS]))
    ids = [
        next(short)
        if len(d) <= MAX_DOC_CHARS
        else list(itertools.chain.from_iterable(batch([piece])[0] for piece in _pieces(d)))
        for d in docs
    ]
    out = np.empty(sum(map(len, ids)) + len(ids), dtype=dtype)
    at = 0
    for row in ids:
        out[at : at + len(row)] = row
        out[at + len(row)] = tokenizer.eos_token_id
        at += len(row) + 1
    return len(docs), out


def _chunks(docs, size: int):
    while chunk := list(itertools.islice(docs, size)):
        yield chunk


def _quiet_worker() -> None:
    """Workers leave Ctrl-C to the parent (which stops the pool and reports once): one line, not a traceback each."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _encoded(docs, tokenizer, num_proc: int, dtype: str):
    """``(n_docs, ids)`` per chunk of documents, in document order, tokenized by ``num_proc`` processes."""
    if num_proc == 1:
        yield from (_encode(chunk, dtype, tokenizer) for chunk in _chunks(docs, CHUNK_DOCS))
        return

    global _TOKENIZER
    _TOKENIZER = tokenizer
    handler = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # workers are forked with the default SIGTERM: the
    try:  # pool's own terminate() then ends them at once, never through the CLI's Ctrl-C handler
        pool = multiprocessing.get_context("fork").Pool(num_proc, initializer=_quiet_worker)
    finally:
        signal.signal(signal.SIGTERM, handler)
    with pool:
        yield from pool.imap(functools.partial(_encode, dtype=dtype), _chunks(docs, CHUNK_DOCS), chunksize=4)


def manifest_identity(
    tokenizer, source: str, source_id, max_tokens: int | None, shard_tokens: int, text_column: str = "text", **extra
) -> dict:
    """What a store holds, for its manifest and for resuming: the tokenizer (hash, vocabulary, EOS, token dtype),
    the source and its identity, the token bound, the shard size, and ``extra`` (a generated store's settings)."""
    vocab = len(tokenizer)
    if tokenizer.eos_token_id is None:
        raise WhelpError("the tokenizer has no EOS token to separate documents")
    return {
        "format": FORMAT,
        "tokenizer": getattr(tokenizer, "name_or_path", "") or "",
        "tokenizer_sha256": tokenizer_hash(tokenizer),
        "vocab_size": vocab,
        "eos_id": tokenizer.eos_token_id,
        "dtype": token_dtype(vocab).name,
        "source": source,
        "source_identity": source_id,
        "max_tokens": max_tokens,
        "text_column": text_column,
        "shard_tokens": shard_tokens,
        **extra,
    }


def _maker(manifest: dict) -> str:
    """The command that made (and resumes, and repairs) a store."""
    return "whelp generate" if "generation" in manifest else "whelp tokenize"


def _write_shard(out: Path, index: int, tokens: np.ndarray, n_docs: int, dtype: np.dtype) -> dict:
    data = tokens.astype(dtype, copy=False).tobytes()
    name = f"tokens-{index:05d}.bin"
    store.write_bytes(out / name, data)
    step = CHUNK_TOKENS * dtype.itemsize
    return {
        "file": name,
        "tokens": len(tokens),
        "documents": n_docs,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "chunk_sha256": [hashlib.sha256(data[i : i + step]).hexdigest() for i in range(0, len(data), step)],
    }


def tokenize(
    source: str,
    tokenizer,
    out: str | Path,
    num_proc: int | None = None,
    max_tokens: int | None = None,
    text_column: str = "text",
    force: bool = False,
    shard_tokens: int = SHARD_TOKENS,
    progress: bool = True,
) -> Path:
    """Tokenize source ``source`` once into a token store at ``out``; resumes an interrupted run of the same call.

    ``num_proc`` worker processes (default: every core) tokenize chunks of documents in order, so 1 and N
    workers write identical shards. ``max_tokens`` bounds the tokens kept (the stream is cut exactly there).
    With ``force`` an existing store is replaced only once the new one is complete.
    """
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism is the workers'; one core each
    out = Path(out).expanduser()
    for name, value in (("--num-proc", num_proc), ("--max-tokens", max_tokens), ("shard_tokens", shard_tokens)):
        if value is not None and value < 1:
            raise WhelpError(f"{name} must be positive, got {value}")
    num_proc = num_proc or os.cpu_count() or 1
    made = manifest_identity(tokenizer, source, source_identity(source), max_tokens, shard_tokens, text_column)
    return write(out, made, force, lambda work, manifest: _fill(work, manifest, tokenizer, num_proc, progress))


def write(out: Path, identity: dict, force: bool, fill) -> Path:
    """Make (or resume) the store of ``identity`` at ``out`` with ``fill(work_dir, manifest)``, which appends shards
    (``flush``) and seals the manifest (``seal``). With ``force`` an existing store is replaced only once the new
    one is complete; a failure before the first shard leaves nothing that would block the corrected command."""
    fix = f"re-run {_maker(identity)} with --force to rebuild {out}"

    def intact(path: Path, shards: list[dict]) -> list[dict]:  # a stream resumes after its first damaged shard
        return list(itertools.takewhile(lambda s: _shard_problem(path, s, identity["dtype"]) is None, shards))

    work, manifest = store.resume_shards(
        out,
        identity,
        force,
        "store",
        "token store",
        lambda path: store.read_record(path / MANIFEST, fix),
        intact,
        ignore=("tokenizer",),  # the name may differ, the hash decides
    )
    try:
        fill(work, manifest)
    except WhelpError:
        if not manifest["shards"]:
            shutil.rmtree(work)
        raise
    if work != out:
        store.commit_dir(work, out, "store")
    return out


def _fill(out: Path, manifest: dict, tokenizer, num_proc: int, progress: bool) -> None:
    """Tokenize the documents after the recorded shards into new shards, then seal the manifest complete."""
    limit = manifest["max_tokens"]
    done_docs = sum(s["documents"] for s in manifest["shards"])
    total = sum(s["tokens"] for s in manifest["shards"])
    max_chars = None if limit is None else 8 * limit
    docs = itertools.islice(iter_documents(manifest["source"], manifest["text_column"], max_chars), done_docs, None)
    parts, n_docs, held, first, t0 = [], 0, 0, total, time.perf_counter()
    with Progress("tokenizing", enabled=progress) as bar:
        for count, ids in _encoded(docs, tokenizer, num_proc, manifest["dtype"]):
            if limit is not None and total + held >= limit:
                break
            if limit is not None:
                ids = ids[: limit - total - held]
            parts.append(ids)
            n_docs, held = n_docs + count, held + len(ids)
            if held >= manifest["shard_tokens"] or (limit is not None and total + held >= limit):
                total += flush(out, manifest, parts, n_docs)
                parts, n_docs, held = [], 0, 0
                rate = (total - first) / max(time.perf_counter() - t0, 1e-9)
                bar.update(info=f"{total:,} tokens, {rate:,.0f} tok/s")
    if held:
        total += flush(out, manifest, parts, n_docs)
    if total == 0:
        raise WhelpError(f"data source '{manifest['source']}' holds no text")
    seal(out, manifest, total)


def flush(out: Path, manifest: dict, parts: list, n_docs: int, **extra) -> int:
    """Write ``parts`` (token arrays) as the next shard of ``n_docs`` documents (``extra`` goes into its record)
    and record it in the manifest; returns its token count."""
    tokens = np.concatenate(parts)
    shard = _write_shard(out, len(manifest["shards"]), tokens, n_docs, np.dtype(manifest["dtype"]))
    manifest["shards"].append({**shard, **extra})
    store.write_record(out / MANIFEST, manifest)
    return len(tokens)


def seal(out: Path, manifest: dict, total: int) -> None:
    """Mark the store complete: totals and the fingerprint (the sha256 of the shards' sha256s)."""
    shas = [s["sha256"] for s in manifest["shards"]]
    store.write_record(
        out / MANIFEST,
        {
            **manifest,
            "complete": True,
            "total_tokens": total,
            "documents": sum(s["documents"] for s in manifest["shards"]),
            "fingerprint": store.content_id([manifest["dtype"], shas]),
        },
    )


def _shard_problem(path: Path, shard: dict, dtype: str, full: bool = True) -> str | None:
    """``store.shard_problem``, and the recorded size must hold exactly the recorded tokens."""
    if shard["bytes"] != shard["tokens"] * np.dtype(dtype).itemsize:
        return f"is recorded as {shard['bytes']} bytes for {shard['tokens']} tokens of {dtype}"
    return store.shard_problem(path, shard, full)


class TokenStore:
    """A complete, verified store: ``len(store)`` tokens; ``store.read(a, b)`` gives tokens [a, b) as int64."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = path, manifest
        self.dtype = np.dtype(manifest["dtype"])
        self.starts = list(itertools.accumulate((s["tokens"] for s in manifest["shards"]), initial=0))
        self._maps: dict[int, np.ndarray] = {}
        self._verified: set[tuple[int, int]] = set()

    def __len__(self) -> int:
        return self.starts[-1]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def _slice(self, i: int, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) of shard ``i``, each 1M-token chunk they touch verified once (sha256)."""
        if i not in self._maps:
            self._maps[i] = np.memmap(self.path / self.manifest["shards"][i]["file"], dtype=self.dtype, mode="r")
        tokens, shard = self._maps[i], self.manifest["shards"][i]
        for c in range(a // CHUNK_TOKENS, (b - 1) // CHUNK_TOKENS + 1):
            if (i, c) not in self._verified:
                chunk = tokens[c * CHUNK_TOKENS : (c + 1) * CHUNK_TOKENS].tobytes()
                if hashlib.sha256(chunk).hexdigest() != shard["chunk_sha256"][c]:
                    raise WhelpError(
                        f"token store shard {self.path / shard['file']} is corrupted (sha256 of its "
                        f"chunk {c} differs from the manifest); re-run the {_maker(self.manifest)} "
                        "command that made it (it rewrites damaged shards)"
                    )
                self._verified.add((i, c))
        return tokens[a:b]

    def read(self, start: int, stop: int) -> np.ndarray:
        if not 0 <= start <= stop <= len(self):
            raise WhelpError(f"tokens [{start}, {stop}) are outside the store's {len(self)} tokens")
        out, i = [], bisect.bisect_right(self.starts, start) - 1
        while start < stop:
            end = min(stop, self.starts[i + 1])
            out.append(self._slice(i, start - self.starts[i], end - self.starts[i]))
            start, i = end, i + 1
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)


def is_store(path: str | Path) -> bool:
    found = store.marker(Path(path).expanduser())
    return found is not None and found["kind"] == "store"


def open_store(path: str | Path, tokenizer=None) -> TokenStore:
    """A complete store after checking its manifest (sealed), every shard's size and the tokenizer."""
    path = Path(path).expanduser()
    m = store.read_record(path / MANIFEST, f"re-run the whelp command that made {path} with --force to rebuild it")
    maker = _maker(m)
    if m.get("format") != FORMAT:
        raise WhelpError(f"{path} has token-store format {m.get('format')}, this whelp reads {FORMAT}; re-tokenize")
    if not m["complete"]:
        raise WhelpError(
            f"{path} is incomplete ({len(m['shards'])} shards written, interrupted); re-run the same "
            f"{maker} command to resume it"
        )
    if tokenizer is not None and tokenizer_hash(tokenizer) != m["tokenizer_sha256"]:
        mine = getattr(tokenizer, "name_or_path", "") or "the model's tokenizer"
        raise WhelpError(
            f"{path} was tokenized with {m['tokenizer'] or 'another tokenizer'} (sha256 "
            f"{m['tokenizer_sha256'][:12]}), not with {mine} ({tokenizer_hash(tokenizer)[:12]}): token ids "
            "would not match; tokenize the source with the model's tokenizer"
        )
    for shard in m["shards"]:
        problem = _shard_problem(path, shard, m["dtype"], full=False)
        if problem:
            raise WhelpError(
                f"token store shard {path / shard['file']} {problem}; re-run the {maker} command "
                "that made it (it rewrites damaged shards)"
            )
    return TokenStore(path, m)
