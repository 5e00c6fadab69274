"""``whelp plan RECIPE``: what a build will make and cost, before anything runs.

Per stage: shapes and parameters (from configs on the meta device; no weights), training FLOPs per
token (6 N for the student's forward + backward, 2 N per live teacher's forward: Kaplan et al. 2020,
with N the total parameters including embeddings as docs/design.md section 4 counts the 70B's 141
GFLOP/token), tokens, cache bytes, and peak memory estimates:
  student training = N * (4 fp32 weights + 4 grads + 8 AdamW moments) bytes,
  live teachers    = N_t * bytes of the teacher dtype,
  activations and chunked-loss buffers are extra (they scale with batch * seq_len, not with vocab).
And per stage the data: tokens it needs, tokens its sources hold (when their token stores exist: a store
directory, or the store a raw source was tokenized into) and the resulting epochs, and the store's bytes on disk
(2 bytes per token at vocab <= 65,536, else 4).
"""

from __future__ import annotations

import math
from pathlib import Path

from whelp import models
from whelp.errors import WhelpError
from whelp.recipe import GENERATED, Recipe
from whelp.registry import REGISTRY
from whelp.specs import TEACHER, parse_mixture

TRAIN_BYTES_PER_PARAM = 16
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


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
            raise WhelpError(f"recipe.teacher.config ({recipe.teacher.config}) is not the shape of the teacher "
                             f"{recipe.teacher.model} on this machine ({diff}); fix it or drop it")
    return config


def _local_teacher(recipe: Recipe) -> Path | None:
    """The teacher's directory when it is on this machine (never downloads or converts anything), else None."""
    from whelp.store import whelp_home

    model = recipe.teacher.model
    path = whelp_home() / "models" / model if model in REGISTRY else Path(model).expanduser()
    return path if (path / "config.json").is_file() else None


