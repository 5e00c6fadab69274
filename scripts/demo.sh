#!/usr/bin/env bash
# The demo build, end to end: set up .venv, then `whelp build smollm2-demo` (demo teacher -> pruned to 60% of its
# non-embedding parameters -> distilled -> report and model card). Re-running resumes or does nothing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=${1:-runs/smollm2-demo}
.venv/bin/whelp inspect smollm2-135m
.venv/bin/whelp plan smollm2-demo
.venv/bin/whelp build smollm2-demo --out "$out"
cat "$out/final/report.md"
