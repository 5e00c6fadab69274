"""A checkpoint's weight files on disk, read without loading them: whether they are safe to read (safetensors, not
pickle), whether they agree with themselves and their config.json (``check_consistent``), and the dtype they store,
which decides the dtype whelp writes its outputs in.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

from whelp.errors import WhelpError
from whelp.output import quiet_loading
from whelp.specs import SAVE_DTYPES, LoadPolicy

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_HEADER = 100_000_000  # bytes: the safetensors library's own limit on a header
REFETCH = "re-download it or re-run the verb that wrote it"


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
    header = read_header(files[0])
    names = sorted(header)
    dtype = header[names[0]][0] if names else "unknown"
    return {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(dtype, dtype)


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


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` of a safetensors file, from its header alone, refused unless the file is exactly as
    long as its header says: a truncated download fails only mid-load otherwise, and bytes appended to a file are read
    by no one and hide whatever went wrong."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > MAX_HEADER:
            raise WhelpError(f"{path} is not a safetensors file ({size:,} bytes); {REFETCH}")
        if 8 + length > size:
            raise WhelpError(
                f"{path} is truncated ({size:,} bytes, shorter than its {length:,}-byte header); {REFETCH}"
            )
        try:
            header = {k: v for k, v in json.loads(f.read(length)).items() if k != "__metadata__"}
            tensors = {k: (str(v["dtype"]), tuple(int(d) for d in v["shape"])) for k, v in header.items()}
            end = 8 + length + max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise WhelpError(f"{path} has no valid safetensors header ({exc!r}); {REFETCH}") from None
    if size < end:
        raise WhelpError(f"{path} is truncated ({size:,} of {end:,} bytes); {REFETCH}")
    if size > end:
        raise WhelpError(f"{path} has {size - end:,} bytes after its last tensor ({size:,}, not {end:,}); {REFETCH}")
    return tensors


def checkpoint_tensors(model_dir: Path) -> dict[str, tuple[int, ...]] | None:
    """``{name: shape}`` of the safetensors checkpoint in ``model_dir`` (None without one), every file checked by
    ``read_header`` and a sharded index against its shards: transformers, llama.cpp's converter and whelp's streaming
    reach the tensors by different routes, and must all find the same ones."""
    single, index = model_dir / SINGLE, model_dir / INDEX
    if single.exists() and index.exists():
        raise WhelpError(
            f"{model_dir} holds both {SINGLE} and {INDEX}, and readers differ on which is the model (transformers "
            "reads the first, others the shards); remove the one that is not"
        )
    if single.exists():
        return {name: shape for name, (_, shape) in read_header(single).items()}
    return _sharded(index) if index.exists() else None


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The files of the checkpoint ``checkpoint_tensors`` reads (the single file, or the shards its index names), not
    every ``*.safetensors`` beside them: a reader of tensor values must read the files whose headers were checked."""
    single, index = model_dir / SINGLE, model_dir / INDEX
    if single.exists():
        return [single]
    return [model_dir / shard for shard in sorted(set(_placed(index).values()))] if index.exists() else []


def _placed(index: Path) -> dict[str, str]:
    """``{tensor name: shard file name}`` of a sharded checkpoint's index."""
    try:
        return {str(k): str(v) for k, v in json.loads(index.read_text())["weight_map"].items()}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise WhelpError(f"{index} is not a valid safetensors index ({exc!r}); {REFETCH}") from None


def _sharded(index: Path) -> dict[str, tuple[int, ...]]:
    """The tensors of a sharded checkpoint: each shard holding exactly the tensors its index places in it."""
    placed = _placed(index)
    absent = sorted(f for f in set(placed.values()) if not (index.parent / f).is_file())
    if absent:
        raise WhelpError(
            f"{index} lists shards missing from {index.parent} ({_first(absent)}); the download is incomplete: "
            "fetch them, or re-run the verb that wrote it"
        )
    held = {shard: read_header(index.parent / shard) for shard in sorted(set(placed.values()))}
    misplaced = sorted(name for name, shard in placed.items() if name not in held[shard])
    if misplaced:
        more = f" ({len(misplaced)} tensors so placed)" if len(misplaced) > 1 else ""
        raise WhelpError(
            f"{index} places {misplaced[0]} in {placed[misplaced[0]]}, which does not hold it{more}; {REFETCH}"
        )
    unplaced = sorted(name for shard, tensors in held.items() for name in tensors if placed.get(name) != shard)
    if unplaced:
        raise WhelpError(
            f"the shards in {index.parent} hold {_first(unplaced)}, which {index.name} does not place there; {REFETCH}"
        )
    return {name: shape for tensors in held.values() for name, (_, shape) in tensors.items()}


def _first(names: list[str]) -> str:
    """The first three of ``names``, for one line."""
    return ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")


@dataclass(frozen=True)
class Layout:
    """The tensors a config's model is saved as, named as in its files (transformers' save-time conversions applied,
    e.g. fused MoE experts back to one tensor per expert): the ``required`` ones, all ``known`` ones (the required and
    tied copies, such as an lm_head sharing the embedding, which a checkpoint may store or not), and transformers' own
    rules for the stored tensors it ignores on load (old rotary ``inv_freq`` buffers, a family's
    ``_keys_to_ignore_on_load_unexpected``) and the model tensors it does not need (``_keys_to_ignore_on_load_missing``).
    """

    required: dict[str, tuple[int, ...]]
    known: dict[str, tuple[int, ...]]
    ignore_unexpected: re.Pattern | None
    ignore_missing: re.Pattern | None
    prefix: str

    def name(self, stored: str) -> str:
        """A stored name as the model's: transformers adds or strips the base model's prefix (GPT-2's hub files hold
        ``h.0...``, its model ``transformer.h.0...``)."""
        prefix = f"{self.prefix}."
        if stored in self.known or not self.prefix:
            return stored
        if prefix + stored in self.known:
            return prefix + stored
        return stored.removeprefix(prefix) if stored.removeprefix(prefix) in self.known else stored


