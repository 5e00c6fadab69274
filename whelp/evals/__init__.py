"""Evaluation: perplexity, lm-eval tasks, size and speed, reports."""
