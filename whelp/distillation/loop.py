"""The distillation loop: ``setup`` -> ``train`` (one optimizer step at a time, each a sum of ``loss_step``s) -> done.

Per optimizer step (torchtune's KD recipe is the model): for each micro-batch, frozen teachers give final hidden
states under ``no_grad`` (or a cache gives sparse targets), the student gives its final hidden states, and the fused
chunked loss of ``whelp.distillation.losses`` returns a SUM over tokens; that sum is divided by the number of loss tokens
in the whole optimizer step (all micro-batches, all ranks), which makes gradient accumulation and data parallelism
exact. Then clipping, the divergence guard (``whelp.distillation.guard``: it stops the run before the update on
non-finite numbers, a loss spike, a vanished gradient or exploding weights), AdamW, warmup + cosine. Minitron
(Muralidharan et al. 2024) and Llama 3.2 distil pruned students exactly so.

``whelp.distillation.inprocess.distill`` runs it in memory; ``whelp.distillation.api`` wraps it with checkpoints,
resume, signals and logs for ``whelp distill``, on one process or FSDP2 under torchrun. Everything a step reads is a
function of ``(seed, step)``, so resuming needs only the step; with ``--mixture dynamic`` also of the mixture's
weights and streams, which checkpoints keep (``whelp.distillation.dynamic``). Hidden-state losses and the block-local
stage (``whelp.distillation.hidden``, ``whelp.distillation.local``) enter through ``loss_step`` and ``local_step``.

One module though over 400 lines: setup, the micro-batch steps and train share the Training state and one invariant
(a step's loss is divided by the tokens of the whole step), which a split would scatter.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import get_cosine_schedule_with_warmup

from whelp.distillation import dynamic, guard, local, metrics, onpolicy, parallel, schedule
from whelp.distillation import hidden as hidden_states
from whelp.distillation.head import check_logits
from whelp.distillation.losses import LiveTarget, backbone, kd_loss, model_transform
from whelp.errors import Interrupted, WhelpError
from whelp.evals.perplexity import perplexity
from whelp.specs import (
    DistillSpec,
    LossSpec,
    OptimSpec,
    check_local,
    check_mixture,
    check_on_policy,
    check_teacher_weights,
)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA devices that support it, else fp32 (a bf16 training step measured 1.9x slower
    than fp32 on this project's 2-core CPU: bf16 backward kernels are slow there)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def live_target(teacher, ids: torch.Tensor, attention: torch.Tensor | None = None, rows: torch.Tensor | None = None):
    """A live teacher's targets for ``ids`` [B, L] (left-padded where ``attention`` [B, L] is given): its final
    hidden states [B * L, H] (final norm included, as its backbone returns them), its lm_head weight and its
    family's logit transform. ``rows`` [B] bool: the rows whose targets the loss reads; the teacher runs on those
    alone (rows are independent under a causal mask) and the others' states are zeros the loss never reads: under
    ``chat_loss`` "ce" the chat rows, which train by CE alone, cost no teacher forward (about a quarter of a step's
    FLOPs on those rows: the teacher's backbone against the student's forward and backward)."""
    weight = teacher.get_output_embeddings().weight
    if rows is None or bool(rows.all()):
        hidden = backbone(teacher)(input_ids=ids, **onpolicy.positions(attention)).last_hidden_state.flatten(0, 1)
    else:
        hidden = torch.zeros(*ids.shape, weight.shape[1], dtype=weight.dtype, device=ids.device)
        if bool(rows.any()):
            positions = onpolicy.positions(None if attention is None else attention[rows])
            hidden[rows] = backbone(teacher)(input_ids=ids[rows], **positions).last_hidden_state.to(weight.dtype)
        hidden = hidden.flatten(0, 1)
    return LiveTarget(hidden=hidden, weight=weight, transform=model_transform(teacher))


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
    hidden: hidden_states.Plan | None = None  # with spec.hidden active: the layer map and the kept channels
    layer_kwargs: dict = field(default_factory=dict)  # --local: the student layers' kwargs per batch shape
    mixing: dynamic.Mixing | None = None  # --mixture dynamic: the sources' weights, reference losses and streams
    tokens_seen: int = 0
    log: list = field(default_factory=list)  # one row per step
    seen: guard.History = field(default_factory=guard.History)  # what the divergence guard has seen of the run

    @property
    def per_step(self) -> int:
        return self.spec.batch_size * self.spec.grad_accum * self.world.size

    @property
    def uniform_loss(self) -> float:
        """A uniform student's loss, the divergence guard's band: over the student's vocabulary, which ``on_loss``
        always names (the tokenizer's where the lm_head is padded)."""
        return guard.uniform_loss(self.on_loss.vocab_size, self.loss.temperature, self.loss.t2_scale)

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
    """AdamW over ``model``'s trained parameters and its schedule: ``spec.warmup`` linear warmup steps, then cosine decay to
    0 at ``steps`` (a warmup not below ``steps`` is refused)."""

    spec.check_steps(steps)
    proj = getattr(model, "hidden_proj", None)  # starts as the pruning's exact slice: no decay towards zero
    trained = [p for p in model.parameters() if p.requires_grad and p is not proj]
    groups = [{"params": trained}] + ([{"params": [proj], "weight_decay": 0.0}] if proj is not None else [])
    optimizer = torch.optim.AdamW(groups, lr=spec.lr, weight_decay=spec.weight_decay)
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
    kept: dict | None = None,
) -> Training:
    """Wrap (and under torchrun shard) the student, build AdamW and the warmup + cosine schedule. ``kept``: the
    pruning's record of the student (prune_report.json ``kept``), which maps its layers to the teacher's for
    hidden-state losses."""
    if blocks.seq_len != spec.seq_len:
        raise WhelpError(f"the data has blocks of {blocks.seq_len} tokens, the spec seq_len={spec.seq_len}")
    check_mixture(len(teachers), len(caches), len(getattr(blocks, "sources", [blocks])), spec)
    if spec.mix.kind == "dynamic":  # the rows come from a view holding out each source's dev blocks
        blocks = dynamic.Reweighted(blocks, spec.mix.dev_blocks, spec.seed)
    widths = (
        [lm.get_output_embeddings().weight.shape[0]]
        + [t.get_output_embeddings().weight.shape[0] for t in teachers]
        + [c.manifest["vocab_size"] for c in caches]
    )
    loss = vocab_spec(spec.kd, widths, tokenizer_size)
    check_teacher_weights(list(weights), spec)
    check_on_policy(list(weights)[: len(teachers)], spec)
    check_local(len(teachers), len(caches), spec)
    if spec.kd.chat_loss == "ce" and not blocks.has_mask:
        raise WhelpError(
            "chat_loss=ce trains the answers of chat data by CE alone, and no source of the data has a loss mask "
            "(written by whelp generate --chat or whelp tokenize --chat); add chat data or drop --chat-loss"
        )
    unusual = guard.unusual_lr(spec.optim.lr)
    if unusual and world.main:
        metrics.note(unusual)
    probe = blocks[torch.arange(1)][:, :16].to(world.device)
    for model, what in [(lm, "student")] + [(m, "teacher") for m in teachers]:
        check_head(model, probe, what)
    if spec.compute.grad_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    matched = hidden_states.plan(lm.config, teachers, kept, spec.hidden) if spec.hidden.active else None
    if spec.hidden.local:  # blocks alone learn (no logits): embeddings, final norm and lm_head stay as they are
        if world.size > 1:
            raise WhelpError("--local runs on one process for now; run the block-local stage without torchrun")
        lm.requires_grad_(False)
        parallel.decoder_layers(lm).requires_grad_(True)
    proj = matched.proj if matched is not None and spec.hidden.weight else None
    model = parallel.shard_student(parallel.KDStudent(lm, proj).train(), world)
    per_step = spec.batch_size * spec.grad_accum * world.size
    steps = spec.steps or math.ceil(spec.max_tokens / (per_step * spec.seq_len))
    optimizer, scheduler = optimiser(model, spec.optim, steps)
    on_loss = spec.gkd.loss_spec(replace(loss, vocab_size=loss.vocab_size or widths[0]))
    t = Training(
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
        matched,
    )
    if spec.mix.kind == "dynamic":  # the first live teacher's dev losses, once: the reference of every re-weighting
        t.mixing = dynamic.Mixing(blocks, spec.mix.every, dev_ce(t, teachers[0]))
    return t


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
    divergence..., CE, per-live-teacher on-policy divergence..., hidden-state loss] (the gradient is already scaled
    by ``tokens``). On chat data (a loss mask) KD and CE run only where the next token is a target; the hidden-state
    term runs on the data's micro-batches (not on the student's samples), at the same tokens."""
    ids = t.blocks[micro].to(t.world.device)
    data_mask = t.blocks.mask(micro)
    data_mask = None if data_mask is None else data_mask.to(t.world.device)
    if t.spec.hidden.local:
        return local_step(t, ids, data_mask, tokens)
    on, attention, rows = rng is not None, None, None
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
        if t.loss.chat_loss == "ce":  # chat rows: CE alone on the teacher's answers (sequence-level KD)
            chat = t.blocks.chat_rows(micro).to(ids.device)
            kd["ce_only"] = chat[:, None].expand_as(ids).flatten()
            rows = ~chat if t.spec.teacher_skips_chat_rows else None  # nothing reads the teacher on chat rows
    matched = t.hidden is not None and t.spec.hidden.weight > 0 and not on
    layers = parallel.decoder_layers(t.teachers[0], "teacher") if matched else []
    with torch.no_grad(), t.autocast(), hidden_states.capture(layers, t.hidden.layer_map if matched else []) as found:
        live = [live_target(m, ids, attention, rows) for m in t.teachers]
    kd["targets"] = live if on else live + [cache.targets(micro) for cache in t.caches]
    if matched:
        states = [found[j].flatten(0, 1) for j in t.hidden.layer_map]
        kd["hidden"] = (states, t.spec.hidden.loss, t.spec.hidden.weight)
    with t.autocast():
        loss, per_teacher, ce, matched_sum = t.model(ids, kd=kd, attention=attention)
    (loss * (t.world.size / max(tokens, 1))).backward()  # FSDP2 averages gradients over ranks: undo it
    off, on_live = torch.zeros(len(t.weights), dtype=torch.float64), torch.zeros(len(t.teachers), dtype=torch.float64)
    (on_live if on else off)[: len(per_teacher)] = per_teacher
    return torch.cat([loss.detach().double().cpu().view(1), off, ce.view(1), on_live, matched_sum.view(1)])


def local_step(t: Training, ids: torch.Tensor, data_mask: torch.Tensor | None, tokens: int) -> torch.Tensor:
    """``--local``: the teacher's span boundaries on ``ids`` [B, L], then forward + backward of every student block
    on its span (whelp.distillation.local) at the positions the KD would count; the SUMS as ``loss_step``'s, the
    loss in the first and last entries."""
    mask = next_token_labels(ids, data_mask) != -100
    teacher, lm = t.teachers[0], t.model.lm
    layers = parallel.decoder_layers(lm)
    with t.autocast():
        states = local.teacher_states(backbone(teacher), parallel.decoder_layers(teacher), ids, t.hidden.layer_map)
        shape = tuple(ids.shape)
        if shape not in t.layer_kwargs:
            t.layer_kwargs[shape] = local.layer_kwargs(backbone(lm), layers, ids)
        channels = None if t.hidden.channels is None else t.hidden.channels.to(ids.device)
        loss = local.local_backward(
            layers,
            t.layer_kwargs[shape],
            states,
            t.hidden.layer_map,
            t.spec.hidden.loss,
            1 / max(tokens, 1),
            mask,
            channels,
        )
    zeros = torch.zeros(len(t.weights) + 1 + len(t.teachers), dtype=torch.float64)
    return torch.cat([loss.view(1), zeros, loss.view(1)])


def step_tokens(t: Training, step: int, idx: torch.Tensor) -> tuple[int, int, int]:
    """(off-policy, on-policy, divergence) loss tokens of optimizer ``step`` over all ranks, ``idx`` [grad_accum,
    ranks, batch_size] its rows (``onpolicy.step_tokens``); on chat data the off-policy count is the target tokens of
    the off-policy micro-batches, read from the mask on every rank alike (1 bit a token, no communication). The
    divergence count is the off-policy tokens the KD terms sum over: all of them, but under ``chat_loss`` "ce" only
    the text rows' (the chat rows train by CE alone), so the logged divergence is a mean over its own tokens."""
    off, on = onpolicy.step_tokens(step, t.spec, t.world.size)
    if not t.blocks.has_mask:
        return off, on, off
    rows = [idx[a].flatten() for a in range(t.spec.grad_accum) if not onpolicy.on_policy(step, a, t.spec)]
    targets = [(r, t.blocks.mask(r)[:, 1:]) for r in rows]
    counted = sum(int(m.sum()) for _, m in targets)
    if t.loss.chat_loss != "ce":
        return counted, on, counted
    return counted, on, sum(int((m & ~t.blocks.chat_rows(r)[:, None]).sum()) for r, m in targets)


