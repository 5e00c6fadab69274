"""``whelp plan RECIPE``: what a build will make and cost, before anything runs.

Per stage (generate, search, prune, one capture per cached teacher, distill): shapes and parameters (from configs on the
meta device; no weights), FLOPs per token and in total, tokens, the parts of its memory and its bytes on disk; the
formulas (Kaplan et al. 2020's 2 N per token forward and 6 N training, N the total parameters including embeddings,
as docs/design.md section 8 counts the 70B's 141 GFLOP/token; memory and disk) are in ``whelp.pricing``, which turns
a plan into GPU-hours, wall-clock hours and bytes per GPU on a chosen kind and number of GPUs.
And per stage the data: tokens it needs, tokens its sources hold (when their token stores exist: a store
directory, or the store a raw source was tokenized into) and the resulting epochs, and the store's bytes on disk
(2 bytes per token at vocab <= 65,536, else 4).
A prune target that is a shape search (``target: {search: ...}``) plans a search stage (the shapes it enumerates,
its one-shot pool and its cost, ``whelp.search.run.plan_search``); the winner is known only once it ran, so
the stages after it are planned at the largest shape the search may pick, an upper bound marked ``estimate``.
"""

from __future__ import annotations

import math
from pathlib import Path

from whelp import models, output, pricing
from whelp.data import available_tokens, check_data, check_source
from whelp.data.tokenstore import token_dtype, tokenizer_hash
from whelp.distillation.cache import MAG_BITS, id_bits
from whelp.errors import WhelpError
from whelp.evals.harness import check_include_paths, check_task_names
from whelp.pruning import moe
from whelp.pruning.moe import shape_of
from whelp.pruning.scores import check_scores_file
from whelp.pruning.surgery import target_config
from whelp.pruning.targets import first_keep, parse_target, rope_summary, target_rope
from whelp.recipe import GENERATED, Recipe, SearchTarget
from whelp.registry import REGISTRY
from whelp.search.run import plan_search
from whelp.specs import TEACHER, DistillSpec, Mixture
from whelp.store import whelp_home

ESTIMATE = "planned at the largest shape the search may pick; the build uses its winner"


def teacher_config(recipe: Recipe):
    """The teacher's config (``teacher.config`` when given, else from the model) - a missing teacher fails here,
    and so does a ``teacher.config`` of another shape than the teacher on this machine."""
    source = recipe.teacher.config or recipe.teacher.model
    config = _at(f"recipe.teacher.{'config' if recipe.teacher.config else 'model'}", lambda: models.load_config(source))
    local = _local_teacher(recipe)
    if recipe.teacher.config and local is not None:
        planned, actual = models.shape(config), models.shape(models.load_config(str(local)))
        if planned != actual:
            diff = ", ".join(f"{k}={planned[k]} vs {actual[k]}" for k in planned if planned[k] != actual.get(k))
            raise WhelpError(
                f"recipe.teacher.config ({recipe.teacher.config}) is not the shape of the teacher "
                f"{recipe.teacher.model} on this machine ({diff}); fix it or drop it"
            )
    return config


def _local_teacher(recipe: Recipe) -> Path | None:
    """The teacher's directory when it is on this machine (never downloads or converts anything), else None."""
    model = recipe.teacher.model
    path = whelp_home() / "models" / model if model in REGISTRY else Path(model).expanduser()
    return path if (path / "config.json").is_file() else None


