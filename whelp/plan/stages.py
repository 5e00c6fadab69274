"""The stages of a recipe, planned: generate, search, prune, one capture per cached teacher and distill, each with
its shapes, params, FLOPs (per token and in total), tokens, data, memory parts and disk bytes (``plan_recipe``)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from whelp import architecture, footprint
from whelp.data import chat, check_data, tokenstore
from whelp.data.generate import check_teacher
from whelp.data.tokenstore import token_dtype
from whelp.distillation.capture import check_k
from whelp.plan.inputs import (
    _at,
    _calib_plan,
    _capture_tokens,
    _check_eval,
    _local_tokenizer,
    _model,
    _params,
    _same_tokenizer,
    _sized,
    cache_bytes_per_token,
    check_sources,
    data_plan,
    teacher_config,
)
from whelp.pruning.arch import family_of
from whelp.pruning.keep import text_config
from whelp.pruning.moe import shape_of
from whelp.pruning.obs import selects
from whelp.pruning.reconstruct import check_mode, resolve
from whelp.pruning.scores import check_scores_file
from whelp.pruning.surgery import target_config
from whelp.pruning.targets import first_keep, parse_target, rope_summary, target_rope
from whelp.recipe import Recipe, SearchTarget
from whelp.search.run import plan_search
from whelp.specs import SPAN_MODES, TEACHER, DistillSpec

ESTIMATE = "planned at the largest shape the search may pick; the build uses its winner"


def _prune_stage(step, source: dict, index: int, shape: dict | None = None) -> tuple[dict, dict]:
    """A prune step's target shape (``shape``: a search's, for its target) and its costs
    (whelp.footprint.prune_memory), and the target's sized config."""
    where, source_cfg = f"recipe.prune[{index}]", source["config"]
    text = step.target if shape is None else ",".join(f"{k}={str(shape[k]).lower()}" for k in shape_of(source_cfg))
    parsed = _at(f"{where}.target", lambda: parse_target(source_cfg, text))
    # a search's target.json is a pruned teacher config, so either rope policy keeps the teacher's RoPE
    rope = None if shape is not None else _at(f"{where}.target", lambda: target_rope(parsed, step.options.rope))
    _at(f"{where}.seq_len", lambda: architecture.check_positions(source_cfg, step.options.seq_len, "seq_len"))
    if step.options.scores:
        _at(f"{where}.scores", lambda: check_scores_file(Path(step.options.scores).expanduser()))
    spec = step.options
    target = _sized(target_config(source_cfg, first_keep(source_cfg, parsed.shape, spec.tie), rope), str(step.target))
    family = family_of(source_cfg)
    mode = resolve(spec.reconstruct, family)
    _at(f"{where}.reconstruct", lambda: check_mode(mode, source_cfg, family, parsed.published, spec.select))
    select = _selection(spec, source_cfg, target["config"], family, mode)
    return {
        "stage": f"prune[{index}]",
        "kind": "prune",
        "target": str(step.target),
        "shape": _params(target),
        "rope": {"source": rope_summary(source_cfg), "target": rope_summary(target["config"])},
        "tokens": spec.calib_samples * spec.seq_len,
        "flops": footprint.prune_flops(spec, source["active"], source_cfg.num_hidden_layers, mode) + select["flops"],
        "parallel": False,
        "device": "cpu",
        "memory": footprint.prune_memory(source["params"])
        + footprint.refit_memory(spec.refit_blocks * spec.seq_len, text_config(source_cfg).hidden_size, mode)
        + select["memory"],
        "disk_bytes": {"model": footprint.MODEL_BYTES_PER_PARAM * target["params"]},
    }, target


def _selection(spec, source_cfg, target_cfg, family, mode: str) -> dict:
    """The neuron selection's FLOPs and host memory (footprint.select_flops, select_memory) where it runs: ``--select``
    resolved to obs for the teacher's ``family`` and a refit (``mode``: the resolved reconstruction, lsq, span or
    span_attn) to choose for; else nothing."""
    if not selects(spec.select, mode, family):
        return {"flops": 0, "memory": []}
    width, kept = text_config(source_cfg).intermediate_size, text_config(target_cfg).intermediate_size
    layers, tokens = text_config(target_cfg).num_hidden_layers, spec.refit_blocks * spec.seq_len
    held = tokens if mode in SPAN_MODES else 0  # the layer's output from the selection's pass
    return {
        "flops": footprint.select_flops(tokens, layers, width, kept),
        "memory": footprint.select_memory(width, kept, held),
    }