@torch.no_grad()
def dev_ce(t: Training, model) -> torch.Tensor:
    """Mean next-token CE (nats per target token) of ``model``, the student ``t.model`` or a live teacher, on each
    source's dev blocks (``--mixture dynamic``): float64 [n_sources]. Every rank evaluates every dev block (under
    FSDP2 each student forward is collective, so all ranks make the same calls), and the ranks' results are
    averaged, so that float noise cannot give ranks different weights, hence different rows."""
    spec = replace(t.loss, ce_weight=1.0)

    def score(rows: torch.Tensor) -> tuple[float, int]:
        ids, mask = t.blocks[rows].to(t.world.device), t.blocks.mask(rows)
        labels = next_token_labels(ids, None if mask is None else mask.to(t.world.device))
        kd = dict(labels=labels, mask=labels != -100, spec=spec, weights=(), targets=[])
        with t.autocast():
            if model is t.model:
                ce = t.model(ids, kd=kd)[2]
            else:
                target = live_target(model, ids)
                with torch.autocast(ids.device.type, enabled=False):  # as KDStudent runs the student's
                    weight = target.weight.to(target.hidden.dtype)
                    ce = kd_loss(target.hidden, weight, transform=target.transform, **kd).ce
        return float(ce), int(kd["mask"].sum())

    t.model.eval()
    losses = dynamic.dev_losses(t.blocks, score, t.spec.batch_size)
    t.model.train()
    return parallel.all_sum(t.world, losses) / t.world.size


