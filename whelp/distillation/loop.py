"""The distillation loop: ``setup`` -> ``train`` (one optimizer step at a time, each a sum of ``loss_step``s) -> done.

Per optimizer step (torchtune's KD recipe is the model): for each micro-batch, frozen teachers give final hidden
states under ``no_grad`` (or a cache gives sparse targets), the student gives its final hidden states, and the fused
chunked loss of ``whelp.distillation.losses`` returns a SUM over tokens; that sum is divided by the number of loss tokens
in the whole optimizer step (all micro-batches, all ranks), which makes gradient accumulation and data parallelism
exact. Then clipping, AdamW, warmup + cosine. Minitron (Muralidharan et al. 2024) and Llama 3.2 distil pruned
students exactly so.

``distill(student, teachers, data, spec)`` runs it in memory and returns the student; ``whelp.distillation.api`` wraps
the same loop with checkpoints, resume, signals and logs for ``whelp distill``, on one process or FSDP2 under
torchrun. Everything a step reads is a function of ``(seed, step)``, so resuming needs only the step.

One module though near 400 lines: setup, loss_step and train share the Training state and one invariant (a step's
loss is divided by the tokens of the whole step), which a split would scatter.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import get_cosine_schedule_with_warmup

from whelp.data import TensorBlocks
from whelp.distillation import metrics as metrics_log
from whelp.distillation import onpolicy, parallel, schedule
from whelp.distillation.head import check_logits
from whelp.distillation.losses import LiveTarget, backbone, model_transform
from whelp.errors import WhelpError
from whelp.evals.perplexity import perplexity
from whelp.output import Progress
from whelp.specs import DistillSpec, LossSpec, Mixture, OptimSpec, check_on_policy, check_teacher_weights

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA devices that support it, else fp32 (a bf16 training step measured 1.9x slower
    than fp32 on this project's 2-core CPU: bf16 backward kernels are slow there)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def live_target(teacher, ids: torch.Tensor, attention: torch.Tensor | None = None):
    """A live teacher's targets for ``ids`` [B, L] (left-padded where ``attention`` [B, L] is given): its final
    hidden states [B * L, H] (final norm included, as its backbone returns them), its lm_head weight and its
    family's logit transform."""
    return LiveTarget(
        hidden=backbone(teacher)(input_ids=ids, **onpolicy.positions(attention)).last_hidden_state.flatten(0, 1),
        weight=teacher.get_output_embeddings().weight,
        transform=model_transform(teacher),
    )


@torch.no_grad()
def check_head(lm, ids: torch.Tensor, what: str) -> None:
    """``head.check_logits`` for the fused loss on ``ids`` [1, L], which also refuses an lm_head bias (the loss
    multiplies by the head's weight alone): a family whose logits are made otherwise is refused in one line before
    training."""
    head = lm.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise WhelpError(
            f"the {what} {type(lm).__name__} ({lm.config.model_type}) has an lm_head bias, which whelp's fused "
            "loss does not apply; whelp distils causal LMs whose logits are lm_head(hidden states) without a bias"
        )
    check_logits(lm, ids, what, "distilled")


@dataclass
class Training:
    """Everything one run holds (plain state, not a trainer class): the models, data, optimizer and counters."""

    model: parallel.KDStudent  # FSDP2-sharded under torchrun
    teachers: list  # frozen live teacher models
    caches: list  # opened teacher-logit caches (whelp.distillation.cache.TeacherCache)
    weights: tuple[float, ...]  # per-teacher weights, live teachers first
    names: list[str]
    blocks: object  # whelp.data.Blocks / TensorBlocks: rows [n, seq_len]
    spec: DistillSpec
    loss: LossSpec
    on_loss: LossSpec  # on-policy micro-batches (whelp.distillation.onpolicy)
    world: parallel.World
    dtype: torch.dtype
    optimizer: torch.optim.Optimizer
    scheduler: object
    steps: int
    eval_ids: torch.Tensor | None = None
    tokens_seen: int = 0
    log: list = field(default_factory=list)  # one row per step

    @property
    def per_step(self) -> int:
        return self.spec.batch_size * self.spec.grad_accum * self.world.size

    def autocast(self):
        return torch.autocast(self.world.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)