def layout(config, trust_remote_code: bool = False) -> Layout | None:
    """The ``Layout`` of the model ``config`` describes, built on the meta device (no memory, no weights); None for a
    config transformers builds no causal LM from (the verb reports that, or llama.cpp's converter reads it)."""
    import torch  # noqa: PLC0415 - heavy: the weights' file checks and dtype need no torch
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 - heavy: the weights' file checks and dtype need no torch
    from transformers.core_model_loading import revert_weight_conversion  # noqa: PLC0415 - heavy: as above

    try:
        with torch.device("meta"), quiet_loading():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError:
        return None
    state, tied = model.state_dict(), set(getattr(model, "all_tied_weights_keys", None) or ())

    def saved(names) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in revert_weight_conversion(model, {k: state[k] for k in names}).items()}

    required = saved(state.keys() - tied)
    buffers = [name for name, _ in model.named_buffers()]
    ignored = [*(model._keys_to_ignore_on_load_unexpected or ())]
    ignored += [r"rotary_emb\.inv_freq"] * any(b.endswith("rotary_emb.inv_freq") for b in buffers)
    ignored += [r"(^|\.)position_ids$"] * any(b.endswith("position_ids") for b in buffers)
    return Layout(
        required,
        saved(state),
        _any(ignored),
        _any(model._keys_to_ignore_on_load_missing or ()),
        model.base_model_prefix,
    )


def _any(patterns) -> re.Pattern | None:
    return re.compile("|".join(f"({p})" for p in patterns)) if patterns else None


def check_consistent(model_dir: Path, config, trust_remote_code: bool = False) -> None:
    """Refuse a checkpoint that contradicts itself (``checkpoint_tensors``) or its config.json: a tensor the config's
    model needs and the files lack, one the files hold and it has no place for, or one of another shape. transformers
    would fill the first with noise and drop the second without a word (a config with fewer layers than the files
    quietly loses the rest), and llama.cpp's converter would write the config's sizes over the tensors' own."""
    stored = checkpoint_tensors(model_dir)
    expected = None if stored is None else layout(config, trust_remote_code)
    if expected is None:
        return
    found, known = {expected.name(k): shape for k, shape in stored.items()}, expected.known
    missing = sorted(k for k in expected.required.keys() - found.keys() if not _hit(expected.ignore_missing, k))
    extra = sorted(k for k in found.keys() - known.keys() if not _hit(expected.ignore_unexpected, k))
    reshaped = sorted(k for k in found.keys() & known.keys() if found[k] != known[k])
    if not (missing or extra or reshaped):
        return
    details = [
        f"{what}: {_first(names)}"
        for what, names in (
            ("missing", missing),
            ("unexpected", extra),
            ("of other shapes", [f"{k} {list(found[k])} (not {list(known[k])})" for k in reshaped]),
        )
        if names
    ]
    counted = {k: v for k, v in found.items() if k in known or k in extra}  # not the ones transformers ignores
    raise WhelpError(
        f"{model_dir}'s config.json {_reason(config, trust_remote_code, expected, counted, reshaped)} "
        f"({'; '.join(details)}); the config is of another model, or the download is incomplete: use the "
        "config.json it was saved with, or re-download the checkpoint"
    )


def _reason(config, trust_remote_code: bool, expected: Layout, found: dict, reshaped: list[str]) -> str:
    """What in the config contradicts the weights, named where it can be: the layer count, else the size whose value,
    set to the weights' own, gives the first wrong-shaped tensor its stored shape."""
    text = config.get_text_config()
    stored, described = _layers(found), _layers(expected.required)
    if stored != described:
        return f"says num_hidden_layers {text.num_hidden_layers} but the weights hold {stored} layers"
    for name in reshaped[:1]:
        key = _culprit(config, trust_remote_code, name, expected.known[name], found[name])
        if key is not None:
            return f"says {key} {getattr(text, key)} but {name} is {list(found[name])}"
    return "does not describe its weights"


def _layers(names) -> int:
    """How many decoder layers ``names`` hold: the distinct indices under the prefix numbered most often
    (``model.layers.<i>.``, ``transformer.h.<i>.``)."""
    indices: dict[str, set[str]] = {}
    for name in names:
        if match := re.match(r"(.*?)\.(\d+)\.", name):
            indices.setdefault(match[1], set()).add(match[2])
    return max(map(len, indices.values()), default=0)


def _culprit(config, trust_remote_code: bool, name: str, described: tuple, stored: tuple) -> str | None:
    """The config key which, set to the stored size, gives tensor ``name`` its ``stored`` shape (None if none does):
    each key whose value is a size the shapes disagree on is tried on the meta device, on the error path only."""
    text = config.get_text_config().to_dict()
    for want, have in zip(described, stored):
        for key in [k for k, v in text.items() if type(v) is int and v == want != have]:
            trial = copy.deepcopy(config)
            setattr(trial.get_text_config(), key, have)
            try:
                built = layout(trial, trust_remote_code)
            except Exception:  # a value the family refuses (heads not dividing hidden...): not the culprit
                continue
            if built is not None and built.known.get(name) == stored:
                return key
    return None


def _hit(pattern: re.Pattern | None, name: str) -> bool:
    return pattern is not None and pattern.search(name) is not None
