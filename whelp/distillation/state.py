"""A distillation run's state and its setup: ``setup`` checks the models and data against the spec, wraps (under
torchrun shards) the student, and builds AdamW and its schedule into one ``Training``, the plain state that
``whelp.distillation.loop`` steps. Also what both the setup and the steps read: the teachers' live targets, the
next-token labels of a block (masked on chat data) and the dev-set CE that ``--mixture dynamic`` re-weights by.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from transformers import get_cosine_schedule_with_warmup

from whelp.distillation import dynamic, guard, metrics, onpolicy, parallel
from whelp.distillation import hidden as hidden_states
from whelp.distillation.head import check_logits
from whelp.distillation.losses import LiveTarget, backbone, kd_loss, model_transform
from whelp.errors import WhelpError
from whelp.specs import (
    DistillSpec,
    LossSpec,
    OptimSpec,
    check_local,
    check_mixture,
    check_on_policy,
    check_teacher_weights,
)


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
