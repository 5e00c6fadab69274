"""Saved importance scores: safetensors files keyed by (teacher files, calibration data, method), reused across prunes.

Scores are cached under ``$WHELP_HOME/scores`` and copied into each output as ``scores/importance.safetensors``, so a
second prune of the same teacher on the same calibration data, to any shape, skips calibration. They sit in a
subdirectory because serving loaders (vLLM, TGI, llama.cpp's converter) read every top-level ``*.safetensors`` of a
model directory as weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from whelp import store
from whelp.errors import WhelpError
from whelp.pruning import importance

SCORES_FILE = "scores/importance.safetensors"  # relative to a pruned model directory


def scores_meta(source_dir: Path, fingerprint: str, method: str) -> dict:
    """What a score file must match to be reused: teacher files, calibration fingerprint, method, definition."""
    return {
        "fingerprint": fingerprint,
        "importance": method,
        "version": str(importance.SCORES_VERSION),
        "teacher": store.content_id(store.path_identity(source_dir)),
    }


def cache_path(meta: dict) -> Path:
    return store.whelp_home() / "scores" / f"{store.content_id(meta)[:32]}.safetensors"


def check_scores_file(path: Path) -> None:
    """Refuse a ``--scores`` path that is not a readable safetensors file, before any model is loaded."""
    if not path.is_file():
        raise WhelpError(f"scores file {path} does not exist; drop --scores to calibrate")
    try:
        with safe_open(str(path), "pt"):
            pass
    except (SafetensorError, OSError, ValueError) as exc:
        raise WhelpError(
            f"{path} is not a safetensors scores file ({str(exc).splitlines()[0]}); pass the "
            f"{SCORES_FILE} a prune wrote, or drop --scores"
        ) from None


def load_scores(path: Path, meta: dict) -> dict[str, torch.Tensor]:
    """Scores saved by ``save_scores``; WhelpError if they came from another teacher, data or method."""
    check_scores_file(path)
    with safe_open(str(path), "pt") as f:
        saved = f.metadata() or {}
        if not {"teacher", "fingerprint", "importance"} <= set(saved):
            raise WhelpError(
                f"{path} is a safetensors file but not importance scores written by whelp prune "
                f"(its {SCORES_FILE}); pass that file, or drop --scores"
            )
        for key in ("teacher", "fingerprint", "importance", "version"):
            if saved.get(key) != meta[key]:
                what = "another teacher (or changed teacher files)" if key == "teacher" else f"{key}={saved.get(key)}"
                raise WhelpError(
                    f"{path} was computed with {what}, this prune uses {meta[key]}; use the same "
                    "teacher and --importance/--calib/--calib-samples/--seq-len, or drop --scores"
                )
        return {k: f.get_tensor(k) for k in f.keys()}


def save_scores(path: Path, scores: dict[str, torch.Tensor], meta: dict) -> None:
    """Scores + metadata (calibration fingerprint, method, teacher) as one safetensors file, written atomically."""
    store.write_bytes(path, save({k: v.contiguous() for k, v in scores.items()}, {k: str(v) for k, v in meta.items()}))
