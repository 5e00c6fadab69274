"""The ``whelp`` command line: a thin index of library verbs.

Each command parses flags, calls one library function and prints the result. The options of every spec come from
its fields (``whelp.flags``); the safety opt-ins become one ``LoadPolicy`` handed to every verb. Heavy libraries
(torch, transformers) are imported inside the commands, so ``whelp --help``, ``show`` and ``validate`` start fast.

Its floors (``[tool.importlinter]``): the verbs, grouped by what they act on - ``model`` (inspect, export, prune,
search) | ``data`` (cache-logits, tokenize, generate) | ``train`` (eval, distill) | ``recipes`` (plan, validate,
show, build) - above ``app`` (the typer app, its global options, its one-line errors and the printing helpers).
Here the commands are registered on ``app`` in the order ``whelp --help`` lists them.
"""

from whelp.cli import data, model, recipes, train
from whelp.cli.app import app

app.command()(model.inspect)
app.command()(model.export)
app.command("cache-logits")(data.cache_logits)
app.command()(data.tokenize)
app.command()(data.generate)
app.command("eval")(train.eval_)
app.command()(recipes.plan)
app.command()(model.prune)
app.command()(model.search)
app.command()(train.distill)
app.command()(recipes.validate)
app.command()(recipes.show)
app.command()(recipes.build)

__all__ = ["app"]
