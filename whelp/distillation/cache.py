"""Offline teacher-logit cache: sparse per-token targets written once, read by the distillation loop.

A teacher too big to run beside the student (a 70B next to a 1B) is run once over the packed data and its
next-token distribution is stored per position, either as

* ``topk``: the k most likely ids with their log-probs plus the tail mass outside them (biased: Anshumann
  et al., ACL 2025 show top-k KD under-weights the tail), or
* ``sample``: S ids drawn from the teacher distribution (repeats are the counts) plus the teacher entropy:
  an unbiased estimate of forward KL and of its gradient (Anshumann et al., ACL 2025).

Layout: ``DIR/manifest.json`` and ``DIR/shard-NNNNN.safetensors``, each shard holding ``tokens`` int32
[b, seq_len] and per position (flattened [b * seq_len]) a bit-packed ``entries`` uint8 row plus ``tail``
or ``entropy`` (fp16). A top-k entry is ``id << 15 | fp16(-logp) without its sign bit`` in
``id_bits + 15`` bits (32 bits at vocab 128256: 4 bytes per entry); a sample is its id in ``id_bits`` bits.
Bytes per token at vocab 128256: top-64 4 + 256 + 2 = 262; S = 16: 4 + 34 + 2 = 40.

Each shard is written to a temporary file and renamed into place, then recorded with its sha256 in the
manifest (itself replaced atomically), so an interrupted run resumes at the first missing shard and a
truncated or corrupted shard is named on read and never used.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from safetensors import safe_open
from safetensors.torch import save

from whelp import store
from whelp.data.tokenstore import tokenizer_hash
from whelp.specs import CacheSpec
from whelp.distillation.losses import SparseTarget
from whelp.errors import WhelpError
from whelp.store import sha256_file

FORMAT = 1
MAG_BITS = 15  # an fp16 of -logp >= 0 has its sign bit clear
MANIFEST = "manifest.json"


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Non-negative ints [n, m] (< 2^bits) -> uint8 [n, ceil(m * bits / 8)], little-endian bit order."""
    n, m = values.shape
    v = values.numpy().astype(np.uint64)
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


def sparse_targets(logits: Tensor, mode: str, k: int, temperature: float,
                   generator: torch.Generator | None = None) -> SparseTarget:
    """Sparse targets of teacher logits [n, V] at temperature T: top-k (+ tail mass) or k samples (+ entropy)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    vocab = logits.shape[-1]
    if mode == "topk":
        values, ids = logp.topk(min(k, vocab), dim=-1)
        tail = (-torch.expm1(torch.logsumexp(values, -1))).clamp_min(0)
        return SparseTarget("topk", ids, temperature, vocab, logp=values, tail=tail)
    if mode == "sample":
        draws = torch.multinomial(logp.exp(), k, replacement=True, generator=generator).sort(-1).values
        entropy = -(logp.exp() * logp).sum(-1)
        return SparseTarget("sample", draws, temperature, vocab, entropy=entropy)
    raise WhelpError(f"unknown cache mode '{mode}'; choose topk or sample")


def encode(target: SparseTarget) -> dict[str, Tensor]:
    """Storage tensors of a sparse target (see the module docstring for the bit layout)."""
    bits = id_bits(target.vocab_size)
    if target.mode == "sample":
        return {"entries": pack_bits(target.ids, bits), "entropy": target.entropy.half()}
    mag = target.logp.neg().clamp_min(0).half().view(torch.int16).long() & 0x7FFF
    return {"entries": pack_bits(target.ids << MAG_BITS | mag, bits + MAG_BITS), "tail": target.tail.half()}


def decode(tensors: dict[str, Tensor], mode: str, k: int, temperature: float, vocab: int) -> SparseTarget:
    """Inverse of ``encode``: fp32 log-probs, tail and entropy."""
    bits = id_bits(vocab)
    if mode == "sample":
        ids = unpack_bits(tensors["entries"], k, bits)
        return SparseTarget("sample", ids, temperature, vocab, entropy=tensors["entropy"].float())
    words = unpack_bits(tensors["entries"], k, bits + MAG_BITS)
    logp = -(words & 0x7FFF).to(torch.int16).view(torch.float16).float()
    return SparseTarget("topk", words >> MAG_BITS, temperature, vocab, logp=logp, tail=tensors["tail"].float())


def config_hash(config) -> str:
    """sha256 of a model config without bookkeeping keys (paths, versions, dtype): the architecture's identity."""
    skip = {"transformers_version", "dtype", "torch_dtype", "architectures"}
    return store.content_id({k: v for k, v in config.to_dict().items() if k not in skip and not k.startswith("_")})


def _identity(model, tokenizer, blocks, mode: str, k: int, temperature: float, teacher_name: str, seed: int) -> dict:
    width = model.get_output_embeddings().weight.shape[0]
    return {"format": FORMAT, "teacher": teacher_name, "teacher_config_sha256": config_hash(model.config),
            "tokenizer_sha256": tokenizer_hash(tokenizer), "vocab_size": min(width, len(tokenizer)),
            "temperature": float(temperature), "mode": mode, "k": int(k), "seq_len": int(blocks.seq_len),
            "n_blocks": len(blocks), "data_fingerprint": blocks.fingerprint,
            "data_source": blocks.source, "seed": seed}


