"""The distillation loop: one plain PyTorch function, resumable, on one process or FSDP2 under torchrun.

Per optimizer step (torchtune's KD recipe is the model): for each micro-batch, frozen teachers give
final hidden states under ``no_grad`` (or a cache gives sparse targets), the student gives its final
hidden states, and the fused chunked loss of ``whelp.distill.losses`` returns a SUM over tokens; that
sum is divided by the number of loss tokens in the whole optimizer step (all micro-batches, all
ranks), which makes gradient accumulation and data parallelism exact. Then clipping, AdamW, warmup
+ cosine. Minitron (Muralidharan et al. 2024) and Llama 3.2 distil pruned students exactly so.

Run state lives beside the output in ``OUT.distill/`` (run.json, metrics.jsonl, checkpoints/,
tensorboard/); the final student is written atomically to ``OUT`` as a vanilla HF checkpoint.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from whelp import store
from whelp.distill import checkpoint, parallel, schedule
from whelp.distill import metrics as metrics_log
from whelp.distill import run as run_state
from whelp.errors import WhelpError

DTYPES = ("auto", "float32", "bfloat16")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class DistillSpec:
    """Hyper-parameters of a distillation run. Budget: exactly one of ``steps`` / ``max_tokens``."""

    data: str = "pydoc:train"
    steps: int | None = None
    max_tokens: int | None = None  # training tokens; also bounds how much of ``data`` is read
    batch_size: int = 8  # sequences per micro-batch on each process
    grad_accum: int = 1
    seq_len: int = 512
    lr: float = 1e-4
    warmup: int = 0  # linear warmup steps, then cosine decay to 0 (transformers' schedule)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    loss: str = "forward_kl"
    temperature: float = 1.0
    ce_weight: float = 0.0
    chunk_size: int = 1024
    schedule: str = "constant"  # teacher weights over steps: constant | linear:N | cosine:N
    eval_every: int = 0  # steps between held-out perplexities (0: at the start and end only)
    eval_data: str = "pydoc:eval"
    eval_tokens: int = 16384
    seed: int = 0
    dtype: str = "auto"  # autocast compute dtype; master weights stay fp32
    grad_checkpointing: bool = False
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_last: int = 2
    tensorboard: bool = False

    def __post_init__(self):
        _check_spec(self)


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA devices that support it, else fp32 (a bf16 training step measured 1.9x slower
    than fp32 on this project's 2-core CPU: bf16 backward kernels are slow there)."""
    if name not in DTYPES:
        raise WhelpError(f"unknown --dtype '{name}'; choose one of {', '.join(DTYPES)}")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def _check_spec(spec: DistillSpec) -> None:
    """Values wrong on their own, caught when the spec is made (CLI flags or a recipe's distill step)."""
    from whelp.distill.losses import LossSpec

    if (spec.steps is None) == (spec.max_tokens is None):
        raise WhelpError("give exactly one training budget: --steps N or --max-tokens N (recipe: steps or max_tokens)")
    for name in ("steps", "max_tokens", "batch_size", "grad_accum", "seq_len", "keep_last", "eval_tokens"):
        if getattr(spec, name) is not None and getattr(spec, name) < 1:
            raise WhelpError(f"{name} must be positive, got {getattr(spec, name)}")
    for name in ("lr", "warmup", "weight_decay", "max_grad_norm", "eval_every", "save_every"):
        if getattr(spec, name) < 0:
            raise WhelpError(f"{name} must be >= 0, got {getattr(spec, name)}")
    if spec.dtype not in DTYPES:
        raise WhelpError(f"unknown dtype '{spec.dtype}'; choose one of {', '.join(DTYPES)}")
    schedule.parse_schedule(spec.schedule)
    LossSpec(name=spec.loss, temperature=spec.temperature, ce_weight=spec.ce_weight, chunk_size=spec.chunk_size)


def _check(spec: DistillSpec, teachers, caches) -> None:
    if not teachers and not caches and spec.ce_weight != 1:
        raise WhelpError("nothing to distil from: pass --teacher MODEL[:WEIGHT] and/or --cache DIR[:WEIGHT] "
                         "(or --ce-weight 1 for a plain CE baseline)")