def _capture_stage(ref, model: dict, step, dtype: str, vocab: int, tokens: int, where: str, number: int) -> dict:
    """A teacher-logit capture that runs before its distil step: one forward (2 N per token) over the step's tokens."""
    _at(f"recipe.{where}.k", lambda: check_k(ref.spec(step.options), vocab))
    per_token = cache_bytes_per_token(ref.mode, ref.k, vocab)
    positions = ref.spec(step.options).batch_size * step.options.seq_len
    return {
        "stage": f"capture[{number}]",
        "kind": "capture",
        "for": where,
        "teacher": model["name"],
        "mode": ref.mode,
        "k": ref.k,
        "params": model["params"],
        "tokens": tokens,
        "flops": 2 * model["active"] * tokens,
        "parallel": True,
        "device": "gpu",
        "bytes_per_token": per_token,
        "memory": footprint.capture_memory(model, dtype, positions, step.options.kd.chunk_size, vocab, ref.tp_size),
        "tp_size": ref.tp_size,
        "disk_bytes": {"cache": per_token * tokens},
    }


def _teacher_share(spec, chat: frozenset[str]) -> float:
    """The share of off-policy rows the live teachers run on: 1, but the text sources' weight alone where the spec
    lets them skip the chat rows (``DistillSpec.teacher_skips_chat_rows``: the ``chat`` sources' rows cost no
    teacher forward)."""
    if not spec.teacher_skips_chat_rows:
        return 1.0
    return sum(s.weight for s in spec.data.sources if s.name not in chat)


def _chat_sources(recipe: Recipe) -> frozenset[str]:
    """The data sources that carry a loss mask (chat): the build's generated chat, and token stores written with
    masks (``whelp tokenize`` of chat jsonl)."""
    names = {s.name for step in recipe.distill for s in step.options.data.sources}
    generated = recipe.generated()
    chat = {n for n in names if n not in generated and tokenstore.is_store(n) and tokenstore.open_store(n).has_mask}
    return frozenset(chat | {name for name, step in generated.items() if step.options.chat})


def _distill_stage(
    step, student: dict, teacher: dict, index: int, tokenizer, generated: frozenset[str], chat=frozenset()
) -> tuple[dict, list]:
    """A distil step's tokens, data, FLOPs, memory parts and disk, and the (CacheRef, sized config) it caches;
    ``generated``: the sources the build's generate stages make; ``chat``: those that carry a loss mask
    (``_chat_sources``)."""
    spec, student_cfg, n_student = step.options, student["config"], student["params"]
    tokens_per_step = spec.batch_size * spec.grad_accum * spec.seq_len
    tokens = spec.max_tokens if spec.max_tokens is not None else spec.steps * tokens_per_step
    steps = math.ceil(tokens / tokens_per_step)  # on one process
    _at(f"recipe.distill[{index}].seq_len", lambda: architecture.check_positions(student_cfg, spec.seq_len, "seq_len"))
    _at(f"recipe.distill[{index}].warmup", lambda: spec.optim.check_steps(steps))
    for i, t in enumerate(step.teachers):
        if t.model != TEACHER:
            _same_tokenizer(t.model, tokenizer, f"recipe.distill[{index}].teachers[{i}]")
    live = [(t, _model(t, teacher, f"recipe.distill[{index}].teachers[{i}]")) for i, t in enumerate(step.teachers)]
    cached = [(c, _model(c, teacher, f"recipe.distill[{index}].caches[{i}]")) for i, c in enumerate(step.caches)]
    vocab = student_cfg.vocab_size
    data = data_plan(spec.data, tokens, vocab, tokenizer, f"recipe.distill[{index}].data", generated)
    # on-policy rows are also run through the student once more, token by token, to sample them (no grad)
    n_active = student["active"]
    # a block-local stage (whelp.distillation.local) runs no lm_head: the student's blocks and the teacher's body
    head = (lambda m: m["config"].vocab_size * m["config"].hidden_size) if spec.hidden.local else (lambda m: 0)
    per_token = {
        "student_train": 6 * (n_active - head(student)),
        "student_sampling": round(spec.gkd.fraction * 2 * n_active),
        "live_teachers": round(_teacher_share(spec, chat) * sum(2 * (m["active"] - head(m)) for _, m in live)),
        "cache_teachers_once": sum(2 * m["active"] for _, m in cached),
    }
    memory = footprint.distill_memory(spec, student, [m for _, m in live])
    return {
        "stage": f"{'local' if spec.hidden.local else 'distill'}[{index}]",
        "kind": "distill",
        "tokens": tokens,
        "steps": steps,
        "data": data,
        "flops_per_token": per_token,
        "teachers": [{"model": t.model, "weight": t.weight, "params": m["params"]} for t, m in live],
        "caches": [
            {
                "model": c.model,
                "weight": c.weight,
                "mode": c.mode,
                "k": c.k,
                "params": m["params"],
                "bytes_per_token": cache_bytes_per_token(c.mode, c.k, vocab),
                "bytes": _capture_tokens(spec, data) * cache_bytes_per_token(c.mode, c.k, vocab),
            }
            for c, m in cached
        ],
        "memory_bytes": {
            "student_training": footprint.TRAIN_BYTES_PER_PARAM * n_student,
            "live_teachers": sum(p["bytes"] for p in memory if "teacher" in p),
        },
        "flops": (per_token["student_train"] + per_token["student_sampling"] + per_token["live_teachers"]) * tokens,
        "parallel": not spec.hidden.local,  # the block-local stage runs on one process
        "device": "gpu",
        "memory": memory,
        "disk_bytes": {
            "store": data["store_bytes"],
            "checkpoints": spec.save.keep_last * footprint.CHECKPOINT_BYTES_PER_PARAM * n_student,
            "model": footprint.MODEL_BYTES_PER_PARAM * n_student,
        },
    }, cached


