"""Model directories that transformers 4.x reads as transformers 5 does.

transformers 5 writes RoPE as one ``rope_parameters`` dict (``rope_theta`` inside it; Gemma 3 one dict per layer
type), the weight dtype as ``dtype``, and a tokenizer_config.json naming its own ``TokenizersBackend`` class with
extra special tokens as a list. transformers 4.x (which vLLM and many serving stacks pin) ignores
``rope_parameters`` and falls back to its defaults without a word: the demo student (RoPE base 100,000) loads with
base 10,000, its logits off by up to 4.6, and its tokenizer does not load at all; and transformers 5 writes the chat
template to ``chat_template.jinja`` alone, which 4.x before 4.50 never reads (the student loses its template).
``write_legacy_fields`` adds, beside the new fields, the ones 4.x reads (``rope_theta``, ``rope_scaling``,
``partial_rotary_factor``, Gemma 3's ``rope_local_base_freq``, ``torch_dtype``), names a tokenizer class both read
and puts the chat template into ``tokenizer_config.json`` too. Every value is derived from the
5.x fields, so both versions build the same model (transformers 5 reads the legacy fields back into the same
``rope_parameters``; tests/test_hf_compat.py checks logits and token ids under both).
"""

from __future__ import annotations

import json
from pathlib import Path

from whelp import store
from whelp.errors import WhelpError

# 5.x class names -> the 4.x class that reads the same files (tokenizer.json, verbatim)
TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}
# keys of a 5.x rope_parameters dict that 4.x keeps outside its rope_scaling dict
TOP_LEVEL_ROPE_KEYS = ("rope_theta", "partial_rotary_factor")
GEMMA3 = ("gemma3_text", "gemma3")


def write_legacy_fields(directory: str | Path) -> None:
    """Add what transformers 4.x reads to the config.json (and tokenizer_config.json, if any) in ``directory``.

    Callers run it on the temporary directory they are writing, after every file is saved; each file is
    replaced atomically."""
    directory = Path(directory)
    _rewrite(directory / "config.json", legacy_config)
    if (directory / "tokenizer_config.json").exists():
        templates = chat_templates(directory)
        _rewrite(directory / "tokenizer_config.json", lambda config: legacy_tokenizer_config(config, templates))


def _rewrite(path: Path, convert) -> None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WhelpError(f"cannot add transformers 4.x fields to {path} ({exc}); re-save the checkpoint") from None
    store.write_text(path, json.dumps(convert(data), indent=2, sort_keys=True) + "\n")


def legacy_config(config: dict) -> dict:
    """``config`` (a config.json dict) with the 4.x fields beside the 5.x ones; a multimodal config's
    ``text_config`` too."""
    out = dict(config)
    if isinstance(out.get("text_config"), dict):
        out["text_config"] = legacy_config(out["text_config"])
    if "dtype" in out:
        out["torch_dtype"] = out["dtype"]
    rope = out.get("rope_parameters")
    if not isinstance(rope, dict):
        return out
    if "rope_theta" in rope:
        out.update(_legacy_rope(rope))
    elif out.get("model_type") in GEMMA3:
        out.update(_legacy_gemma3_rope(rope))
    return out


def _legacy_rope(rope: dict) -> dict:
    """One rope dict as 4.x spells it: ``rope_theta`` (and ``partial_rotary_factor``) at the top level, the rest
    as ``rope_scaling`` (None for plain RoPE, as 4.x writes it)."""
    scaling = {k: v for k, v in rope.items() if k not in TOP_LEVEL_ROPE_KEYS}
    fields = {key: rope[key] for key in TOP_LEVEL_ROPE_KEYS if key in rope}
    fields["rope_scaling"] = None if scaling in ({}, {"rope_type": "default"}) else scaling
    return fields


def _legacy_gemma3_rope(rope: dict) -> dict:
    """Gemma 3's per-layer-type rope: 4.x scales only the full-attention layers (``rope_theta``, ``rope_scaling``)
    and gives the sliding ones plain RoPE of base ``rope_local_base_freq``."""
    full, local = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
    if set(local) - {"rope_type", "rope_theta"} or local.get("rope_type", "default") != "default":
        raise WhelpError(
            f"Gemma 3 rope_parameters scale the sliding-attention layers ({local}), which transformers "
            "4.x cannot express; keep the teacher's RoPE (--rope teacher)"
        )
    fields = _legacy_rope(full) if "rope_theta" in full else {}
    if "rope_theta" in local:
        fields["rope_local_base_freq"] = local["rope_theta"]
    return fields


def chat_templates(directory: Path) -> str | list[dict] | None:
    """The chat template(s) of the template files in ``directory`` as ``tokenizer_config.json`` holds them: the text
    of ``chat_template.jinja``, or with named ones in ``additional_chat_templates/`` the list of ``{"name",
    "template"}`` (the default named ``default``); None without the file."""
    default = directory / "chat_template.jinja"
    if not default.is_file():
        return None
    named = sorted((directory / "additional_chat_templates").glob("*.jinja"))
    if not named:
        return default.read_text()
    return [{"name": "default", "template": default.read_text()}] + [
        {"name": path.stem, "template": path.read_text()} for path in named
    ]


def legacy_tokenizer_config(config: dict, templates: str | list[dict] | None = None) -> dict:
    """``config`` (a tokenizer_config.json dict) readable by 4.x: a tokenizer class 4.x has, extra special tokens
    given as a list under the name 4.x reads for a list (5.x reads it back as the same list), and the chat
    ``templates`` of the template files (``chat_templates``) unless it holds its own."""
    out = dict(config)
    if templates is not None:
        out.setdefault("chat_template", templates)
    name = out.get("tokenizer_class")
    if name in TOKENIZER_CLASSES:
        out["tokenizer_class"] = TOKENIZER_CLASSES[name]
    if isinstance(out.get("extra_special_tokens"), list):
        out["additional_special_tokens"] = out.pop("extra_special_tokens")
    return out
