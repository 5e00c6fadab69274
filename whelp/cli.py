"""The ``whelp`` command line: a thin index of library verbs.

Each command parses flags, calls one library function and prints the result. Heavy libraries
(torch, transformers) are imported inside the commands so that ``whelp --help`` starts fast.
"""

from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer

from whelp.errors import WhelpError


class _App(typer.Typer):
    """Typer app whose user-facing errors print as one line, not a traceback."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except WhelpError as exc:
            typer.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(2)
        except SystemExit as exc:
            if exc.code == 130:  # typer's exit on KeyboardInterrupt (Ctrl-C outside a training loop)
                typer.secho("error: interrupted; outputs are written atomically, so nothing half-written was kept. "
                            "Re-run the same command to continue (distil runs, caches and builds resume)",
                            fg="red", err=True)
            raise


app = _App(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
           help="Build small language models from big ones: prune, distill, evaluate.")


def _terminate(*_):
    raise KeyboardInterrupt  # SIGTERM (a scheduler, `kill`): the same clean stop and message as Ctrl-C


@app.callback(invoke_without_command=True)
def _main(version: bool = typer.Option(False, "--version", help="Print the version and exit"),
          allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Load pickle (.bin/.pt) checkpoints: "
                                            "only for files you trust, pickle can run arbitrary code"),
          trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run model code shipped "
                                                 "with a checkpoint (off by default)")):
    """Build small language models from big ones: prune, distill, evaluate."""
    import os
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    for name, on in (("WHELP_ALLOW_PICKLE", allow_pickle), ("WHELP_TRUST_REMOTE_CODE", trust_remote_code)):
        if on:
            os.environ[name] = "1"
    if version:
        from whelp import __version__

        typer.echo(__version__)
        raise typer.Exit()


def _console():
    from rich.console import Console

    return Console(emoji=False)  # ":train:" in pydoc:train is data, not an emoji


def _print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2))


@app.command()
def inspect(model: str = typer.Argument(..., help="Model directory, registered name (smollm2-135m), hub id or config.json"),
            as_json: bool = typer.Option(False, "--json", help="Print one JSON object")):
    """Shape (HF config names), parameters, stored dtype and bytes on disk of a model; no weights loaded."""
    from whelp import models

    info = models.inspect(model)
    if as_json:
        return _print_json(info)
    from rich.table import Table

    table = Table(title=model, show_header=False)
    for key, value in info.items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value))
    _console().print(table)


@app.command("cache-logits")
def cache_logits(teacher: str = typer.Argument(..., help="Teacher model directory or registered name"),
                 data: str = typer.Option(..., "--data", help="Text source (file, dir, pydoc:train, hf:...)"),
                 out: str = typer.Option(..., "--out", help="Cache directory to write"),
                 topk: Optional[int] = typer.Option(None, "--topk", help="Store the top-K log-probs + tail mass"),
                 sample: Optional[int] = typer.Option(None, "--sample", help="Store S teacher samples (unbiased)"),
                 temperature: float = typer.Option(1.0, "--temperature", help="Teacher softmax temperature"),
                 seq_len: int = typer.Option(512, "--seq-len", help="Tokens per packed block"),
                 max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Read at most this many tokens"),
                 batch_size: int = typer.Option(4, "--batch-size", help="Blocks per teacher forward"),
                 force: bool = typer.Option(False, "--force", help="Replace an existing cache at --out")):
    """Run a teacher over packed data once and cache sparse per-token targets (resumes if interrupted)."""
    if (topk is None) == (sample is None):
        raise WhelpError("pass exactly one of --topk K or --sample S")
    from whelp.distill.cache import cache_teacher

    path = cache_teacher(teacher, data, out, "topk" if topk else "sample", topk or sample, temperature, seq_len,
                         max_tokens, batch_size=batch_size, force=force)
    typer.echo(f"wrote the {teacher} targets of {data} to {path}")


@app.command()
def tokenize(data: str = typer.Argument(..., help="Text source: file, directory, pydoc:train, hf:NAME[:CONFIG]:SPLIT"),
             tokenizer: str = typer.Option(..., "--tokenizer", help="Model whose tokenizer to use (dir or registered)"),
             out: str = typer.Option(..., "--out", help="Token-store directory to write"),
             num_proc: Optional[int] = typer.Option(None, "--num-proc", help="Tokenizer processes (default: all cores)"),
             max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Keep at most N tokens"),
             text_column: str = typer.Option("text", "--text-column", help="Column of .jsonl/.parquet/hf rows"),
             force: bool = typer.Option(False, "--force", help="Replace an existing token store at --out")):
    """Tokenize a corpus once into a token store (uint16/uint32 shards + manifest) that every stage reads."""
    from whelp.data import check_source, tokenstore
    from whelp.models import load_tokenizer

    if "," in data:
        raise WhelpError("tokenize one source into one store; mix stores when you use them (--data a:0.7,b:0.3)")
    check_source(data)
    path = tokenstore.tokenize(data, load_tokenizer(tokenizer), out, num_proc, max_tokens, text_column, force=force)
    m = tokenstore.open_store(path).manifest
    typer.echo(f"wrote {m['total_tokens']:,} tokens of {m['documents']:,} documents ({m['dtype']}, "
               f"{len(m['shards'])} shards) to {path}")


@app.command("eval")
def eval_(models: List[str] = typer.Argument(..., help="MODEL or LABEL=MODEL (dir, registered name, hub id); "
                                             "the first is the reference"),
          out: str = typer.Option(..., "--out", help="Report directory (metrics.json, report.md, report.png)"),
          ppl: List[str] = typer.Option(["pydoc:eval"], "--ppl", help="Perplexity source(s) (file, dir, pydoc:eval, hf:...)"),
          tasks: str = typer.Option("", "--tasks", help="lm-eval tasks, comma-separated (offline: whelp_pydoc, "
                                    "whelp_licenses, whelp_pydoc_next)"),
          include_path: List[str] = typer.Option([], "--include-path", help="Directory of extra lm-eval task YAMLs"),
          limit: Optional[int] = typer.Option(None, "--limit", help="At most N documents per lm-eval task"),
          baseline: Optional[str] = typer.Option(None, "--baseline", help="Reference model (default: the first)"),
          seq_len: int = typer.Option(512, "--seq-len", help="Perplexity window and lm-eval context, in tokens"),
          stride: Optional[int] = typer.Option(None, "--stride", help="Sliding-window stride (default: --seq-len)"),
          max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Read at most N tokens per --ppl source"),
          batch_size: int = typer.Option(4, "--batch-size", help="Windows / lm-eval requests per forward"),
          device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
          dtype: str = typer.Option("float32", "--dtype", help="float32 or bfloat16"),
          force: bool = typer.Option(False, "--force", help="Replace an existing --out directory")):
    """Score models on perplexity, lm-eval tasks, size and speed; write a report comparing them to the reference."""
    from whelp.evals.api import EvalSpec, evaluate, order_models
    from whelp.evals.report import markdown

    spec = EvalSpec(ppl=tuple(ppl), tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()),
                    include_paths=tuple(include_path), limit=limit, seq_len=seq_len, stride=stride,
                    max_tokens=max_tokens, batch_size=batch_size, device=device, dtype=dtype)
    metrics = evaluate(order_models(models, baseline), out, spec, force=force)
    typer.echo(markdown(metrics) + f"\nwrote {out}/metrics.json, report.md, report.png")


@app.command()
def plan(model: str = typer.Argument(..., help="Teacher (model directory, registered name, hub id, config.json) "
                                     "or a recipe (YAML path or shipped name)"),
         target: Optional[str] = typer.Option(None, "--target", help="Preset (llama-3.2-1b, llama-3.2-3b, "
                                              "smollm2-half, smollm2-quarter), a config.json, or key=value,... overrides"),
         rope: str = typer.Option("teacher", "--rope", help="RoPE of the target: teacher or target (preset's)"),
         set_: Optional[List[str]] = typer.Option(None, "--set", help="Recipe override key.path=value (repeatable)"),
         as_json: bool = typer.Option(False, "--json", help="Print one JSON object")):
    """Shapes and parameter counts of a prune (MODEL --target T), or of every stage of a recipe with FLOPs,
    cache bytes and memory estimates; no weights loaded."""
    if target is None:
        return _plan_recipe(model, tuple(set_ or ()), as_json)
    from whelp.models import load_config
    from whelp.prune.targets import plan_target

    result = plan_target(load_config(model), target, rope)
    if as_json:
        return _print_json(result)
    from rich.table import Table

    table = Table(title=f"{model} -> {target}")
    for column in ("", "source", "target"):
        table.add_column(column)
    for key in result["source"]:
        table.add_row(key, *(f"{result[s][key]:,}" if type(result[s][key]) is int else str(result[s][key])
                             for s in ("source", "target")))
    _console().print(table)


@app.command()
def prune(model: str = typer.Argument(..., help="Teacher: model directory, registered name or hub id"),
          target: str = typer.Option(..., "--target", help="Preset, config.json, or key=value,... overrides"),
          out: str = typer.Option(..., "--out", help="Output directory (HF checkpoint + prune_report.json)"),
          importance: str = typer.Option("activation", "--importance", help="activation | magnitude | taylor | random"),
          layer_importance: str = typer.Option("block", "--layer-importance", help="block (1 - cos) | loss (skip a layer)"),
          calib: str = typer.Option("pydoc:calib", "--calib", help="Calibration data (file, dir, pydoc:calib, hf:...)"),
          calib_samples: int = typer.Option(16, "--calib-samples", help="Calibration blocks"),
          seq_len: int = typer.Option(256, "--seq-len", help="Tokens per calibration block"),
          batch_size: int = typer.Option(4, "--batch-size", help="Calibration blocks per forward"),
          tie: str = typer.Option("embedding", "--tie", help="Init of the shared matrix when an untied teacher "
                                  "becomes tied: embedding | lm_head | mean"),
          rope: str = typer.Option("teacher", "--rope", help="RoPE of the target: teacher or target (preset's)"),
          stream: Optional[bool] = typer.Option(None, "--stream/--no-stream", help="Prune from the shards layer by "
                                                "layer (default: only when the teacher does not fit in memory)"),
          scores: Optional[str] = typer.Option(None, "--scores", help="Reuse a saved importance.safetensors"),
          force: bool = typer.Option(False, "--force", help="Replace an existing --out directory")):
    """Prune a teacher to a target shape in one pass; write a vanilla HF checkpoint and prune_report.json."""
    from whelp.prune.api import PruneSpec, prune_checkpoint

    spec = PruneSpec(importance=importance, layer_importance=layer_importance, calib=calib, calib_samples=calib_samples,
                     seq_len=seq_len, batch_size=batch_size, tie=tie, rope=rope, stream=stream, scores=scores)
    report = prune_checkpoint(model, target, out, spec, force=force)
    p = report["params"]
    typer.echo(f"wrote {out}: {p['before']:,} -> {p['after']:,} params ({report['path']}, {report['importance']}"
               f"{', scores reused' if report['scores_reused'] else ''})")


@app.command()
def distill(student: str = typer.Argument(..., help="Student model directory (e.g. a pruned checkpoint)"),
            out: str = typer.Option(..., "--out", help="Output directory of the distilled student"),
            teacher: List[str] = typer.Option([], "--teacher", help="Live teacher MODEL[:WEIGHT] (repeatable)"),
            cache: List[str] = typer.Option([], "--cache", help="Teacher-logit cache DIR[:WEIGHT] (repeatable)"),
            data: str = typer.Option(..., "--data", help="Training text (file, dir, pydoc:train, hf:...)"),
            steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (or --max-tokens)"),
            max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Training tokens (or --steps)"),
            batch_size: int = typer.Option(8, "--batch-size", help="Sequences per micro-batch per process"),
            grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step"),
            seq_len: int = typer.Option(512, "--seq-len"), lr: float = typer.Option(1e-4, "--lr"),
            warmup: int = typer.Option(0, "--warmup", help="Linear warmup steps before cosine decay"),
            loss: str = typer.Option("forward_kl", "--loss", help="forward_kl|reverse_kl|jsd|skew_kl|tvd"),
            temperature: float = typer.Option(1.0, "--temperature"),
            ce_weight: float = typer.Option(0.0, "--ce-weight", help="Weight of the next-token CE in [0, 1]"),
            chunk_size: int = typer.Option(1024, "--chunk-size",
                                           help="Tokens per loss chunk: loss memory ~ 3 x chunk x vocab x 4 bytes"),
            schedule: str = typer.Option("constant", "--schedule",
                                         help="Teacher weights: constant | linear:N | cosine:N (first teacher -> given weights)"),
            eval_every: int = typer.Option(0, "--eval-every", help="Held-out perplexity every N steps"),
            eval_data: str = typer.Option("pydoc:eval", "--eval-data"), seed: int = typer.Option(0, "--seed"),
            dtype: str = typer.Option("auto", "--dtype", help="Autocast dtype: auto|bfloat16|float32"),
            grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing"),
            save_every: int = typer.Option(0, "--save-every", help="Checkpoint every N steps (and at the end)"),
            keep_last: int = typer.Option(2, "--keep-last", help="Checkpoints kept"),
            tensorboard: bool = typer.Option(False, "--tensorboard", help="Also log to OUT.distill/tensorboard"),
            resume: bool = typer.Option(False, "--resume", help="Require a run to resume in OUT.distill"),
            force: bool = typer.Option(False, "--force", help="Start over and overwrite --out")):
    """Distil a student from live teachers and/or logit caches (resumes; works under torchrun with FSDP2)."""
    from pathlib import Path

    from whelp.distill import loop
    from whelp.distill.schedule import parse_weighted

    spec = loop.DistillSpec(data=data, steps=steps, max_tokens=max_tokens, batch_size=batch_size, grad_accum=grad_accum,
                            seq_len=seq_len, lr=lr, warmup=warmup, loss=loss, temperature=temperature,
                            ce_weight=ce_weight, chunk_size=chunk_size, schedule=schedule, eval_every=eval_every,
                            eval_data=eval_data, seed=seed, dtype=dtype, grad_checkpointing=grad_checkpointing,
                            save_every=save_every, keep_last=keep_last, tensorboard=tensorboard)
    report = loop.distill(student, Path(out), spec, teachers=tuple(map(parse_weighted, teacher)),
                          caches=tuple(map(parse_weighted, cache)), force=force, resume=resume)
    typer.echo(f"distilled {report['tokens']:,} tokens in {report['steps']} steps -> {out} "
               f"(held-out ppl {report['eval_start']['eval_ppl'] if report['eval_start'] else float('nan'):.2f} -> "
               f"{report['eval_end']['eval_ppl']:.2f})")


# --- recipes and builds (whelp.recipe, whelp.plan, whelp.build) ---
SetOption = typer.Option(None, "--set", help="Override a recipe value: key.path=value (repeatable)")


def _plan_recipe(name: str, overrides: tuple[str, ...], as_json: bool) -> None:
    from whelp import plan as planning, recipe as recipes

    if not name.endswith((".yaml", ".yml")) and not (recipes.RECIPES_DIR / f"{name}.yaml").exists():
        raise WhelpError(f"'{name}' is not a recipe; to plan a prune of a model, pass --target")
    result = planning.plan_recipe(recipes.load(name, overrides))
    if as_json:
        return _print_json(result)
    from rich.table import Table

    table = Table(title=f"recipe {result['recipe']}")
    for column in ("stage", "shape / work", "params / FLOPs per token", "bytes"):
        table.add_column(column)
    table.add_row("teacher", result["teacher"]["model"], f"{result['teacher']['shape']['params']:,}", "")
    for stage in result["stages"]:
        table.add_row(*planning.describe(stage))
    _console().print(table)


@app.command()
def validate(recipe: str = typer.Argument(..., help="Recipe YAML path or shipped recipe name"),
             set_: Optional[List[str]] = SetOption):
    """Check a recipe strictly: keys, types, ranges, the teacher and every target shape."""
    from whelp import plan as planning, recipe as recipes

    loaded = recipes.load(recipe, tuple(set_ or ()))
    planning.plan_recipe(loaded)
    typer.echo(f"ok: {loaded.name} ({len(loaded.stages())} stages)")


@app.command()
def show(recipe: str = typer.Argument(..., help="Recipe YAML path or shipped recipe name"),
         set_: Optional[List[str]] = SetOption):
    """Print the resolved recipe: every value a build would use."""
    from whelp import recipe as recipes

    typer.echo(recipes.dump(recipes.load(recipe, tuple(set_ or ()))), nl=False)


@app.command()
def build(recipe: str = typer.Argument(..., help="Recipe YAML path or shipped recipe name"),
          out: Optional[str] = typer.Option(None, "--out", help="Build directory (default: the recipe's out, or runs/NAME)"),
          set_: Optional[List[str]] = SetOption,
          force: bool = typer.Option(False, "--force", help="Run every stage again; only whelp's own outputs are "
                                     "replaced, each once its new version is complete")):
    """Run a recipe: prune -> distill -> eval -> final student with report and model card; resumable."""
    from whelp import build as builder, recipe as recipes

    final = builder.build(recipes.load(recipe, tuple(set_ or ())), out, force=force)
    typer.echo(str(final))
