"""``whelp plan RECIPE``: what a build will make and cost, before anything runs.

Per stage (generate, search, prune, one capture per cached teacher, distill): shapes and parameters (from configs on the
meta device; no weights), FLOPs per token and in total, tokens, the parts of its memory and its bytes on disk; the
formulas (Kaplan et al. 2020's 2 N per token forward and 6 N training, N the total parameters including embeddings,
as docs/design.md section 8 counts the 70B's 141 GFLOP/token; memory and disk) are in ``whelp.footprint`` (what each
stage holds, the prune's and generation's FLOPs) and ``whelp.pricing``, which turns a plan into GPU-hours, wall-clock
hours and bytes per GPU on a chosen kind and number of GPUs.
And per stage the data: tokens it needs, tokens its sources hold (when their token stores exist: a store
directory, or the store a raw source was tokenized into) and the resulting epochs, and the store's bytes on disk
(2 bytes per token at vocab <= 65,536, else 4).
A prune target that is a shape search (``target: {search: ...}``) plans a search stage (the shapes it enumerates,
its one-shot pool and its cost, ``whelp.search.run.plan_search``); the winner is known only once it ran, so
the stages after it are planned at the largest shape the search may pick, an upper bound marked ``estimate``.

Its floors (``[tool.importlinter]``): ``stages`` (each stage planned, ``plan_recipe``) | ``describe`` (a stage as
text) > ``inputs`` (configs, tokenizers, data and caches read and checked, each error naming its recipe key).
"""

from whelp.plan.describe import describe, describe_data
from whelp.plan.inputs import cache_bytes_per_token, data_plan, teacher_config
from whelp.plan.stages import ESTIMATE, plan_recipe

__all__ = [
    "ESTIMATE",
    "cache_bytes_per_token",
    "data_plan",
    "describe",
    "describe_data",
    "plan_recipe",
    "teacher_config",
]
