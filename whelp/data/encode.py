"""Documents to token ids in N worker processes, in order: plain texts (each followed by EOS) or conversations
rendered through the chat template with their loss masks (``whelp.data.chat``), for ``whelp.data.tokenstore``.

The fast tokenizer's Rust batch encoding runs on chunks of ``CHUNK_DOCS`` documents; workers are forked (they
inherit the tokenizer) and ``imap`` keeps the chunks in document order, so 1 and N workers give identical ids.
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import signal

import numpy as np

from whelp.data import chat

CHUNK_DOCS = 128  # documents per worker task
MAX_DOC_CHARS = 1 << 20  # longer documents are encoded in pieces cut at line breaks (bounded memory)
_TOKENIZER = None  # the worker processes' tokenizer (inherited through fork)


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


def _encode_chat(convs: list[list[dict]], dtype: str, end_of_turn: tuple[int, ...], tokenizer=None):
    """``(len(convs), ids, mask)``: each conversation rendered through the chat template (``chat.render``) and
    followed by EOS (not a target), concatenated."""
    tokenizer = tokenizer or _TOKENIZER
    rendered = [chat.render(tokenizer, conv, end_of_turn) for conv in convs]
    ids = np.concatenate([np.append(np.asarray(i, dtype=dtype), tokenizer.eos_token_id) for i, _ in rendered])
    return len(convs), ids.astype(dtype), np.concatenate([np.append(m, False) for _, m in rendered])


def _chunks(docs, size: int):
    while chunk := list(itertools.islice(docs, size)):
        yield chunk


def _quiet_worker() -> None:
    """Workers leave Ctrl-C to the parent (which stops the pool and reports once): one line, not a traceback each."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def encoded(docs, tokenizer, num_proc: int, dtype: str, end_of_turn: tuple[int, ...] | None = None):
    """``(n_docs, ids, mask)`` per chunk of documents, in document order, tokenized by ``num_proc`` processes;
    ``end_of_turn`` given, the documents are conversations rendered with their mask (else the mask is None)."""
    encode = (
        functools.partial(_encode_chat, dtype=dtype, end_of_turn=end_of_turn)
        if end_of_turn
        else functools.partial(_encode_text, dtype=dtype)
    )
    yield from _mapped(encode, _chunks(docs, CHUNK_DOCS), tokenizer, num_proc)


def _encode_text(docs: list[str], dtype: str, tokenizer=None) -> tuple[int, np.ndarray, None]:
    return *_encode(docs, dtype, tokenizer), None


def _mapped(encode, chunks, tokenizer, num_proc: int):
    """``encode(chunk)`` of each chunk, in order: here, or in ``num_proc`` forked processes that share
    ``tokenizer``."""
    if num_proc == 1:
        yield from (encode(chunk, tokenizer=tokenizer) for chunk in chunks)
        return

    global _TOKENIZER
    _TOKENIZER = tokenizer
    handler = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # workers are forked with the default SIGTERM: the
    try:  # pool's own terminate() then ends them at once, never through the CLI's Ctrl-C handler
        pool = multiprocessing.get_context("fork").Pool(num_proc, initializer=_quiet_worker)
    finally:
        signal.signal(signal.SIGTERM, handler)
    with pool:
        yield from pool.imap(encode, chunks, chunksize=4)
