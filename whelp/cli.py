"""The ``whelp`` command line: a thin index of library verbs.

Each command parses flags, calls one library function and prints the result. The options of every spec come from
its fields (``whelp.flags``); the safety opt-ins become one ``LoadPolicy`` handed to every verb. Heavy libraries
(torch, transformers) are imported inside the commands, so ``whelp --help``, ``show`` and ``validate`` start fast.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

import typer

try:  # typer >= 0.26 vendors click as typer._click; older typer raises click's own
    from typer._click.exceptions import UsageError
except ImportError:
    from click.exceptions import UsageError

from whelp import __version__, output
from whelp.errors import WhelpError
from whelp.flags import with_spec
from whelp.specs import (
    CacheSpec,
    DistillSpec,
    EvalSpec,
    GenerateSpec,
    LoadPolicy,
    Mixture,
    PruneSpec,
    SearchSpec,
    parse_weighted,
)


class _App(typer.Typer):
    """Typer app whose user-facing errors print as one line, not a traceback or a usage box."""

    def __call__(self, *args, **kwargs):
        try:
            code = super().__call__(*args, standalone_mode=False, **kwargs)
        except UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `whelp` or `whelp VERB`: the help, as asked
                exc.show()
                sys.exit(0)
            where = exc.ctx.command_path if exc.ctx else "whelp"
            _fail(f"{exc.format_message()} (see `{where} --help`)")
        except typer.Abort:  # Ctrl-C outside a training loop
            _fail(INTERRUPTED, 130)
        except WhelpError as exc:
            _fail(str(exc))
        except OSError as exc:  # a full disk, a read-only --out, a path below a regular file
            where = f" ({exc.filename})" if exc.filename else ""
            _fail(
                f"{exc.strerror or exc}{where}; nothing half-written was kept: free space or choose another path, "
                "then re-run"
            )
        if code == 130:  # typer turns a KeyboardInterrupt into exit code 130
            _fail(INTERRUPTED, 130)
        if isinstance(code, int) and code:
            sys.exit(code)
        return code


INTERRUPTED = (
    "interrupted; outputs are written atomically, so nothing half-written was kept. Re-run the same "
    "command to continue (distil runs, caches and builds resume)"
)


def _fail(message: str, code: int = 2):
    typer.secho(f"error: {message}", fg="red", err=True)
    sys.exit(code)


app = _App(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Build small language models from big ones: prune, distill, evaluate.",
)
POLICY = {"policy": LoadPolicy()}  # set once per process by the callback below, read by every command


def _terminate(*_):
    raise KeyboardInterrupt  # SIGTERM (a scheduler, `kill`): the same clean stop and message as Ctrl-C


@app.callback(invoke_without_command=True)
def _main(
    version: bool = typer.Option(False, "--version", help="Print the version and exit"),
    allow_pickle: bool = typer.Option(
        False,
        "--allow-pickle",
        help="Load pickle (.bin/.pt) checkpoints: only for files you trust, pickle can run arbitrary code",
    ),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Run model code shipped with a checkpoint (off by default)"
    ),
    verbose: bool = typer.Option(False, "--verbose", help="Show third-party warnings and loading bars"),
):
    """Build small language models from big ones: prune, distill, evaluate."""
    signal.signal(signal.SIGTERM, _terminate)
    output.configure(verbose)
    POLICY["policy"] = LoadPolicy(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if version:
        typer.echo(__version__)
        raise typer.Exit()


def _policy() -> LoadPolicy:
    return POLICY["policy"]


def _console():
    from rich.console import Console  # noqa: PLC0415 - start-up: only a printed table needs rich

    return Console(emoji=False)  # ":train:" in pydoc:train is data, not an emoji


def _say(line: str) -> None:
    """A closing line, once: under torchrun only rank 0 prints it."""
    if os.environ.get("RANK", "0") == "0":
        typer.echo(line)


def _print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2))


def _table(title: str, rows, columns=None) -> None:
    from rich.table import Table  # noqa: PLC0415 - start-up: only a printed table needs rich

    table = Table(title=title, show_header=columns is not None)
    for column in columns or ("", ""):
        table.add_column(column)
    for row in rows:
        table.add_row(*(f"{v:,}" if type(v) is int else str(v) for v in row))
    _console().print(table)


@app.command()
def inspect(
    model: str = typer.Argument(..., help="Model directory, registered name (smollm2-135m), hub id or config.json"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
):
    """Shape (HF config names), parameters, stored dtype and bytes on disk of a model; no weights loaded."""
    from whelp import models  # noqa: PLC0415 - start-up: --help and show load no verb module

    info = models.inspect(model, _policy())
    if as_json:
        return _print_json(info)
    _table(model, info.items())


@app.command()
def export(
    model: str = typer.Argument(..., help="Model directory (HF checkpoint) or registered name"),
    gguf: str = typer.Option(..., "--gguf", help="GGUF file to write (llama.cpp, ollama, LM Studio)"),
    outtype: str = typer.Option(
        "auto",
        "--outtype",
        help="auto (llama.cpp's default: bf16 for a bf16 checkpoint, else f16) | f16 | bf16 | q8_0 | f32",
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing GGUF file at --gguf"),
):
    """Export a checkpoint to one GGUF file through llama.cpp's own converter (fetched once from PyPI)."""
    from whelp.export import LLAMA_CPP_PYTHON, export_gguf  # noqa: PLC0415 - start-up: --help and show load no verb module

    path = export_gguf(model, gguf, outtype, force=force, policy=_policy())
    typer.echo(
        f"wrote {path} ({outtype}, {path.stat().st_size:,} bytes; llama.cpp's converter from "
        f"llama-cpp-python {LLAMA_CPP_PYTHON})"
    )