def cache_bytes_per_token(mode: str, k: int, vocab: int) -> int:
    """Bytes one cached token takes (whelp.distillation.cache layout: int32 token, packed entries, fp16 tail/entropy)."""
    bits = id_bits(vocab) + (MAG_BITS if mode == "topk" else 0)
    return 4 + -(-k * bits // 8) + 2


def _sized(config, name: str) -> dict:
    """Model ``name``'s config with its total and non-embedding parameter counts (counted once: a 70B takes
    seconds) and the parameters one token runs through (``active``: an MoE's top-k experts, else the total), which
    FLOPs are priced at (2 N per forward token, 6 N per trained one)."""
    if moe.moe_family_of(config) is not None:  # one meta build counts all three
        total, non_embedding, active = models.count_params(config, active=True)
    else:
        (total, non_embedding), active = models.count_params(config), None
    return {
        "name": name,
        "config": config,
        "params": total,
        "non_embedding": non_embedding,
        "active": total if active is None else active,
    }


def _params(model: dict) -> dict:
    active = {"active_params": model["active"]} if model["active"] != model["params"] else {}
    return {
        **shape_of(model["config"]),
        "params": model["params"],
        "non_embedding_params": model["non_embedding"],
        **active,
    }


def _local_tokenizer(recipe: Recipe):
    """The teacher's tokenizer when it is on this machine, else None."""
    local = _local_teacher(recipe)
    return models.load_tokenizer(str(local)) if local is not None else None


def data_plan(mixture: Mixture, needed: int, vocab: int, tokenizer, where: str = "data") -> dict:
    """Tokens a stage needs from ``mixture``, tokens available in its stores (None when not tokenized yet), epochs,
    and the store's bytes on disk. An unreadable source fails here, naming the recipe key ``where``."""
    sources = mixture.names
    for source in sources:
        if source != GENERATED:  # the build's generate stage makes that one
            _at(where, check_source, source)
    available = None if GENERATED in sources else available_tokens(mixture, tokenizer)
    per_token = token_dtype(vocab).itemsize
    return {
        "source": str(mixture),
        "tokens_needed": needed,
        "tokens_available": available,
        "epochs": None if not available else needed / available,
        "store_bytes": per_token * (available if available is not None else needed),
    }


def _prune_stage(step, source: dict, index: int, shape: dict | None = None) -> tuple[dict, dict]:
    """A prune step's target shape (``shape``: a search's, for its target) and its costs
    (whelp.pricing.prune_memory), and the target's sized config."""
    where, source_cfg = f"recipe.prune[{index}]", source["config"]
    text = step.target if shape is None else ",".join(f"{k}={str(shape[k]).lower()}" for k in shape_of(source_cfg))
    parsed = _at(f"{where}.target", lambda: parse_target(source_cfg, text))
    # a search's target.json is a pruned teacher config, so either rope policy keeps the teacher's RoPE
    rope = None if shape is not None else _at(f"{where}.target", lambda: target_rope(parsed, step.options.rope))
    _at(f"{where}.seq_len", lambda: models.check_positions(source_cfg, step.options.seq_len, "seq_len"))
    if step.options.scores:
        _at(f"{where}.scores", lambda: check_scores_file(Path(step.options.scores).expanduser()))
    spec = step.options
    target = _sized(target_config(source_cfg, first_keep(source_cfg, parsed.shape, spec.tie), rope), str(step.target))
    return {
        "stage": f"prune[{index}]",
        "kind": "prune",
        "target": str(step.target),
        "shape": _params(target),
        "rope": {"source": rope_summary(source_cfg), "target": rope_summary(target["config"])},
        "tokens": spec.calib_samples * spec.seq_len,
        "flops": pricing.prune_flops(spec, source["active"], source_cfg.num_hidden_layers),
        "parallel": False,
        "device": "cpu",
        "memory": pricing.prune_memory(source["params"]),
        "disk_bytes": {"model": pricing.MODEL_BYTES_PER_PARAM * target["params"]},
    }, target


def _at(where: str, check, *args):
    """``check(*args)``, whose WhelpError names the recipe key ``where``."""
    try:
        return check(*args)
    except WhelpError as exc:
        raise WhelpError(f"{where}: {exc}") from None


def _same_tokenizer(model: str, tokenizer, where: str) -> None:
    """A local distill teacher must share the recipe teacher's tokenizer (checked from its files; no weights)."""
    if tokenizer is None or not (Path(model).expanduser() / "config.json").is_file():
        return
    theirs = models.load_tokenizer(model)
    if tokenizer_hash(theirs) != tokenizer_hash(tokenizer):
        raise WhelpError(
            f"{where}: {model} has another tokenizer than the recipe's teacher ({len(theirs):,} vs "
            f"{len(tokenizer):,} tokens): token-level distillation needs the same token ids"
        )


def _calib_plan(step, vocab: int, tokenizer, index: int) -> dict:
    return data_plan(
        step.options.calib,
        step.options.calib_samples * step.options.seq_len,
        vocab,
        tokenizer,
        f"recipe.prune[{index}].calib",
    )


def _model(ref, teacher: dict, path: str) -> dict:
    """The sized config of a stage's ``model`` (``teacher``: the recipe's; else its ``config`` or its files)."""
    if ref.model == TEACHER:
        return teacher
    return _sized(_at(path, lambda: models.load_config(getattr(ref, "config", None) or ref.model)), ref.model)


def _capture_tokens(spec, data: dict) -> int:
    """Tokens ``whelp cache-logits`` reads for a step: its max_tokens (all the data for a steps budget), no more than
    the stores hold when that is known; the step's tokens when it is not."""
    available = data["tokens_available"]
    if available is None:
        return data["tokens_needed"]
    return available if spec.max_tokens is None else min(spec.max_tokens, available)


def _capture_stage(ref, model: dict, step, dtype: str, vocab: int, tokens: int, where: str, number: int) -> dict:
    """A teacher-logit capture that runs before its distil step: one forward (2 N per token) over the step's tokens."""
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
        "memory": pricing.capture_memory(model, dtype, positions, step.options.kd.chunk_size, vocab, ref.tp_size),
        "tp_size": ref.tp_size,
        "disk_bytes": {"cache": per_token * tokens},
    }