def cache_bytes_per_token(mode: str, k: int, vocab: int) -> int:
    """Bytes one cached token takes (whelp.distillation.cache layout: int32 token, packed entries, fp16 tail/entropy)."""
    from whelp.distillation.cache import MAG_BITS, id_bits

    bits = id_bits(vocab) + (MAG_BITS if mode == "topk" else 0)
    return 4 + -(-k * bits // 8) + 2


def _params(config) -> dict:
    total, non_embedding = models.count_params(config)
    return {**models.shape(config), "params": total, "non_embedding_params": non_embedding}


def _local_tokenizer(recipe: Recipe):
    """The teacher's tokenizer when it is on this machine, else None."""
    local = _local_teacher(recipe)
    return models.load_tokenizer(str(local)) if local is not None else None


def data_plan(spec: str, needed: int, vocab: int, tokenizer, where: str = "data") -> dict:
    """Tokens a stage needs from ``spec``, tokens available in its stores (None when not tokenized yet), epochs,
    and the store's bytes on disk. An unreadable source fails here, naming the recipe key ``where``."""
    from whelp.data import available_tokens, check_data

    sources = [source for source, _ in parse_mixture(spec)]
    for source in sources:
        if source != GENERATED:  # the build's generate stage makes that one
            _at(where, lambda: check_data(source))
    available = None if GENERATED in sources else available_tokens(spec, tokenizer)
    per_token = 2 if vocab <= 1 << 16 else 4
    return {"source": spec, "tokens_needed": needed, "tokens_available": available,
            "epochs": None if not available else needed / available,
            "store_bytes": per_token * (available if available is not None else needed)}


def _prune_stage(step, source_cfg, index: int) -> tuple[dict, object]:
    from whelp.pruning.scores import check_scores_file
    from whelp.pruning.surgery import target_config
    from whelp.pruning.targets import first_keep, parse_target, target_rope

    where = f"recipe.prune[{index}]"
    parsed = _at(f"{where}.target", lambda: parse_target(source_cfg, step.target))
    rope = _at(f"{where}.target", lambda: target_rope(parsed, step.options.rope))
    _at(f"{where}.seq_len", lambda: models.check_positions(source_cfg, step.options.seq_len, "seq_len"))
    if step.options.scores:
        _at(f"{where}.scores", lambda: check_scores_file(Path(step.options.scores).expanduser()))
    cfg = target_config(source_cfg, first_keep(source_cfg, parsed.shape, step.options.tie), rope)
    return {"stage": f"prune[{index}]", "target": step.target, "shape": _params(cfg)}, cfg


def _at(where: str, check):
    """``check()``, whose WhelpError names the recipe key ``where``."""
    try:
        return check()
    except WhelpError as exc:
        raise WhelpError(f"{where}: {exc}") from None


def _same_tokenizer(model: str, tokenizer, where: str) -> None:
    """A local distill teacher must share the recipe teacher's tokenizer (checked from its files; no weights)."""
    from whelp.data.tokenstore import tokenizer_hash

    if tokenizer is None or not (Path(model).expanduser() / "config.json").is_file():
        return
    theirs = models.load_tokenizer(model)
    if tokenizer_hash(theirs) != tokenizer_hash(tokenizer):
        raise WhelpError(f"{where}: {model} has another tokenizer than the recipe's teacher ({len(theirs):,} vs "
                         f"{len(tokenizer):,} tokens): token-level distillation needs the same token ids")


def _calib_plan(step, vocab: int, tokenizer, index: int) -> dict:
    return data_plan(step.options.calib, step.options.calib_samples * step.options.seq_len, vocab, tokenizer,
                     f"recipe.prune[{index}].calib")


def _teacher_params(ref, teacher_cfg, path: str) -> int:
    if ref.model == TEACHER:
        return models.count_params(teacher_cfg)[0]
    return _at(path, lambda: models.count_params(models.load_config(ref.config or ref.model))[0])


def _distill_stage(step, student_cfg, recipe: Recipe, teacher_cfg, index: int, tokenizer) -> dict:
    spec = step.options
    n_student = models.count_params(student_cfg)[0]
    tokens_per_step = spec.batch_size * spec.grad_accum * spec.seq_len
    tokens = spec.max_tokens if spec.max_tokens is not None else spec.steps * tokens_per_step
    steps = math.ceil(tokens / tokens_per_step)  # on one process
    _at(f"recipe.distill[{index}].seq_len", lambda: models.check_positions(student_cfg, spec.seq_len, "seq_len"))
    _at(f"recipe.distill[{index}].warmup", lambda: spec.check_steps(steps))
    for i, t in enumerate(step.teachers):
        if t.model != TEACHER:
            _same_tokenizer(t.model, tokenizer, f"recipe.distill[{index}].teachers[{i}]")
    live = [(t.model, t.weight, _teacher_params(t, teacher_cfg, f"recipe.distill[{index}].teachers[{i}]"))
            for i, t in enumerate(step.teachers)]
    cached = [(c, _teacher_params(c, teacher_cfg, f"recipe.distill[{index}].caches[{i}]"))
              for i, c in enumerate(step.caches)]
    teacher_bytes = DTYPE_BYTES[recipe.teacher.dtype]
    return {
        "stage": f"distill[{index}]", "tokens": tokens, "steps": steps,
        "data": data_plan(spec.data, tokens, student_cfg.vocab_size, tokenizer, f"recipe.distill[{index}].data"),
        # on-policy rows are also run through the student once more, token by token, to sample them (no grad)
        "flops_per_token": {"student_train": 6 * n_student, "student_sampling": round(spec.on_policy * 2 * n_student),
                            "live_teachers": sum(2 * n for _, _, n in live),
                            "cache_teachers_once": sum(2 * n for _, n in cached)},
        "teachers": [{"model": m, "weight": w, "params": n} for m, w, n in live],
        "caches": [{"model": c.model, "weight": c.weight, "mode": c.mode, "k": c.k, "params": n,
                    "bytes_per_token": cache_bytes_per_token(c.mode, c.k, student_cfg.vocab_size),
                    "bytes": tokens * cache_bytes_per_token(c.mode, c.k, student_cfg.vocab_size)}
                   for c, n in cached],
        "memory_bytes": {"student_training": TRAIN_BYTES_PER_PARAM * n_student,
                         "live_teachers": sum(teacher_bytes * n for _, _, n in live)},
    }


def _generate_stage(recipe: Recipe, teacher_cfg) -> dict:
    """Teacher text: its tokens, the sampling FLOPs (2 x params per token, prompts included) and store bytes."""
    from whelp.data import check_data

    step = recipe.generate
    n = models.count_params(teacher_cfg if step.model == TEACHER else
                            _at("recipe.generate.model", lambda: models.load_config(step.model)))[0]
    if step.options.prompts:
        _at("recipe.generate.prompts", lambda: check_data(step.options.prompts))
    tokens = step.options.max_tokens
    return {"stage": "generate", "tokens": tokens, "flops_per_token": {"teacher_sampling": 2 * n},
            "store_bytes": (2 if teacher_cfg.vocab_size <= 1 << 16 else 4) * tokens}


def plan_recipe(recipe: Recipe) -> dict:
    """Every stage's shapes, params, FLOPs per token, tokens, cache bytes and memory estimates."""
    teacher_cfg = teacher_config(recipe)
    tokenizer = _local_tokenizer(recipe)
    stages, current = [], teacher_cfg
    if recipe.generate is not None:
        stages.append(_generate_stage(recipe, teacher_cfg))
    for ref in recipe.stages():
        if ref.kind == "prune":
            entry, current = _prune_stage(ref.step, current, ref.index)
            entry["data"] = _calib_plan(ref.step, teacher_cfg.vocab_size, tokenizer, ref.index)
        else:
            entry = _distill_stage(ref.step, current, recipe, teacher_cfg, ref.index, tokenizer)
        stages.append(entry)
    _check_eval(recipe)
    return {"recipe": recipe.name, "teacher": {"model": recipe.teacher.model, "shape": _params(teacher_cfg)},
            "stages": stages, "student": _params(current)}


def _check_eval(recipe: Recipe) -> None:
    """The eval section's sources and lm-eval task names, so a build never fails on them after pruning."""
    from whelp.data import check_data
    from whelp.evals.harness import check_include_paths, check_task_names

    for i, source in enumerate(recipe.eval.ppl):
        _at(f"recipe.eval.ppl[{i}]", lambda: check_data(source))
    _at("recipe.eval.include_paths", lambda: check_include_paths(recipe.eval.include_paths))
    if recipe.eval.tasks:
        _at("recipe.eval.tasks", lambda: check_task_names(recipe.eval.tasks, recipe.eval.include_paths))


def describe_data(d: dict) -> str:
    """``needs N tokens of SOURCE: M available (E epochs), store B GB`` for a table cell."""
    have = "not tokenized yet" if d["tokens_available"] is None else (
        f"{d['tokens_available']:,} available ({d['epochs']:.2f} epochs)")
    return f"data {d['source']}: needs {d['tokens_needed']:,} tokens, {have}; store {d['store_bytes'] / 1e9:,.3f} GB"


def describe(stage: dict) -> tuple[str, str, str, str]:
    """One table row of a planned stage: name, what it makes, params or FLOPs/token, bytes (data, cache, memory)."""
    if stage["stage"] == "generate":
        return ("generate", f"{stage['tokens']:,} tokens of teacher text",
                f"teacher sampling {stage['flops_per_token']['teacher_sampling'] / 1e9:.1f} G",
                f"store {stage['store_bytes'] / 1e9:,.3f} GB (the data source 'generated')")
    if "shape" in stage:
        shape = stage["shape"]
        dims = (f"L{shape['num_hidden_layers']} H{shape['hidden_size']} I{shape['intermediate_size']} "
                f"heads {shape['num_attention_heads']}/{shape['num_key_value_heads']}x{shape['head_dim']}")
        return stage["stage"], f"-> {stage['target']}: {dims}", f"{shape['params']:,}", describe_data(stage["data"])
    flops = stage["flops_per_token"]
    cache = sum(c["bytes"] for c in stage["caches"])
    memory = stage["memory_bytes"]
    return (stage["stage"], f"{stage['tokens']:,} tokens",
            f"student {flops['student_train'] / 1e9:.1f} G"
            + (f" + on-policy sampling {flops['student_sampling'] / 1e9:.1f} G" if flops["student_sampling"] else "")
            + f", live teachers {flops['live_teachers'] / 1e9:.1f} G, "
            f"cached teachers {flops['cache_teachers_once'] / 1e9:.1f} G once",
            f"{describe_data(stage['data'])}; cache {cache / 1e9:,.1f} GB; training "
            f"{memory['student_training'] / 2**30:.1f} GiB + live teachers {memory['live_teachers'] / 2**30:.1f} GiB")
