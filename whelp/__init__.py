"""whelp: build small language models from big ones (structured pruning, multi-teacher distillation, evaluation)."""

__version__ = "0.1.0"
