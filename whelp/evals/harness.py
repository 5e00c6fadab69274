"""lm-eval tasks on an in-memory model: ``simple_evaluate`` with ``HFLM`` wrapping the model whelp already loaded.

Registered lm-eval tasks work when the user is online; offline, tasks come from YAML include paths, and whelp ships
three (``whelp_pydoc``, ``whelp_licenses``, ``whelp_pydoc_next``: see ``whelp/evals/tasks``) whose data is built on
the machine, so the whole path runs with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path

from whelp.errors import WhelpError

SHIPPED_TASKS = Path(__file__).resolve().parent / "tasks"
# simple_evaluate's seeds, passed explicitly so that metrics.json records them
SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}


def task_manager(include_paths: tuple[str, ...] = ()):
    """lm-eval's TaskManager over its registered tasks, whelp's shipped tasks and the user's include paths."""
    from lm_eval.tasks import TaskManager

    for path in include_paths:
        if not Path(path).expanduser().is_dir():
            raise WhelpError(f"--include-path {path} is not a directory of lm-eval task YAMLs")
    paths = [str(SHIPPED_TASKS), *(str(Path(p).expanduser()) for p in include_paths)]
    return TaskManager(include_path=paths, verbosity="ERROR")


def check_tasks(names: tuple[str, ...], manager) -> None:
    """Fail on task names lm-eval does not know, naming the closest known ones."""
    known = manager.all_tasks
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else "see `lm-eval ls tasks` for the known names"
            raise WhelpError(f"unknown lm-eval task '{name}': {hint} (local YAMLs go in --include-path DIR)")


def flatten_results(results: dict) -> dict[str, float]:
    """``{"task/metric": value}`` from simple_evaluate's ``results`` (filter suffix ``,none`` dropped).

    Only finite numbers are kept; lm-eval reports ``"N/A"`` stderrs for perplexity-type metrics.
    """
    flat = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if key == "alias" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if not math.isfinite(value):
                continue
            metric, _, flt = key.partition(",")
            flat[f"{task}/{metric}" + ("" if flt in ("", "none") else f",{flt}")] = float(value)
    return flat


def run_tasks(model, tokenizer, tasks: tuple[str, ...], manager, limit: int | None = None,
              max_length: int = 512, batch_size: int = 4) -> dict[str, float]:
    """Scores of ``model`` on lm-eval ``tasks`` as ``{"task/metric": value}``.

    ``max_length`` is HFLM's context window (rolling-loglikelihood windows have this many tokens);
    ``limit`` caps the documents per task (lm-eval marks such results as not for reporting).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    check_tasks(tasks, manager)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
              device=str(model.device))
    out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False,
                          bootstrap_iters=1000, verbosity="ERROR", **SEEDS)
    return flatten_results(out["results"])
