"""A checkpoint's weight files on disk, read without loading them: whether they are safe to read (safetensors, not
pickle) and the dtype they store, which decides the dtype whelp writes its outputs in.
"""

from __future__ import annotations

import json
from pathlib import Path

from whelp.errors import WhelpError
from whelp.specs import SAVE_DTYPES, LoadPolicy

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_safe_weights(target: str, policy: LoadPolicy) -> None:
    """Refuse a directory whose weights are pickle only (pickle can run arbitrary code) unless the policy allows."""
    path = Path(target)
    if policy.allow_pickle or not path.is_dir() or any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise WhelpError(
            f"{path} holds only pickle weights ({', '.join(pickles)}), which can run arbitrary code; "
            "convert them to safetensors, or pass `whelp --allow-pickle ...` if you trust them"
        )


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def stored_dtype(model_dir: Path) -> str:
    """dtype of the first stored tensor, read from the safetensors header (no weights loaded)."""
    files = weight_files(model_dir)
    if not files:
        return "unknown"
    header_len = int.from_bytes(files[0].open("rb").read(8), "little")
    with open(files[0], "rb") as f:
        f.seek(8)
        header = json.loads(f.read(header_len))
    names = sorted(k for k in header if k != "__metadata__")
    return (
        {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(
            header[names[0]]["dtype"], header[names[0]]["dtype"]
        )
        if names
        else "unknown"
    )


def save_dtype(choice: str, source: str | Path, config) -> str:
    """The dtype an output's weights are written in: ``choice``, or for ``auto`` the dtype ``source`` (the model it
    was made from) stores, so a bf16 teacher gives bf16 students (training itself keeps fp32 master weights).
    Without safetensors to read, the config's ``dtype`` says; a source that stores neither a float dtype nor names
    one is refused rather than guessed."""
    if choice != "auto":
        return choice
    stored = stored_dtype(Path(source)) if Path(source).is_dir() else "unknown"
    named = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "").replace("torch.", "")
    for dtype in (stored, named):
        if dtype in SAVE_DTYPES[1:]:
            return dtype
    raise WhelpError(
        f"cannot tell the dtype of {source} (stored {stored}, config {named or 'none'}); pass "
        "--save-dtype float32|bfloat16|float16"
    )