def vocab_spec(spec: LossSpec, widths: list[int], tokenizer_size: int | None) -> LossSpec:
    """Student and teacher lm_heads padded to different widths (e.g. 49152 vs 49216 rows) share the tokenizer's
    ids: softmax over those alone (ids beyond it masked). Vocabularies that really differ are refused by the loss
    (and by ``whelp.distillation.api`` before any model loads, from the tokenizers)."""
    if len(set(widths)) == 1:
        return spec
    if tokenizer_size is None:
        raise WhelpError(
            f"the student and teachers have lm_heads of {sorted(set(widths))} rows: if they share one "
            "tokenizer padded to other widths, pass it (tokenizer=) so only its ids are compared; models "
            "with different tokenizers cannot be distilled token by token"
        )
    return replace(spec, vocab_size=tokenizer_size)


def optimiser(model, spec: OptimSpec, steps: int):
    """AdamW over ``model``'s parameters and its schedule: ``spec.warmup`` linear warmup steps, then cosine decay to
    0 at ``steps`` (a warmup not below ``steps`` is refused)."""

    spec.check_steps(steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, spec.warmup, steps)


def setup(
    lm,
    teachers: list,
    caches: list,
    weights,
    names,
    blocks,
    spec: DistillSpec,
    world,
    eval_ids=None,
    tokenizer_size: int | None = None,
) -> Training:
    """Wrap (and under torchrun shard) the student, build AdamW and the warmup + cosine schedule."""
    if blocks.seq_len != spec.seq_len:
        raise WhelpError(f"the data has blocks of {blocks.seq_len} tokens, the spec seq_len={spec.seq_len}")
    widths = (
        [lm.get_output_embeddings().weight.shape[0]]
        + [t.get_output_embeddings().weight.shape[0] for t in teachers]
        + [c.manifest["vocab_size"] for c in caches]
    )
    loss = vocab_spec(spec.kd, widths, tokenizer_size)
    check_teacher_weights(list(weights), spec)
    check_on_policy(list(weights)[: len(teachers)], spec)
    probe = blocks[torch.arange(1)][:, :16].to(world.device)
    for model, what in [(lm, "student")] + [(m, "teacher") for m in teachers]:
        check_head(model, probe, what)
    if spec.compute.grad_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = parallel.shard_student(parallel.KDStudent(lm).train(), world)
    per_step = spec.batch_size * spec.grad_accum * world.size
    steps = spec.steps or math.ceil(spec.max_tokens / (per_step * spec.seq_len))
    optimizer, scheduler = optimiser(model, spec.optim, steps)
    on_loss = spec.gkd.loss_spec(replace(loss, vocab_size=loss.vocab_size or widths[0]))
    return Training(
        model,
        teachers,
        caches,
        tuple(weights),
        list(names),
        blocks,
        spec,
        loss,
        on_loss,
        world,
        compute_dtype(spec.compute.dtype, world.device),
        optimizer,
        scheduler,
        steps,
        eval_ids,
    )


def next_token_labels(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """LongTensor [B * L]: position t's label is token t + 1, -100 (no loss) at each row's last position and, with a
    loss ``mask`` [B, L] (chat data), where token t + 1 is not a target (system, user and template tokens)."""
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    if mask is not None:
        labels = labels.masked_fill(~torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1), -100)
    return labels.flatten()