def _distill_stage(step, student: dict, teacher: dict, index: int, tokenizer) -> tuple[dict, list]:
    """A distil step's tokens, data, FLOPs, memory parts and disk, and the (CacheRef, sized config) it caches."""
    spec, student_cfg, n_student = step.options, student["config"], student["params"]
    tokens_per_step = spec.batch_size * spec.grad_accum * spec.seq_len
    tokens = spec.max_tokens if spec.max_tokens is not None else spec.steps * tokens_per_step
    steps = math.ceil(tokens / tokens_per_step)  # on one process
    _at(f"recipe.distill[{index}].seq_len", lambda: models.check_positions(student_cfg, spec.seq_len, "seq_len"))
    _at(f"recipe.distill[{index}].warmup", lambda: spec.optim.check_steps(steps))
    for i, t in enumerate(step.teachers):
        if t.model != TEACHER:
            _same_tokenizer(t.model, tokenizer, f"recipe.distill[{index}].teachers[{i}]")
    live = [(t, _model(t, teacher, f"recipe.distill[{index}].teachers[{i}]")) for i, t in enumerate(step.teachers)]
    cached = [(c, _model(c, teacher, f"recipe.distill[{index}].caches[{i}]")) for i, c in enumerate(step.caches)]
    vocab = student_cfg.vocab_size
    data = data_plan(spec.data, tokens, vocab, tokenizer, f"recipe.distill[{index}].data")
    # on-policy rows are also run through the student once more, token by token, to sample them (no grad)
    n_active = student["active"]
    per_token = {
        "student_train": 6 * n_active,
        "student_sampling": round(spec.gkd.fraction * 2 * n_active),
        "live_teachers": sum(2 * m["active"] for _, m in live),
        "cache_teachers_once": sum(2 * m["active"] for _, m in cached),
    }
    memory = pricing.distill_memory(spec, student, [m for _, m in live])
    return {
        "stage": f"distill[{index}]",
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
            "student_training": pricing.TRAIN_BYTES_PER_PARAM * n_student,
            "live_teachers": sum(p["bytes"] for p in memory if "teacher" in p),
        },
        "flops": (per_token["student_train"] + per_token["student_sampling"] + per_token["live_teachers"]) * tokens,
        "parallel": True,
        "device": "gpu",
        "memory": memory,
        "disk_bytes": {
            "store": data["store_bytes"],
            "checkpoints": spec.save.keep_last * pricing.CHECKPOINT_BYTES_PER_PARAM * n_student,
            "model": pricing.MODEL_BYTES_PER_PARAM * n_student,
        },
    }, cached


