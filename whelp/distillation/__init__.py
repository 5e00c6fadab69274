"""Distillation: chunked KD losses, teacher-logit cache, training loop."""
