"""Teacher-logit capture (``whelp cache-logits``): one process, or data- and tensor-parallel under torchrun.

The work unit is a *shard*: a fixed range of blocks ``[start, stop)`` of the data (``shard_tokens // seq_len``
blocks, whatever the number of processes), written once to ``blocks-START-STOP.safetensors`` (the format is in
``whelp.distillation.cache``). Rank r of R data-parallel ranks takes the r-th, (r+R)-th, ... missing shard; in
each round every rank writes at most one shard (to a temporary file, renamed into place) and rank 0 gathers the
round's records (file, block range, bytes, sha256) into the sealed manifest, replaced atomically at most every
``MANIFEST_EVERY_S`` seconds (it grows to 305K records at 20B tokens). A capture killed on any rank loses at most
that long's work; rerun on any number of processes, it lists the missing ranges
afresh (the ranges are fixed by the data, so 4 processes resume what 8 started).

Fingerprint: each shard stores ``block_sha256`` uint8 [b, 32], the sha256 of each block's tokens and targets; the
manifest's ``content_sha256`` is the sha256 of all of them in block order, so a cache made by 1 process and by N
processes is identical and shows it in one field.

Extraction: the teacher's backbone gives hidden states [b, L, H]; its lm_head and the family's own logit transform
(``whelp.architecture.logit_transform``) run on ``CHUNK`` positions at a time on the teacher's device, in fp32, and only
the sparse targets (k ids and values per position) reach the host, never an [N, V] logits tensor (at V = 128,256 a
block of 8,192 positions is 4.2 GB in fp32). The chunked logits are checked once against ``model(...).logits``
on the first block, so a family with a transform whelp does not know fails at once instead of caching wrong targets.

Tensor parallel (``tp_size`` T > 1): groups of T consecutive ranks hold one teacher sharded by transformers'
``tp_plan`` (Megatron-style column/row splits); group g is data-parallel rank g and its first rank writes.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from whelp import store
from whelp.architecture import config_hash
from whelp.data.tokenstore import tokenizer_hash
from whelp.distillation import parallel
from whelp.distillation.cache import FORMAT, MANIFEST, encode, read_manifest, sparse_targets
from whelp.distillation.head import check_logits, chunk_logits
from whelp.distillation.losses import backbone
from whelp.errors import WhelpError
from whelp.specs import CacheSpec

CHUNK = 1024  # positions per on-device logits chunk: [1024, 128256] fp32 is 0.5 GB
MANIFEST_EVERY_S = 30.0  # rank 0 rewrites the manifest at most this often (and at the end)


def shard_ranges(n_blocks: int, per_shard: int) -> list[tuple[int, int]]:
    return [(start, min(start + per_shard, n_blocks)) for start in range(0, n_blocks, per_shard)]


def shard_name(start: int, stop: int) -> str:
    return f"blocks-{start:012d}-{stop:012d}.safetensors"


def _device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def teacher_shard(model, tokens: Tensor, spec: dict, first_block: int, batch_size: int) -> dict[str, Tensor]:
    """Storage tensors of one shard: teacher targets for every position of ``tokens`` [b, seq_len] (block
    ``first_block + i`` is row i; sampling is seeded per block, so any split of the blocks draws the same)."""
    device, L = _device(model), tokens.shape[1]
    parts = []
    for s in range(0, len(tokens), batch_size):
        with torch.no_grad():
            hidden = backbone(model)(input_ids=tokens[s : s + batch_size].to(device)).last_hidden_state
            for j, row in enumerate(hidden):
                gen = torch.Generator(device=device).manual_seed(spec["seed"] * 1_000_003 + first_block + s + j)
                for c in range(0, L, CHUNK):
                    logits = chunk_logits(model, row[c : c + CHUNK], spec["vocab_size"])
                    parts.append(encode(sparse_targets(logits, spec["mode"], spec["k"], spec["temperature"], gen)))
    out = {key: torch.cat([p[key] for p in parts]).contiguous() for key in parts[0]}
    out["tokens"] = tokens.to(torch.int32).contiguous()
    out["block_sha256"] = block_digests(out, L)
    return out


def block_digests(tensors: dict[str, Tensor], seq_len: int) -> Tensor:
    """uint8 [b, 32]: the sha256 of each block's tokens and per-position targets, in a fixed key order."""
    keys = sorted(k for k in tensors if k not in ("tokens", "block_sha256"))
    rows = []
    for b in range(len(tensors["tokens"])):
        digest = hashlib.sha256(tensors["tokens"][b].numpy().tobytes())
        for key in keys:
            digest.update(tensors[key][b * seq_len : (b + 1) * seq_len].numpy().tobytes())
        rows.append(torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8))
    return torch.stack(rows)


