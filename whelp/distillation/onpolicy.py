"""On-policy distillation: the student samples, every live teacher scores what it sampled.

A student trained only on fixed text (the data, or the teacher's own generations) is judged at test time on its
*own* continuations, where its early mistakes compound; scoring the student's samples with the teacher trains it on
the states it actually visits (GKD, Agarwal et al., ICLR 2024; Qwen3 and Gemma 3 post-training; Thinking Machines,
"On-Policy Distillation", 2025). The divergence is reverse KL by default, KL(p_s || p_t) per sampled position,
mode-seeking, as in those works; JSD(beta) and forward KL are allowed.

A fraction ``F`` of the micro-batches is on-policy, picked by their slot ``j = step * grad_accum + a`` (``a`` the
accumulation index) as ``floor((j + 1) F) > floor(j F)``: exactly ``F`` of them in the long run, evenly spread, and
the same on every rank, since FSDP2's collectives need every rank to run the same forwards. With ``from_step``
the run is off-policy until that step (on-policy in its last part only, once the student's samples are
worth scoring). In such a micro-batch
every data block gives its first ``P`` tokens as a prompt and the student samples ``G`` tokens after it at
temperature 1 (its own distribution, the whole vocabulary, no gradient; on text data EOS does not stop a row, as
packed training blocks run on across documents). The loss covers the ``G`` positions whose next
token was sampled (positions ``P-1 .. P+G-2`` of the ``[B, P+G]`` sequence), through the same fused chunked loss as
off-policy batches. Cached teachers hold logits of the data's tokens, so they score only the off-policy batches.

On chat data (a store with a loss mask, ``whelp generate --chat``) the prompt is each block up to its first assistant
turn (the first target token after a non-target one: the conversation so far, template header included); a block in
which no turn starts gives its first ``P`` tokens, as text does. Prompts are left-padded to the longest (attention
mask and position ids, so padding changes nothing), and a row stops at its first end-of-turn id (every eos id of the
student's generation config, which carries the teacher's): the answer and its end-of-turn are the loss positions,
what follows is padding. The step's loss is divided by ``rows x G`` for such a micro-batch whether or not a row
stopped early: a constant normaliser (Dr. GRPO, Liu et al. 2025), known before sampling on every rank, so each
sampled token weighs the same and no rank waits for another's count.

The sampling RNG of a micro-batch is a generator seeded from ``seed`` and its global index ``g = j * ranks + rank``:
the checkpoint's step fixes it, so a resumed run samples exactly what an uninterrupted one does, on any device,
without saving generator states.
"""

from __future__ import annotations

import math

import torch

from whelp.architecture import kv_cache_name
from whelp.distillation.losses import head_logits, model_transform
from whelp.specs import DistillSpec


def is_on_policy(slot: int, fraction: float) -> bool:
    """Whether micro-batch slot ``slot`` is on-policy: ``fraction`` of them, evenly spread (Bresenham)."""
    return math.floor((slot + 1) * fraction) > math.floor(slot * fraction)


def on_policy(step: int, accum: int, spec: DistillSpec) -> bool:
    """Whether micro-batch ``accum`` of optimizer ``step`` (0-based) is on-policy: none before ``from_step`` (a run
    that turns on-policy in its last part), then ``fraction`` of the slots."""
    return step >= spec.gkd.from_step and is_on_policy(step * spec.grad_accum + accum, spec.gkd.fraction)


def step_tokens(step: int, spec: DistillSpec, world_size: int) -> tuple[int, int]:
    """(off-policy, on-policy) loss tokens of optimizer ``step`` over all ranks: the step's loss is their sum's
    mean. Every rank computes the same numbers, with no communication."""
    on = sum(on_policy(step, a, spec) for a in range(spec.grad_accum))
    rows = spec.batch_size * world_size
    return (spec.grad_accum - on) * rows * (spec.seq_len - 1), on * rows * spec.gkd.gen_tokens


def generator(step: int, accum: int, rank: int, spec: DistillSpec, world_size: int, device: torch.device):
    """The sampling RNG of micro-batch ``accum`` of ``rank`` in optimizer ``step`` (0-based), or None when that
    micro-batch is off-policy."""
    slot = step * spec.grad_accum + accum
    if not on_policy(step, accum, spec):
        return None
    return torch.Generator(device=device).manual_seed(spec.seed * 1_000_003 + slot * world_size + rank)


def stop_ids(lm) -> tuple[int, ...]:
    """Every end-of-turn id of ``lm``: its generation config's eos ids (an instruct model's ``<|im_end|>`` and the
    tokenizer's eos) and its config's."""
    ids = set()
    for source in (getattr(lm, "generation_config", None), lm.config):
        value = getattr(source, "eos_token_id", None)
        ids.update([value] if isinstance(value, int) else value or [])
    return tuple(sorted(ids))