@torch.no_grad()
def param_norm(model) -> float:
    """The global L2 norm of ``model``'s trained parameters, every shard's (FSDP2: a DTensor, made whole as the
    gradient norm is): one pass over the weights, cheap beside a step's forward and backward."""
    norm = torch.nn.utils.get_total_norm([p for p in model.parameters() if p.requires_grad])
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def check_step(
    t: Training, step: int, sums: torch.Tensor, grad_norm: torch.Tensor, kind: int, tokens: int, last_good
) -> float:
    """The divergence guard's verdict, before the update of 0-based ``step``, on the step's mean loss over its
    ``tokens`` (``sums`` all-reduced), of ``kind`` (its on-policy tokens), its whole gradient norm and the weights'
    norm: every rank decides alike. Raises ``guard.Diverged``, naming the checkpoint ``last_good`` to resume from;
    returns the loss it judged, the one the step's row logs."""
    loss = sums[0].item() / max(tokens, 1)
    norm = param_norm(t.model)
    seen, verdict = guard.judge(t.seen, step, kind, loss, float(grad_norm), norm, t.uniform_loss)
    if verdict is not None:
        what = f"training diverged at step {step + 1}: {verdict.what}"
        raise guard.Diverged(what, step, verdict.bad_from, last_good, t.spec.optim.lr)
    t.seen = seen
    return loss


