#!/usr/bin/env bash
# The test command: set up .venv (scripts/setup.sh), then run the whole suite, one pytest-xdist worker per core
# (at most 4), each with one torch thread: most tests are short processes, and two workers sharing two cores
# finish sooner than one using both. Tests on the real demo teacher fetch and convert it once into $WHELP_HOME
# (default ~/.cache/whelp); workers share it, and whelp's own locks make each shared cache once.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q --durations=15 -n auto --maxprocesses=4 --dist worksteal "$@"