def _search_stage(recipe: Recipe, teacher: dict, tokenizer) -> dict:
    """The shape search before prune[0]: how many shapes meet the budget, its one-shot pool, the FLOPs of its
    calibration, of the pool's one-shot scores and of the short distillations (``plan_search``'s closed forms), the
    memory of distilling its largest shape from the fp32 teacher (an upper bound), its disk (the K candidates and the
    winner, at the largest shape), and the largest shape it may pick."""
    spec, where, config = recipe.search(), "recipe.prune[0].target.search", teacher["config"]
    planned = _at(where, lambda: plan_search(config, spec))
    _at(f"{where}.seq_len", lambda: models.check_positions(config, spec.seq_len, "seq_len"))
    for key in ("calib", "eval_data"):
        for source in getattr(spec, key).names:
            if source != GENERATED:
                _at(f"{where}.{key}", check_source, source)
    cost, shape = planned["cost"], dict(planned["largest"])
    data = data_plan(
        spec.data, cost["distillation_tokens_per_candidate"], config.vocab_size, tokenizer, f"{where}.data"
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
        "memory": pricing.distill_memory(run, largest, [teacher]),
        "disk_bytes": {
            "store": data["store_bytes"],
            "models": (spec.candidates + 1) * pricing.MODEL_BYTES_PER_PARAM * largest["params"],
        },
    }


