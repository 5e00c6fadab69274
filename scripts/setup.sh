#!/usr/bin/env bash
# Create or reuse .venv at the repository root and install whelp with what it needs.
# On a machine without an NVIDIA GPU, torch is pinned to the CPU wheel torch==2.13.0 (never the CUDA build).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv .venv
stamp=.venv/.whelp-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  pipq() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    pipq torch
  else
    links=(); [ -d /opt/wheels ] && links=(--find-links /opt/wheels)
    pipq "${links[@]}" torch==2.13.0
  fi
  pipq -e ".[test,generic]"
  echo "$want" > "$stamp"
fi
