#!/usr/bin/env bash
# The test command: set up .venv (scripts/setup.sh), run the checks, then the whole suite, one pytest-xdist worker
# per core (at most 4), each with one torch thread: most tests are short processes, and two workers sharing two
# cores finish sooner than one using both. Tests on the real demo teacher fetch and convert it once into $WHELP_HOME
# (default ~/.cache/whelp); workers share it, and whelp's own locks make each shared cache once.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
# The checks a change must pass before the tests run: lint, formatting, and the import contract (a module imports
# only from the layers below it: [tool.importlinter] in pyproject.toml). The first that fails stops the script.
check() {  # check HINT COMMAND...: run COMMAND; if it fails, name it and the fix, and stop
  local hint=$1
  shift
  if ! "$@"; then
    echo "scripts/test.sh: '$*' failed: $hint" >&2
    exit 1
  fi
}
check "'.venv/bin/ruff check --fix .' fixes some; fix the rest by hand" .venv/bin/ruff check .
check "'.venv/bin/ruff format .' formats the tree" .venv/bin/ruff format --check .
check "a module imports only from the layers below it ([tool.importlinter] in pyproject.toml)" .venv/bin/lint-imports --no-logo --no-cache
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q --durations=15 -n auto --maxprocesses=4 --dist worksteal "$@"
