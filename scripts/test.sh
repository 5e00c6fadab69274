#!/usr/bin/env bash
# The test command: set up .venv (scripts/setup.sh), then run the whole suite.
# Tests on the real demo teacher fetch and convert it once into $WHELP_HOME (default ~/.cache/whelp).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q --durations=15 "$@"