def _write_manifest(out: Path, manifest: dict) -> None:
    store.write_record(out / MANIFEST, manifest)


def _read_manifest(path: Path) -> dict:
    """The sealed manifest: an edited one (a changed ``k``, say) is refused, never trained on."""
    if not (path / MANIFEST).exists():
        raise WhelpError(f"{path} is not a teacher-logit cache (no {MANIFEST}); build one with whelp cache-logits")
    return store.read_record(path / MANIFEST, "rebuild the cache with whelp cache-logits --force")


def _teacher_shard(model, tokens: Tensor, spec: dict, first_block: int, batch_size: int) -> dict[str, Tensor]:
    """Storage tensors of one shard: teacher targets for every position of ``tokens`` [b, seq_len]."""
    parts = []
    device = next(model.parameters()).device
    for s in range(0, len(tokens), batch_size):
        with torch.no_grad():
            logits = model(input_ids=tokens[s : s + batch_size].to(device)).logits[..., : spec["vocab_size"]]
        for j, row in enumerate(logits.float().cpu()):
            gen = torch.Generator().manual_seed(spec["seed"] * 1_000_003 + first_block + s + j)
            parts.append(encode(sparse_targets(row, spec["mode"], spec["k"], spec["temperature"], gen)))
    out = {key: torch.cat([p[key] for p in parts]).contiguous() for key in parts[0]}
    out["tokens"] = tokens.to(torch.int32).contiguous()
    return out


def _continued(out: Path, identity: dict) -> tuple[dict, bool]:
    """The manifest to continue ``out`` with (intact shards kept, damaged ones dropped) and whether ``out`` was
    already complete and intact. WhelpError if ``out`` holds a cache of another run."""
    old = _read_manifest(out)
    diff = [key for key in identity if old.get(key) != identity[key]]
    if diff:
        key = diff[0]
        raise WhelpError(f"{out} holds a cache of a different run ({key}: {old.get(key)!r} there, "
                         f"{identity[key]!r} now); pass --force to replace it or choose another --out")
    store.clean_stale(out)
    shards = [s for s in old["shards"] if store.shard_problem(out, s) is None]
    return {**old, "shards": shards, "complete": False}, bool(old.get("complete")) and shards == old["shards"]


