"""whelp: build small language models from big ones (structured pruning, multi-teacher distillation, evaluation).

The Python API works on models in memory; the ``whelp`` command and ``whelp build`` wrap the same functions with
directories, checkpoints and caches::

    import whelp
    teacher, tok = whelp.load_model("smollm2-135m")
    student = whelp.prune(teacher, "intermediate_size=768", whelp.blocks("pydoc:calib", tok, 128, n=4))
    student = whelp.distill(student, [teacher], whelp.blocks("pydoc:train", tok, 128, n=8),
                            whelp.DistillSpec(steps=2, batch_size=2, seq_len=128))
    print(whelp.evaluate({"teacher": teacher, "student": student}, tok,
                         whelp.EvalSpec(ppl=("pydoc:eval",), max_tokens=2048)).markdown())

The specs are torch-free and imported eagerly; the verbs (and torch) load on first use.
"""

import importlib

from whelp.errors import WhelpError
from whelp.specs import (
    CacheSpec,
    DistillSpec,
    EvalSpec,
    GenerateSpec,
    LoadPolicy,
    LossSpec,
    PruneSpec,
    Schedule,
    SpeedSpec,
)

__version__ = "0.1.0"

_VERBS = {
    "load_model": ("whelp.models", "load_model"),
    "blocks": ("whelp.data.blocks", "blocks"),
    "prune": ("whelp.pruning.api", "prune"),
    "distill": ("whelp.distillation.inprocess", "distill"),
    "evaluate": ("whelp.evals.api", "evaluate"),
    "open_cache": ("whelp.distillation.cache", "open_cache"),
    "prune_checkpoint": ("whelp.pruning.api", "prune_checkpoint"),
    "distill_run": ("whelp.distillation.api", "distill_run"),
    "evaluate_to": ("whelp.evals.api", "evaluate_to"),
    "cache_teacher": ("whelp.distillation.api", "cache_teacher"),
    "generate_store": ("whelp.data.generate", "generate_store"),
    # not "search": that name is the subpackage whelp.search, which importing it binds on this module
    "search_run": ("whelp.search.run", "search_run"),
}

__all__ = [
    "CacheSpec",
    "DistillSpec",
    "EvalSpec",
    "GenerateSpec",
    "LoadPolicy",
    "LossSpec",
    "PruneSpec",
    "Schedule",
    "SpeedSpec",
    "WhelpError",
    "__version__",
    *_VERBS,
]


def __getattr__(name: str):
    """The verbs, imported when first used (``import whelp`` stays as fast as the specs)."""
    if name not in _VERBS:
        raise AttributeError(f"module 'whelp' has no attribute '{name}'")

    module, attr = _VERBS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
