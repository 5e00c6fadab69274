"""``whelp export DIR --gguf OUT.gguf``: one GGUF file (llama.cpp, ollama, LM Studio) through llama.cpp's own converter.

Design:

* **llama.cpp's converter, unmodified, never copied into whelp.** The converter (``convert_hf_to_gguf.py``, its
  ``conversion/`` package and the ``gguf-py`` it imports, newer than PyPI's ``gguf``) ships in the source package
  of llama-cpp-python on PyPI. The pinned version (``LLAMA_CPP_PYTHON``) is fetched once per ``$WHELP_HOME`` with
  ``pip download`` (76 MB), its sha256 checked against ``SDIST_SHA256`` before it is opened, and only those files
  (plus the licence and chat templates) are extracted, as regular files below the converter's directory, into a
  temporary sibling renamed into place: ``$WHELP_HOME/tools/llama-cpp-python-VERSION``. A lock makes parallel
  processes (pytest-xdist workers) fetch it once.
* **A subprocess.** The converter runs as ``sys.executable convert_hf_to_gguf.py DIR --outfile TMP --outtype T``
  with its own ``gguf-py`` first on the path; its output is captured (streamed with ``whelp --verbose``), and a
  failure becomes one line: the converter's last error and the fix.
* **Outtypes.** ``auto`` (llama.cpp's default: bf16 for a bf16 checkpoint, else f16), ``f16``, ``bf16``, ``q8_0``
  and ``f32`` (lossless).
* **Your files are safe.** The GGUF is written to a temporary sibling of OUT and renamed over it; an existing OUT is
  replaced only with ``--force`` and only if it is a GGUF file (a file of any other kind is never overwritten).
  The whelp load policy holds here too: pickle-only weights need ``--allow-pickle``, and a checkpoint that ships
  code (llama.cpp loads some tokenizers with ``trust_remote_code=True``) needs ``--trust-remote-code``. A checkpoint
  whose files contradict themselves or its config.json is refused (``models.check_checkpoint``): the converter would
  write the config's sizes into the GGUF whatever the tensors hold.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from whelp import output
from whelp.errors import WhelpError
from whelp.gguf_fix import complete_gguf
from whelp.models import check_checkpoint, locate
from whelp.specs import LoadPolicy
from whelp.store import check_apart, claim, clean_stale, locked, sha256_file, tag, whelp_home, writer
from whelp.weights import check_safe_weights

LLAMA_CPP_PYTHON = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
OUTTYPES = ("auto", "f16", "bf16", "q8_0", "f32")
SCRIPT = "convert_hf_to_gguf.py"
# What the converter reads, relative to the sdist's vendor/llama.cpp/: files, or folders (ending in /).
KEEP = (SCRIPT, "LICENSE", "conversion/", "gguf-py/gguf/", "gguf-py/LICENSE", "models/templates/")
VENDOR = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"


@writer
def export_gguf(
    model_dir: str, out_path: str, outtype: str = "auto", force: bool = False, policy: LoadPolicy = LoadPolicy()
) -> Path:
    """Write ``model_dir`` (a HF checkpoint directory or registered name) as one GGUF file at ``out_path``."""
    if outtype not in OUTTYPES:
        raise WhelpError(f"--outtype {outtype}: choose one of {', '.join(OUTTYPES)}")
    model = _check_model(model_dir, policy)
    out = _check_out(out_path, force)
    check_apart(out, [str(model)], "--gguf")  # inside the model directory it would change that model's identity
    claim(out)
    if importlib.util.find_spec("sentencepiece") is None:
        raise WhelpError(
            "whelp export needs sentencepiece (llama.cpp's converter imports it for Llama-family "
            "tokenizers): pip install 'whelp[gguf]'"
        )
    script = converter() / SCRIPT
    tmp = out.with_name(f".{out.name}.tmp-{tag()}")
    try:
        _convert(script, model, tmp, outtype)
        complete_gguf(tmp, json.loads((model / "config.json").read_text()))  # a pruned Gemma 3's layer types, scale
        _check_out(out, force)  # a file that appeared at OUT while the converter ran is not clobbered either
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _check_model(model_dir: str, policy: LoadPolicy) -> Path:
    """The local checkpoint directory, refused up front for what the converter would fail on or whelp never runs."""
    path = Path(locate(model_dir))
    if not path.is_dir():
        raise WhelpError(f"no such model directory: {model_dir} (export reads a local checkpoint, not a hub id)")
    try:
        config = json.loads((path / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise WhelpError(f"{path}/config.json is not valid JSON ({exc}); re-save the checkpoint") from None
    check_safe_weights(str(path), policy)
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise WhelpError(f"{path} has no weights (*.safetensors); pass a complete checkpoint directory")
    if not policy.trust_remote_code and (_ships_code(path) or "auto_map" in config):
        raise WhelpError(
            f"{path} ships its own model or tokenizer code, which llama.cpp's converter may run; pass "
            "`whelp --trust-remote-code export ...` if you trust it"
        )
    check_checkpoint(str(path), policy)  # the converter writes the config's sizes over whatever tensors there are
    return path


def _ships_code(path: Path) -> bool:
    config = path / "tokenizer_config.json"
    return any(path.glob("*.py")) or (config.exists() and '"auto_map"' in config.read_text(errors="replace"))


def _check_out(out_path: str, force: bool) -> Path:
    """OUT as an absolute path, if it may be written: absent, or (with ``force``) an existing GGUF file."""
    out = Path(os.path.abspath(Path(out_path).expanduser()))
    if out.is_dir() or out.is_symlink():
        raise WhelpError(f"--gguf {out} is a {'directory' if out.is_dir() else 'symbolic link'}; pass a file path")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise WhelpError(f"--gguf {out} is below {blocking}, which is a file; choose a path in a directory")
    if not out.parent.is_dir():
        raise WhelpError(f"--gguf {out}: no such directory {out.parent}; create it or choose another path")
    clean_stale(out.parent, out.name)
    if not out.exists():
        return out
    if not out.is_file():  # a FIFO, device or socket: reading its magic bytes could block for ever
        raise WhelpError(
            f"--gguf {out} is a {_kind(out)}, not a regular file; whelp writes only regular files: choose another path"
        )
    with open(out, "rb") as f:
        if f.read(4) != b"GGUF":
            raise WhelpError(
                f"--gguf {out} exists and is not a GGUF file; whelp never overwrites it, with or "
                "without --force: choose another path"
            )
    if not force:
        raise WhelpError(
            f"--gguf {out} already exists; pass --force to replace it (the old one stays until the new "
            "one is complete) or choose another path"
        )
    return out


def _kind(path: Path) -> str:
    """What a path that is neither a regular file, a directory nor a link is, for a person."""
    mode = path.stat().st_mode
    kinds = {
        "named pipe (FIFO)": stat.S_ISFIFO,
        "character device": stat.S_ISCHR,
        "block device": stat.S_ISBLK,
        "socket": stat.S_ISSOCK,
    }
    return next((name for name, test in kinds.items() if test(mode)), "special file")


def converter() -> Path:
    """The directory of llama.cpp's converter, fetched and extracted once per ``$WHELP_HOME`` (locked)."""
    dest = whelp_home() / "tools" / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"
    if (dest / SCRIPT).exists():
        return dest
    with locked(dest, "to fetch llama.cpp's converter"):
        if (dest / SCRIPT).exists():  # fetched while this process waited
            return dest
        print(
            f"whelp: fetching llama.cpp's converter (llama-cpp-python=={LLAMA_CPP_PYTHON}, 76 MB) -> {dest} "
            "(first use only)",
            file=sys.stderr,
            flush=True,
        )
        clean_stale(dest.parent, dest.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{tag()}-", dir=dest.parent))
        try:
            _extract(_download(tmp), tmp / "tool")
            os.replace(tmp / "tool", dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _download(into: Path) -> Path:
    """The pinned sdist, verified: pip resolves the index and proxies the user configured."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        "llama-cpp-python",
        "--quiet",
        "--disable-pip-version-check",
        "-d",
        str(into),
        f"llama-cpp-python=={LLAMA_CPP_PYTHON}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    sdist = into / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if done.returncode != 0 or not sdist.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no source package"]
        raise WhelpError(f"could not download llama-cpp-python=={LLAMA_CPP_PYTHON} ({tail[0]}); check PyPI access")
    got = sha256_file(sdist)
    if got != SDIST_SHA256:
        raise WhelpError(
            f"sha256 of {sdist.name} is {got}, expected {SDIST_SHA256}: refusing a corrupt or tampered download"
        )
    return sdist


def _extract(sdist: Path, dest: Path) -> None:
    """Only the converter's regular files, each written below ``dest``: no links, devices or escaping names."""
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            rel = member.name[len(VENDOR) :] if member.name.startswith(VENDOR) else ""
            wanted = any(rel == keep or (keep.endswith("/") and rel.startswith(keep)) for keep in KEEP)
            if not (member.isfile() and wanted) or ".." in Path(rel).parts:
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    if not (dest / SCRIPT).exists():
        raise WhelpError(f"llama-cpp-python=={LLAMA_CPP_PYTHON} holds no {VENDOR}{SCRIPT}; report this to whelp")


def _convert(script: Path, model: Path, out: Path, outtype: str) -> None:
    """Run the converter; its output is kept (the last lines, for the error) and streamed when verbose."""
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # its own gguf-py, not PyPI's gguf
    env["PYTHONPATH"] = os.pathsep.join([str(script.parent / "gguf-py"), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, str(script), str(model), "--outfile", str(out), "--outtype", outtype]
    tail = collections.deque(maxlen=200)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        try:
            for line in proc.stdout:
                tail.append(line.rstrip())
                if output.verbose():
                    print(line, end="", file=sys.stderr, flush=True)
        except BaseException:  # Ctrl-C, SIGTERM: stop the converter too
            proc.kill()
            raise
    if proc.returncode != 0 or not out.exists():
        raise WhelpError(_failure(model, list(tail), proc.returncode))


def _error_line(lines: list[str], code: int) -> str:
    """The converter's last error: a logged ``ERROR:logger:message`` or an exception's closing line."""
    for line in reversed(lines):
        if line.startswith("ERROR:"):
            return line.split(":", 2)[-1].strip()
        if re.match(r"[\w.]+(Error|Exception)\b", line):
            return line.strip()
    return lines[-1] if lines else f"exit status {code}"


def _failure(model: Path, lines: list[str], code: int) -> str:
    """One line: the converter's last error and what to do about it."""
    error = _error_line(lines, code)
    if "not supported" in error:
        from whelp.pruning.arch import FAMILIES  # noqa: PLC0415 - heavy: torch, only to name the prunable families in an error
        from whelp.pruning.moe import MOE_FAMILIES  # noqa: PLC0415 - heavy: torch, only to name the prunable families in an error

        fix = (
            f"llama.cpp converts the families whelp prunes ({', '.join([*FAMILIES, *MOE_FAMILIES])}) and many "
            f"more: `python {converter() / SCRIPT} --print-supported-models x` lists them"
        )
    elif "pre-tokenizer was not recognized" in error:
        fix = "llama.cpp does not know this tokenizer; export a model that keeps its teacher's tokenizer"
    else:
        fix = "`whelp --verbose export ...` shows the converter's whole output"
    return f"llama.cpp's converter failed on {model}: {error}; {fix}"