def _generate_stage(recipe: Recipe, teacher: dict) -> dict:
    """Teacher text: its tokens, the sampling FLOPs (2 x params per token, prompts included; decoding is bound by
    memory bandwidth, so expect an MFU well below training's), one process's memory and the store's bytes."""
    step = recipe.generate
    spec, model = step.options, _model(step, teacher, "recipe.generate.model")
    if spec.prompts:
        _at("recipe.generate.prompts", lambda: check_data(spec.prompts))
    tokens = spec.max_tokens
    store = token_dtype(teacher["config"].vocab_size).itemsize * tokens
    return {
        "stage": "generate",
        "kind": "generate",
        "tokens": tokens,
        "flops_per_token": {"teacher_sampling": 2 * model["active"]},
        "flops": 2 * model["active"] * tokens,
        "parallel": False,
        "device": "gpu" if spec.device.startswith("cuda") else "cpu",
        "memory": pricing.generate_memory(model, spec),
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
    if recipe.generate is not None:
        stages.append(_generate_stage(recipe, teacher))
    searched = None
    if recipe.search() is not None:
        stages.append(_search_stage(recipe, teacher, tokenizer))
        searched = stages[-1]["largest"], len(stages)
    for ref in recipe.stages():
        if ref.kind == "prune":
            shape = searched[0] if searched and isinstance(ref.step.target, SearchTarget) else None
            entry, current = _prune_stage(ref.step, current, ref.index, shape)
            entry["data"] = _calib_plan(ref.step, vocab, tokenizer, ref.index)
            entry["disk_bytes"] = {"store": entry["data"]["store_bytes"], **entry["disk_bytes"]}
            stages.append(entry)
            continue
        entry, cached = _distill_stage(ref.step, current, teacher, ref.index, tokenizer)
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
    _check_eval(recipe)
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


def _check_eval(recipe: Recipe) -> None:
    """The eval section's sources and lm-eval task names, so a build never fails on them after pruning."""
    for i, source in enumerate(recipe.eval.ppl):
        _at(f"recipe.eval.ppl[{i}]", check_data, source)
    _at("recipe.eval.include_paths", lambda: check_include_paths(recipe.eval.include_paths))
    if recipe.eval.tasks:
        _at("recipe.eval.tasks", lambda: check_task_names(recipe.eval.tasks, recipe.eval.include_paths))


def describe_data(d: dict) -> str:
    """``SOURCE: needs N tokens, M available (E epochs)`` (its store's bytes are the stage's disk)."""
    have = (
        "not tokenized yet"
        if d["tokens_available"] is None
        else (f"{d['tokens_available']:,} available ({d['epochs']:.2f} epochs)")
    )
    return f"{d['source']}: needs {d['tokens_needed']:,} tokens, {have}"


def describe(stage: dict) -> list[tuple[str, str]]:
    """A planned stage as ``(key, value)`` lines: what it makes, its params or FLOPs per token, its data and
    memory; a stage planned at the search's largest shape says it is an estimate."""
    lines = _describe(stage)
    return [("estimate", "planned at the largest searched shape")] + lines if stage.get("estimate") else lines


def _dims(shape: dict) -> str:
    return (
        f"L{shape['num_hidden_layers']} H{shape['hidden_size']} I{shape['intermediate_size']} "
        f"heads {shape['num_attention_heads']}/{shape['num_key_value_heads']}x{shape['head_dim']}"
    )


def _giga(flops: float) -> str:
    return f"{flops / 1e9:,.3g} G"


def _describe(stage: dict) -> list[tuple[str, str]]:
    if stage["kind"] == "search":
        parts = stage["flops_parts"]
        return [
            ("shapes", f"{stage['candidates']:,} within {stage['budget']}"),
            (
                "work",
                f"a pool of {len(stage['pool'])} one-shot, the best {stage['scored']} distilled "
                f"{stage['score_steps']} steps each",
            ),
            ("largest", _dims(stage["largest"])),
            (
                "FLOPs parts",
                f"calibration {parts['calibration']:.3g}, one-shot {parts['one_shot']:.3g}, distillation "
                f"{parts['distillation']:.3g} at most",
            ),
            ("data", describe_data(stage["data"])),
        ]
    if stage["kind"] == "generate":
        return [
            ("work", f"{stage['tokens']:,} tokens of teacher text (the data source 'generated')"),
            ("FLOPs/token", f"teacher sampling {_giga(stage['flops_per_token']['teacher_sampling'])}"),
        ]
    if stage["kind"] == "prune":
        shape = stage["shape"]
        rope = stage["rope"]["target"] + (
            "" if stage["rope"]["target"] == stage["rope"]["source"] else f" (teacher: {stage['rope']['source']})"
        )
        return [
            ("target", f"{stage['target']}: {_dims(shape)}"),
            ("RoPE", rope),
            ("params", f"{shape['params']:,}"),
            ("data", describe_data(stage["data"])),
        ]
    if stage["kind"] == "capture":
        return [
            (
                "work",
                f"{stage['tokens']:,} tokens of {stage['teacher']} logits ({stage['mode']} {stage['k']}) "
                f"for {stage['for']}",
            ),
            ("FLOPs/token", f"teacher {_giga(2 * stage['params'])}"),
            ("cache", f"{stage['bytes_per_token']} B/token"),
        ]
    flops = stage["flops_per_token"]
    memory = stage["memory_bytes"]
    return [
        ("work", f"{stage['tokens']:,} tokens"),
        (
            "FLOPs/token",
            f"student {_giga(flops['student_train'])}"
            + (f" + on-policy sampling {_giga(flops['student_sampling'])}" if flops["student_sampling"] else "")
            + f", live teachers {_giga(flops['live_teachers'])}",
        ),
        ("data", describe_data(stage["data"])),
        (
            "memory parts",
            f"training {output.size(memory['student_training'])} + live teachers "
            f"{output.size(memory['live_teachers'])}",
        ),
    ]
