#!/usr/bin/env bash
# GPU check for a session with one CUDA device: at most 8 minutes (the Python side takes
# about half that on an H100; the limit only guards against a hung run).
# Results: gpu_check.json and gpu_check.md in $OUT if set, else ./gpu-results.
#
#   bash benchmarks/gpu_check.sh              # real sizes on the GPU
#   bash benchmarks/gpu_check.sh --dry-run    # tiny presets on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -f .venv/bin/activate ]]; then
    source .venv/bin/activate
fi
# Import samkd from this checkout even where it is not installed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
output="${OUT:-gpu-results}"
python -c "import torch; print(torch.__version__, 'CUDA', torch.cuda.is_available())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
timeout --signal=INT --kill-after=20 470 python -m benchmarks.gpu_check --output "$output" "$@"
