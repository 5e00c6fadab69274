"""Nucleus (top-p) sampling's mask without sorting the vocabulary each step (Holtzman et al. 2020, arXiv 1904.09751).

transformers' ``TopPLogitsWarper`` sorts every row of the logits at every decoding step: on the demo's generation
(SmolLM2-135M-Instruct, batch 32, 49,152 ids, CPU) the sort took 62 ms of a 310 ms step, and sampling with it 100 ms
more than without. The nucleus at top_p < 1 lies among the few most likely ids, so ``TopP`` finds it among the
``TOP_K`` largest (``topk``, 3 ms there) and sorts only rows whose ``TOP_K`` largest hold less than ``top_p`` of the
mass. The mask is the warper's: a token is kept while the mass of the tokens likelier than it is below ``top_p`` (the
one that crosses it included, and always the likeliest), the others are set to -inf. The two sum the probabilities in
different orders, so a token whose mass lies within float rounding of the boundary could be kept by one and not the
other.
"""

from __future__ import annotations

import copy

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

TOP_K = 256  # ids searched for the nucleus before a row falls back to the full sort


class TopP(LogitsProcessor):
    """``TopPLogitsWarper(top_p)`` by ``topk``: scores [B, V] (after temperature) -> the same with the ids outside
    each row's nucleus at -inf."""

    def __init__(self, top_p: float):
        if not 0 < top_p < 1:
            raise ValueError(f"top_p must be in (0, 1), got {top_p}")
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        top, ids = scores.float().softmax(-1).topk(min(TOP_K, scores.shape[-1]), dim=-1)  # [B, K], descending
        keep = top.cumsum(-1) - top < self.top_p  # the mass likelier than each id
        out = torch.full_like(scores, -float("inf"))
        out.scatter_(-1, ids, scores.gather(-1, ids).masked_fill(~keep, -float("inf")))
        wide = top.sum(-1) < self.top_p  # the nucleus runs past the TOP_K largest: sort those rows
        if wide.any():
            out[wide] = TopPLogitsWarper(self.top_p)(input_ids[wide], scores[wide])
        return out


def nucleus(config) -> tuple[object, LogitsProcessorList]:
    """``(config, processors)`` for ``generate``: a sampling config's temperature, top-k and top-p moved out of
    transformers' warpers into the processors given to ``generate``, in the order transformers applies them
    (temperature, top-k, then ``TopP`` on what top-k left), which ``generate`` would not keep by itself: it runs the
    processors it is given before its own warpers. So it samples from the stock distribution (the nucleus's edge up
    to rounding, as the module docstring says). Any other config as it is, with no processor."""
    if not config.do_sample or config.top_p is None or config.top_p >= 1:
        return config, LogitsProcessorList()
    plain = copy.deepcopy(config)
    plain.temperature, plain.top_k, plain.top_p = 1.0, 0, 1.0
    temperature = [] if config.temperature in (None, 1.0) else [TemperatureLogitsWarper(config.temperature)]
    top_k = [TopKLogitsWarper(config.top_k)] if config.top_k else []
    return plain, LogitsProcessorList([*temperature, *top_k, TopP(config.top_p)])
