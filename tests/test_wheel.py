"""whelp as a package, not only a checkout: a wheel built from the repository and installed into a clean venv
outside it validates and builds the tiny recipe from a directory outside the repository. Everything whelp reads
from its own package at run time (recipes, reference configs, lm-eval task files, the licence texts) must be
package data for this to pass.

The new venv gets whelp from the wheel alone (``--no-deps``); the dependencies come from this venv's
site-packages, named by a path line in a ``.pth`` file: that adds the directory to ``sys.path`` without running
the ``.pth`` files inside it, so this checkout's editable install of whelp stays out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.demo, pytest.mark.slow]  # the tiny recipe's teacher is the demo teacher


def run(cmd: list, cwd: Path) -> subprocess.CompletedProcess:
    """``cmd`` from ``cwd`` (outside the repository), offline, with nothing of the checkout on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{cmd}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def source_copy(dest: Path) -> Path:
    """What the wheel is built from, copied: the build then leaves nothing in the checkout and reads no stale
    ``build/`` or ``__pycache__`` there."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "whelp", dest / "whelp", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A clean venv outside the repository with whelp installed from a freshly built wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = source_copy(tmp / "src")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", tmp / "dist", src], tmp)
    (wheel,) = (tmp / "dist").glob("whelp-*.whl")
    venv = tmp / "venv"
    run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", venv], tmp)
    python = venv / "bin" / "python"
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (Path(site) / "whelp_test_deps.pth").write_text("".join(f"{p}\n" for p in ours))
    run([python, "-m", "pip", "--disable-pip-version-check", "install", "--no-deps", "--quiet", wheel], tmp)
    return venv


def test_installed_wheel_validates_and_builds_the_tiny_recipe(venv, tmp_path):
    from transformers import AutoModelForCausalLM

    found = run([venv / "bin" / "python", "-c", "import whelp; print(whelp.__file__)"], tmp_path).stdout.strip()
    assert Path(found).is_relative_to(venv) and not Path(found).is_relative_to(ROOT), found
    whelp = venv / "bin" / "whelp"  # the console script
    assert "ok: tiny" in run([whelp, "validate", "tiny"], tmp_path).stdout
    prompts = "from importlib.resources import files; print(files('whelp.evals') / 'data' / 'chat_general.jsonl')"
    shipped = Path(run([venv / "bin" / "python", "-c", prompts], tmp_path).stdout.strip())
    assert shipped.is_relative_to(venv) and len(shipped.read_text().splitlines()) >= 100  # chat:general is packaged
    out = tmp_path / "tiny"
    run(
        [whelp, "build", "tiny", "--out", out, "--set", "distill.0.caches=[]"], tmp_path
    )  # the cache is no package data
    final = out / "final"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "recipe.yaml", "metrics.json", "README.md"):
        assert (final / name).is_file(), name
    metrics = json.loads((final / "metrics.json").read_text())
    assert [m["label"] for m in metrics["models"]] == ["teacher", "pruned", "distilled"]
    assert "whelp_pydoc_next/acc" in metrics["models"][-1]["lm_eval"]["scores"]  # a task whelp ships
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 192