def check_last_update(t: Training, step: int, last_good) -> None:
    """The guard on the weights the last update (of 0-based ``step``) wrote, before they are saved or shipped: no
    later step measures them, so a run ruined by its last update would otherwise be written out."""
    verdict = guard.last_update(t.seen, step + 1, param_norm(t.model))
    if verdict is not None:
        what = f"training diverged at its last update (step {step + 1}): {verdict.what}"
        raise guard.Diverged(what, step, verdict.bad_from, last_good, t.spec.optim.lr)


def optimizer_step(t: Training, step: int, last_good: Path | None) -> dict:
    """One optimizer step (0-based ``step``): every micro-batch of this rank, clip, the checks of ``check_step``,
    AdamW. Returns the step's log row (means over loss tokens of all ranks)."""
    t_step = time.perf_counter()
    weights = schedule.teacher_weights(t.spec.schedule, t.weights, step)
    if t.mixing is None:
        idx, mixed = schedule.step_blocks(step, len(t.blocks), t.per_step, t.spec.seed), {}
    else:
        idx, mixed = t.mixing.step(step, t.per_step, lambda: dev_ce(t, t.model))
    idx = idx.view(t.spec.grad_accum, t.world.size, t.spec.batch_size)
    off_tokens, on_tokens, divergence_tokens = step_tokens(t, step, idx)
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
    loss = check_step(t, step, sums, grad_norm, on_tokens, off_tokens + on_tokens, last_good)
    t.optimizer.step()
    t.scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    t.tokens_seen += t.per_step * t.spec.seq_len
    return {
        "step": step + 1,
        "loss": loss,
        **_means(t, sums, off_tokens, on_tokens, divergence_tokens),
        "teacher_weights": list(weights),
        **mixed,
        "lr": t.scheduler.get_last_lr()[0],
        "grad_norm": float(grad_norm),
        "tokens": t.tokens_seen,
        "step_s": time.perf_counter() - t_step,
    }


