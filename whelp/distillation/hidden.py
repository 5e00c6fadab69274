"""Intermediate-state distillation: the student's residual stream matched to the teacher's at mapped layers.

Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation", section 4.3)
adds losses between the hidden states of matched teacher and student layers when depth is pruned substantially,
mapping the student's states into the teacher's width with one learned linear shared by all layers. Here:

- ``layer_map``: student layer i (0-based) is matched with teacher layer ``map[i]``, whose OUTPUT the student's
  output should equal. From the kept-layer indices of the pruning (``kept``), ``map[i]`` is the last teacher layer
  of the span student layer i replaces (up to the next kept layer; the last span runs to the teacher's end), the
  pairing the span reconstruction fits; without them, a uniform map (student layer i ends where a fraction
  (i + 1) / Ls of the teacher's layers does).
- ``projection``: where the widths differ, the student's state [N, Hs] is mapped to [N, Ht] by a learned matrix
  initialised to place each student channel at the teacher channel it was kept from (zeros elsewhere), so on the
  kept channels it starts as the exact slice of the pruning; the removed channels it learns to predict.
- ``term``: per token, ``cosine`` 1 - cos(s, t) (scale-free) or ``nmse`` ||s - t||^2 / ||t||^2 (matches the scale
  too; what a block-local stage needs, whelp.distillation.local), summed over tokens and averaged over layers so
  that ``hidden_weight`` weighs it against the per-token KD.

Pure functions on tensors and hooks; the loop (whelp.distillation.loop) decides when they run.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from whelp.architecture import layer_output
from whelp.errors import WhelpError
from whelp.specs import HIDDEN_LOSSES

EPS = 1e-6  # guards the norms of all-zero states (padding) in both terms


def layer_map(n_student: int, n_teacher: int, kept: list[int] | None = None) -> list[int]:
    """The teacher layer each student layer's output is matched with: ``[Ls]`` ints in ``0 .. Lt - 1``, strictly
    increasing, the last ``Lt - 1``. ``kept``: the teacher layers the pruning kept (its ``kept.layers``)."""
    if kept is None:
        if n_student > n_teacher:
            raise WhelpError(
                f"the student has {n_student} layers and the teacher {n_teacher}: a hidden-state map pairs each "
                "student layer with a deeper-or-equal teacher layer; use a teacher at least as deep"
            )
        return [round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)]
    kept = [int(k) for k in kept]
    if len(kept) != n_student or kept != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= n_teacher:
        raise WhelpError(
            f"the pruning's kept layers {kept} do not fit a {n_student}-layer student of this {n_teacher}-layer "
            "teacher (one increasing teacher index per student layer); pass the teacher the student was pruned "
            "from, or --hidden-map uniform"
        )
    return [nxt - 1 for nxt in kept[1:]] + [n_teacher - 1]


def projection(kept_hidden: list[int] | None, student_size: int, teacher_size: int) -> Tensor | None:
    """The initial student -> teacher map [Ht, Hs] (float32): 1 at (kept_hidden[a], a), else 0; None when the
    widths agree (no projection is learned)."""
    if student_size == teacher_size:
        return None
    if kept_hidden is None or len(kept_hidden) != student_size or max(kept_hidden) >= teacher_size:
        raise WhelpError(
            f"the student's hidden size {student_size} differs from the teacher's {teacher_size} and no record of "
            "the kept hidden channels fits it (prune_report.json kept.hidden): hidden-state losses need a student "
            "pruned from this teacher by whelp prune"
        )
    weight = torch.zeros(teacher_size, student_size)
    weight[torch.as_tensor(kept_hidden), torch.arange(student_size)] = 1.0
    return weight


def term(student: Tensor, teacher: Tensor, kind: str) -> Tensor:
    """Per-token distance [N] (float32) between states ``student`` and ``teacher`` [N, H] of the same width."""
    s, t = student.float(), teacher.float()
    if kind == "cosine":
        return 1 - (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1)).clamp_min(EPS)
    if kind == "nmse":
        return (s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(EPS)
    raise WhelpError(f"unknown hidden-state loss '{kind}'; choose one of {', '.join(HIDDEN_LOSSES)}")


def hidden_loss(
    student: list[Tensor], teacher: list[Tensor], kind: str, proj: Tensor | None = None, mask: Tensor | None = None
) -> Tensor:
    """SUM over counted tokens of the mean over matched layers of ``term``: ``student[k]`` [N, Hs] against
    ``teacher[k]`` [N, Ht], the student's states mapped by ``proj`` [Ht, Hs] first when given; ``mask`` [N] bool
    selects the tokens that count (as the KD's loss mask does). Each layer's term is recomputed in backward rather
    than kept (activation checkpointing): its fp32 [N, Ht] intermediates would otherwise stay alive for every layer
    at once, 12 bytes x N x Ht a layer."""
    total = student[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student, teacher, strict=True):
        total = total + checkpoint(_layer_sum, s, t, kind, proj, mask, use_reentrant=False)
    return total / len(student)


def _layer_sum(s: Tensor, t: Tensor, kind: str, proj: Tensor | None, mask: Tensor | None) -> Tensor:
    if mask is not None:
        s, t = s[mask], t[mask]
    return term(s if proj is None else s @ proj.to(s.dtype).T, t, kind).sum()


@contextmanager
def capture(layers, indices):
    """Inside the block, ``found[j]`` is the output [B, T, H] of ``layers[j]`` for each j >= 0 in ``indices`` and
    ``found[-1]`` the input of ``layers[0]`` (the embeddings as the model's forward hands them on) if -1 is among
    them, from the forwards that run there (hooks, removed on exit)."""
    found: dict[int, Tensor] = {}

    def grab(j):
        return lambda _module, _args, out: found.__setitem__(j, layer_output(out))

    def grab_input(_module, args, kwargs):
        found[-1] = args[0] if args else kwargs["hidden_states"]

    wanted = sorted(set(indices))
    handles = [layers[j].register_forward_hook(grab(j)) for j in wanted if j >= 0]
    if -1 in wanted:
        handles.append(layers[0].register_forward_pre_hook(grab_input, with_kwargs=True))
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class Plan:
    """What a run with hidden states needs: each student layer's teacher layer (``layer_map``), the teacher's
    hidden channels the student kept (``channels``, None when the widths agree) and the projection's initial
    weight [Ht, Hs] (``proj``, None when the widths agree)."""

    layer_map: list[int]
    channels: Tensor | None
    proj: Tensor | None


def plan(student_config, teachers: list, kept: dict | None, spec) -> Plan:
    """The ``Plan`` of a run with ``spec`` (a ``HiddenSpec``) on the first live teacher of ``teachers``; ``kept``:
    the pruning's record of the student (prune_report.json ``kept``: ``layers``, ``hidden``), or None."""
    if not teachers:
        raise WhelpError(
            "--hidden-weight and --local need a live teacher (--teacher MODEL): a teacher-logit cache holds "
            "logits only, no hidden states"
        )
    s_cfg, t_cfg = student_config.get_text_config(), teachers[0].config.get_text_config()
    recorded = kept is not None and "layers" in kept
    if spec.map == "kept" and not recorded:
        raise WhelpError(
            "--hidden-map kept needs the pruning's record of the kept layers (prune_report.json next to the "
            "student, written by whelp prune); use --hidden-map uniform for another student"
        )
    use_kept = spec.map == "kept" or (spec.map == "auto" and recorded)
    layers = layer_map(s_cfg.num_hidden_layers, t_cfg.num_hidden_layers, kept["layers"] if use_kept else None)
    hidden = None if kept is None else kept.get("hidden")
    proj = projection(hidden, s_cfg.hidden_size, t_cfg.hidden_size)
    return Plan(layers, None if proj is None else torch.as_tensor(hidden), proj)