@app.command("cache-logits")
@with_spec("spec", CacheSpec)
def cache_logits(
    teacher: str = typer.Argument(..., help="Teacher model directory or registered name"),
    data: str = typer.Option(..., "--data", help="Text source (file, dir, pydoc:train, hf:...)"),
    out: str = typer.Option(..., "--out", help="Cache directory to write"),
    topk: int | None = typer.Option(None, "--topk", help="Store the top-K log-probs + tail mass"),
    sample: int | None = typer.Option(None, "--sample", help="Store S teacher samples (unbiased)"),
    force: bool = typer.Option(False, "--force", help="Replace an existing cache at --out"),
    spec: CacheSpec | None = None,
):  # built from the options by @with_spec
    """Run a teacher over packed data once and cache sparse per-token targets (resumes if interrupted)."""
    from whelp.distillation.api import cache_teacher  # noqa: PLC0415 - start-up: --help and show load no verb module

    if (topk is None) == (sample is None):
        raise WhelpError("pass exactly one of --topk K or --sample S")
    spec = replace(spec, mode="topk" if topk is not None else "sample", k=topk if topk is not None else sample)
    path = cache_teacher(teacher, data, out, spec, force=force, policy=_policy())
    _say(f"wrote the {teacher} targets of {data} to {path}")


@app.command()
def tokenize(
    data: str = typer.Argument(..., help="Text source: file, directory, pydoc:train, hf:NAME[:CONFIG]:SPLIT"),
    tokenizer: str = typer.Option(..., "--tokenizer", help="Model whose tokenizer to use (dir or registered)"),
    out: str = typer.Option(..., "--out", help="Token-store directory to write"),
    num_proc: int | None = typer.Option(None, "--num-proc", help="Tokenizer processes (default: all cores)"),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="Keep at most N tokens"),
    text_column: str = typer.Option("text", "--text-column", help="Column of .jsonl/.parquet/hf rows"),
    force: bool = typer.Option(False, "--force", help="Replace an existing token store at --out"),
):
    """Tokenize a corpus once into a token store (uint16/uint32 shards + manifest) that every stage reads."""
    from whelp.data import check_source, tokenstore  # noqa: PLC0415 - start-up: --help and show load no verb module
    from whelp.models import load_tokenizer  # noqa: PLC0415 - start-up: --help and show load no verb module

    if len(Mixture.parse(data).sources) > 1:  # an existing path with a ',' is one source
        raise WhelpError("tokenize one source into one store; mix stores when you use them (--data a:0.7,b:0.3)")
    check_source(data)
    _wrote_store(
        tokenstore.tokenize(
            data, load_tokenizer(tokenizer, _policy()), out, num_proc, max_tokens, text_column, force=force
        ),
        "documents",
    )