def _means(t: Training, sums: torch.Tensor, off_tokens: int, on_tokens: int, divergence_tokens: int) -> dict:
    """The log row's means: CE and each teacher's divergence over the data's tokens (``kl/NAME``, the chosen
    loss) and, in steps with on-policy micro-batches, each live teacher's over the sampled ones (``on/NAME``); the
    hidden-state loss (``hidden``) over the data's tokens, alone in a block-local run."""
    n = len(t.weights)
    if t.spec.hidden.local:
        return {"hidden": sums[-1].item() / max(off_tokens, 1)}
    row = {}
    if off_tokens:
        row["ce"] = sums[1 + n].item() / off_tokens
        row.update({f"kl/{name}": v.item() / max(divergence_tokens, 1) for name, v in zip(t.names, sums[1 : 1 + n])})
    if on_tokens:
        row["on_policy_tokens"] = on_tokens
        row.update({f"on/{name}": v.item() / on_tokens for name, v in zip(t.names, sums[2 + n : -1])})
    if t.spec.hidden.active and off_tokens:
        row["hidden"] = sums[-1].item() / off_tokens
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
    a Ctrl-C raises at once. ``on_step(row)`` sees every row (logs, progress). A step the divergence guard condemns
    raises ``guard.Diverged`` before its update, its save and its row.
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
            if step + 1 == t.steps:
                check_last_update(t, step, last_good)
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
                raise Interrupted(
                    f"interrupted at step {step + 1}/{t.steps}; checkpoint saved to {last_good}. "
                    "Re-run the same command to resume"
                )
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return last
