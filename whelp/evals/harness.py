"""lm-eval tasks on an in-memory model: ``simple_evaluate`` with ``HFLM`` wrapping the model whelp already loaded.

Registered lm-eval tasks work when the user is online; offline, tasks come from YAML include paths, and whelp ships
three (``whelp_pydoc``, ``whelp_licenses``, ``whelp_pydoc_next``: see ``whelp/evals/tasks``) whose data is built on
the machine, so the whole path runs with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import difflib
import math
import traceback
from pathlib import Path

from whelp import store
from whelp.errors import WhelpError
from whelp.output import quiet_streams

SHIPPED_TASKS = Path(__file__).resolve().parent / "tasks"
# simple_evaluate's seeds, passed explicitly so that metrics.json records them
SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}


def check_include_paths(include_paths: tuple[str, ...]) -> None:
    """Each path a directory with task YAMLs somewhere below it (where lm-eval looks)."""
    for path in include_paths:
        if not Path(path).expanduser().is_dir():
            raise WhelpError(f"--include-path {path} is not a directory of lm-eval task YAMLs")
        if not any(Path(path).expanduser().rglob("*.yaml")):
            raise WhelpError(
                f"--include-path {path} holds no lm-eval task YAMLs (*.yaml); point it at the directory "
                "of your task files"
            )


def _task_paths(include_paths: tuple[str, ...]) -> list[str]:
    check_include_paths(include_paths)
    return [str(SHIPPED_TASKS), *(str(Path(p).expanduser()) for p in include_paths)]


def task_manager(tasks: tuple[str, ...], include_paths: tuple[str, ...] = ()):
    """lm-eval's TaskManager over whelp's shipped tasks and the user's include paths, plus lm-eval's registered
    tasks only when a requested name is not local (indexing those takes ~30 s on a slow CPU).

    Unknown names fail here, naming the closest known ones.
    """
    from lm_eval.tasks import TaskManager  # noqa: PLC0415 - heavy: lm-eval loads only when tasks are run or checked

    paths = _task_paths(include_paths)
    manager = TaskManager(include_path=paths, include_defaults=False)
    if not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=paths)
    check_tasks(tasks, manager.all_tasks)
    return manager


def check_task_names(tasks: tuple[str, ...], include_paths: tuple[str, ...] = ()) -> None:
    """``task_manager``'s name check without building it: whelp's and the include paths' tasks, then the names of
    lm-eval's registry, indexed once per lm-eval version (about 13 s on a slow CPU) into ``$WHELP_HOME/lm-eval``."""
    import lm_eval  # noqa: PLC0415 - heavy: lm-eval loads only when tasks are run or checked
    from lm_eval.tasks import TaskManager  # noqa: PLC0415 - heavy: lm-eval loads only when tasks are run or checked

    local = TaskManager(include_path=_task_paths(include_paths), include_defaults=False).all_tasks
    if set(tasks) <= set(local):
        return
    index = store.whelp_home() / "lm-eval" / f"tasks-{lm_eval.__version__}.json"
    try:
        registry = store.read_record(index, "")["names"]
    except WhelpError:  # first use, or a damaged index: made again
        registry = TaskManager().all_tasks
        store.write_record(index, {"names": registry})
    check_tasks(tasks, sorted(set(local) | set(registry)))


def check_tasks(names: tuple[str, ...], known: list[str]) -> None:
    """Fail on task names not in ``known``, naming the closest known ones."""
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else "see `lm-eval ls tasks` for the known names"
            raise WhelpError(f"unknown lm-eval task '{name}': {hint} (local YAMLs go in --include-path DIR)")


def traceback_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


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


def run_tasks(
    model,
    tokenizer,
    tasks: tuple[str, ...],
    manager,
    limit: int | None = None,
    max_length: int | None = None,
    batch_size: int = 4,
    apply_chat_template: bool = False,
) -> dict:
    """Scores of ``model`` on lm-eval ``tasks`` (names checked by ``task_manager``):
    ``{"scores": {"task/metric": value}, "higher_is_better": {"task/metric": bool}}``.

    ``max_length`` is HFLM's context window (rolling-loglikelihood windows have this many tokens); None lets lm-eval
    take the model's own (``max_position_embeddings``...), so the numbers equal the stock ``lm_eval`` CLI's. It is
    independent of whelp's perplexity window: a short window must not truncate a task's long answers.
    ``limit`` caps the documents per task (lm-eval marks such results as not for reporting).
    ``apply_chat_template`` is lm-eval's own: each request is formatted as a chat turn with the model's template.
    """
    from lm_eval import simple_evaluate  # noqa: PLC0415 - heavy: lm-eval loads only when tasks are run or checked
    from lm_eval.models.huggingface import HFLM  # noqa: PLC0415 - heavy: lm-eval loads only when tasks are run or checked

    with quiet_streams():
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            device=str(model.device),
        )
        try:
            out = simple_evaluate(
                model=lm,
                tasks=list(tasks),
                task_manager=manager,
                limit=limit,
                apply_chat_template=apply_chat_template,
                log_samples=False,
                bootstrap_iters=1000,
                verbosity="ERROR",
                **SEEDS,
            )
        except AssertionError as exc:  # lm-eval asserts that each request fits its context
            if "max_length" not in str(exc) and "continuation" not in traceback_text(exc):
                raise
            raise WhelpError(
                f"a request of {', '.join(tasks)} is longer than the {lm.max_length}-token lm-eval "
                "context; raise --max-length (or drop it: the model's own context)"
            ) from None
    higher = {
        f"{task}/{metric}": bool(better)
        for task, metrics in out["higher_is_better"].items()
        for metric, better in metrics.items()
        if better is not None
    }
    return {"scores": flatten_results(out["results"]), "higher_is_better": higher}
