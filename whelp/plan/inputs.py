"""What a plan reads, and checks as it reads: the teacher's config (and tokenizer, when it is on this machine), a
model's parameter counts, the tokens a stage's data needs and holds, the bytes of a cached token, and the eval
section's sources and tasks; each error names the recipe key it comes from."""

from __future__ import annotations

from pathlib import Path

from whelp import architecture, models
from whelp.data import available_tokens, check_data, check_source
from whelp.data.chat import check_chat_template
from whelp.data.tokenstore import token_dtype, tokenizer_hash
from whelp.distillation.cache import MAG_BITS, id_bits
from whelp.errors import WhelpError
from whelp.evals.api import check_lengths
from whelp.evals.behaviour import read_prompts
from whelp.evals.harness import check_include_paths, check_task_names
from whelp.pruning import moe
from whelp.pruning.moe import shape_of
from whelp.recipe import Recipe
from whelp.registry import REGISTRY
from whelp.specs import TEACHER, Mixture
from whelp.store import whelp_home


def teacher_config(recipe: Recipe):
    """The teacher's config (``teacher.config`` when given, else from the model) - a missing teacher fails here,
    and so does a ``teacher.config`` of another shape than the teacher on this machine."""
    source = recipe.teacher.config or recipe.teacher.model
    config = _at(f"recipe.teacher.{'config' if recipe.teacher.config else 'model'}", lambda: models.load_config(source))
    local = _local_teacher(recipe)
    if recipe.teacher.config and local is not None:
        planned, actual = architecture.shape(config), architecture.shape(models.load_config(str(local)))
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
        total, non_embedding, active = architecture.count_params(config, active=True)
    else:
        (total, non_embedding), active = architecture.count_params(config), None
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


def data_plan(
    mixture: Mixture, needed: int, vocab: int, tokenizer, where: str = "data", generated: frozenset[str] = frozenset()
) -> dict:
    """Tokens a stage needs from ``mixture``, tokens available in its stores (None when not tokenized yet), epochs,
    and the store's bytes on disk. An unreadable source fails here, naming the recipe key ``where``; ``generated``:
    the sources a generate stage of the build makes (not on disk before it runs)."""
    check_sources(mixture, where, generated)
    available = None if generated & set(mixture.names) else available_tokens(mixture, tokenizer)
    per_token = token_dtype(vocab).itemsize
    return {
        "source": str(mixture),
        "tokens_needed": needed,
        "tokens_available": available,
        "epochs": None if not available else needed / available,
        "store_bytes": per_token * (available if available is not None else needed),
    }


def check_sources(mixture: Mixture, where: str, generated: frozenset[str] = frozenset()) -> None:
    """Every source of ``mixture`` is readable, naming the recipe key ``where``; ``generated`` are left out (a generate
    stage of the build makes them)."""
    for source in mixture.names:
        if source not in generated:
            _at(where, check_source, source)


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


def _calib_plan(step, vocab: int, tokenizer, index: int, generated: frozenset[str]) -> dict:
    return data_plan(
        step.options.calib,
        step.options.calib_samples * step.options.seq_len,
        vocab,
        tokenizer,
        f"recipe.prune[{index}].calib",
        generated,
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


def _check_eval(recipe: Recipe, configs) -> None:
    """The eval section's sizes against the positions of the models it measures (``configs``: the teacher's and the
    student's), its sources, lm-eval task names and chat prompts (and the teacher's chat template, which the prompts
    are answered through, when the teacher is on this machine), so a build never fails on them after pruning."""
    for config in configs:
        _at("recipe.eval", check_lengths, config, recipe.eval)
    for i, source in enumerate(recipe.eval.ppl):
        _at(f"recipe.eval.ppl[{i}]", check_data, source)
    _at("recipe.eval.include_paths", lambda: check_include_paths(recipe.eval.include_paths))
    if recipe.eval.tasks:
        _at("recipe.eval.tasks", lambda: check_task_names(recipe.eval.tasks, recipe.eval.include_paths))
    for i, name in enumerate(recipe.eval.chat):
        _at(f"recipe.eval.chat[{i}]", read_prompts, name)
    local = _local_teacher(recipe)
    if recipe.eval.chat and local is not None:
        why = "eval.chat answers through the teacher's template: drop eval.chat or use an instruct teacher"
        _at("recipe.eval.chat", lambda: check_chat_template(models.load_tokenizer(str(local)), "the teacher", why))