def content_sha256(path: Path, shards: list[dict]) -> str:
    """sha256 over every block's digest in block order (reads only the 32-byte digests, not the targets)."""
    digest = hashlib.sha256()
    for shard in sorted(shards, key=lambda s: s["start"]):
        with safe_open(str(path / shard["file"]), framework="pt") as f:
            digest.update(f.get_tensor("block_sha256").numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Teacher:
    """The teacher a cache is captured from: the loaded model, its tokenizer, and the name the manifest records
    (a build's or a user's name for it: resuming a cache needs the same one)."""

    model: Any
    tokenizer: Any
    name: str


def _identity(teacher: Teacher, blocks, spec: CacheSpec, seed: int, per_shard: int) -> dict:
    width = teacher.model.get_output_embeddings().weight.shape[0]
    return {
        "format": FORMAT,
        "teacher": teacher.name,
        "teacher_config_sha256": config_hash(teacher.model.config),
        "tokenizer_sha256": tokenizer_hash(teacher.tokenizer),
        "vocab_size": min(width, len(teacher.tokenizer)),
        "temperature": float(spec.temperature),
        "mode": spec.mode,
        "k": int(spec.k),
        "seq_len": int(blocks.seq_len),
        "n_blocks": len(blocks),
        "shard_blocks": per_shard,
        "data_fingerprint": blocks.fingerprint,
        "data_source": str(blocks.source),
        "seed": seed,
    }


def _recorded(path: Path) -> dict | None:
    """The manifest of the cache at ``path``, or None where it recorded no shard (nothing to lose)."""
    if not (path / MANIFEST).exists():
        return None
    manifest = read_manifest(path)
    return manifest if manifest["shards"] else None


def _intact(path: Path, shards: list[dict]) -> list[dict]:
    return [s for s in shards if store.shard_problem(path, s) is None]


def check_k(spec: CacheSpec, vocab: int) -> None:
    """Refuse a top-k above the teacher's ``vocab`` (its ids with logits): that is the whole distribution."""
    if spec.mode == "topk" and spec.k > vocab:
        raise WhelpError(
            f"--topk {spec.k} exceeds the teacher's {vocab}-token vocabulary; use at most {vocab} (that is the "
            "whole distribution)"
        )


@store.writer
def write_cache(
    teacher: Teacher,
    blocks,
    out: Path,
    spec: CacheSpec,
    *,
    force: bool = False,
    seed: int = 0,
    progress=None,
    stage_key: str | None = None,
    world: parallel.World | None = None,
) -> Path:
    """Run the teacher over the rows of ``blocks`` (``whelp.data.Blocks``: ``len``, ``blocks[idx]``, ``seq_len``,
    ``fingerprint``, ``source``) and write a sparse-target cache to ``out``, as ``spec`` says (``mode``, ``k``,
    ``temperature``, ``batch_size``, ``shard_tokens``, ``tp_size``; its ``seq_len``, ``max_tokens`` and ``dtype``
    are how ``blocks`` and the teacher were loaded, e.g. by ``whelp.distillation.api.cache_teacher``). Every rank of
    ``world`` calls it (collective), groups of ``spec.tp_size`` ranks sharing one tensor-parallel teacher.

    Resumable on any number of processes: rerunning after an interruption keeps every intact shard and writes the
    rest (the result is identical to an uninterrupted run). ``progress(n_blocks)`` is called on rank 0 after each
    round. ``stage_key`` (a build's key of this cache's inputs) goes into its marker.
    """
    world = world or parallel.World(0, 1, _device(teacher.model), owns_group=False)
    out = Path(out).expanduser()
    per_shard = max(1, spec.shard_tokens // blocks.seq_len)
    identity = _identity(teacher, blocks, spec, seed, per_shard)
    check_k(spec, identity["vocab_size"])
    if world.size % spec.tp_size:
        raise WhelpError(f"--tp-size {spec.tp_size} does not divide the {world.size} processes; use a divisor")
    work, manifest = parallel.from_main(
        world,
        lambda: store.resume_shards(out, identity, force, "cache", "cache", _recorded, _intact, stage_key=stage_key),
    )
    work = Path(work)
    probe = blocks[torch.arange(1)][0][:64].view(1, -1).to(_device(teacher.model))
    check_logits(teacher.model, probe, "teacher", "cached", identity["vocab_size"])
    done = {s["file"] for s in manifest["shards"]}
    todo = [r for r in shard_ranges(len(blocks), per_shard) if shard_name(*r) not in done]
    dp_rank, dp_size, writer = world.rank // spec.tp_size, world.size // spec.tp_size, world.rank % spec.tp_size == 0
    mine = todo[dp_rank::dp_size]
    saved = time.monotonic()
    try:
        for i in range(-(-len(todo) // dp_size)):
            record = None
            if i < len(mine):
                start, stop = mine[i]
                tensors = teacher_shard(
                    teacher.model, blocks[torch.arange(start, stop)], identity, start, spec.batch_size
                )
                if writer:
                    name = shard_name(start, stop)
                    store.write_bytes(work / name, save(tensors))
                    record = {
                        "file": name,
                        "start": start,
                        "stop": stop,
                        "bytes": (work / name).stat().st_size,
                        "sha256": store.sha256_file(work / name),
                    }
            records = [r for r in parallel.gather(world, record) if r is not None]
            if world.main:
                manifest["shards"] += records
                if time.monotonic() - saved >= MANIFEST_EVERY_S:  # at 20B tokens the manifest holds 305K records
                    store.write_record(work / MANIFEST, manifest)
                    saved = time.monotonic()
                if progress is not None:
                    progress(sum(r["stop"] - r["start"] for r in records))
    finally:  # Ctrl-C or an error: the shards recorded so far are kept (only a SIGKILL loses the unsaved ones)
        if world.main:
            store.write_record(work / MANIFEST, manifest)
    if world.main:
        _seal(work, out, manifest, len(blocks) * blocks.seq_len)
    parallel.barrier(world)
    return out


def _seal(work: Path, out: Path, manifest: dict, n_tokens: int) -> None:
    """Rank 0: the complete manifest (shards in block order, bytes per token, content fingerprint), then a rebuild
    replaces the old cache."""
    shards = sorted(manifest["shards"], key=lambda s: s["start"])
    store.write_record(
        work / MANIFEST,
        {
            **manifest,
            "shards": shards,
            "complete": True,
            "bytes_per_token": sum(s["bytes"] for s in shards) / n_tokens,
            "content_sha256": content_sha256(work, shards),
        },
    )
    if work != out:
        store.commit_dir(work, out, "cache")