def chat_prompts(ids: torch.Tensor, mask: torch.Tensor | None, prompt_len: int) -> list[torch.Tensor]:
    """Each row's prompt: ``ids`` [B, L] up to the first assistant turn that starts in the row (``mask`` [B, L], a
    target token after a non-target one), or its first ``prompt_len`` tokens where no turn starts (text data, a
    ``mask`` of None, an answer running on from the previous block)."""
    starts = torch.zeros_like(ids, dtype=torch.bool) if mask is None else mask[:, 1:] & ~mask[:, :-1]
    out = []
    for row, start in zip(ids, starts):
        found = start.nonzero()
        out.append(row[: int(found[0]) + 1] if len(found) else row[:prompt_len])
    return out


def left_pad(prompts: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(ids [B, W], attention [B, W] or None)``: prompts of different lengths left-padded to the longest ``W``;
    None when they are all as long (the text path, run without an attention mask)."""
    width = max(len(p) for p in prompts)
    if all(len(p) == width for p in prompts):
        return torch.stack(prompts), None
    ids = prompts[0].new_full((len(prompts), width), pad)
    attention = torch.zeros_like(ids, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        attention[row, width - len(prompt) :] = True
    return ids, attention


def positions(attention: torch.Tensor | None) -> dict:
    """The forward's ``attention_mask`` and ``position_ids`` for left-padded rows (none without padding)."""
    if attention is None:
        return {}
    return {"attention_mask": attention.long(), "position_ids": (attention.long().cumsum(1) - 1).clamp_min(0)}


@torch.no_grad()
def sample(
    lm,
    prompts: torch.Tensor,
    new_tokens: int,
    vocab: int,
    rng: torch.Generator,
    stop: tuple[int, ...] = (),
    attention: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``prompts`` [B, W] (left-padded where ``attention`` [B, W] is given) continued by ``new_tokens`` tokens drawn
    from ``lm``'s next-token distribution (fp32 softmax over the first ``vocab`` lm_head rows, the family's logit
    transform applied) with the KV cache. Returns ``(ids [B, W + new_tokens], attention)``: with ``stop`` ids a row
    ends at its first one (kept) and is padded after it (attention False); without ``stop`` and padding the
    attention is None, every token live."""
    body, transform = lm.base_model, model_transform(lm)
    name = kv_cache_name(body.forward)
    weight = lm.get_output_embeddings().weight[:vocab].float()
    if stop and attention is None:
        attention = torch.ones_like(prompts, dtype=torch.bool)
    stop_t = torch.tensor(stop, device=prompts.device)
    was_training = lm.training
    lm.eval()  # gradient checkpointing turns the KV cache off in train mode
    try:
        ids, past, seqs = prompts, None, [prompts]
        live = torch.ones(len(prompts), dtype=torch.bool, device=prompts.device)
        for _ in range(new_tokens):
            extra = positions(attention)
            if past is not None:
                extra = {k: v[:, -ids.shape[1] :] if k == "position_ids" else v for k, v in extra.items()}
                extra[name] = past
            out = body(input_ids=ids, use_cache=True, **extra)
            past = out[name]
            with torch.autocast(prompts.device.type, enabled=False):  # fp32 logits, as the loss's
                logits = head_logits(out.last_hidden_state[:, -1], weight, transform)  # the family's transform too
            ids = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=rng)
            if attention is not None:
                ids = torch.where(live[:, None], ids, ids.new_tensor(stop[0] if stop else 0))
                attention = torch.cat([attention, live[:, None]], dim=1)
                if stop:
                    live = live & ~torch.isin(ids[:, 0], stop_t)
            seqs.append(ids)
        return torch.cat(seqs, dim=1), attention
    finally:
        lm.train(was_training)


def generated_mask(batch: int, prompt: int, new_tokens: int, device: torch.device) -> torch.Tensor:
    """Bool [B * (P + G)]: the positions whose next token was sampled, ``P-1 .. P+G-2`` of each row."""
    row = torch.zeros(prompt + new_tokens, dtype=torch.bool, device=device)
    row[prompt - 1 : prompt + new_tokens - 1] = True
    return row.repeat(batch)


def sampled_mask(attention: torch.Tensor | None, batch: int, prompt: int, new_tokens: int) -> torch.Tensor:
    """Bool [B * (W + G)]: the positions whose next token was sampled and live (``generated_mask`` where no row
    stopped; a stopped row's padding after its end-of-turn excluded)."""
    mask = generated_mask(batch, prompt, new_tokens, attention.device if attention is not None else "cpu")
    if attention is None:
        return mask
    return mask & torch.cat([attention[:, 1:], torch.zeros_like(attention[:, :1])], dim=1).flatten()
