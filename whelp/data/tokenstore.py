"""Token stores: a corpus tokenized once into contiguous little-endian token shards, read through memory maps.

The pre-tokenized layout of torchtitan (``PreTokenizedTextDataset``), Megatron (``.bin``/``.idx``), OLMo-core and
datatrove: documents are tokenized, each followed by EOS, and concatenated; the stream is cut into shards at
document boundaries once a shard holds ``shard_tokens`` tokens (so the cut depends on the text alone, not on the
number of workers). A store directory holds ``whelp.json`` (its marker), ``manifest.json`` (sealed: tokenizer
identity and hash, vocab size, EOS id, dtype, source, per-shard token and document counts and sha256, totals,
fingerprint) and ``tokens-NNNNN.bin`` (uint16 when the vocabulary fits in 65,536 ids, else uint32: 2 or 4
bytes per token on disk, nothing else).

Tokenizing streams the source (memory independent of its size) through N worker processes that run the fast
tokenizer's batch encoding on chunks of documents, in order (``whelp.data.encode``); each shard is written to a temporary name,
fsynced, renamed and then recorded in the manifest, so an interrupted run resumes at the first missing shard.
Reading checks every shard's size when the store is opened and the sha256 of each 1M-token chunk the first time
a read touches it (a random batch at 20B tokens touches a few MiB, not whole shards), so a truncated or altered
shard is named and never used. The fingerprint is the sha256 of the shards' sha256s: the
corpus is never hashed in RAM.

Loss masks (chat data, optional and versioned): a store whose manifest has ``"mask": 1`` holds beside each token shard
``tokens-NNNNN.bin`` a mask shard ``mask-NNNNN.bin``, one bit per token packed with ``np.packbits(mask,
bitorder="little")`` (1/16 of the uint16 tokens' bytes: 2.5 GB at 20B tokens beside their 40 GB), recorded in the
shard's entry as ``"mask": {"file", "bytes", "sha256"}``, its size checked when the store is opened and its sha256
when a read first touches it. ``mask[t]`` True means token ``t`` is a training target (the loss at ``t - 1``, which
predicts it, counts): the assistant turns of a conversation and their end-of-turn tokens (``whelp.data.chat``). A
store without the key (every plain text store, every store made before masks) reads exactly as before.

One module: writing and reading are both the on-disk format (manifest keys, shard names, dtype, chunk hashes), which
must change in one place.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import os
import shutil
import time
from pathlib import Path

import numpy as np

from whelp import store
from whelp.data import chat
from whelp.data.encode import encoded
from whelp.data.sources import iter_documents, iter_records, source_identity
from whelp.errors import WhelpError
from whelp.output import Progress

FORMAT = 2
MASK_FORMAT = 1  # the manifest's "mask": bit-packed per-token loss masks beside the token shards
MANIFEST = store.SHARD_MANIFEST
SHARD_TOKENS = 1 << 26  # 64M tokens: 128 MiB at uint16
CHUNK_TOKENS = 1 << 20  # a sha256 per 1M tokens: a read verifies only the chunks it touches


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the token -> id map and the special ids: equal hashes mean identical token ids."""
    specials = {name: getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return store.content_id([sorted(tokenizer.get_vocab().items()), specials])


def token_dtype(vocab_size: int) -> np.dtype:
    """The store's token dtype, the one place the rule is written: uint16 when every id fits (``vocab_size`` <=
    65,536), else uint32; ``.itemsize`` is a token's bytes on disk (``whelp plan`` prices stores by it)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


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


def _write_shard(out: Path, index: int, tokens: np.ndarray, n_docs: int, dtype: np.dtype, mask=None) -> dict:
    data = tokens.astype(dtype, copy=False).tobytes()
    name = f"tokens-{index:05d}.bin"
    store.write_bytes(out / name, data)
    step = CHUNK_TOKENS * dtype.itemsize
    masked = {}
    if mask is not None:
        bits = np.packbits(mask.astype(bool), bitorder="little").tobytes()
        store.write_bytes(out / f"mask-{index:05d}.bin", bits)
        masked = {
            "mask": {"file": f"mask-{index:05d}.bin", "bytes": len(bits), "sha256": hashlib.sha256(bits).hexdigest()},
            "targets": int(mask.sum()),
        }
    return {
        **masked,
        "file": name,
        "tokens": len(tokens),
        "documents": n_docs,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "chunk_sha256": [hashlib.sha256(data[i : i + step]).hexdigest() for i in range(0, len(data), step)],
    }


@store.writer
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
    end_of_turn: tuple[int, ...] | None = None,
) -> Path:
    """Tokenize source ``source`` once into a token store at ``out``; resumes an interrupted run of the same call.

    ``num_proc`` worker processes (default: every core) tokenize chunks of documents in order, so 1 and N
    workers write identical shards. ``max_tokens`` bounds the tokens kept (the stream is cut exactly there).
    With ``force`` an existing store is replaced only once the new one is complete. With ``end_of_turn`` (the
    model's end-of-turn ids, ``chat.end_of_turn_ids``) the source is chat rows (``messages``), each conversation
    rendered through the tokenizer's chat template into a document with its loss mask.
    """
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism is the workers'; one core each
    out = Path(out).expanduser()
    for name, value in (("--num-proc", num_proc), ("--max-tokens", max_tokens), ("shard_tokens", shard_tokens)):
        if value is not None and value < 1:
            raise WhelpError(f"{name} must be positive, got {value}")
    num_proc = num_proc or os.cpu_count() or 1
    made = manifest_identity(
        tokenizer,
        source,
        source_identity(source),
        max_tokens,
        shard_tokens,
        text_column,
        **chat_identity(tokenizer, end_of_turn),
    )
    return write(out, made, force, lambda work, manifest: _fill(work, manifest, tokenizer, num_proc, progress))


def chat_identity(tokenizer, end_of_turn: tuple[int, ...] | None) -> dict:
    """A chat store's manifest keys ({} for text): the mask format, the end-of-turn ids its masks end turns at and
    the sha256 of the chat template that rendered it (the tokenizer's hash covers its ids only)."""
    if not end_of_turn:
        return {}
    template = hashlib.sha256(str(tokenizer.chat_template).encode()).hexdigest()
    return {"mask": MASK_FORMAT, "end_of_turn": list(end_of_turn), "chat_template_sha256": template}


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
    eot = tuple(manifest.get("end_of_turn") or ())
    docs = itertools.islice(_documents(manifest["source"], manifest["text_column"], max_chars, eot), done_docs, None)
    parts, masks, n_docs, held, first, t0 = [], [], 0, 0, total, time.perf_counter()
    with Progress("tokenizing", enabled=progress) as bar:
        for count, ids, mask in encoded(docs, tokenizer, num_proc, manifest["dtype"], eot):
            if limit is not None and total + held >= limit:
                break
            if limit is not None:
                ids, mask = ids[: limit - total - held], mask if mask is None else mask[: limit - total - held]
            parts.append(ids)
            masks.append(mask)
            n_docs, held = n_docs + count, held + len(ids)
            if held >= manifest["shard_tokens"] or (limit is not None and total + held >= limit):
                total += flush(out, manifest, parts, n_docs, masks if eot else None)
                parts, masks, n_docs, held = [], [], 0, 0
                rate = (total - first) / max(time.perf_counter() - t0, 1e-9)
                bar.update(info=f"{total:,} tokens, {rate:,.0f} tok/s")
    if held:
        total += flush(out, manifest, parts, n_docs, masks if eot else None)
    if total == 0:
        raise WhelpError(f"data source '{manifest['source']}' holds no text")
    seal(out, manifest, total)


def _documents(source: str, text_column: str, max_chars: int | None, end_of_turn: tuple[int, ...]):
    """The documents of ``source``: its texts, or with ``end_of_turn`` the conversations of its chat rows."""
    if not end_of_turn:
        return iter_documents(source, text_column, max_chars)
    return (chat.messages_of(row, where, column=text_column) for where, row in iter_records(source))


def flush(out: Path, manifest: dict, parts: list, n_docs: int, masks: list | None = None, **extra) -> int:
    """Write ``parts`` (token arrays) as the next shard of ``n_docs`` documents, with ``masks`` (bool arrays parallel
    to ``parts``) in a store that has masks (``extra`` goes into its record), and record it in the manifest; returns
    its token count."""
    if (masks is None) != (manifest.get("mask") is None):
        raise ValueError("a store with masks (its manifest's 'mask') is written with masks, any other without")
    tokens = np.concatenate(parts)
    mask = None if masks is None else np.concatenate(masks)
    if mask is not None and len(mask) != len(tokens):
        raise ValueError(f"{len(mask)} mask bits for {len(tokens)} tokens")
    shard = _write_shard(out, len(manifest["shards"]), tokens, n_docs, np.dtype(manifest["dtype"]), mask)
    manifest["shards"].append({**shard, **extra})
    store.write_record(out / MANIFEST, manifest)
    return len(tokens)


def seal(out: Path, manifest: dict, total: int, **extra) -> None:
    """Mark the store complete: totals, ``extra`` and the fingerprint (the sha256 of the shards' sha256s, and of
    their mask shards' in a store with masks). A store with masks and not one target is refused."""
    shas = [s["sha256"] for s in manifest["shards"]]
    masked = {}
    if manifest.get("mask") is not None:
        masked = {"targets": sum(s["targets"] for s in manifest["shards"])}
        shas = [shas, [s["mask"]["sha256"] for s in manifest["shards"]]]
        _check_targets(out, masked["targets"])
    store.write_record(
        out / MANIFEST,
        {
            **manifest,
            **extra,
            **masked,
            "complete": True,
            "total_tokens": total,
            "documents": sum(s["documents"] for s in manifest["shards"]),
            "fingerprint": store.content_id([manifest["dtype"], shas]),
        },
    )


def _check_targets(path: Path, targets: int) -> None:
    if targets == 0:
        raise WhelpError(
            f"{path} holds chat data without one assistant token to train on (its loss mask is all 0); give "
            "conversations with assistant turns"
        )


def _shard_problem(path: Path, shard: dict, dtype: str, full: bool = True) -> str | None:
    """``store.shard_problem`` of the token shard and of its mask shard (named: the problem is the mask's), and the
    recorded sizes must hold exactly the recorded tokens."""
    if shard["bytes"] != shard["tokens"] * np.dtype(dtype).itemsize:
        return f"is recorded as {shard['bytes']} bytes for {shard['tokens']} tokens of {dtype}"
    mask = shard.get("mask")
    if mask is not None and mask["bytes"] != (shard["tokens"] + 7) // 8:
        return f"has a mask recorded as {mask['bytes']} bytes for {shard['tokens']} tokens"
    problem = store.shard_problem(path, shard, full)
    if problem is None and mask is not None and (problem := store.shard_problem(path, mask, full)):
        return f"has its mask shard {mask['file']}, which {problem}"
    return problem


class TokenStore:
    """A complete, verified store: ``len(store)`` tokens; ``store.read(a, b)`` gives tokens [a, b) as int64, and in
    a store with masks (``has_mask``) ``store.read_mask(a, b)`` their loss mask (bool)."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = path, manifest
        self.dtype = np.dtype(manifest["dtype"])
        self.starts = list(itertools.accumulate((s["tokens"] for s in manifest["shards"]), initial=0))
        self._maps: dict[int, np.ndarray] = {}
        self._verified: set[tuple[int, int]] = set()
        self._masks: dict[int, np.ndarray] = {}

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

    def _pieces(self, start: int, stop: int, piece) -> list[np.ndarray]:
        """``piece(i, a, b)`` over the shards that tokens [start, stop) span, ``a, b`` local to shard ``i``."""
        if not 0 <= start <= stop <= len(self):
            raise WhelpError(f"tokens [{start}, {stop}) are outside the store's {len(self)} tokens")
        out, i = [], bisect.bisect_right(self.starts, start) - 1
        while start < stop:
            end = min(stop, self.starts[i + 1])
            out.append(piece(i, start - self.starts[i], end - self.starts[i]))
            start, i = end, i + 1
        return out

    def read(self, start: int, stop: int) -> np.ndarray:
        out = self._pieces(start, stop, self._slice)
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)

    @property
    def has_mask(self) -> bool:
        return self.manifest.get("mask") is not None

    def _mask_bits(self, i: int) -> np.ndarray:
        """Shard ``i``'s packed mask bits, its sha256 checked on first use (the whole shard: 1/16 of its tokens)."""
        if i not in self._masks:
            shard = self.manifest["shards"][i]
            bits = np.memmap(self.path / shard["mask"]["file"], dtype=np.uint8, mode="r")
            if hashlib.sha256(bits).hexdigest() != shard["mask"]["sha256"]:
                raise WhelpError(
                    f"token store mask shard {self.path / shard['mask']['file']} is corrupted (its sha256 differs "
                    f"from the manifest); re-run the {_maker(self.manifest)} command that made it (it rewrites "
                    "damaged shards)"
                )
            self._masks[i] = bits
        return self._masks[i]

    def _mask_slice(self, i: int, a: int, b: int) -> np.ndarray:
        bits = np.unpackbits(self._mask_bits(i)[a // 8 : (b + 7) // 8], bitorder="little")
        return bits[a % 8 : a % 8 + b - a].astype(bool)

    def read_mask(self, start: int, stop: int) -> np.ndarray:
        """The loss mask of tokens [start, stop): bool [stop - start], True where the token is a training target."""
        if not self.has_mask:
            raise WhelpError(f"{self.path} has no loss mask (plain text: every token is a target)")
        out = self._pieces(start, stop, self._mask_slice)
        return np.concatenate(out) if out else np.zeros(0, dtype=bool)


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
    if m.get("mask", MASK_FORMAT) != MASK_FORMAT:
        raise WhelpError(f"{path} has mask format {m['mask']}, this whelp reads {MASK_FORMAT}; re-make it")
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
    if m.get("mask") is not None:
        _check_targets(path, m["targets"])
    return TokenStore(path, m)
