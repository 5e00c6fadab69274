#!/usr/bin/env bash
# The demo: set up .venv, then inspect the demo teacher and measure its perplexity on the built-in corpus.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=${1:-runs/demo}
.venv/bin/whelp inspect smollm2-135m
.venv/bin/whelp eval smollm2-135m --ppl pydoc:eval --out "$out/eval" --force