def _search_stage(recipe: Recipe, teacher: dict, tokenizer, generated: frozenset[str]) -> dict:
    """The shape search before prune[0]: how many shapes meet the budget, its one-shot pool, the FLOPs of its
    calibration, of the pool's one-shot scores and of the short distillations (``plan_search``'s closed forms), the
    memory of distilling its largest shape from the fp32 teacher (an upper bound), its disk (the K candidates and the
    winner, at the largest shape), and the largest shape it may pick."""
    spec, where, config = recipe.search(), "recipe.prune[0].target.search", teacher["config"]
    planned = _at(where, lambda: plan_search(config, spec))
    _at(f"{where}.seq_len", lambda: architecture.check_positions(config, spec.seq_len, "seq_len"))
    for key in ("calib", "eval_data"):
        check_sources(getattr(spec, key), f"{where}.{key}", generated)
    cost, shape = planned["cost"], dict(planned["largest"])
    data = data_plan(
        spec.data, cost["distillation_tokens_per_candidate"], config.vocab_size, tokenizer, f"{where}.data", generated
    )
    largest = _sized(target_config(config, first_keep(config, shape)), "the largest searched shape")
    run = DistillSpec(
        steps=spec.score_steps, batch_size=spec.batch_size, seq_len=spec.seq_len, lr=spec.lr, dtype="float32"
    )
    return {
        "stage": "search",
        "kind": "search",
        "for": "prune[0]",
        "budget": spec.budget,
        "candidates": planned["candidates"],
        "pool": planned["pool"],
        "scored": spec.candidates,
        "score_steps": spec.score_steps,
        "largest": _params(largest),
        "tokens": cost["distillation_tokens_per_candidate"],
        "data": data,
        "flops_parts": {k: cost[k] for k in ("calibration", "one_shot", "distillation")},
        "flops": cost["total"],
        "parallel": False,
        "device": "gpu",
        "memory": footprint.distill_memory(run, largest, [teacher]),
        "disk_bytes": {
            "store": data["store_bytes"],
            "models": (spec.candidates + 1) * footprint.MODEL_BYTES_PER_PARAM * largest["params"],
        },
    }


