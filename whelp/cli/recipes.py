"""The recipe verbs: ``whelp plan`` (a prune's shapes from configs, or every stage of a recipe priced), ``validate``,
``show`` and ``build``."""

from __future__ import annotations

from pathlib import Path

import typer

from whelp import output
from whelp.cli.app import load_policy, print_json
from whelp.errors import WhelpError
from whelp.specs import PruneSpec

SetOption = typer.Option(None, "--set", help="Override a recipe value: key.path=value (repeatable)")


def plan(
    model: str = typer.Argument(
        ...,
        help="Teacher (model directory, registered name, hub id, config.json) or a recipe (YAML path or shipped name)",
    ),
    target: str | None = typer.Option(
        None,
        "--target",
        help="Preset (llama-3.2-1b, llama-3.2-3b, "
        "smollm2-half, smollm2-quarter), a config.json, or key=value,... overrides",
    ),
    rope: str = typer.Option(
        "auto",
        "--rope",
        help="RoPE of the target: auto (a preset's or config.json target's own, else the teacher's) | teacher | target",
    ),
    set_: list[str] | None = typer.Option(None, "--set", help="Recipe override key.path=value (repeatable)"),
    gpus: int | None = typer.Option(None, "--gpus", help="Recipe: price on N GPUs (default 1)"),
    gpu: str | None = typer.Option(
        None,
        "--gpu",
        help="Recipe: GPU kind h100 | a100 | h200, or its peak "
        "FLOP/s (e.g. 989e12; memory then unknown) (default h100)",
    ),
    mfu: float | None = typer.Option(None, "--mfu", help="Recipe: model FLOPs utilization in (0, 1] (default 0.4)"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
):
    """Shapes and parameter counts of a prune (MODEL --target T), or of every stage of a recipe with its FLOPs,
    GPU-hours, wall-clock hours on N GPUs, memory per GPU and disk; no weights loaded."""
    if target is None:
        return _plan_recipe(model, tuple(set_ or ()), as_json, gpu, gpus, mfu)
    if (gpus, gpu, mfu) != (None, None, None):
        raise WhelpError(
            "--gpus, --gpu and --mfu price a recipe (whelp plan RECIPE); a prune plan (--target) has no "
            "GPU work to price"
        )
    from whelp.models import load_config  # noqa: PLC0415 - start-up: --help and show load no verb module
    from whelp.pruning.targets import plan_target  # noqa: PLC0415 - start-up: --help and show load no verb module

    PruneSpec(rope=rope)  # the one check of the value
    result = plan_target(load_config(model, load_policy()), target, rope)
    if as_json:
        return print_json(result)
    rows = [(key, result["source"][key], result["target"][key]) for key in result["source"]]
    typer.echo("\n".join(output.columns(f"{model} -> {target}", ("", "source", "target"), rows)))


def _plan_recipe(
    name: str, overrides: tuple[str, ...], as_json: bool, gpu: str | None, gpus: int | None, mfu: float | None
) -> None:
    from whelp import plan as planning  # noqa: PLC0415 - start-up: --help and show load no verb module
    from whelp import pricing  # noqa: PLC0415 - start-up: --help and show load no verb module
    from whelp import recipe as recipes  # noqa: PLC0415 - start-up: --help and show load no verb module

    default = " (the default; choose with --gpus N --gpu KIND)" if gpu is None and gpus is None else ""
    kind = pricing.parse_gpu(gpu or "h100")
    gpus, mfu = 1 if gpus is None else gpus, pricing.MFU if mfu is None else mfu
    pricing.check_pricing(gpus, mfu)  # the pricing options first: no config is read for a typo
    if Path(name).expanduser().is_dir():
        raise WhelpError(
            f"'{name}' is a directory here, not a recipe; to plan a prune of that model pass --target T "
            f"(for the shipped recipe of that name, write {recipes.RECIPES_DIR / name}.yaml)"
        )
    if not name.endswith((".yaml", ".yml")) and not (recipes.RECIPES_DIR / f"{name}.yaml").exists():
        raise WhelpError(f"'{name}' is not a recipe; to plan a prune of a model, pass --target")
    result = pricing.price(planning.plan_recipe(recipes.load(name, overrides)), kind, gpus, mfu)
    if as_json:
        return print_json(result)
    p = result["pricing"]
    memory = "memory unknown: fit not checked" if p["gpu_memory_bytes"] is None else output.size(p["gpu_memory_bytes"])
    blocks = [
        ("teacher", [("model", result["teacher"]["model"]), ("params", f"{result['teacher']['shape']['params']:,}")]),
        *((s["stage"], planning.describe(s) + pricing.describe_cost(s)) for s in result["stages"]),
        ("total", pricing.describe_total(result["totals"])),
    ]
    lines = [
        f"recipe {result['recipe']}",
        *output.wrap(
            f"cost on {p['gpus']} x {p['gpu']} ({p['peak_flops'] / 1e12:,.0f} TFLOP/s, {memory}) at MFU {p['mfu']:g}"
            + default
        ),
    ]
    for name, pairs in blocks:
        lines += ["", name, *output.key_values(pairs)]
    lines += [
        "",
        *output.wrap(
            "GPU time = FLOPs / (peak x MFU) / 3600; a CPU stage's time is at one GPU's rate (a CPU takes far "
            "longer); `--json` lists every memory part and gives raw numbers"
        ),
    ]
    typer.echo("\n".join(lines))
    for warning in result["warnings"]:
        typer.secho("\n".join(output.wrap(warning, "  ", "warning: ")), fg="yellow")


def validate(
    recipe: str = typer.Argument(..., help="Recipe YAML path or shipped recipe name"),
    set_: list[str] | None = SetOption,
):
    """Check a recipe strictly: keys, types, ranges, data sources, eval tasks, the teacher, every target shape and
    the build directory."""
    from whelp import build as builder  # noqa: PLC0415 - start-up: --help and show load no verb module
    from whelp import plan as planning  # noqa: PLC0415 - start-up: --help and show load no verb module
    from whelp import recipe as recipes  # noqa: PLC0415 - start-up: --help and show load no verb module
    from whelp.card import license_of  # noqa: PLC0415 - start-up: --help and show load no verb module

    loaded = recipes.load(recipe, tuple(set_ or ()))
    planning.plan_recipe(loaded)
    license_of(loaded)  # the card the build ends with needs a licence (a gated teacher's must be set)
    builder.check_out(builder.build_dir(loaded, None))
    searches = sum(ref.kind == "prune" and not isinstance(ref.step.target, str) for ref in loaded.stages())
    typer.echo(f"ok: {loaded.name} ({len(loaded.stages()) + len(loaded.generate) + searches} stages)")


def show(
    recipe: str = typer.Argument(..., help="Recipe YAML path or shipped recipe name"),
    set_: list[str] | None = SetOption,
):
    """Print the resolved recipe: every value a build would use."""
    from whelp import recipe as recipes  # noqa: PLC0415 - start-up: --help and show load no verb module

    typer.echo(recipes.dump(recipes.load(recipe, tuple(set_ or ()))), nl=False)


def build(
    recipe: str = typer.Argument(..., help="Recipe YAML path or shipped recipe name"),
    out: str | None = typer.Option(None, "--out", help="Build directory (default: the recipe's out, or runs/NAME)"),
    set_: list[str] | None = SetOption,
    force: bool = typer.Option(
        False,
        "--force",
        help="Run every stage again; only whelp's own outputs are replaced, each once its new version is complete",
    ),
):
    """Run a recipe: prune -> distill -> eval -> final student with report and model card; resumable."""
    from whelp import build as builder  # noqa: PLC0415 - start-up: --help and show load no verb module
    from whelp import recipe as recipes  # noqa: PLC0415 - start-up: --help and show load no verb module

    final = builder.build(recipes.load(recipe, tuple(set_ or ())), out, force=force, policy=load_policy())
    typer.echo(str(final))