def _wrote_store(path, what: str) -> None:
    from whelp.data import tokenstore  # noqa: PLC0415 - start-up: --help and show load no verb module

    m = tokenstore.open_store(path).manifest
    typer.echo(
        f"wrote {m['total_tokens']:,} tokens of {m['documents']:,} {what} ({m['dtype']}, "
        f"{len(m['shards'])} shards) to {path}"
    )


@app.command()
@with_spec("spec", GenerateSpec)
def generate(
    teacher: str = typer.Argument(..., help="Teacher model directory or registered name"),
    out: str = typer.Option(..., "--out", help="Token-store directory to write"),
    force: bool = typer.Option(False, "--force", help="Replace an existing token store at --out"),
    spec: GenerateSpec | None = None,
):  # built from the options by @with_spec
    """Sample text from a teacher into a token store (usable wherever DATA is; resumes if interrupted)."""
    from whelp.data.generate import generate_store  # noqa: PLC0415 - start-up: --help and show load no verb module

    _wrote_store(generate_store(teacher, out, spec, force=force, policy=_policy()), f"sequences sampled from {teacher}")


@app.command("eval")
@with_spec("spec", EvalSpec)
def eval_(
    models: list[str] = typer.Argument(
        ..., help="MODEL or LABEL=MODEL (dir, registered name, hub id); the first is the reference"
    ),
    out: str = typer.Option(..., "--out", help="Report directory (metrics.json, report.md, report.png)"),
    baseline: str | None = typer.Option(None, "--baseline", help="Reference model (default: the first)"),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out directory"),
    spec: EvalSpec | None = None,
):  # built from the options by @with_spec
    """Score models on perplexity, lm-eval tasks, size and speed; write a report comparing them to the reference."""
    from whelp.evals.api import EvalResult, evaluate_to, labelled  # noqa: PLC0415 - start-up: --help and show load no verb module

    metrics = evaluate_to(out, labelled(models, baseline), spec, force=force, policy=_policy())
    typer.echo(EvalResult(metrics).markdown() + f"\nwrote {out}/metrics.json, report.md, report.png")


@app.command()
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
    result = plan_target(load_config(model, _policy()), target, rope)
    if as_json:
        return _print_json(result)
    rows = [(key, result["source"][key], result["target"][key]) for key in result["source"]]
    typer.echo("\n".join(output.columns(f"{model} -> {target}", ("", "source", "target"), rows)))


@app.command()
@with_spec("spec", PruneSpec)
def prune(
    model: str = typer.Argument(..., help="Teacher: model directory, registered name or hub id"),
    target: str = typer.Option(..., "--target", help="Preset, config.json, or key=value,... overrides"),
    out: str = typer.Option(..., "--out", help="Output directory (HF checkpoint + prune_report.json)"),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out directory"),
    spec: PruneSpec | None = None,
):  # built from the options by @with_spec
    """Prune a teacher to a target shape in one pass; write a vanilla HF checkpoint and prune_report.json."""
    from whelp.pruning.api import prune_checkpoint  # noqa: PLC0415 - start-up: --help and show load no verb module

    report = prune_checkpoint(model, target, out, spec, force=force, policy=_policy())
    p = report["params"]
    typer.echo(
        f"wrote {out}: {p['before']:,} -> {p['after']:,} params ({report['path']}, {report['importance']}"
        f"{', scores reused' if report['scores_reused'] else ''})"
    )


