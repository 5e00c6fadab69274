"""Offline teacher-logit cache: the format, and the verified reader the distillation loop trains from.

A teacher too big to run beside the student (a 70B next to a 1B) is run once over the packed data
(``whelp.distillation.capture``) and its next-token distribution is stored per position, either as

* ``topk``: the k most likely ids with their log-probs plus the tail mass outside them (biased: Anshumann
  et al., ACL 2025 show top-k KD under-weights the tail), or
* ``sample``: S ids drawn from the teacher distribution (repeats are the counts) plus the teacher entropy:
  an unbiased estimate of forward KL and of its gradient (Anshumann et al., ACL 2025).

Layout: ``DIR/manifest.json`` and ``DIR/blocks-START-STOP.safetensors``, each shard holding the blocks
``[START, STOP)``: ``tokens`` int32 [b, seq_len], ``block_sha256`` uint8 [b, 32] and per position (flattened
[b * seq_len]) a bit-packed ``entries`` uint8 row plus ``tail`` or ``entropy`` (fp16). A top-k entry is
``id << 15 | fp16(-logp) without its sign bit`` in ``id_bits + 15`` bits (32 bits at vocab 128256: 4 bytes per
entry); a sample is its id in ``id_bits`` bits. Bytes per token at vocab 128256: top-64 4 + 256 + 2 = 262;
S = 16: 4 + 34 + 2 = 40.

Every shard is recorded with its size and sha256 in the sealed manifest, which also holds ``content_sha256``
(the blocks' fingerprint, see ``capture``); a truncated or corrupted shard is named on read and never used.
"""

from __future__ import annotations

import bisect
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from whelp import store
from whelp.data.tokenstore import tokenizer_hash
from whelp.distillation.losses import SparseTarget
from whelp.errors import WhelpError

