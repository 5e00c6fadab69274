"""Reconstruction in a streaming prune: the refit of reconstruct.py with one teacher layer resident at a time.

The calibration tokens are embedded from the shards; then for each student layer ``i`` (teacher layer ``j``) the
teacher layer's tensors are read once and sliced twice, to the student layer and to the wide layer (reconstruct.py),
both loaded into meta skeletons; the student's hidden states [N, T, H'] go through with the rotary embeddings and
masks of ``layerwise.rope_and_mask``, the layer is refit, and its whole state is spilled to ``spill/{i}.safetensors``
so the shard writer (streaming.write_pruned) takes the refit tensors in place of the sliced ones. For ``span`` the
teacher's hidden states [N, T, H] advance beside the student's through every teacher layer, one resident at a time.

Peak memory: the streaming prune's (one layer, one shard) + the student's and (``span``) the teacher's calibration
hidden states + one wide layer + the float64 moments of one map. The refit layers go to disk, not memory, so a
student larger than memory streams too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from whelp.pruning.arch import Family
from whelp.pruning.keep import Keep, text_config
from whelp.pruning.layerwise import assign_layer, embedded, layer_types, load_layer, n_experts, rope_and_mask, skeleton
from whelp.pruning.moe_layout import memory_names, read, to_disk
from whelp.pruning.reconstruct import (
    layer_states,
    reconstruct_layer,
    span_ends,
    wide_keep,
    wide_rotary,
    with_mlp,
    with_zero_biases,
)
from whelp.pruning.refit_stats import teacher_layer
from whelp.pruning.shards import weight_map
from whelp.pruning.surgery import target_config, tie_embeddings
from whelp.specs import SPAN_MODES


def _student_inputs(shards, family: Family, config, keep: Keep, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """``(teacher, student)`` hidden states entering the first layer: the student's are the teacher's kept
    channels (Gemma's embedding compensation keeps their values), or a tied init's merged rows."""
    cfg = text_config(config)
    teacher = embedded(shards, family, cfg, tokens, torch.float32)
    if keep.tie is None or keep.tie == "embedding":
        return teacher, teacher[..., keep.hidden].clone()
    head = embedded(shards, family, cfg, tokens, torch.float32, family.lm_head)
    return teacher, tie_embeddings(teacher[..., keep.hidden], head[..., keep.hidden], keep.tie)


def refit_streaming(
    source_dir: Path,
    config,
    target_cfg,
    keep: Keep,
    family: Family,
    tokens: Tensor,
    mode: str,
    batch_size: int,
    spill: Path,
    progress=None,
    select: bool = False,
) -> tuple[list[dict], Keep]:
    """Refit every student layer from the shards of ``source_dir`` and spill each layer's state to ``spill``;
    returns the per-layer relative calibration errors (reconstruct.summary makes the report of them) and ``keep``
    with the MLP neurons ``select`` chose (structured OBS, reconstruct.reconstruct_layer)."""
    shards = weight_map(Path(source_dir))
    wkeep = wide_keep(keep, config)
    wide_cfg = target_config(config, wkeep, getattr(text_config(target_cfg), "rope_parameters", None))
    teacher_sk, student_sk, wide_sk = skeleton(config), skeleton(target_cfg), skeleton(wide_cfg)
    t_hidden, s_hidden = _student_inputs(shards, family, config, keep, tokens)
    slices = [slice(i, i + batch_size) for i in range(0, len(tokens), batch_size)]
    batches, t_batches = [s_hidden[b] for b in slices], [t_hidden[b] for b in slices]
    del t_hidden, s_hidden
    s_types, t_types = layer_types(text_config(target_cfg)), layer_types(text_config(config))
    # rotary embeddings and masks depend on the batches' length only: made once per layer type, used by every layer
    s_rope = {t: [rope_and_mask(student_sk, family, target_cfg, h, t) for h in batches] for t in set(s_types)}
    t_rope = {  # the teacher walks beside the student only for span and span_attn
        t: [rope_and_mask(teacher_sk, family, text_config(config), h, t) for h in t_batches]
        for t in (set(t_types) if mode in SPAN_MODES else ())
    }
    wide_ropes = wide_rotary(wide_sk, family, wide_cfg, target_cfg, batches, s_types)
    ends, done, report, chosen = span_ends(keep, text_config(config).num_hidden_layers), 0, [], []
    n = n_experts(config, family)
    spill.mkdir(parents=True, exist_ok=True)
    for i, j in enumerate(keep.layers):
        span_end, mid = None, [] if mode == "span_attn" else None
        if mode in SPAN_MODES:
            for jj in range(done, ends[i] + 1):
                at = mid if jj == j else None
                _advance_teacher(teacher_sk, family, shards, jj, t_batches, t_rope[t_types[jj]], at, keep.hidden)
            done, span_end = ends[i] + 1, [h[..., keep.hidden] for h in t_batches]
        prefix = f"{family.layers}.{j}."
        names = memory_names([name for name in shards if name.startswith(prefix)], family)  # MoE: fused experts
        named = ((name, read(shards, name, family, n, torch.float32)) for name in names)
        s_state, w_state = layer_states(named, [(keep, target_cfg), (wkeep, wide_cfg)], family, config)
        layer = student_sk.get_submodule(family.layers)[i]
        student = assign_layer(student_sk, family, i, with_zero_biases(layer, s_state))
        wide = assign_layer(wide_sk, family, i, w_state)
        kwargs = [{"position_embeddings": rope, "attention_mask": mask} for rope, mask in s_rope[s_types[i]]]
        rope = None if wide_ropes is None else wide_ropes[s_types[i]]
        errors, kept = reconstruct_layer(
            student, wide, family, batches, kwargs, mode, rope, span_end, select=select, span_mid=mid
        )
        report.append(errors)
        chosen.append(kept)
        state = {  # under the names on disk (an MoE's experts one by one), as the shard writer meets them
            disk: t.contiguous()
            for k, v in student.state_dict().items()
            for disk, t in to_disk(f"{family.layers}.{i}.{k}", v, family)
        }
        save_file(state, spill / f"{i}.safetensors")
        student.to("meta")
        wide.to("meta")
        if progress is not None:
            progress(1)
    return report, with_mlp(keep, chosen)


def _advance_teacher(
    model, family: Family, shards, j: int, batches: list[Tensor], rope_mask: list, mid=None, channels=None
) -> None:
    """Teacher layer ``j`` loaded from the shards, ``batches`` run through it in place (``rope_mask``: its rotary
    embeddings and mask per batch; ``mid``, ``channels``: refit_stats.teacher_layer's), the layer freed."""
    layer = load_layer(model, family, j, shards, torch.float32)
    kwargs = [{"position_embeddings": rope, "attention_mask": mask} for rope, mask in rope_mask]
    teacher_layer(layer, family, batches, kwargs, mid, channels)
    layer.to("meta")


def spilled(tensors, spill: Path):
    """``(name, tensor)`` pairs with every layer's tensors taken from its spill file (refit weights, added biases)
    in place of the sliced ones, one spill file resident at a time; the spilled tensors slicing does not produce
    (new biases) come last."""
    files = {int(p.stem): p for p in spill.glob("*.safetensors")}
    current, layer, emitted = None, {}, set()
    for name, tensor in tensors:
        index = _layer_index(name)
        if index is not None and index != current:
            current, layer = index, (load_file(files[index]) if index in files else {})
        emitted.add(name)
        yield name, layer.get(name, tensor)
    for index in sorted(files):
        for name, tensor in load_file(files[index]).items():
            if name not in emitted:
                yield name, tensor


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    for k, part in enumerate(parts[:-1]):
        if part == "layers" and parts[k + 1].isdigit():
            return int(parts[k + 1])
    return None