@app.command()
@with_spec("spec", SearchSpec)
def search(
    teacher: str = typer.Argument(..., help="Teacher: model directory or registered name"),
    out: str = typer.Option(..., "--out", help="Output directory (leaderboard, plot, winner/, target.json)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the candidates and the cost; load no weights"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object"),
    force: bool = typer.Option(False, "--force", help="Start the search over and replace --out"),
    spec: SearchSpec | None = None,
):  # built from the options by @with_spec
    """Find the best student shape for a budget: enumerate, prune a pool one-shot, distil the best K, rank."""
    from whelp.search.run import search_run  # noqa: PLC0415 - start-up: --help and show load no verb module

    result = search_run(teacher, spec, Path(out), force=force, dry_run=dry_run, policy=_policy())
    if as_json:
        return _print_json(result)
    if dry_run:
        return _search_plan(result)
    w = result["winner"]
    typer.echo(
        f"wrote {out}: winner {_shape_text(w['shape'])} ({w['params'][1]:,} non-embedding params), KL "
        f"{w['one_shot']['kl']:.4f} one-shot -> {w['trained']['kl']:.4f} after {spec.score_steps} steps; "
        f"prune to it with --target {Path(out) / 'target.json'}"
    )


def _shape_text(shape: dict) -> str:
    return ",".join(
        f"{k}={shape[k]}"
        for k in (
            "num_hidden_layers",
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        )
    )


def _search_plan(result: dict) -> None:
    keys = (
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
    )
    _table(
        f"{len(result['candidates']):,} shapes meet the budget; the one-shot pool",
        [[row["shape"][k] for k in keys] + [row["params"][1]] for row in result["pool"]],
        ("layers", "hidden", "mlp", "heads", "kv heads", "head dim", "non-embedding"),
    )
    cost = result["cost"]
    typer.echo(
        f"cost: {cost['total']:.3g} FLOPs (calibration {cost['calibration']:.3g}, one-shot "
        f"{cost['one_shot']:.3g}, distillation {cost['distillation']:.3g} at most)"
    )


@app.command()
@with_spec("spec", DistillSpec)
def distill(
    student: str = typer.Argument(..., help="Student model directory (e.g. a pruned checkpoint)"),
    out: str = typer.Option(..., "--out", help="Output directory of the distilled student"),
    teacher: list[str] = typer.Option([], "--teacher", help="Live teacher MODEL[:WEIGHT] (repeatable)"),
    cache: list[str] = typer.Option([], "--cache", help="Teacher-logit cache DIR[:WEIGHT] (repeatable)"),
    resume: bool = typer.Option(False, "--resume", help="Require a run to resume in OUT.distill"),
    force: bool = typer.Option(False, "--force", help="Start over and overwrite --out"),
    spec: DistillSpec | None = None,
):  # built from the options by @with_spec
    """Distil a student from live teachers and/or logit caches (resumes; works under torchrun with FSDP2)."""
    from whelp.distillation.api import distill_run  # noqa: PLC0415 - start-up: --help and show load no verb module

    report = distill_run(
        student,
        Path(out),
        spec,
        teachers=tuple(map(parse_weighted, teacher)),
        caches=tuple(map(parse_weighted, cache)),
        force=force,
        resume=resume,
        policy=_policy(),
    )
    start = report["eval_start"]["eval_ppl"] if report["eval_start"] else float("nan")
    _say(
        f"distilled {report['tokens']:,} tokens in {report['steps']} steps -> {out} "
        f"(held-out ppl {start:.2f} -> {report['eval_end']['eval_ppl']:.2f})"
    )


# --- recipes and builds (whelp.recipe, whelp.plan, whelp.build) ---
SetOption = typer.Option(None, "--set", help="Override a recipe value: key.path=value (repeatable)")


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
        return _print_json(result)
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


@app.command()
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
    typer.echo(f"ok: {loaded.name} ({len(loaded.stages()) + (loaded.generate is not None) + searches} stages)")


@app.command()
def show(
    recipe: str = typer.Argument(..., help="Recipe YAML path or shipped recipe name"),
    set_: list[str] | None = SetOption,
):
    """Print the resolved recipe: every value a build would use."""
    from whelp import recipe as recipes  # noqa: PLC0415 - start-up: --help and show load no verb module

    typer.echo(recipes.dump(recipes.load(recipe, tuple(set_ or ()))), nl=False)


@app.command()
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

    final = builder.build(recipes.load(recipe, tuple(set_ or ())), out, force=force, policy=_policy())
    typer.echo(str(final))
