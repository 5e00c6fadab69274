"""Prune a checkpoint larger than memory, straight from its safetensors shards (DESIGN.md 3, Streaming).

Calibration runs layer by layer: the calibration tokens are embedded (reading the embedding in row
chunks), then each decoder layer's tensors alone are loaded into that layer of a meta-device
skeleton of the model (``load_state_dict(assign=True)``), the cached hidden states [N, T, H] go
through it with the model's own rotary embedding and causal mask, importance statistics are
recorded, and the layer goes back to the meta device. Surgery then maps the source tensors one by
one through ``surgery.slice_tensor`` into target shards of at most ``shard_bytes``.

Peak memory ~ one decoder layer in the compute dtype + the activations [N, T, H] (a few copies) +
one target shard being filled: for Llama-3.1-8B in bf16 -> llama-3.2-1b, about 0.9 GB of layer
(fp32) + 1 GB of shard + one source tensor, measured by bench/prune_scale.py.

Each tensor is read by opening its shard for that read only: safetensors memory-maps the file and
the returned tensor is backed by the mapping, so touched file pages count towards resident memory
until the tensor is dropped; never holding a shard open keeps that to one tensor.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from whelp.errors import WhelpError
from whelp.models import check_writable, commit_dir
from whelp.prune.surgery import slice_tensor, text_config, tie_embeddings

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
COPIED = ("tokenizer*", "special_tokens_map.json", "generation_config.json", "vocab.json", "merges.txt",
          "*.model", "chat_template.*", "added_tokens.json")
EMBED_CHUNK_ROWS = 16384
MEMORY_FACTOR = 2.5  # in-memory prune holds the model at load dtype + pruned copy + calibration activations


def weight_map(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> shard file, from ``model.safetensors.index.json`` or a single ``model.safetensors``."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX
    if index.exists():
        try:
            files = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise WhelpError(f"{index} is not a valid safetensors index ({exc!r}); re-download the checkpoint") from None
        shards = {name: model_dir / file for name, file in files.items()}
        missing = sorted({p.name for p in shards.values() if not p.exists()})
        if missing:
            raise WhelpError(f"{index} lists shards missing from {model_dir}: {', '.join(missing)}; "
                             "the download is incomplete - fetch the missing files")
        return shards
    single = model_dir / SINGLE
    if not single.exists():
        raise WhelpError(f"{model_dir} has neither {INDEX} nor {SINGLE}: streaming needs safetensors weights")
    return {name: single for name in _shard_keys(single)}


def _shard_keys(path: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as exc:
        raise WhelpError(f"cannot read safetensors shard {path} ({exc}); it is corrupt or truncated - "
                         "re-download it") from None


def read_tensor(shards: dict[str, Path], name: str) -> Tensor:
    """One tensor from its shard, opening the shard for this read only (see the module docstring)."""
    from safetensors import SafetensorError, safe_open

    if name not in shards:
        raise WhelpError(f"tensor '{name}' is not in the checkpoint's weight map; the checkpoint is incomplete "
                         "or of another architecture than its config.json says")
    path = shards[name]
    try:
        with safe_open(str(path), framework="pt") as f:
            if name not in f.keys():
                raise WhelpError(f"the index puts tensor '{name}' in {path.name}, which does not hold it; "
                                 "the index and shards disagree - re-download the checkpoint")
            return f.get_tensor(name)
    except (SafetensorError, OSError) as exc:
        raise WhelpError(f"cannot read '{name}' from {path} ({exc}); the shard is corrupt or truncated - "
                         "re-download it") from None


def embed_rows(shards: dict[str, Path], name: str, ids: Tensor, dtype: torch.dtype) -> Tensor:
    """``embedding[ids]`` [*ids.shape, H] in ``dtype``, reading the [V, H] matrix EMBED_CHUNK_ROWS rows at a time."""
    from safetensors import safe_open

    flat = ids.reshape(-1)
    with safe_open(str(shards[name]), framework="pt") as f:
        view = f.get_slice(name)
        vocab, hidden = view.get_shape()
        if int(flat.max()) >= vocab:
            raise WhelpError(f"calibration token id {int(flat.max())} >= vocab size {vocab}: "
                             "the tokenizer does not belong to this checkpoint")
        out = torch.empty(flat.numel(), hidden, dtype=dtype)
        for start in range(0, vocab, EMBED_CHUNK_ROWS):
            hit = (flat >= start) & (flat < start + EMBED_CHUNK_ROWS)
            if hit.any():
                out[hit] = view[start:start + EMBED_CHUNK_ROWS][flat[hit] - start].to(dtype)
    return out.view(*ids.shape, hidden)


def skeleton(config):
    """The full model on the meta device: module structure and names, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config).eval()


