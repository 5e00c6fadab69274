"""Structured pruning: importance scores, surgery, per-family module tables, streaming."""
