"""Evaluation: perplexity, lm-eval tasks, chat behaviour, size and speed, reports."""