def _generate_stage(recipe: Recipe, index: int, teacher: dict, tokenizer) -> dict:
    """Teacher text: its tokens, the FLOPs of sampling them (``footprint.generate_flops_per_token``; decoding is bound
    by memory bandwidth, so expect an MFU well below training's), one process's memory and the store's bytes (a chat
    store adds one mask bit a token). A chat stage counts the teacher's template tokens when its tokenizer is on
    this machine (``template`` None: not counted)."""
    step, where = recipe.generate[index], f"recipe.generate[{index}]"
    spec, model = step.options, _model(step, teacher, f"{where}.model")
    if spec.prompts:
        _at(f"{where}.prompts", lambda: check_data(spec.prompts))
    template, system = None, 0
    if spec.chat and tokenizer is not None and step.model == TEACHER:
        _at(f"{where}.chat", lambda: chat.check_chat_template(tokenizer, "the teacher"))
        template = chat.template_tokens(tokenizer)
        if spec.system is not None:
            system = _at(f"{where}.system", lambda: chat.system_tokens(tokenizer, spec.system))
    own = tokenizer if step.model == TEACHER else None  # another model's vocabulary: its config's
    _at(where, lambda: check_teacher(spec, model["config"], own, template or 0))
    per_token = footprint.generate_flops_per_token(model["active"], spec, template or 0, system)
    sequence = (template or 0) + system + spec.request_tokens if spec.chat else spec.prompt_tokens
    tokens = spec.max_tokens
    store = token_dtype(teacher["config"].vocab_size).itemsize * tokens + (-(-tokens // 8) if spec.chat else 0)
    return {
        "stage": f"generate[{index}]",
        "kind": "generate",
        "name": step.name,  # the data source it makes
        "tokens": tokens,
        "chat": {
            "template_tokens": template,
            "system_tokens": system,  # shown to the teacher with each request, not stored
            "request_tokens": spec.request_tokens,
            "new_tokens": spec.new_tokens,
            "samples_per_prompt": spec.samples_per_prompt,
            "self_instruct": not spec.prompts,
        }
        if spec.chat
        else None,
        "flops_per_token": per_token,
        "flops": round(sum(per_token.values()) * tokens),
        "parallel": False,
        "device": "gpu" if spec.device.startswith("cuda") else "cpu",
        "memory": footprint.generate_memory(model, spec, sequence + spec.new_tokens),
        "store_bytes": store,
        "disk_bytes": {"store": store},
    }


def plan_recipe(recipe: Recipe) -> dict:
    """Every stage's shapes, params, FLOPs (per token and total), tokens, memory parts and disk bytes, before a GPU
    is chosen (``whelp.pricing.price`` adds the hours, bytes per GPU and fit warnings). Each entry of a distil step's
    ``caches`` is a capture stage that runs just before it."""
    teacher = _sized(teacher_config(recipe), recipe.teacher.model)
    tokenizer = _local_tokenizer(recipe)
    stages, current, vocab = [], teacher, teacher["config"].vocab_size
    chat, generated = _chat_sources(recipe), frozenset(recipe.generated())
    stages += [_generate_stage(recipe, i, teacher, tokenizer) for i in range(len(recipe.generate))]
    searched = None
    if recipe.search() is not None:
        stages.append(_search_stage(recipe, teacher, tokenizer, generated))
        searched = stages[-1]["largest"], len(stages)
    for ref in recipe.stages():
        if ref.kind == "prune":
            shape = searched[0] if searched and isinstance(ref.step.target, SearchTarget) else None
            entry, current = _prune_stage(ref.step, current, ref.index, shape)
            entry["data"] = _calib_plan(ref.step, vocab, tokenizer, ref.index, generated)
            entry["disk_bytes"] = {"store": entry["data"]["store_bytes"], **entry["disk_bytes"]}
            stages.append(entry)
            continue
        if ref.step.local is not None:  # its block-local stage first: the first teacher, no caches
            options = ref.step.local.options(ref.step.options)
            local = replace(ref.step, options=options, teachers=ref.step.teachers[:1], caches=(), local=None)
            stages.append(_distill_stage(local, current, teacher, ref.index, tokenizer, generated)[0])
        entry, cached = _distill_stage(ref.step, current, teacher, ref.index, tokenizer, generated, chat)
        tokens = _capture_tokens(ref.step.options, entry["data"])
        for j, (cache, model) in enumerate(cached):
            number = sum(s["kind"] == "capture" for s in stages)
            stages.append(
                _capture_stage(
                    cache,
                    model,
                    ref.step,
                    recipe.teacher.dtype,
                    current["config"].vocab_size,
                    tokens,
                    f"{ref.key}.caches[{j}]",
                    number,
                )
            )
        stages.append(entry)
    _check_eval(recipe, [teacher["config"], current["config"]])
    for stage in stages[searched[1] if searched else len(stages) :]:
        if stage["kind"] in ("prune", "distill"):  # the student's stages; a capture runs the teacher alone
            stage["estimate"] = ESTIMATE
    return {
        "recipe": recipe.name,
        "teacher": {"model": recipe.teacher.model, "shape": _params(teacher)},
        "stages": stages,
        "student": _params(current),
        **({"estimate": ESTIMATE} if searched else {}),
    }
