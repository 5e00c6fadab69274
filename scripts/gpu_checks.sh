#!/usr/bin/env bash
# The GPU checks, as one prepared run on a machine with an NVIDIA GPU (from the repository root):
#
#   bash scripts/gpu_checks.sh          # about 5 minutes on one H200; logs and results under $OUT
#
# 1. tests/test_cuda.py: the fused loss on CUDA against the CPU fp64 reference, bf16 autocast within 1e-2 of fp32,
#    capture and distillation on CUDA in bf16 against the CPU fp32 cache and losses, a killed bf16 distil resuming,
#    and the bf16 gradient error of the fused loss against fp32 (printed: the Liger #1432 comparison);
# 2. bench/capture_scale.py at V = 128,256: a random Llama-3.2-1B-shaped teacher in bf16, plain forward vs top-64
#    and sampled capture, tokens/s and peak GPU memory (its table goes to $OUT/capture-gpu.md; append it to
#    bench/RESULTS.md here).
# 3. bench/gpu_train.py: whelp's training step with a Llama-3.2-1B-shaped student at V = 128,256, seq 4096: tokens/s,
#    MFU and peak memory for CE only, KD from a top-64 cache, KD with a live Llama-3.1-8B-shaped teacher, and with
#    gradient checkpointing; the fused KD loss against the bare lm_head GEMM ($OUT/gpu-train.md).
# The machine's python3 holds CUDA torch and transformers; whelp runs from this checkout (PYTHONPATH), nothing is
# installed and nothing is fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/whelp-gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
python3 -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU"; print(torch.__version__, torch.cuda.get_device_name())'
status=0
python3 -m pytest -q -p no:cacheprovider -rs -s tests/test_cuda.py 2>&1 | tee "$out/cuda-tests.log" || status=$?
python3 bench/gpu_train.py --json "$out/gpu-train.json" --dry 2>&1 | tee "$out/gpu-train.md" || status=$?
python3 bench/capture_scale.py --teacher llama-3.2-1b --device cuda --dtype bfloat16 --procs 1 --tokens 262144 \
  --seq-len 2048 --batch-size 8 --rounds 3 --json "$out/capture-gpu.json" --dry 2>&1 | tee "$out/capture-gpu.md" \
  || status=$?
exit $status
