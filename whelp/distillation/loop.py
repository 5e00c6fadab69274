"""The distillation loop: ``state.setup`` -> ``train`` (one optimizer step at a time, each a sum of ``loss_step``s).

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
The run's state and its setup live in ``whelp.distillation.state``.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import torch

from whelp.distillation import guard, local, onpolicy, parallel, schedule
from whelp.distillation import hidden as hidden_states
from whelp.distillation.losses import backbone
from whelp.distillation.state import Training, dev_ce, live_target, next_token_labels
from whelp.errors import Interrupted
from whelp.evals.perplexity import perplexity

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
