"""The data verbs: ``whelp cache-logits``, ``tokenize`` and ``generate``: what every later stage reads."""

from __future__ import annotations

from dataclasses import replace

import typer

from whelp.cli.app import load_policy, say
from whelp.errors import WhelpError
from whelp.flags import with_spec
from whelp.specs import CacheSpec, GenerateSpec, Mixture


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
    path = cache_teacher(teacher, data, out, spec, force=force, policy=load_policy())
    say(f"wrote the {teacher} targets of {data} to {path}")


def tokenize(
    data: str = typer.Argument(..., help="Text source: file, directory, pydoc:train, hf:NAME[:CONFIG]:SPLIT"),
    tokenizer: str = typer.Option(..., "--tokenizer", help="Model whose tokenizer to use (dir or registered)"),
    out: str = typer.Option(..., "--out", help="Token-store directory to write"),
    num_proc: int | None = typer.Option(None, "--num-proc", help="Tokenizer processes (default: all cores)"),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="Keep at most N tokens"),
    text_column: str = typer.Option(
        "text", "--text-column", help="Column of .jsonl/.parquet/hf rows (with --chat: default messages)"
    ),
    chat: bool = typer.Option(
        False,
        "--chat",
        help="DATA is chat rows (messages: a list of {role, content} turns), rendered through the tokenizer's chat "
        "template with a loss mask on the assistant turns",
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing token store at --out"),
):
    """Tokenize a corpus once into a token store (uint16/uint32 shards + manifest) that every stage reads."""
    from whelp.data import chat as chats  # noqa: PLC0415 - start-up: --help and show load no verb module
    from whelp.data import check_source, tokenstore  # noqa: PLC0415 - start-up: --help and show load no verb module
    from whelp.models import load_tokenizer, locate  # noqa: PLC0415 - start-up: --help and show load no verb module

    if len(Mixture.parse(data).sources) > 1:  # an existing path with a ',' is one source
        raise WhelpError("tokenize one source into one store; mix stores when you use them (--data a:0.7,b:0.3)")
    check_source(data)
    tok, end_of_turn = load_tokenizer(tokenizer, load_policy()), None
    if chat:
        chats.check_chat_template(tok, f"tokenizer {tokenizer}")
        end_of_turn = chats.saved_end_of_turn(tok, locate(tokenizer))
        text_column = "messages" if text_column == "text" else text_column
    _wrote_store(
        tokenstore.tokenize(data, tok, out, num_proc, max_tokens, text_column, force=force, end_of_turn=end_of_turn),
        "conversations" if chat else "documents",
    )


def _wrote_store(path, what: str) -> None:
    from whelp.data import tokenstore  # noqa: PLC0415 - start-up: --help and show load no verb module

    m = tokenstore.open_store(path).manifest
    typer.echo(
        f"wrote {m['total_tokens']:,} tokens of {m['documents']:,} {what} ({m['dtype']}, "
        f"{len(m['shards'])} shards) to {path}"
    )
    if "targets" in m:
        dropped = ", ".join(f"{n:,} {why}" for why, n in m.get("chat", {}).get("dropped", {}).items() if n)
        typer.echo(
            f"{m['targets']:,} tokens are training targets (assistant turns)"
            + (f"; samples dropped: {dropped}" if dropped else "")
        )


@with_spec("spec", GenerateSpec)
def generate(
    teacher: str = typer.Argument(..., help="Teacher model directory or registered name"),
    out: str = typer.Option(..., "--out", help="Token-store directory to write"),
    force: bool = typer.Option(False, "--force", help="Replace an existing token store at --out"),
    spec: GenerateSpec | None = None,
):  # built from the options by @with_spec
    """Sample text from a teacher into a token store (usable wherever DATA is; resumes if interrupted)."""
    from whelp.data.generate import generate_store  # noqa: PLC0415 - start-up: --help and show load no verb module

    _wrote_store(
        generate_store(teacher, out, spec, force=force, policy=load_policy()),
        f"conversations answered by {teacher}" if spec.chat else f"sequences sampled from {teacher}",
    )