FORMAT = 2  # 2: shards named by block range, per-block digests, content_sha256
MAG_BITS = 15  # an fp16 of -logp >= 0 has its sign bit clear
MANIFEST = store.SHARD_MANIFEST


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Non-negative ints [n, m] (< 2^bits) -> uint8 [n, ceil(m * bits / 8)], little-endian bit order."""
    n, m = values.shape
    v = values.cpu().numpy().astype(np.uint64)
    planes = ((v[..., None] >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8)
    return torch.from_numpy(np.packbits(planes.reshape(n, m * bits), axis=1, bitorder="little"))


def unpack_bits(packed: Tensor, m: int, bits: int) -> Tensor:
    """Inverse of ``pack_bits``: uint8 [n, nbytes] -> int64 [n, m]."""
    n = packed.shape[0]
    if bits in (8, 16, 32):
        dtype = {8: "u1", 16: "<u2", 32: "<u4"}[bits]
        return torch.from_numpy(packed.numpy()[:, : m * bits // 8].copy().view(dtype).astype(np.int64))
    planes = np.unpackbits(packed.numpy(), axis=1, count=m * bits, bitorder="little").reshape(n, m, bits)
    width = 64 if bits > 32 else 32
    padded = np.zeros((n, m, width), dtype=np.uint8)
    padded[..., :bits] = planes
    words = np.packbits(padded, axis=-1, bitorder="little").view("<u8" if width == 64 else "<u4")
    return torch.from_numpy(words.reshape(n, m).astype(np.int64))


def id_bits(vocab: int) -> int:
    return max(1, (vocab - 1).bit_length())


ROWS = 8  # positions per pass of the [n, V] reductions on a CPU: an [8, V] block stays in cache (1.5 MB at V = 49K)


def _row_blocks(z: Tensor) -> list[slice]:
    """Row blocks of ``z`` [n, V]: ROWS rows on a CPU, where a full [n, V] temporary costs more in page faults and
    memory traffic than the exp itself (measured: 94 ms vs 34 ms for the exp of [1024, 49152]), all rows on an
    accelerator (one kernel a reduction)."""
    step = ROWS if z.device.type == "cpu" else max(1, len(z))
    return [slice(s, s + step) for s in range(0, len(z), step)]


def _logsumexp(z: Tensor, top: Tensor) -> Tensor:
    """logsumexp [n, 1] of ``z`` [n, V] around its row maxima ``top`` [n, 1] (top-k has found them)."""
    return top + torch.cat([(z[b] - top[b]).exp_().sum(-1, keepdim=True) for b in _row_blocks(z)]).log_()


def sparse_targets(
    logits: Tensor, mode: str, k: int, temperature: float, generator: torch.Generator | None = None
) -> SparseTarget:
    """Sparse targets of teacher logits [n, V] at temperature T: top-k (+ tail mass) or k samples (+ entropy).
    Neither writes a full [n, V] log-softmax: top-k log-probs are the top logits minus their logsumexp; samples
    are drawn from the unnormalised exp(z - max) and the entropy is log S - sum(e (z - max)) / S."""
    z = logits.float() if temperature == 1 else logits.float() / temperature
    vocab = logits.shape[-1]
    if mode == "topk":
        values, ids = z.topk(min(k, vocab), dim=-1)
        values = values - _logsumexp(z, values[:, :1])
        tail = (-torch.expm1(torch.logsumexp(values, -1))).clamp_min(0)
        return SparseTarget("topk", ids, temperature, vocab, logp=values, tail=tail)
    if mode == "sample":
        draws, entropy = [], []
        for b in _row_blocks(z):
            block = z[b] - z[b].amax(-1, keepdim=True)
            e = block.exp()
            total = e.sum(-1)
            draws.append(torch.multinomial(e, k, replacement=True, generator=generator))
            entropy.append(total.log() - (e * block).sum(-1) / total)
        return SparseTarget("sample", torch.cat(draws).sort(-1).values, temperature, vocab, entropy=torch.cat(entropy))
    raise WhelpError(f"unknown cache mode '{mode}'; choose topk or sample")


def encode(target: SparseTarget) -> dict[str, Tensor]:
    """Storage tensors of a sparse target (see the module docstring for the bit layout)."""
    bits = id_bits(target.vocab_size)
    if target.mode == "sample":
        return {"entries": pack_bits(target.ids, bits), "entropy": target.entropy.half().cpu()}
    mag = target.logp.neg().clamp_min(0).half().view(torch.int16).long() & 0x7FFF
    return {"entries": pack_bits(target.ids << MAG_BITS | mag, bits + MAG_BITS), "tail": target.tail.half().cpu()}


def decode(tensors: dict[str, Tensor], mode: str, k: int, temperature: float, vocab: int) -> SparseTarget:
    """Inverse of ``encode``: fp32 log-probs, tail and entropy."""
    bits = id_bits(vocab)
    if mode == "sample":
        ids = unpack_bits(tensors["entries"], k, bits)
        return SparseTarget("sample", ids, temperature, vocab, entropy=tensors["entropy"].float())
    words = unpack_bits(tensors["entries"], k, bits + MAG_BITS)
    logp = -(words & 0x7FFF).to(torch.int16).view(torch.float16).float()
    return SparseTarget("topk", words >> MAG_BITS, temperature, vocab, logp=logp, tail=tensors["tail"].float())


def read_manifest(path: Path) -> dict:
    """The sealed manifest: an edited one (a changed ``k``, say) is refused, never trained on."""
    if not (path / MANIFEST).exists():
        raise WhelpError(f"{path} is not a teacher-logit cache (no {MANIFEST}); build one with whelp cache-logits")
    return store.read_record(path / MANIFEST, "rebuild the cache with whelp cache-logits --force")


def claim(out: Path, force: bool) -> bool:
    """Whether ``out`` holds a whelp cache to resume, or with ``force`` to replace, whatever its manifest says (a
    cache stopped before its first shard holds nothing to lose); WhelpError if it holds anything else."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    store.check_writable(out, True, "cache")
    return force or ((out / MANIFEST).exists() and bool(read_manifest(out)["shards"]))


