"""``--interpolate A``: the distilled student written as the average of its weights with those it started from.

WiSE-FT (Wortsman et al. 2022, arXiv 2109.01903): a model fine-tuned on a narrow distribution loses some of what it
did outside it, and the weight-space average (1 - A) theta_start + A theta_trained of the two ends keeps more of it
than either end, for part of the fine-tuning's gain in its own domain. A distillation on a narrow mixture (the
demo's chat and pydoc, before its BOS rows) is such a fine-tuning of the pruned student. On it at three seeds, A =
0.75 read news-like text 8% better than the trained weights (134.1 against 145.9), vim's manual 3% and the licences
1% better, looped on 41 of 345 requests against 49, for pydoc:eval +1% (bench/RESULTS.md, "Weight interpolation
... at three seeds"); A = 0.5 read news-like text better still and looped on 62. The demo recipe ships 0.75; the
option's default stays 1, since the gain is measured only where the training mixture is narrow. It costs one pass
over the weights at save time and no training.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from whelp.errors import WhelpError
from whelp.weights import checkpoint_files, checkpoint_tensors

TIED_HEAD = "lm_head.weight"


def average_with_start(state: dict[str, torch.Tensor], start: Path, a: float, tied: bool) -> None:
    """Replace each tensor of ``state`` (the trained student's full state dict, HF names) by ``(1 - a) * start +
    a * trained`` in the trained tensor's dtype, ``start`` read from the safetensors files of the directory the run
    started from, one tensor at a time (memory: one tensor beyond ``state``). A tied ``lm_head.weight`` that the
    files leave out is left as it is: tying makes it the averaged embedding again. Any other name the files lack,
    or a shape that differs, is an error found from the files' headers before any tensor is read or replaced: the
    directory is not the student this run trained."""
    shapes = checkpoint_tensors(start)
    if shapes is None:
        raise WhelpError(
            f"--interpolate averages with the student the run started from, and {start} holds no safetensors "
            "weights; convert it to safetensors or omit --interpolate"
        )
    missing = sorted(state.keys() - shapes.keys() - ({TIED_HEAD} if tied else set()))
    if missing:
        raise WhelpError(
            f"{start} has no tensor {missing[0]}: it is not the student this run trained; --interpolate needs it"
        )
    for name in sorted(state.keys() & shapes.keys()):
        if shapes[name] != tuple(state[name].shape):
            raise WhelpError(
                f"{start}: {name} is {shapes[name]}, the trained student's {tuple(state[name].shape)}: it is not "
                "the student this run trained; --interpolate needs it"
            )
    for file in checkpoint_files(start):
        with safe_open(str(file), "pt") as f:
            for name in state.keys() & set(f.keys()):
                trained = state[name]
                state[name] = torch.lerp(f.get_tensor(name).to(trained.dtype), trained, a)