def _load_data(spec: DistillSpec, tokenizer, caches, student_vocab: int) -> tuple:
    """The data's rows (``whelp.data.Blocks``, read from token stores; nothing per token in RAM) and the opened
    caches, each verified to hold targets for exactly these rows: same data fingerprint (stores, seq_len, seed,
    budget), hence the same blocks in the same order, the one ``whelp cache-logits`` caches."""
    from whelp.data import open_blocks

    blocks = open_blocks(spec.data, tokenizer, spec.seq_len, max_tokens=spec.max_tokens)
    opened = []
    if caches:
        from whelp.distill.cache import open_cache

        for path, _ in caches:
            cache = open_cache(path, student_vocab_size=student_vocab, tokenizer=tokenizer)
            m = cache.manifest
            if (m["data_fingerprint"], m["seq_len"], m["n_blocks"]) != (blocks.fingerprint, spec.seq_len, len(blocks)):
                raise WhelpError(f"cache {path} holds other token blocks ({m['n_blocks']} blocks of {m['seq_len']} "
                                 f"from {m['data_source']}) than --data {spec.data} ({len(blocks)} of {spec.seq_len}); "
                                 "pass the data, seq_len and max_tokens the cache was made with")
            opened.append(cache)
    return blocks, opened


def _inputs(student: str, teachers, caches, spec: DistillSpec) -> str:
    """Identity of the files the run trains from (student, teachers, caches, training data): a run whose inputs
    changed on disk is a different run, never resumed."""
    from whelp.data import data_identity, source_identity

    return store.content_id([source_identity(student), [source_identity(t) for t, _ in teachers],
                             [source_identity(c) for c, _ in caches], data_identity(spec.data)])


def _vocab_masked(loss_spec, tokenizer, widths: list[int]):
    """Student and teacher lm_heads padded to different widths (e.g. 49152 vs 49216 rows) share the tokenizer's
    ids: softmax over those alone (ids beyond it masked), rather than refusing the run. Vocabularies that really
    differ (a width below the tokenizer's) are still refused by the loss."""
    if len(set(widths)) == 1:
        return loss_spec
    return replace(loss_spec, vocab_size=len(tokenizer))


def _train_step(model, teachers: list, caches: list, blocks, idx: torch.Tensor, kd: dict,
                autocast, world, loss_tokens: int) -> torch.Tensor:
    """Forward + backward of one optimizer step's micro-batches ``idx`` [grad_accum, batch_size] on this rank.

    Returns the float64 per-rank SUMS [loss, per-teacher KL..., CE] over loss tokens (not averaged).
    """
    from whelp.distill.losses import LiveTarget

    sums = torch.zeros(2 + len(kd["weights"]), dtype=torch.float64)
    for micro in idx:
        ids = blocks[micro].to(world.device)
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1).flatten()
        with torch.no_grad(), autocast:
            live = [LiveTarget(hidden=t.model(input_ids=ids).last_hidden_state.flatten(0, 1),
                               weight=t.get_output_embeddings().weight) for t in teachers]
        targets = live + [cache.targets(micro) for cache in caches]
        with autocast:
            loss, per_teacher, ce = model(ids, kd=dict(kd, targets=targets, labels=labels, mask=labels != -100))
        (loss * (world.size / loss_tokens)).backward()  # FSDP2 averages gradients over ranks: undo it
        sums += torch.cat([loss.detach().double().cpu().view(1), per_teacher, ce.view(1)])
    return sums


def _evaluate(student, ids, spec: DistillSpec, autocast) -> dict:
    from whelp.evals.perplexity import perplexity

    with autocast:
        result = perplexity(student, ids, spec.seq_len, batch_size=spec.batch_size)
    student.train()
    return {"eval_ppl": result.ppl, "eval_nll": result.nll}


def _stop_flag(world, stop: dict) -> bool:
    """True on every rank if any rank got SIGINT/SIGTERM (ranks must stop at the same step)."""
    return bool(parallel.all_sum(world, torch.tensor([float(stop["requested"])], dtype=torch.float64)).item() > 0)


