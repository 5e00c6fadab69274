"""Teacher-weight schedules and the data order of a distillation run: pure functions of the step.

Everything a resumed run needs to continue bit-exactly is a function of ``(seed, step)``, so the
checkpoint only has to store the step.
"""

from __future__ import annotations

import functools

import torch

from whelp.specs import Schedule


def teacher_weights(schedule: Schedule, weights: tuple[float, ...], step: int) -> tuple[float, ...]:
    """Per-teacher weights at optimizer ``step`` (0-based); the start point keeps the weights' total mass."""
    if schedule.kind == "constant" or len(weights) < 2:
        return tuple(weights)
    progress = min(step / schedule.steps, 1.0)
    if schedule.kind == "cosine":
        progress = 0.5 - 0.5 * torch.cos(torch.tensor(progress * torch.pi, dtype=torch.float64)).item()
    start = (float(sum(weights)),) + (0.0,) * (len(weights) - 1)
    return tuple((1 - progress) * a + progress * b for a, b in zip(start, weights))


def step_blocks(step: int, n_blocks: int, per_step: int, seed: int) -> torch.Tensor:
    """Block indices of the global batch of optimizer ``step``: LongTensor [per_step].

    Blocks are visited in a fresh permutation per epoch (seeded by ``seed`` and the epoch), so the
    data position is the step alone and every rank computes the same indices without communication.
    """
    first = step * per_step
    out = []
    while sum(map(len, out)) < per_step:
        epoch, offset = divmod(first + sum(map(len, out)), n_blocks)
        out.append(_epoch_order(n_blocks, seed, epoch)[offset : offset + per_step - sum(map(len, out))])
    return torch.cat(out)


@functools.lru_cache(maxsize=2)
def _epoch_order(n_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    """The block order of one epoch (8 bytes per block), computed once per epoch, not once per step."""
    return torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
