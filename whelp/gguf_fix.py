"""What llama.cpp reads of a pruned Gemma 3 but its converter does not write, added to the GGUF ``whelp export`` made.

llama.cpp's converter (run unmodified, whelp/export.py) writes what a published Gemma 3 needs; two things a pruned
one changes it leaves out (measured with llama-cpp-python 0.3.36 against transformers, bench/gemma3_teacher.py):

* **Each layer's attention type.** llama.cpp takes every 6th layer as global (full attention, RoPE base 1e6) and the
  others as local (sliding window, base 1e4) unless the GGUF lists them (``gemma3.attention.sliding_window_pattern``,
  one bool per layer: llama.cpp reads it, the converter never writes it). A depth-pruned student keeps the types of
  the teacher's layers it kept (``layer_types``: S S S F S ...), which the period of 6 gets wrong.
* **The attention scale.** llama.cpp scales scores by head_dim^-0.5 (a 62-layer model, Gemma 3 27B: by
  (hidden / heads)^-0.5), transformers by query_pre_attn_scalar^-0.5, which pruning keeps as the teacher's; a student
  whose head_dim was pruned (256 -> 128) differs. The ratio is folded into the q norm weights, which scale q before
  the attention (Gemma's ``1 + w``, stored shifted by the converter, so a plain product).

transformers' own GGUF reader reads neither (it assumes the period of 6 and query_pre_attn_scalar 256): it reads the
teacher's shape and width-pruned students right, llama.cpp every student.
"""

from __future__ import annotations

import os
from pathlib import Path

from whelp.errors import WhelpError
from whelp.output import quiet_streams

PERIOD = 6  # llama.cpp's Gemma 3: layers 6, 12, ... (1-based) are global unless the GGUF lists the types
PATTERN_KEY = "gemma3.attention.sliding_window_pattern"


def gemma3_fixes(config: dict) -> tuple[list[bool] | None, float]:
    """``(pattern, scale)`` a Gemma 3 checkpoint's GGUF needs: its layers' sliding flags where llama.cpp's period of 6
    would get them wrong (else None), and the factor of its q norm weights (1.0: none)."""
    if config.get("model_type") != "gemma3_text":
        return None, 1.0
    layers = config["num_hidden_layers"]
    pattern = [kind == "sliding_attention" for kind in config.get("layer_types") or []]
    default = [(i + 1) % PERIOD != 0 for i in range(layers)]
    heads, head_dim = config["num_attention_heads"], config.get("head_dim", 256)
    llama = (config["hidden_size"] // heads) ** -0.5 if layers == 62 else head_dim**-0.5
    scale = config.get("query_pre_attn_scalar", 256) ** -0.5 / llama
    return (pattern if pattern and pattern != default else None), scale


def complete_gguf(path: Path, config: dict) -> None:
    """Rewrite the GGUF at ``path`` (written by the converter from a checkpoint whose config.json is ``config``) with
    what ``gemma3_fixes`` says it lacks; a GGUF that lacks nothing is left untouched (every other family)."""
    pattern, scale = gemma3_fixes(config)
    if pattern is None and abs(scale - 1.0) < 1e-7:
        return
    from gguf import GGUFReader, GGUFWriter  # noqa: PLC0415 - heavy (numpy): only a pruned Gemma 3's export needs it
    from gguf.scripts.gguf_new_metadata import copy_with_new_metadata  # noqa: PLC0415 - as above

    reader = GGUFReader(path)
    reader.tensors = [_scaled(t, scale) if t.name.endswith("attn_q_norm.weight") else t for t in reader.tensors]
    tmp = path.with_name(f"{path.name}-fix")  # export's temporary name + a suffix: store.clean_stale removes it
    writer = GGUFWriter(tmp, arch="gemma3", endianess=reader.endianess)
    if pattern is not None:
        writer.add_array(PATTERN_KEY, pattern)
    try:
        with quiet_streams():  # its "Writing" bar
            copy_with_new_metadata(reader, writer, {}, [])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _scaled(tensor, scale: float):
    """A q norm tensor of the reader with its weights times ``scale`` (kept fp32 by the converter at every outtype)."""
    if tensor.data.dtype.name != "float32":
        raise WhelpError(
            f"{tensor.name} is {tensor.data.dtype.name} in the GGUF, not float32, so its attention scale cannot be "
            "folded in; export with --outtype f32 and report this to whelp"
        )
    return tensor._replace(data=tensor.data * scale)