def loss_step(
    t: Training, micro: torch.Tensor, weights: tuple[float, ...], rng: torch.Generator | None, tokens: int
) -> torch.Tensor:
    """Forward + backward of one micro-batch of rows ``micro`` [batch_size], on-policy when given its sampling
    ``rng``, in a step of ``tokens`` loss tokens over all ranks; returns the float64 SUMS [loss, per-teacher
    divergence..., CE, per-live-teacher on-policy divergence...] (the gradient is already scaled by ``tokens``).
    On chat data (a loss mask) KD and CE run only where the next token is a target."""
    ids = t.blocks[micro].to(t.world.device)
    data_mask = t.blocks.mask(micro)
    data_mask = None if data_mask is None else data_mask.to(t.world.device)
    on, attention = rng is not None, None
    if on:  # the student continues each block's prompt; the teachers score its samples
        gen = t.spec.gkd.gen_tokens
        prompts = onpolicy.chat_prompts(ids, data_mask, t.spec.gkd.prompt_len(t.spec.seq_len))
        stop = onpolicy.stop_ids(t.model.lm) if data_mask is not None else ()
        prompts, attention = onpolicy.left_pad(prompts, stop[0] if stop else 0)
        with t.autocast():
            ids, attention = t.model(prompts, rollout=(gen, t.on_loss.vocab_size, rng, stop), attention=attention)
        kd = dict(
            labels=None,
            mask=onpolicy.sampled_mask(attention, len(ids), prompts.shape[1], gen).to(ids.device),
            spec=t.on_loss,
            weights=weights[: len(t.teachers)],
        )
    else:
        labels = next_token_labels(ids, data_mask)
        kd = dict(labels=labels, mask=labels != -100, spec=t.loss, weights=weights)
    with torch.no_grad(), t.autocast():
        live = [live_target(m, ids, attention) for m in t.teachers]
    kd["targets"] = live if on else live + [cache.targets(micro) for cache in t.caches]
    with t.autocast():
        loss, per_teacher, ce = t.model(ids, kd=kd, attention=attention)
    (loss * (t.world.size / max(tokens, 1))).backward()  # FSDP2 averages gradients over ranks: undo it
    off, on_live = torch.zeros(len(t.weights), dtype=torch.float64), torch.zeros(len(t.teachers), dtype=torch.float64)
    (on_live if on else off)[: len(per_teacher)] = per_teacher
    return torch.cat([loss.detach().double().cpu().view(1), off, ce.view(1), on_live])


def step_tokens(t: Training, step: int, idx: torch.Tensor) -> tuple[int, int]:
    """(off-policy, on-policy) loss tokens of optimizer ``step`` over all ranks, ``idx`` [grad_accum, ranks,
    batch_size] its rows (``onpolicy.step_tokens``); on chat data the off-policy count is the target tokens of the
    off-policy micro-batches, read from the mask on every rank alike (1 bit a token, no communication)."""
    off, on = onpolicy.step_tokens(step, t.spec, t.world.size)
    if not t.blocks.has_mask:
        return off, on
    slots = [a for a in range(t.spec.grad_accum) if not onpolicy.on_policy(step, a, t.spec)]
    counted = sum(int(t.blocks.mask(idx[a].flatten())[:, 1:].sum()) for a in slots)
    return counted, on


