"""Run one decoder layer apart from its model: the meta-device skeleton whose layers get their tensors one at a time,
and the rotary embeddings and causal mask the model's own forward would pass a layer (streaming calibration and
reconstruction, streaming.py and reconstruct.py)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from whelp.architecture import kv_cache_name
from whelp.errors import WhelpError
from whelp.pruning import moe_layout
from whelp.pruning.arch import SQRT_HIDDEN
from whelp.pruning.keep import text_config
from whelp.pruning.shards import embed_rows


class Stop(Exception):
    """Raised inside a model's or layer's forward to end it early, once what was needed of it is taken
    (reconstruct.py, obs.py)."""


@contextlib.contextmanager
def standing_in(pairs: Iterable[tuple[torch.nn.Module, Callable]]):
    """Each module's forward replaced by its stand-in inside the block (a recorder, or one that raises ``Stop``), and
    the module's own forward back after it, an error included: the stand-in is an instance attribute that hides the
    class's method, and deleting it restores the method."""
    pairs = list(pairs)
    for module, forward in pairs:
        module.forward = forward
    try:
        yield
    finally:
        for module, _ in pairs:
            del module.forward


def skeleton(config):
    """The full model on the meta device: module structure and names, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config).eval()


def rope_and_mask(
    model, family, config, hidden: Tensor, layer_type: str | None = None
) -> tuple[tuple[Tensor, Tensor], Tensor | None]:
    """``(cos, sin)`` [1, T, d] and the causal mask the model's own forward would pass its layers of
    ``layer_type`` (``config.layer_types``: a sliding-window mask for "sliding_attention", and Gemma 3's RoPE
    of that type)."""
    rotary = model.get_submodule(family.layers.rsplit(".", 1)[0]).rotary_emb
    rotary = type(rotary)(config=config)  # a fresh one on CPU: the skeleton's inv_freq buffer is on meta
    positions = torch.arange(hidden.shape[1])[None]
    make = create_sliding_window_causal_mask if layer_type == "sliding_attention" else create_causal_mask
    no_cache = {kv_cache_name(make): None}
    mask = make(config=config, inputs_embeds=hidden, attention_mask=None, position_ids=positions, **no_cache)
    per_type = layer_type is not None and "layer_type" in inspect.signature(rotary.forward).parameters
    cos, sin = rotary(hidden, positions, layer_type) if per_type else rotary(hidden, positions)
    return (cos.to(hidden.dtype), sin.to(hidden.dtype)), mask


def layer_types(config) -> list[str | None]:
    """Each layer's attention type, as the models' forwards pick it: ``config.layer_types`` when the config has
    them, else one sliding-window type for all layers when it sets a window (Mistral, Phi-3), else None (causal)."""
    window = "sliding_attention" if getattr(config, "sliding_window", None) is not None else None
    return list(getattr(config, "layer_types", None) or [window] * config.num_hidden_layers)


def assign_layer(model, family, index: int, state: dict[str, Tensor]):
    """Layer ``index`` of a meta skeleton holding ``state`` (names inside the layer), every tensor given."""
    layer = model.get_submodule(family.layers)[index]
    layer.load_state_dict(state, strict=True, assign=True)
    return layer


def n_experts(config, family) -> int:
    return getattr(text_config(config), family.experts_key) if family.experts_key else 0


def load_layer(model, family, index: int, shards: dict[str, Path], dtype: torch.dtype):
    """Decoder layer ``index`` of a meta skeleton with its tensors (and only those) loaded, in ``dtype`` (an MoE
    layer's experts stacked from their per-expert tensors, moe_layout.py)."""
    layer = model.get_submodule(family.layers)[index]
    prefix, n = f"{family.layers}.{index}.", n_experts(model.config, family)
    state = {key: moe_layout.read(shards, prefix + key, family, n, dtype) for key in layer.state_dict()}
    expected = {disk for key in state for disk in moe_layout.disk_suffixes(key, family, n)}
    unknown = sorted(name for name in shards if name.startswith(prefix) and name[len(prefix) :] not in expected)
    if unknown:
        raise WhelpError(
            f"the checkpoint holds tensors its config.json does not describe: {', '.join(unknown)}; "
            "the config and the weights are of different models"
        )
    try:
        layer.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise WhelpError(
            f"layer {index} of the checkpoint does not match its config.json: {str(exc).splitlines()[-1].strip()}"
        ) from None
    return layer


def unload_layer(layer) -> None:
    """Free a layer's weights by moving it back to the meta device."""
    layer.to("meta")


def embedded(
    shards: dict[str, Path], family, cfg, tokens: Tensor, dtype: torch.dtype, name: str | None = None
) -> Tensor:
    """The hidden states [N, T, H] entering the first layer for ``tokens`` [N, T], read from the shards: the rows of
    the embedding (or of the matrix ``name``), scaled as the model's forward scales them."""
    hidden = embed_rows(shards, name or family.embed, tokens, dtype)
    if family.embed_multiplier == SQRT_HIDDEN:  # Gemma's scaled embedding module, in its own arithmetic
        return hidden * torch.tensor(cfg.hidden_size**0.5).to(dtype)
    if family.embed_multiplier is not None:  # Granite: the model scales its embeddings by a config scalar
        return hidden * getattr(cfg, family.embed_multiplier)
    return hidden
