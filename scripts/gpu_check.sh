#!/usr/bin/env bash
# The whole GPU path in one command on a single-GPU machine (docs/gpu.md): a short CUDA training run,
# export with TensorRT engines, TensorRT vs onnxruntime outputs, Triton serving the GPU repository (when a
# tritonserver binary or the Triton container image is present), dense vs pruned latency on
# onnxruntime-CUDA and TensorRT at batch 1 and 64. One PASS/FAIL/SKIP line per step (per problem); results in
# reports/gpu_check/gpu_check.json. Needs only the NVIDIA driver: it makes its own venv (make venv GPU=1, the
# CUDA stack that driver runs, or a one-line refusal naming the driver and what to do).
#   scripts/gpu_check.sh [--out PATH] [--work DIR] [--keep] [--pull]   (VENV=.venv-gpu by default)
set -euo pipefail
cd "$(dirname "$0")/.."

# No GPU: stop before anything is installed or written.
gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU ' || true)
if [ "${gpus:-0}" -eq 0 ]; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi -L lists none, or the driver is missing): this check runs" \
       "only on a GPU machine with the NVIDIA driver installed. Nothing was run." >&2
  exit 2
fi

venv=${VENV:-.venv-gpu}
started=$(date +%s)
echo "gpu_check: $gpus GPU(s); preparing $venv (make venv GPU=1, once) and the data ..."
if ! make -s venv GPU=1 VENV="$venv"; then
  echo "FAIL venv: make venv GPU=1 VENV=$venv failed (see above)"; exit 1
fi
if ! make -s data VENV="$venv"; then
  echo "FAIL data: scripts/get_fmnist.sh could not provide Fashion-MNIST (see above)"; exit 1
fi
PYTHONPATH=$PWD exec "$venv/bin/python" scripts/gpu_check.py --setup-seconds $(( $(date +%s) - started )) "$@"