class TeacherCache:
    """A verified cache. ``tokens(block_idx)`` gives the cached blocks' tokens [len(block_idx), seq_len] (the cache
    keeps its own copy, read per block, never all at once); ``targets(block_idx)`` gives the teacher targets of
    those blocks flattened to [len(block_idx) * seq_len] positions, block-major, where position t of a block
    holds the teacher's distribution of token t + 1 (its logits at t), exactly aligned with the student's logits
    at t. The last position of a block predicts the token after the block."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = path, manifest
        self._shards = manifest["shards"]  # in block order
        self._starts = [s["start"] for s in self._shards]
        self._files = {s["file"]: safe_open(str(path / s["file"]), framework="pt") for s in self._shards}

    def check_blocks(self, blocks) -> None:
        """Refuse data whose rows are not the ones cached: same fingerprint (stores, seq_len, seed, budget), hence
        the same blocks in the same order."""
        m = self.manifest
        if (m["data_fingerprint"], m["seq_len"], m["n_blocks"]) != (blocks.fingerprint, blocks.seq_len, len(blocks)):
            raise WhelpError(
                f"cache {self.path} holds other token blocks ({m['n_blocks']} blocks of {m['seq_len']} "
                f"from {m['data_source']}) than the data {blocks.source} ({len(blocks)} of "
                f"{blocks.seq_len}); pass the data, seq_len and max_tokens the cache was made with"
            )

    def tokens(self, block_idx: Tensor) -> Tensor:
        rows = []
        for block in block_idx.tolist():
            shard = self._shard_of(block)
            rows.append(
                self._files[shard["file"]].get_slice("tokens")[block - shard["start"] : block - shard["start"] + 1]
            )
        return torch.cat(rows).long()

    def _shard_of(self, block: int) -> dict:
        i = bisect.bisect_right(self._starts, block) - 1  # O(log shards): 300k shards at 20B tokens
        if i >= 0 and block < self._shards[i]["stop"]:
            return self._shards[i]
        raise WhelpError(f"block {block} is outside the cache's {self.manifest['n_blocks']} blocks")

    def targets(self, block_idx: Tensor) -> SparseTarget:
        m, L = self.manifest, self.manifest["seq_len"]
        keys = ("entries", "tail") if m["mode"] == "topk" else ("entries", "entropy")
        parts: dict[str, list[Tensor]] = {key: [] for key in keys}
        for block in block_idx.tolist():
            shard = self._shard_of(block)
            row = (block - shard["start"]) * L
            for key in keys:
                parts[key].append(self._files[shard["file"]].get_slice(key)[row : row + L])
        tensors = {key: torch.cat(parts[key]) for key in keys}
        return decode(tensors, m["mode"], m["k"], m["temperature"], m["vocab_size"])


def open_cache(
    path, *, student_vocab_size: int | None = None, tokenizer=None, data_fingerprint: str | None = None
) -> TeacherCache:
    """Open a cache after checking its manifest against the student, tokenizer and data, and every shard's
    size and sha256; any mismatch or damage raises a WhelpError that names it."""
    path = Path(path).expanduser()
    m = read_manifest(path)
    if m.get("format") != FORMAT:
        raise WhelpError(f"{path} has cache format {m.get('format')}, this whelp reads {FORMAT}; rebuild it")
    if not m.get("complete"):
        raise WhelpError(
            f"{path} is incomplete ({len(m['shards'])} shards written, interrupted); rerun the same "
            "whelp cache-logits command to resume it"
        )
    if student_vocab_size is not None and student_vocab_size < m["vocab_size"]:
        raise WhelpError(
            f"{path} holds teacher targets over {m['vocab_size']} ids but the student has "
            f"{student_vocab_size}: the vocabularies differ; cache a teacher with the student's tokenizer"
        )
    if tokenizer is not None and tokenizer_hash(tokenizer) != m["tokenizer_sha256"]:
        raise WhelpError(
            f"{path} was built with a different tokenizer (sha256 {m['tokenizer_sha256'][:12]}, the "
            f"student's is {tokenizer_hash(tokenizer)[:12]}); token ids would not match"
        )
    if data_fingerprint is not None and data_fingerprint != m["data_fingerprint"]:
        raise WhelpError(
            f"{path} was built on other data (fingerprint {m['data_fingerprint'][:12]}, given "
            f"{data_fingerprint[:12]}); use the cache's tokens or rebuild it on this data"
        )
    for shard in m["shards"]:
        problem = store.shard_problem(path, shard)
        if problem:
            raise WhelpError(
                f"cache shard {path / shard['file']} {problem}; rerun the same whelp cache-logits command to rewrite it"
            )
    return TeacherCache(path, m)
