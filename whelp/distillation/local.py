"""Block-local distillation: every student block learns to map the teacher's hidden state at the start of the span
of teacher layers it replaces to the teacher's state at the span's end, from the teacher's own states.

Puzzle's blockwise local distillation (Bercovich et al. 2024, "Puzzle: Distillation-Based NAS for
Inference-Optimized LLMs", section 3) trains each replacement block on the parent's activations, independently of the
others: errors do not compound through the student during training, and no logits are computed, so a token costs one
teacher forward and one forward/backward of each block (no lm_head, no vocabulary-wide softmax). whelp runs all blocks
in one pass over the data: per micro-batch one teacher forward captures the span boundaries (hooks), then each block
runs forward and backward on its own input, its graph freed before the next. The spans come from
``whelp.distillation.hidden.layer_map`` (the pruning's kept layers); a width-pruned student reads and is compared with
the teacher's states at its kept hidden channels (what its sliced embeddings and lm_head see). Global KD starts from
the result (a recipe's ``local:`` stage, whelp.build).
"""

from __future__ import annotations

import torch
from torch import Tensor

from whelp.architecture import layer_output
from whelp.distillation.hidden import capture, term


def spans(layer_map: list[int]) -> list[tuple[int, int]]:
    """``(start, end)`` per student block: it reads the output of teacher layer ``start`` (-1: the input of layer 0)
    and should give the output of teacher layer ``end`` = ``layer_map[i]``."""
    return [(layer_map[i - 1] if i else -1, end) for i, end in enumerate(layer_map)]


@torch.no_grad()
def layer_kwargs(body, layers, ids: Tensor) -> list[tuple[tuple, dict]]:
    """The arguments after the hidden states (rotary embeddings, mask, positions; positional ones too, as GPT-2
    passes its mask) that the model's forward passes each of ``layers`` on ``ids`` [B, T], captured by pre-hooks in
    one forward of ``body`` (its backbone): they depend on the shape and the model alone, so one probe serves every
    micro-batch of that shape."""
    found: list[tuple[tuple, dict]] = [((), {}) for _ in layers]

    def grab(i):
        def hook(_module, args, kwargs):
            found[i] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})

        return hook

    handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        body(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return found


@torch.no_grad()
def teacher_states(body, layers, ids: Tensor, layer_map: list[int]) -> dict[int, Tensor]:
    """The teacher's span boundaries on ``ids`` [B, T]: ``{j: [B, T, Ht]}`` for every start and end of ``spans``."""
    with capture(layers, [j for pair in spans(layer_map) for j in pair]) as found:
        body(input_ids=ids, use_cache=False)
    return dict(found)


def local_backward(
    layers,
    kwargs: list[tuple[tuple, dict]],
    states: dict[int, Tensor],
    layer_map: list[int],
    kind: str,
    scale: float,
    mask: Tensor | None = None,
    channels: Tensor | None = None,
) -> Tensor:
    """Forward and backward of every student block on its span: block i maps ``states[start]`` to ``states[end]``
    (both at ``channels``, the kept hidden channels, when given); its loss is the SUM over counted tokens (``mask``
    [B * T] bool) of the per-token ``term``, and its gradient is taken at ``scale`` times the mean over blocks.
    Returns that mean (float64, detached): the step's per-token loss once divided by its tokens."""
    total = torch.zeros((), dtype=torch.float64)
    for i, (start, end) in enumerate(spans(layer_map)):
        source, target = states[start], states[end]
        if channels is not None:
            source, target = source[..., channels], target[..., channels]
        args, kw = kwargs[i]
        dtype = next(layers[i].parameters()).dtype  # a teacher stored in another dtype than the student
        out = layer_output(layers[i](source.detach().to(dtype), *args, **kw)).flatten(0, 1)
        target = target.flatten(0, 1)
        if mask is not None:
            out, target = out[mask], target[mask]
        loss = term(out, target, kind).sum() / len(layer_map)
        (loss * scale).backward()
        total += loss.detach().double().cpu()
    return total