def claim(out: Path, force: bool) -> bool:
    """Whether ``out`` holds a whelp cache to resume, or with ``force`` to replace, whatever its manifest says (a
    cache stopped before its first shard holds nothing to lose); WhelpError if it holds anything else."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    store.check_writable(out, True, "cache")
    return force or ((out / MANIFEST).exists() and bool(_read_manifest(out)["shards"]))


def _workdir(out: Path, identity: dict, force: bool, stage_key: str | None) -> tuple[Path, dict]:
    """Where the shards go and the manifest to continue: ``out`` itself (new or resumed), or with ``force`` on
    an existing cache a staging sibling ``.OUT.rebuild`` (resumed by the same forced command) that replaces
    ``out`` only when complete. A directory that is not a whelp cache is never written into or deleted."""
    work = out
    if claim(out, force):
        if not force:
            manifest, complete = _continued(out, identity)
            if complete:
                raise WhelpError(f"{out} already holds this complete cache; pass --force to rebuild it")
            return out, manifest
        work = out.with_name(f".{out.name}.rebuild")
        if work.exists() and store.marker(work) is None:
            raise WhelpError(f"{work} is in the way of rebuilding {out} and was not made by whelp; move it away")
        try:
            return work, _continued(work, identity)[0]
        except WhelpError:
            shutil.rmtree(work, ignore_errors=True)  # absent, or another rebuild's leftovers: ours to start again
    manifest = {**identity, "shards": [], "complete": False}
    with store.atomic_dir(work, force=True, kind="cache", stage_key=stage_key) as tmp:  # born whole, marked
        _write_manifest(tmp, manifest)
    return work, manifest


def write_cache(teacher_model, tokenizer, blocks, out: Path, mode: str, k: int, temperature: float,
                teacher_name: str, force: bool = False, batch_size: int = 4, shard_tokens: int = 65536,
                seed: int = 0, progress=None, stage_key: str | None = None) -> Path:
    """Run the teacher over the rows of ``blocks`` (``whelp.data.Blocks``: ``len``, ``blocks[idx]``, ``seq_len``,
    ``fingerprint``, ``source``) and write a sparse-target cache to ``out``.

    Resumable: rerunning the same call after an interruption keeps every intact shard and writes the rest
    (sampling is seeded per block, so the result equals an uninterrupted run). ``progress(n_blocks)`` is
    called after each shard. ``stage_key`` (a build's key of this cache's inputs) goes into its marker.
    """
    CacheSpec(mode, k, temperature)  # the one range check of these values
    out = Path(out).expanduser()
    identity = _identity(teacher_model, tokenizer, blocks, mode, k, temperature, teacher_name, seed)
    if mode == "topk" and k > identity["vocab_size"]:
        raise WhelpError(f"--topk {k} exceeds the teacher's {identity['vocab_size']}-token vocabulary; use at most "
                         f"{identity['vocab_size']} (that is the whole distribution)")
    work, manifest = _workdir(out, identity, force, stage_key)
    per_shard = max(1, shard_tokens // identity["seq_len"])
    done = {s["file"] for s in manifest["shards"]}
    for index, start in enumerate(range(0, identity["n_blocks"], per_shard)):
        stop = min(start + per_shard, identity["n_blocks"])
        name = f"shard-{index:05d}.safetensors"
        if name not in done:
            tensors = _teacher_shard(teacher_model, blocks[torch.arange(start, stop)], identity, start, batch_size)
            store.write_bytes(work / name, save(tensors))
            manifest["shards"].append({"file": name, "start": start, "stop": stop,
                                       "bytes": (work / name).stat().st_size, "sha256": sha256_file(work / name)})
            _write_manifest(work, manifest)
        if progress is not None:
            progress(stop - start)
    manifest["shards"].sort(key=lambda s: s["start"])
    manifest["bytes_per_token"] = sum(s["bytes"] for s in manifest["shards"]) / (len(blocks) * blocks.seq_len)
    _write_manifest(work, {**manifest, "complete": True})
    if work != out:
        store.commit_dir(work, out, "cache")
    return out


class TeacherCache:
    """A verified cache. ``tokens(block_idx)`` gives the cached blocks' tokens [len(block_idx), seq_len] (the cache
    keeps its own copy, read per block, never all at once); ``targets(block_idx)`` gives the teacher targets of
    those blocks flattened to [len(block_idx) * seq_len] positions, block-major, where position t of a block
    holds the teacher's distribution of token t + 1 (its logits at t), exactly aligned with the student's logits
    at t. The last position of a block predicts the token after the block."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = path, manifest
        self._shards = manifest["shards"]
        self._files = {s["file"]: safe_open(str(path / s["file"]), framework="pt") for s in self._shards}

    def check_blocks(self, blocks) -> None:
        """Refuse data whose rows are not the ones cached: same fingerprint (stores, seq_len, seed, budget), hence
        the same blocks in the same order."""
        m = self.manifest
        if (m["data_fingerprint"], m["seq_len"], m["n_blocks"]) != (blocks.fingerprint, blocks.seq_len, len(blocks)):
            raise WhelpError(f"cache {self.path} holds other token blocks ({m['n_blocks']} blocks of {m['seq_len']} "
                             f"from {m['data_source']}) than the data {blocks.source} ({len(blocks)} of "
                             f"{blocks.seq_len}); pass the data, seq_len and max_tokens the cache was made with")

    def tokens(self, block_idx: Tensor) -> Tensor:
        rows = []
        for block in block_idx.tolist():
            shard = self._shard_of(block)
            rows.append(self._files[shard["file"]].get_slice("tokens")[block - shard["start"]: block - shard["start"] + 1])
        return torch.cat(rows).long()

    def _shard_of(self, block: int) -> dict:
        for shard in self._shards:
            if shard["start"] <= block < shard["stop"]:
                return shard
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


def open_cache(path, *, student_vocab_size: int | None = None, tokenizer=None,
               data_fingerprint: str | None = None) -> TeacherCache:
    """Open a cache after checking its manifest against the student, tokenizer and data, and every shard's
    size and sha256; any mismatch or damage raises a WhelpError that names it."""
    path = Path(path).expanduser()
    m = _read_manifest(path)
    if m.get("format") != FORMAT:
        raise WhelpError(f"{path} has cache format {m.get('format')}, this whelp reads {FORMAT}; rebuild it")
    if not m.get("complete"):
        raise WhelpError(f"{path} is incomplete ({len(m['shards'])} shards written, interrupted); rerun the same "
                         "whelp cache-logits command to resume it")
    if student_vocab_size is not None and student_vocab_size < m["vocab_size"]:
        raise WhelpError(f"{path} holds teacher targets over {m['vocab_size']} ids but the student has "
                         f"{student_vocab_size}: the vocabularies differ; cache a teacher with the student's tokenizer")
    if tokenizer is not None and tokenizer_hash(tokenizer) != m["tokenizer_sha256"]:
        raise WhelpError(f"{path} was built with a different tokenizer (sha256 {m['tokenizer_sha256'][:12]}, the "
                         f"student's is {tokenizer_hash(tokenizer)[:12]}); token ids would not match")
    if data_fingerprint is not None and data_fingerprint != m["data_fingerprint"]:
        raise WhelpError(f"{path} was built on other data (fingerprint {m['data_fingerprint'][:12]}, given "
                         f"{data_fingerprint[:12]}); use the cache's tokens or rebuild it on this data")
    for shard in m["shards"]:
        problem = store.shard_problem(path, shard)
        if problem:
            raise WhelpError(f"cache shard {path / shard['file']} {problem}; rerun the same whelp cache-logits "
                             "command to rewrite it")
    return TeacherCache(path, m)