def optimizer_step(t: Training, step: int, last_good: Path | None) -> dict:
    """One optimizer step (0-based ``step``): every micro-batch of this rank, clip, a finiteness check, AdamW.
    Returns the step's log row (means over loss tokens of all ranks)."""
    t_step = time.perf_counter()
    weights = schedule.teacher_weights(t.spec.schedule, t.weights, step)
    idx = schedule.step_blocks(step, len(t.blocks), t.per_step, t.spec.seed)
    idx = idx.view(t.spec.grad_accum, t.world.size, t.spec.batch_size)
    off_tokens, on_tokens = step_tokens(t, step, idx)
    idx = idx[:, t.world.rank]
    sums = sum(
        loss_step(
            t,
            micro,
            weights,
            onpolicy.generator(step, a, t.world.rank, t.spec, t.world.size, t.world.device),
            off_tokens + on_tokens,
        )
        for a, micro in enumerate(idx)
    )
    grad_norm = torch.nn.utils.clip_grad_norm_(t.model.parameters(), t.spec.optim.max_grad_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    sums = parallel.all_sum(t.world, sums)
    if not (torch.isfinite(sums).all() and torch.isfinite(grad_norm)):
        where = (
            f"re-run with a lower --lr to resume from the last good checkpoint, {last_good}"
            if last_good
            else "lower the learning rate and start again"
        )
        raise WhelpError(
            f"non-finite loss ({sums[0].item()}) or gradient norm at step {step + 1}; stopped without "
            f"updating; {where} (or check the data)"
        )
    t.optimizer.step()
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    t.tokens_seen += t.per_step * t.spec.seq_len
    return {
        "step": step + 1,
        "loss": sums[0].item() / max(off_tokens + on_tokens, 1),
        **_means(t, sums, off_tokens, on_tokens),
        "teacher_weights": list(weights),
        "lr": t.scheduler.get_last_lr()[0],
        "grad_norm": float(grad_norm),
        "tokens": t.tokens_seen,
        "step_s": time.perf_counter() - t_step,
    }


def _means(t: Training, sums: torch.Tensor, off_tokens: int, on_tokens: int) -> dict:
    """The log row's means: CE and each teacher's divergence over the data's tokens (``kl/NAME``, the chosen
    loss) and, in steps with on-policy micro-batches, each live teacher's over the sampled ones (``on/NAME``)."""
    n = len(t.weights)
    row = {}
    if off_tokens:
        row["ce"] = sums[1 + n].item() / off_tokens
        row.update({f"kl/{name}": v.item() / off_tokens for name, v in zip(t.names, sums[1 : 1 + n])})
    if on_tokens:
        row["on_policy_tokens"] = on_tokens
        row.update({f"on/{name}": v.item() / on_tokens for name, v in zip(t.names, sums[2 + n :])})
    return row


def held_out(t: Training) -> dict | None:
    """Perplexity of the student on the held-out tokens (None without them)."""
    if t.eval_ids is None:
        return None

    with t.autocast():
        result = perplexity(t.model, t.eval_ids, t.spec.seq_len, batch_size=t.spec.batch_size)
    t.model.train()
    return {"eval_ppl": result.ppl, "eval_nll": result.nll}


def _stop_flag(world, stop: dict) -> bool:
    """True on every rank if any rank got SIGINT/SIGTERM (ranks must stop at the same step)."""
    return bool(parallel.all_sum(world, torch.tensor([float(stop["requested"])], dtype=torch.float64)).item() > 0)


def train(t: Training, start: int = 0, save=None, on_step=None, last_good: Path | None = None) -> dict:
    """Steps ``start`` .. ``t.steps``; returns the last step's row.

    ``save(step) -> Path`` (checkpointing runs) is called every ``save_every`` steps, at the end and when SIGINT /
    SIGTERM asked to stop (the signal is honoured at the end of the current step, on every rank); without ``save``
    a Ctrl-C raises at once. ``on_step(row)`` sees every row (logs, progress).
    """
    stop = {"requested": False}
    handlers = {sig: signal.signal(sig, lambda *_: stop.update(requested=True)) for sig in STOP_SIGNALS} if save else {}
    t0, last = time.perf_counter(), {}
    try:
        for step in range(start, t.steps):
            last = optimizer_step(t, step, last_good)
            last["tokens_per_s"] = (step + 1 - start) * t.per_step * t.spec.seq_len / (time.perf_counter() - t0)
            if t.spec.monitor.eval_every and (step + 1) % t.spec.monitor.eval_every == 0 and step + 1 < t.steps:
                last.update(held_out(t) or {})
            interrupted = save is not None and _stop_flag(t.world, stop)
            if save is not None and (
                (t.spec.save.save_every and (step + 1) % t.spec.save.save_every == 0)
                or interrupted
                or step + 1 == t.steps
            ):
                last_good = save(step + 1)
            t.log.append(last)
            if on_step is not None:
                on_step(last)
            if interrupted:
                raise WhelpError(
                    f"interrupted at step {step + 1}/{t.steps}; checkpoint saved to {last_good}. "
                    "Re-run the same command to resume"
                )
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return last


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
    t = setup(
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
    )
    start = held_out(t)
    with Progress("distill", t.steps, enabled=progress) as bar:
        train(t, on_step=lambda row: metrics_log.show(bar, row))
    student.whelp_distill = {
        "steps": t.steps,
        "tokens": t.tokens_seen,
        "log": t.log,
        "eval_start": start,
        "eval_end": held_out(t),
    }
    return student.eval()
