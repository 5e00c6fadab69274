"""A model's logits as whelp computes them, outside its forward: the lm_head on the backbone's final hidden states,
then the family's logit transform (``whelp.architecture.logit_transform``), on a chunk of positions at a time.

Capture (``cache-logits``) and the fused KD loss never run a teacher's or student's full forward to its [N, V]
logits; ``check_logits`` compares this view with the model's own ``forward(...).logits`` once, so a family whose
logits are made otherwise is refused in one line before hours of work rather than caching or distilling wrong ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

from whelp import architecture
from whelp.distillation.losses import backbone
from whelp.errors import WhelpError


def chunk_logits(model, hidden: Tensor, vocab: int | None = None) -> Tensor:
    """fp32 logits [c, vocab] of hidden states [c, H]: the lm_head, then the family's logit transform."""
    return architecture.logit_transform(model.config)(model.get_output_embeddings()(hidden).float())[..., :vocab]


def check_logits(lm, ids: Tensor, what: str, use: str, vocab: int | None = None) -> None:
    """``chunk_logits`` of ``lm``'s backbone hidden states against its own ``forward(...).logits`` on ``ids``
    [1, L] (the first ``vocab`` ids): WhelpError naming the ``what`` (teacher, student) that ``cannot be {use}``
    when it has no lm_head, or its logits are more than ``lm_head(hidden)`` scaled or soft-capped as
    ``logit_transform`` knows."""
    family, head = f"{type(lm).__name__} ({lm.config.model_type})", lm.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise WhelpError(
            f"the {what} {family} has no output embeddings (lm_head) whelp can read; whelp distils "
            "causal LMs whose logits are lm_head(hidden states)"
        )
    was = lm.training
    lm.eval()
    try:
        with torch.no_grad():
            ref = lm(input_ids=ids).logits[0, :, :vocab].float()
            body = backbone(lm)
            hidden = getattr(body(input_ids=ids) if body is not lm else None, "last_hidden_state", None)
            mine = None if hidden is None else chunk_logits(lm, hidden[0], vocab)
    finally:
        lm.train(was)
    exact = ref.dtype == torch.float32 and head.weight.dtype == torch.float32
    if (
        mine is None
        or mine.shape != ref.shape
        or (mine - ref).abs().max() > (1e-4 if exact else 3e-2) * max(1.0, float(ref.abs().max()))
    ):
        raise WhelpError(
            f"the {what} {family} computes its logits in a way whelp does not know (lm_head of its "
            "base model's hidden states, with the family's logit scaling or soft-capping, differs from "
            f"its forward's logits); it cannot be {use}"
        )
