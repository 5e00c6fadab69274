"""MoE experts between their on-disk and in-memory names, for pruning straight from the shards (streaming.py).

transformers 5 holds a layer's experts fused (``mlp.experts.gate_up_proj`` [E, 2I, H] = per expert [gate; up],
``mlp.experts.down_proj`` [E, H, I]) but ``save_pretrained`` writes, and checkpoints on the Hub hold, one tensor per
expert and projection: ``{disk_block}.experts.{j}.{part}.weight`` with the family's ``expert_parts`` (Mixtral:
``block_sparse_moe.experts.{j}.w1`` gate, ``w3`` up, ``w2`` down; Qwen: ``mlp.experts.{j}.gate_proj`` ...) and the
router at ``{disk_block}.gate.weight``. Streaming slices in memory names, with the very code of the in-memory path
(surgery.slice_tensor), one fused layer tensor resident at a time: at most one layer's experts, as calibration
already holds; each target tensor is then written back under its per-expert names. For a dense family every
function here is the identity.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from whelp.errors import WhelpError
from whelp.pruning.arch import Family, split_name
from whelp.pruning.shards import read_tensor

ROUTER, GATE_UP, DOWN = "mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"


def _expert_pattern(family: Family) -> re.Pattern:
    gate, up, down = (re.escape(p) for p in family.expert_parts)
    return re.compile(rf"{re.escape(family.disk_block)}\.experts\.(\d+)\.({gate}|{up}|{down})\.weight")


def memory_suffix(suffix: str, family: Family) -> str:
    """A disk name inside a layer -> the in-memory name holding it (a per-expert tensor -> its fused tensor)."""
    if not family.experts_key:
        return suffix
    match = _expert_pattern(family).fullmatch(suffix)
    if match:
        return DOWN if match.group(2) == family.expert_parts[2] else GATE_UP
    return ROUTER if suffix == f"{family.disk_block}.gate.weight" else suffix


def disk_suffixes(suffix: str, family: Family, n_experts: int) -> list[str]:
    """The disk names inside a layer that make up in-memory tensor ``suffix`` (fused: expert by expert, gate then
    up)."""
    if not family.experts_key or suffix not in (ROUTER, GATE_UP, DOWN):
        return [suffix]
    if suffix == ROUTER:
        return [f"{family.disk_block}.gate.weight"]
    gate, up, down = family.expert_parts
    parts = (gate, up) if suffix == GATE_UP else (down,)
    return [f"{family.disk_block}.experts.{j}.{part}.weight" for j in range(n_experts) for part in parts]


def memory_names(names: Iterable[str], family: Family) -> list[str]:
    """Disk tensor names -> the in-memory names they make up, each once, in the order first seen."""
    out: dict[str, None] = {}
    for name in names:
        layer, suffix = split_name(name, family)
        out[name if layer is None else f"{family.layers}.{layer}.{memory_suffix(suffix, family)}"] = None
    return list(out)


def read(
    shards: dict[str, Path], name: str, family: Family, n_experts: int, dtype: torch.dtype | None = None
) -> Tensor:
    """In-memory tensor ``name`` read from the shards in ``dtype`` (None: as stored). A fused expert tensor is
    filled expert by expert into one preallocated tensor, so besides it only one expert's part is resident."""
    layer, suffix = split_name(name, family)
    if layer is None or suffix not in (GATE_UP, DOWN) or not family.experts_key:
        disk = disk_suffixes(suffix, family, n_experts)[0] if layer is not None else name
        tensor = read_tensor(shards, name if layer is None else f"{family.layers}.{layer}.{disk}")
        return tensor if dtype is None else tensor.to(dtype)
    prefix = f"{family.layers}.{layer}."
    names = disk_suffixes(suffix, family, n_experts)
    per_expert = len(names) // n_experts  # [gate_j; up_j] or down_j
    out = None
    for i, disk in enumerate(names):
        part = read_tensor(shards, prefix + disk)
        if out is None:
            rows, first = part.shape[0], (disk, tuple(part.shape))
            out = torch.empty((n_experts, per_expert * rows, *part.shape[1:]), dtype=dtype or part.dtype)
        elif tuple(part.shape) != first[1]:
            raise WhelpError(
                f"tensor '{prefix + disk}' has shape {list(part.shape)} but '{prefix + first[0]}' has "
                f"{list(first[1])}: the experts of a layer share one shape; the checkpoint is damaged or "
                "of another model than its config.json - re-download it"
            )
        j, k = divmod(i, per_expert)
        out[j, k * rows : (k + 1) * rows] = part
    return out


def to_disk(name: str, tensor: Tensor, family: Family) -> Iterator[tuple[str, Tensor]]:
    """A target tensor under its in-memory ``name`` -> its ``(disk name, tensor)`` entries, as save_pretrained
    writes them."""
    layer, suffix = split_name(name, family)
    if layer is None or not family.experts_key or suffix not in (ROUTER, GATE_UP, DOWN):
        yield name, tensor
        return
    prefix = f"{family.layers}.{layer}."
    disk = disk_suffixes(suffix, family, tensor.shape[0])
    if suffix == ROUTER:
        yield prefix + disk[0], tensor
    elif suffix == DOWN:
        yield from ((prefix + d, tensor[j].contiguous()) for j, d in enumerate(disk))
    else:
        halves = [half.contiguous() for j in range(tensor.shape[0]) for half in tensor[j].chunk(2)]
        yield from ((prefix + d, half) for d, half in zip(disk, halves))
