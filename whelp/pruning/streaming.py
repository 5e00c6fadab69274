"""Prune a checkpoint larger than memory, straight from its safetensors shards (docs/design.md section 3, Streaming).

Calibration runs layer by layer: the calibration tokens are embedded (reading the embedding in row
chunks), then each decoder layer's tensors alone are loaded into that layer of a meta-device
skeleton of the model (``load_state_dict(assign=True)``), the cached hidden states [N, T, H] go
through it with the model's own rotary embedding and causal mask, importance statistics are
recorded, and the layer goes back to the meta device. Surgery then maps the source tensors one by
one through ``surgery.slice_tensor`` into target shards of at most ``shard_bytes``.

Peak memory ~ one decoder layer in the compute dtype + the activations [N, T, H] (a few copies) +
one target shard being filled (``shard_bytes``) + one source tensor. bench/prune_scale.py measured
Llama-3.1-8B (bf16, 16 GB) -> llama-3.2-1b at 2.8 GiB peak RSS (bench/RESULTS.md).

When to stream (``should_stream``): the checkpoint's bytes at the compute dtype times
MEMORY_FACTOR = 2.5 (teacher + pruned copy + calibration activations) exceed ``MemAvailable``.

Tensors are read and shards written one tensor at a time by shards.py.

One module: calibration and writing both walk the same shard map one layer at a time; their pairing is the streaming
path.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from whelp.architecture import layer_output
from whelp.assistant import carry_assistant
from whelp.errors import WhelpError
from whelp.hf_compat import write_legacy_fields
from whelp.models import check_checkpoint, check_written, load_config
from whelp.pruning import moe_layout
from whelp.pruning.arch import family_of
from whelp.pruning.importance import attach, finish, minitron_sq, select, weight_scores
from whelp.pruning.keep import head_dim_of, text_config
from whelp.pruning.layerwise import embedded, layer_types, load_layer, n_experts, rope_and_mask, skeleton, unload_layer
from whelp.pruning.moe import expert_magnitudes, expert_scores, is_moe
from whelp.pruning.obs import selects
from whelp.pruning.reconstruct import resolve, summary
from whelp.pruning.shards import read_tensor, weight_map, write_shards
from whelp.pruning.stream_refit import refit_streaming, spilled
from whelp.pruning.surgery import slice_tensor, target_config, tie_embeddings
from whelp.pruning.targets import target_rope
from whelp.specs import PruneSpec
from whelp.store import atomic_dir
from whelp.weights import save_dtype, stored_dtype

MEMORY_FACTOR = 2.5  # in-memory prune holds the model at load dtype + pruned copy + calibration activations


def sliced_tensors(shards: dict[str, Path], keep, family, source_cfg, target_cfg) -> Iterator[tuple[str, Tensor]]:
    """Target ``(name, tensor)`` pairs, one source tensor resident at a time (an MoE layer's fused experts: one
    fused tensor, moe_layout.py).

    The embedding and lm_head come first: a tied target stores one matrix, which for an untied
    source is ``surgery.tie_embeddings`` of both sliced [V, H'] matrices (``keep.tie``), so both are
    held briefly - before any target shard has started filling. The rest follows in shard order.
    """
    tied = text_config(target_cfg).tie_word_embeddings
    if tied and family.embed not in shards:
        raise WhelpError(f"the checkpoint has no '{family.embed}'; it cannot be pruned to a tied model")
    embeddings = [name for name in (family.embed, family.lm_head) if name in shards]
    held: dict[str, Tensor] = {}
    n = n_experts(source_cfg, family)
    names = moe_layout.memory_names(sorted(set(shards) - set(embeddings), key=lambda k: (shards[k].name, k)), family)
    for name in embeddings + names:
        for target_name, tensor in slice_tensor(
            name, moe_layout.read(shards, name, family, n), keep, family, source_cfg, target_cfg
        ).items():
            if tied and target_name in (family.embed, family.lm_head):
                held[target_name] = tensor
            else:
                yield from moe_layout.to_disk(target_name, tensor, family)
        if tied and name == embeddings[-1]:
            embedding = held.pop(family.embed)
            yield family.embed, tie_embeddings(embedding, held.pop(family.lm_head, embedding), keep.tie or "embedding")


def write_pruned(
    source_dir: Path,
    out_dir: Path,
    keep,
    family,
    source_cfg,
    target_cfg,
    force: bool = False,
    shard_bytes: int = 1 << 30,
    extra: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
    spill: Path | None = None,
) -> Path:
    """Surgery shard to shard: the pruned checkpoint (shards, index, config, the source's tokenizer files and
    generation config, ``extra`` text files) written to a temporary sibling of ``out_dir`` and renamed into place;
    tensors cast to ``dtype`` if given, else as stored; a layer spilled by a reconstruction (``spill``,
    stream_refit.py) is written from its spill file."""
    shards = weight_map(Path(source_dir))
    tensors = sliced_tensors(shards, keep, family, source_cfg, target_cfg)
    if spill is not None:
        tensors = spilled(tensors, spill)
    with atomic_dir(out_dir, force) as tmp:
        write_shards(((n, t.to(dtype)) for n, t in tensors) if dtype is not None else tensors, tmp, shard_bytes)
        target_cfg.save_pretrained(tmp)
        carry_assistant(str(source_dir), tmp)
        write_legacy_fields(tmp)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        check_written(tmp)
    return Path(out_dir).expanduser()


def available_memory() -> int:
    """Bytes the kernel estimates can be allocated without swapping (``MemAvailable``)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def should_stream(source_dir: Path, dtype: torch.dtype) -> bool:
    """Stream when an in-memory prune would not fit: the checkpoint's bytes on disk, scaled from the
    stored to the compute ``dtype``, times MEMORY_FACTOR (model + pruned copy + calibration
    activations) exceed ``MemAvailable``. Streaming reads local safetensors shards, so a hub id or a
    pickle-only directory is never streamed."""
    if not any(Path(source_dir).glob("*.safetensors")):
        return False
    files = set(weight_map(Path(source_dir)).values())
    stored = getattr(torch, stored_dtype(Path(source_dir)), dtype)
    n_bytes = sum(p.stat().st_size for p in files) * dtype.itemsize / stored.itemsize
    return n_bytes * MEMORY_FACTOR > available_memory()


def final_norm(model, family, shards: dict[str, Path], dtype: torch.dtype):
    """The model's final RMSNorm with its weight loaded (its output feeds the hidden-channel score)."""
    norm = model.get_submodule(family.final_norm.rsplit(".", 1)[0])
    norm.load_state_dict({"weight": read_tensor(shards, family.final_norm).to(dtype)}, strict=True, assign=True)
    return norm


@torch.no_grad()
def calibrate_streaming(
    source_dir: Path,
    config,
    family,
    tokens: Tensor,
    batch_size: int = 4,
    dtype: torch.dtype = torch.float32,
    progress=None,
    method: str = "activation",
    seed: int = 0,
) -> dict[str, Tensor]:
    """Activation scores (the keys and values of ``importance.calibrate``) with one decoder layer resident.

    ``tokens`` [N, T] are embedded once; the hidden states [N, T, H] in ``dtype`` then go through
    layer after layer in the same batches as the in-memory pass, each batch with its own hook
    statistics, summed over batches at the end. Every per-layer score is thereby summed in the
    in-memory order exactly; the cross-layer ``hidden`` score too for a single batch, and to
    fp32 rounding otherwise. ``progress(1)`` is called after each layer. An MoE teacher's expert scores
    (moe.expert_scores of ``method``) come from the same pass.
    """
    cfg = text_config(config)
    shards = weight_map(Path(source_dir))
    model = skeleton(config)
    hidden = embedded(shards, family, cfg, tokens, dtype)
    batches = [slice(i, i + batch_size) for i in range(0, len(tokens), batch_size)]
    types = layer_types(cfg)
    rope_mask = [{t: rope_and_mask(model, family, cfg, hidden[b], t) for t in set(types)} for b in batches]
    per_batch: list[dict] = [{} for _ in batches]
    magnitudes: dict = {}  # the experts' weight magnitudes, read once per layer (not per batch)
    for index in range(cfg.num_hidden_layers):
        layer = load_layer(model, family, index, shards, dtype)
        if is_moe(layer):
            magnitudes.update(expert_magnitudes({index: layer.mlp}))
        for b, per_type, stats in zip(batches, rope_mask, per_batch):
            rope, mask = per_type[types[index]]
            handles = attach(layer, family, head_dim_of(cfg), stats, index)
            try:
                out = layer(hidden[b], position_embeddings=rope, attention_mask=mask)
            finally:
                for handle in handles:
                    handle.remove()
            hidden[b] = layer_output(out)
        unload_layer(layer)
        if progress is not None:
            progress(1)
    norm = final_norm(model, family, shards, dtype)
    total: dict = {}
    for b, stats in zip(batches, per_batch):
        stats["hidden"] = stats["hidden"] + minitron_sq(norm(hidden[b]))
        for key, value in stats.items():
            total[key] = total[key] + value if key in total else value
    scores = finish(total, cfg.num_hidden_layers)
    if family.experts_key:
        scores.update(expert_scores({**total, **magnitudes}, method, seed))
    return scores


def magnitude_streaming(source_dir: Path, config, family, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """``importance.weight_scores`` of w^2 over every parameter, read one tensor at a time in the
    model's parameter order (the in-memory order, so the sums are identical)."""
    shards = weight_map(Path(source_dir))
    scores: dict[str, Tensor] = {}
    n = n_experts(config, family)
    for name, _ in skeleton(config).named_parameters():
        squared = moe_layout.read(shards, name, family, n, dtype).float() ** 2
        for key, value in weight_scores({name: squared}, family, config).items():
            scores[key] = scores[key] + value if key in scores else value
    return scores


def streamable_family(config):
    """The arch.py table entry of ``config``; streaming knows no other layout."""
    family = family_of(config)
    if family is None:
        raise WhelpError(
            f"streaming supports the families of whelp/pruning/arch.py, not '{config.model_type}'; "
            "prune this model in memory (without --stream)"
        )
    if getattr(text_config(config), "use_bidirectional_attention", False):  # EmbeddingGemma: not a causal mask
        raise WhelpError(
            f"streaming calibrates with causal masks and this {config.model_type} model attends "
            "bidirectionally (use_bidirectional_attention); prune it in memory (without --stream)"
        )
    return family


def streaming_scores(
    source_dir: Path,
    config,
    tokens: Tensor,
    method: str = "activation",
    batch_size: int = 4,
    dtype: torch.dtype = torch.float32,
    progress=None,
) -> dict[str, Tensor]:
    """Scores of ``importance.calibrate`` computed from the shards: ``activation`` (default) or
    ``magnitude`` widths, block influence for the layers either way.

    Taylor needs gradients through the whole model and random is an in-memory baseline; both are
    refused rather than silently replaced.
    """
    family = streamable_family(config)
    if method not in ("activation", "magnitude"):
        raise WhelpError(
            f"importance '{method}' cannot stream (taylor needs a backward pass through the whole "
            "model; random is an in-memory baseline); use activation or magnitude, or drop --stream"
        )
    scores = calibrate_streaming(source_dir, config, family, tokens, batch_size, dtype, progress, method)
    if method == "magnitude":
        kept = {k: v for k, v in scores.items() if k.startswith(("experts.", "ffn.", "layers."))}
        scores = {**kept, **magnitude_streaming(source_dir, config, family, dtype)}
    return scores


def prune_streaming(
    source_dir: str | Path,
    out_dir: str | Path,
    target,
    spec: PruneSpec = PruneSpec(),
    tokens: Tensor | None = None,
    *,
    scores: dict[str, Tensor] | None = None,
    progress=None,
    refit_progress=None,
    shard_bytes: int = 1 << 30,
):
    """Prune the checkpoint in ``source_dir`` to ``target`` (a ``targets.Target``) without loading it, as ``spec``
    says (``importance``, ``layer_importance``, ``tie``, ``rope``, ``batch_size``, ``save_dtype``; its calibration
    data is ``tokens``).

    ``scores`` (e.g. a saved importance.safetensors) skip calibration; otherwise ``tokens`` [N, T] are the
    calibration blocks, run in fp32. Returns ``(keep, target_config, scores, reconstruction)`` (the last: the
    report of ``spec.reconstruct`` (reconstruct.summary), or None); the checkpoint (weights in the
    spec's ``save_dtype``, ``auto``: the source's stored dtype) lands in ``out_dir`` atomically, in shards of
    about ``shard_bytes``. ``progress()`` is called once per calibrated layer, ``refit_progress()`` once per
    refit layer.
    """
    if spec.layer_importance != "block" and f"layers.{spec.layer_importance}" not in (scores or {}):
        raise WhelpError(
            f"layer importance '{spec.layer_importance}' runs the whole model once per layer and cannot stream; "
            "use --layer-importance block, or drop --stream"
        )
    check_checkpoint(str(source_dir))
    config = load_config(str(source_dir))
    family = streamable_family(config)
    if scores is None:
        if tokens is None:
            raise WhelpError("streaming prune needs calibration tokens or saved importance scores")
        scores = streaming_scores(
            Path(source_dir), config, tokens, spec.importance, spec.batch_size, torch.float32, progress
        )
    keep = select(scores, config, target.shape, spec.layer_importance, spec.tie)
    target_cfg = target_config(config, keep, target_rope(target, spec.rope))
    dtype = save_dtype(spec.save_dtype, source_dir, config)
    target_cfg.dtype = dtype
    mode = resolve(spec.reconstruct, family)
    if mode == "bias":
        text_config(target_cfg).attention_bias = text_config(target_cfg).mlp_bias = True
    if mode != "none" and tokens is None:
        raise WhelpError(f"--reconstruct {mode} needs calibration tokens; give them, or --reconstruct none")
    write = (Path(source_dir), Path(out_dir), keep, family, config, target_cfg, False, shard_bytes, None)
    if mode == "none":
        write_pruned(*write, getattr(torch, dtype))
        return keep, target_cfg, scores, None
    with tempfile.TemporaryDirectory(dir=Path(out_dir).expanduser().parent, prefix=".whelp-refit-") as spill:
        errors, keep = refit_streaming(
            Path(source_dir),
            config,
            target_cfg,
            keep,
            family,
            tokens[: spec.refit_blocks],
            mode,
            spec.batch_size,
            Path(spill),
            refit_progress,
            selects(spec.select, mode, family),
        )
        write_pruned(*write, getattr(torch, dtype), Path(spill))
    return keep, target_cfg, scores, summary(mode, errors)
