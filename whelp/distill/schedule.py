"""Teacher-weight schedules and the data order of a distillation run: pure functions of the step.

Everything a resumed run needs to continue bit-exactly is a function of ``(seed, step)``, so the
checkpoint only has to store the step.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass

import torch

from whelp.errors import WhelpError

SCHEDULE_KINDS = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class Schedule:
    """How teacher weights move over optimizer steps.

    ``constant``: the given weights throughout. ``linear:N`` / ``cosine:N``: all weight on the FIRST
    teacher at step 0, moving (linearly / along a half cosine) to the given weights at step N and
    staying there - "8B first, annealing toward the 70B" is ``--teacher 8b:0 --teacher 70b:1
    --schedule linear:N``.
    """

    kind: str = "constant"
    steps: int = 0


def parse_schedule(text: str) -> Schedule:
    """``constant`` | ``linear:N`` | ``cosine:N`` -> Schedule."""
    kind, _, steps = text.partition(":")
    if kind not in SCHEDULE_KINDS:
        raise WhelpError(f"unknown teacher-weight schedule '{text}'; write constant, linear:N or cosine:N")
    if kind == "constant":
        if steps:
            raise WhelpError(f"'constant' takes no step count (got '{text}'); write constant")
        return Schedule()
    if not steps.isdigit() or int(steps) < 1:
        raise WhelpError(f"schedule '{text}' needs a positive step count, e.g. {kind}:100")
    return Schedule(kind, int(steps))


def teacher_weights(schedule: Schedule, weights: tuple[float, ...], step: int) -> tuple[float, ...]:
    """Per-teacher weights at optimizer ``step`` (0-based); the start point keeps the weights' total mass."""
    if schedule.kind == "constant" or len(weights) < 2:
        return tuple(weights)
    progress = min(step / schedule.steps, 1.0)
    if schedule.kind == "cosine":
        progress = 0.5 - 0.5 * torch.cos(torch.tensor(progress * torch.pi, dtype=torch.float64)).item()
    start = (float(sum(weights)),) + (0.0,) * (len(weights) - 1)
    return tuple((1 - progress) * a + progress * b for a, b in zip(start, weights))


def parse_weighted(text: str) -> tuple[str, float]:
    """``NAME[:WEIGHT]`` -> (name, weight); the weight defaults to 1 (names may contain ':' e.g. pydoc:...)."""
    name, sep, weight = text.rpartition(":")
    if sep:
        try:
            value = float(weight)
        except ValueError:
            return text, 1.0
        if value < 0:
            raise WhelpError(f"teacher weight must be >= 0 in '{text}'")
        return name, value
    return text, 1.0


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
