"""On-policy distillation: the student samples, every live teacher scores what it sampled.

A student trained only on fixed text (the data, or the teacher's own generations) is judged at test time on its
*own* continuations, where its early mistakes compound; scoring the student's samples with the teacher trains it on
the states it actually visits (GKD, Agarwal et al., ICLR 2024; Qwen3 and Gemma 3 post-training; Thinking Machines,
"On-Policy Distillation", 2025). The divergence is reverse KL by default, KL(p_s || p_t) per sampled position,
mode-seeking, as in those works; JSD(beta) and forward KL are allowed.

A fraction ``F`` of the micro-batches is on-policy, picked by their slot ``j = step * grad_accum + a`` (``a`` the
accumulation index) as ``floor((j + 1) F) > floor(j F)``: exactly ``F`` of them in the long run, evenly spread, and
the same on every rank, since FSDP2's collectives need every rank to run the same forwards. In such a micro-batch
every data block gives its first ``P`` tokens as a prompt and the student samples ``G`` tokens after it at
temperature 1 (its own distribution, the whole vocabulary, no gradient; EOS does not stop a row, as packed training
blocks run on across documents). The loss covers the ``G`` positions whose next
token was sampled (positions ``P-1 .. P+G-2`` of the ``[B, P+G]`` sequence), through the same fused chunked loss as
off-policy batches. Cached teachers hold logits of the data's tokens, so they score only the off-policy batches.

The sampling RNG of a micro-batch is a generator seeded from ``seed`` and its global index ``g = j * ranks + rank``:
the checkpoint's step fixes it, so a resumed run samples exactly what an uninterrupted one does, on any device,
without saving generator states.
"""

from __future__ import annotations

import math

import torch

from whelp.distillation.losses import head_logits, model_transform
from whelp.models import kv_cache_name
from whelp.specs import DistillSpec


def is_on_policy(slot: int, fraction: float) -> bool:
    """Whether micro-batch slot ``slot`` is on-policy: ``fraction`` of them, evenly spread (Bresenham)."""
    return math.floor((slot + 1) * fraction) > math.floor(slot * fraction)


def step_tokens(step: int, spec: DistillSpec, world_size: int) -> tuple[int, int]:
    """(off-policy, on-policy) loss tokens of optimizer ``step`` over all ranks: the step's loss is their sum's
    mean. Every rank computes the same numbers, with no communication."""
    on = sum(is_on_policy(step * spec.grad_accum + a, spec.gkd.fraction) for a in range(spec.grad_accum))
    rows = spec.batch_size * world_size
    return (spec.grad_accum - on) * rows * (spec.seq_len - 1), on * rows * spec.gkd.gen_tokens


def generator(step: int, accum: int, rank: int, spec: DistillSpec, world_size: int, device: torch.device):
    """The sampling RNG of micro-batch ``accum`` of ``rank`` in optimizer ``step`` (0-based), or None when that
    micro-batch is off-policy."""
    slot = step * spec.grad_accum + accum
    if not is_on_policy(slot, spec.gkd.fraction):
        return None
    return torch.Generator(device=device).manual_seed(spec.seed * 1_000_003 + slot * world_size + rank)


@torch.no_grad()
def sample(lm, prompts: torch.Tensor, new_tokens: int, vocab: int, rng: torch.Generator) -> torch.Tensor:
    """``prompts`` [B, P] continued by ``new_tokens`` tokens drawn from ``lm``'s next-token distribution (fp32
    softmax over the first ``vocab`` lm_head rows, the family's logit transform applied) with the KV cache:
    LongTensor [B, P + new_tokens]."""
    body, transform = lm.base_model, model_transform(lm)
    name = kv_cache_name(body.forward)
    weight = lm.get_output_embeddings().weight[:vocab].float()
    was_training = lm.training
    lm.eval()  # gradient checkpointing turns the KV cache off in train mode
    try:
        ids, past, seqs = prompts, None, [prompts]
        for _ in range(new_tokens):
            out = body(input_ids=ids, use_cache=True, **({name: past} if past is not None else {}))
            past = out[name]
            with torch.autocast(prompts.device.type, enabled=False):  # fp32 logits, as the loss's
                logits = head_logits(out.last_hidden_state[:, -1], weight, transform)  # the family's transform too
            ids = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=rng)
            seqs.append(ids)
        return torch.cat(seqs, dim=1)
    finally:
        lm.train(was_training)


def generated_mask(batch: int, prompt: int, new_tokens: int, device: torch.device) -> torch.Tensor:
    """Bool [B * (P + G)]: the positions whose next token was sampled, ``P-1 .. P+G-2`` of each row."""
    row = torch.zeros(prompt + new_tokens, dtype=torch.bool, device=device)
    row[prompt - 1 : prompt + new_tokens - 1] = True
    return row.repeat(batch)
