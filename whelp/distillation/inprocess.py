"""``distill(student, teachers, data, spec)``: the distillation loop (whelp.distillation.loop) run in this process on
models in memory, for notebooks, the search's short trainings and benchmarks; ``whelp distill``
(whelp.distillation.api) runs the same loop with checkpoints, resume and logs."""

from __future__ import annotations

import torch

from whelp.data import TensorBlocks
from whelp.distillation import loop, parallel, state
from whelp.distillation import metrics as metrics_log
from whelp.errors import WhelpError
from whelp.output import Progress
from whelp.specs import DistillSpec, Mixture


def _weighted(items) -> list[tuple[object, float]]:
    return [item if isinstance(item, tuple) else (item, 1.0) for item in items]


def distill(
    student,
    teachers,
    data,
    spec: DistillSpec,
    eval_ids: torch.Tensor | None = None,
    tokenizer=None,
    progress: bool = True,
):
    """Distil ``student`` (an HF causal LM, trained in place and returned in eval mode) from ``teachers`` on
    ``data`` (``whelp.blocks(...)`` rows or a LongTensor [n, seq_len]) for ``spec``'s budget.

    ``teachers``: models, opened caches (``whelp.open_cache``), or ``(teacher, weight)`` pairs. ``eval_ids`` [T]:
    held-out tokens for the perplexity logged at the start and end (``student.whelp_distill`` holds the log).
    ``tokenizer``: needed only when the lm_heads are padded to different widths. No checkpoints are written: for
    resumable runs use ``whelp distill`` (``whelp.distillation.api.distill_run``).
    """
    if isinstance(data, (str, Mixture)):
        raise WhelpError(f"data is rows of tokens: pass whelp.blocks('{data}', tokenizer, seq_len), not the name")
    blocks = data if hasattr(data, "head") else TensorBlocks(torch.as_tensor(data))
    pairs = _weighted(teachers)
    live = [(m.eval().requires_grad_(False), w) for m, w in pairs if isinstance(m, torch.nn.Module)]
    cached = [(c, w) for c, w in pairs if not isinstance(c, torch.nn.Module)]
    for cache, _ in cached:
        cache.check_blocks(blocks)
    names = [f"teacher{i}" for i in range(len(live))] + [str(c.path) for c, _ in cached]
    world = parallel.World(0, 1, student.device, owns_group=False)
    torch.manual_seed(spec.seed)
    trainable = {p: p.requires_grad for p in student.parameters()}  # --local freezes all but the blocks
    try:
        t = state.setup(
            student,
            [m for m, _ in live],
            [c for c, _ in cached],
            [w for _, w in live + cached],
            names,
            blocks,
            spec,
            world,
            None if eval_ids is None else eval_ids.long(),
            tokenizer and len(tokenizer),
            getattr(student, "whelp_kept", None),
        )
        start = loop.held_out(t)
        with Progress("distill", t.steps, enabled=progress) as bar:
            loop.train(t, on_step=lambda row: metrics_log.show(bar, row))
        student.whelp_distill = {
            "steps": t.steps,
            "tokens": t.tokens_seen,
            "log": t.log,
            "eval_start": start,
            "eval_end": loop.held_out(t),
        }
    finally:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
    return student.eval()