def distill(student: str, out: Path, spec: DistillSpec, teachers: tuple[tuple[str, float], ...] = (),
            caches: tuple[tuple[str, float], ...] = (), force: bool = False, resume: bool = False,
            progress: bool = True, stage_key: str | None = None) -> dict:
    """Distil ``student`` from weighted live ``teachers`` and/or teacher-logit ``caches``; returns the report.

    Writes the final student to ``out`` (vanilla HF checkpoint + ``distill_report.json``). Re-running
    the same call resumes from the newest checkpoint in ``OUT.distill/checkpoints``. SIGINT/SIGTERM write a
    checkpoint at the end of the current step and raise WhelpError; a NaN/inf loss raises WhelpError naming the step and keeps the
    last good checkpoint; re-running with a lower ``lr`` (or other ``run.ADJUSTABLE`` settings) resumes from it.
    ``stage_key`` (a build's key of this step's inputs) is recorded in ``out``'s marker.
    """
    from transformers import get_cosine_schedule_with_warmup

    from whelp.data import check_data, stream_tokens
    from whelp.distill.losses import LossSpec
    from whelp.models import load_model
    from whelp.store import check_writable

    _check(spec, teachers, caches)
    for source in (spec.data, spec.eval_data):  # before any model is loaded
        check_data(source)
    loss_spec = LossSpec(name=spec.loss, temperature=spec.temperature, ce_weight=spec.ce_weight,
                         chunk_size=spec.chunk_size)
    out = check_writable(out, force, "model")
    world = parallel.init_world()
    try:
        identity = {"student": student, "teachers": [list(t) for t in teachers], "caches": [list(c) for c in caches],
                    "spec": asdict(spec), "world_size": world.size, "inputs": _inputs(student, teachers, caches, spec)}
        rdir, changed = run_state.prepare(out, identity, force, resume, world)
        torch.manual_seed(spec.seed)
        lm, tokenizer = load_model(student, device=str(world.device))
        dtype = compute_dtype(spec.dtype, world.device)  # frozen teachers are stored in it: half the memory in bf16
        teacher_models = [load_model(name, dtype=str(dtype).replace("torch.", ""), device=str(world.device))[0]
                          .requires_grad_(False) for name, _ in teachers]
        vocab = lm.get_output_embeddings().weight.shape[0]
        blocks, opened = parallel.main_first(world, lambda: _load_data(spec, tokenizer, caches, vocab))
        loss_spec = _vocab_masked(loss_spec, tokenizer, [vocab] + [t.get_output_embeddings().weight.shape[0]
                                                                   for t in teacher_models]
                                  + [c.manifest["vocab_size"] for c in opened])
        eval_ids = parallel.main_first(world, lambda: stream_tokens(spec.eval_data, tokenizer, spec.eval_tokens))
        per_step = spec.batch_size * spec.grad_accum * world.size
        steps = spec.steps or math.ceil(spec.max_tokens / (per_step * spec.seq_len))
        loss_tokens = per_step * (spec.seq_len - 1)  # the last position of a block has no next-token label
        names = [name for name, _ in teachers] + [path for path, _ in caches]
        base_weights = tuple(w for _, w in teachers) + tuple(w for _, w in caches)
        sched = schedule.parse_schedule(spec.schedule)
        autocast = torch.autocast(world.device.type, dtype=dtype, enabled=dtype != torch.float32)

        if spec.grad_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = parallel.shard_student(parallel.KDStudent(lm).train(), world)
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
        scheduler = get_cosine_schedule_with_warmup(optimizer, spec.warmup, steps)

        start, tokens_seen = 0, 0
        found = checkpoint.list_checkpoints(rdir / "checkpoints")
        if found:
            meta = checkpoint.load_checkpoint(found[-1], model, optimizer, scheduler)
            start, tokens_seen = meta["step"], meta["tokens_seen"]
            scheduler = run_state.adjusted_scheduler(optimizer, spec, steps, start)  # every rank: the same lr as an unbroken run
            if changed:
                shown = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
                metrics_log.note(f"resuming {rdir} from step {start} with changed settings: {shown} "
                                 f"(recorded in {run_state.RUN_FILE})")
        metrics = rdir / "metrics.jsonl"
        if world.main:
            metrics_log.trim(metrics, start)
        writer = metrics_log.tensorboard(rdir) if spec.tensorboard and world.main else None

        def save(step: int) -> Path:
            return checkpoint.save_checkpoint(rdir / "checkpoints", step, model, optimizer, scheduler,
                                              {"tokens_seen": tokens_seen, "data_position": step * per_step},
                                              spec.keep_last)

        first_eval = _evaluate(model, eval_ids, spec, autocast) if start == 0 else None
        stop = {"requested": False}
        # Ctrl-C, and the SIGTERM that torchrun and cluster schedulers send: checkpoint at the step's end, exit
        previous = {sig: signal.signal(sig, lambda *_: stop.update(requested=True)) for sig in STOP_SIGNALS}
        last_good = found[-1] if found else None
        bar = metrics_log.progress(steps, start, progress and world.main)
        t0, last = time.perf_counter(), {}
        try:
            for step in range(start, steps):
                t_step = time.perf_counter()
                weights = schedule.teacher_weights(sched, base_weights, step)
                idx = schedule.step_blocks(step, len(blocks), per_step, spec.seed)
                idx = idx.view(spec.grad_accum, world.size, spec.batch_size)[:, world.rank]
                sums = _train_step(model, teacher_models, opened, blocks, idx, dict(weights=weights, spec=loss_spec),
                                   autocast, world, loss_tokens)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), spec.max_grad_norm)
                grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                sums = parallel.all_sum(world, sums) / loss_tokens
                if not (torch.isfinite(sums).all() and torch.isfinite(grad_norm)):
                    where = (f"re-run with a lower --lr to resume from the last good checkpoint, {last_good}"
                             if last_good else "no checkpoint was written yet: re-run with a lower --lr to start over")
                    raise WhelpError(f"non-finite loss ({sums[0].item()}) or gradient norm at step {step + 1}; "
                                     f"stopped without updating; {where} (or check the data)")
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                tokens_seen += per_step * spec.seq_len
                elapsed = time.perf_counter() - t0
                last = {"step": step + 1, "loss": sums[0].item(), "ce": sums[-1].item(),
                        **{f"kl/{n}": v.item() for n, v in zip(names, sums[1:-1])},
                        "teacher_weights": list(weights), "lr": scheduler.get_last_lr()[0],
                        "grad_norm": float(grad_norm), "tokens": tokens_seen, "step_s": time.perf_counter() - t_step,
                        "tokens_per_s": (step + 1 - start) * per_step * spec.seq_len / elapsed}
                if spec.eval_every and (step + 1) % spec.eval_every == 0 and step + 1 < steps:
                    last.update(_evaluate(model, eval_ids, spec, autocast))
                interrupted = _stop_flag(world, stop)
                if (spec.save_every and (step + 1) % spec.save_every == 0) or interrupted or step + 1 == steps:
                    last_good = save(step + 1)
                if world.main:
                    metrics_log.log(metrics, writer, bar, last)
                if interrupted:
                    raise WhelpError(f"interrupted at step {step + 1}/{steps}; checkpoint saved to {last_good}. "
                                     "Re-run the same command to resume")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if bar is not None:
                bar.stop()
            if writer is not None:
                writer.close()
        final_eval = _evaluate(model, eval_ids, spec, autocast)
        report = {"student": student, "teachers": identity["teachers"], "caches": identity["caches"],
                  "spec": asdict(spec), "world_size": world.size, "steps": steps, "tokens": tokens_seen,
                  "compute_dtype": str(dtype).replace("torch.", ""), "final": last, "eval_start": first_eval,
                  "eval_end": final_eval, "run_dir": str(rdir), "wall_s": time.perf_counter() - t0}
        report["history"] = run_state.history(rdir) if world.main else []
        _save_student(model, lm, tokenizer, out, force, report, world, stage_key)
        return report
    finally:
        parallel.close_world(world)


def _save_student(model, lm, tokenizer, out: Path, force: bool, report: dict, world, stage_key) -> None:
    """Gather the full fp32 weights and write ``out`` from rank 0 as a plain (unsharded) HF model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    from whelp.models import save_model

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if world.main:
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(lm.config)
        plain.load_state_dict({k.removeprefix("lm."): v for k, v in full.items()}, assign=True)
        plain.tie_weights()
        plain.config.use_cache = True
        save_model(plain.eval(), tokenizer, out, force=force, stage_key=stage_key,
                   extra={"distill_report.json": json.dumps(report, indent=2)})
    if world.size > 1:
        torch.distributed.barrier()