def load_layer(model, family, index: int, shards: dict[str, Path], dtype: torch.dtype):
    """Decoder layer ``index`` of a meta skeleton with its tensors (and only those) loaded, in ``dtype``."""
    layer = model.get_submodule(family.layers)[index]
    prefix = f"{family.layers}.{index}."
    state = {name[len(prefix):]: read_tensor(shards, name).to(dtype) for name in shards if name.startswith(prefix)}
    try:
        layer.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise WhelpError(f"layer {index} of the checkpoint does not match its config.json: "
                         f"{str(exc).splitlines()[-1].strip()}") from None
    return layer


def unload_layer(layer) -> None:
    """Free a layer's weights by moving it back to the meta device."""
    layer.to("meta")


def rope_and_mask(model, family, config, hidden: Tensor) -> tuple[tuple[Tensor, Tensor], Tensor | None]:
    """``(cos, sin)`` [1, T, d] and the causal mask the model's own forward would pass its layers."""
    from transformers.masking_utils import create_causal_mask

    rotary = model.get_submodule(family.layers.rsplit(".", 1)[0]).rotary_emb
    rotary = type(rotary)(config=config)  # a fresh one on CPU: the skeleton's inv_freq buffer is on meta
    positions = torch.arange(hidden.shape[1])[None]
    mask = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=None, past_key_values=None,
                              position_ids=positions)
    cos, sin = rotary(hidden, positions)
    return (cos.to(hidden.dtype), sin.to(hidden.dtype)), mask


def write_shards(tensors: Iterable[tuple[str, Tensor]], out_dir: Path, shard_bytes: int) -> list[str]:
    """Write ``(name, tensor)`` pairs into safetensors shards of at most ``shard_bytes`` (one
    oversized tensor gets a shard of its own), HF names and index; returns the file names."""
    from safetensors.torch import save_file

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
    (out_dir / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map_out},
                                            indent=2))
    return names


def sliced_tensors(shards: dict[str, Path], keep, family, source_cfg, target_cfg) -> Iterator[tuple[str, Tensor]]:
    """Target ``(name, tensor)`` pairs, one source tensor resident at a time (shard order).

    A tied target stores one embedding matrix: with an untied source, the sliced embedding and
    lm_head are held until both are read and merged by ``surgery.tie_embeddings`` (keep.tie).
    """
    tied = text_config(target_cfg).tie_word_embeddings
    held: dict[str, Tensor] = {}
    for name in sorted(shards, key=lambda n: (shards[n].name, n)):
        for target_name, tensor in slice_tensor(name, read_tensor(shards, name), keep, family,
                                                source_cfg, target_cfg).items():
            if tied and target_name in (family.embed, family.lm_head):
                held[target_name] = tensor
                continue
            yield target_name, tensor
    if tied:
        if family.embed not in held:
            raise WhelpError(f"the checkpoint has no '{family.embed}'; it cannot be pruned to a tied model")
        embedding = held.pop(family.embed)
        yield family.embed, tie_embeddings(embedding, held.pop(family.lm_head, embedding), keep.tie or "embedding")


def copy_side_files(source_dir: Path, out_dir: Path) -> None:
    """Tokenizer and generation config of the source, unchanged (pruning never touches the vocabulary)."""
    for pattern in COPIED:
        for path in Path(source_dir).glob(pattern):
            if path.is_file():
                shutil.copy2(path, out_dir / path.name)


def write_pruned(source_dir: Path, out_dir: Path, keep, family, source_cfg, target_cfg, force: bool = False,
                 shard_bytes: int = 1 << 30, extra: dict[str, str] | None = None) -> Path:
    """Surgery shard to shard: the pruned checkpoint (shards, index, config, tokenizer, ``extra`` text
    files) written to a temporary sibling of ``out_dir`` and renamed into place."""
    out = check_writable(out_dir, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    shards = weight_map(Path(source_dir))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_shards(sliced_tensors(shards, keep, family, source_cfg, target_cfg), tmp, shard_bytes)
        target_cfg.save_pretrained(tmp)
        copy_side_files(Path(source_dir), tmp)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def available_memory() -> int:
    """Bytes the kernel estimates can be allocated without swapping (``MemAvailable``)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def should_stream(source_dir: Path, dtype: torch.dtype) -> bool:
    """Stream when an in-memory prune would not fit: the weights at the compute ``dtype`` times
    MEMORY_FACTOR (model + pruned copy + calibration activations) exceed ``MemAvailable``."""
    from safetensors import safe_open

    total = 0
    for path in set(weight_map(Path(source_dir)).values()):
        with safe_open(str(path), framework="pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total * torch.empty((), dtype=dtype).element_size() * MEMORY_FACTOR > available_memory()
