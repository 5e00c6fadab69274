"""Safetensors checkpoints one tensor at a time: the weight map, single-tensor reads, shard writing.

Each tensor is read by opening its shard for that read only: safetensors memory-maps the file and
the returned tensor is backed by the mapping, so touched file pages count towards resident memory
until the tensor is dropped; never holding a shard open keeps that to one tensor. Written shards
follow the HF layout (``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + index) so
stock ``from_pretrained`` loads them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from whelp.errors import WhelpError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
EMBED_CHUNK_ROWS = 16384


def weight_map(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> shard file, from ``model.safetensors.index.json`` or a single ``model.safetensors``."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX
    if index.exists():
        try:
            files = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise WhelpError(
                f"{index} is not a valid safetensors index ({exc!r}); re-download the checkpoint"
            ) from None
        shards = {name: model_dir / file for name, file in files.items()}
        missing = sorted({p.name for p in shards.values() if not p.exists()})
        if missing:
            raise WhelpError(
                f"{index} lists shards missing from {model_dir}: {', '.join(missing)}; "
                "the download is incomplete - fetch the missing files"
            )
        return shards
    single = model_dir / SINGLE
    if not single.exists():
        raise WhelpError(f"{model_dir} has neither {INDEX} nor {SINGLE}: streaming needs safetensors weights")
    try:
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise WhelpError(f"cannot read {single} ({exc}); it is corrupt or truncated - re-download it") from None


def read_tensor(shards: dict[str, Path], name: str) -> Tensor:
    """One tensor from its shard, opening the shard for this read only (see the module docstring)."""
    if name not in shards:
        raise WhelpError(
            f"tensor '{name}' is not in the checkpoint's weight map; the checkpoint is incomplete "
            "or of another architecture than its config.json says"
        )
    path = shards[name]
    try:
        with safe_open(str(path), framework="pt") as f:
            if name not in f.keys():
                raise WhelpError(
                    f"the index puts tensor '{name}' in {path.name}, which does not hold it; "
                    "the index and shards disagree - re-download the checkpoint"
                )
            return f.get_tensor(name)
    except (SafetensorError, OSError) as exc:
        raise WhelpError(
            f"cannot read '{name}' from {path} ({exc}); the shard is corrupt or truncated - re-download it"
        ) from None


def embed_rows(shards: dict[str, Path], name: str, ids: Tensor, dtype: torch.dtype) -> Tensor:
    """``embedding[ids]`` [*ids.shape, H] in ``dtype``, reading the [V, H] matrix EMBED_CHUNK_ROWS rows at a time."""
    flat = ids.reshape(-1)
    with safe_open(str(shards[name]), framework="pt") as f:
        view = f.get_slice(name)
        vocab, hidden = view.get_shape()
        if int(flat.max()) >= vocab:
            raise WhelpError(
                f"calibration token id {int(flat.max())} >= vocab size {vocab}: "
                "the tokenizer does not belong to this checkpoint"
            )
        out = torch.empty(flat.numel(), hidden, dtype=dtype)
        for start in range(0, vocab, EMBED_CHUNK_ROWS):
            hit = (flat >= start) & (flat < start + EMBED_CHUNK_ROWS)
            if hit.any():
                out[hit] = view[start : start + EMBED_CHUNK_ROWS][flat[hit] - start].to(dtype)
    return out.view(*ids.shape, hidden)


def write_shards(tensors: Iterable[tuple[str, Tensor]], out_dir: Path, shard_bytes: int) -> list[str]:
    """Write ``(name, tensor)`` pairs into safetensors shards of at most ``shard_bytes`` (one
    oversized tensor gets a shard of its own), HF names and index; returns the file names."""
    parts: list[dict[str, str]] = []
    shard: dict[str, Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal shard, size
        part = f"part-{len(parts):05d}.safetensors"
        save_file(shard, str(out_dir / part), metadata={"format": "pt"})
        parts.append({name: part for name in shard})
        shard, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > shard_bytes:
            flush()
        shard[name] = tensor.contiguous()
        size += nbytes
        total += nbytes
    if shard or not parts:
        flush()
    if len(parts) == 1:
        (out_dir / "part-00000.safetensors").rename(out_dir / SINGLE)
        return [SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    weight_map_out = {}
    for i, part in enumerate(parts):
        (out_dir / f"part-{i:05d}.safetensors").rename(out_dir / names[i])
        weight_map_out.update({name: names[i] for name in part})
    (out_dir / INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map_out}, indent=2)
    )
    return names
