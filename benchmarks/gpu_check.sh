#!/usr/bin/env bash
# GPU check for a session with one CUDA device: at most 8 minutes (the Python side takes
# about half that on an H100; the limit only guards against a hung run).
# Results: gpu_check.json and gpu_check.md in $OUT if set, else ./gpu-results.
#
#   bash benchmarks/gpu_wheels.sh              # here, once: the wheels the GPU machine lacks
#   bash benchmarks/gpu_check.sh               # real sizes on the GPU (carry: gpu-wheels)
#   bash benchmarks/gpu_check.sh --dry-run     # tiny presets on the CPU
#
# Both first install gpu-wheels/ into a scratch folder with no index, as the GPU machine (no
# registry) must, and import samkd's requirements from there.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then
    source .venv/bin/activate
fi
site="$(mktemp -d "${TMPDIR:-/tmp}/samkd-gpu-site.XXXXXX")"
trap 'rm -rf "$site" "$site-aside"' EXIT
# Import samkd from this checkout even where it is not installed, the wheels' packages next.
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
python3 -m benchmarks.gpu_wheels install "$site"
output="${OUT:-gpu-results}"
python3 -c "import torch; print(torch.__version__, 'CUDA', torch.cuda.is_available())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
timeout --signal=INT --kill-after=20 460 python3 -m benchmarks.gpu_check --output "$output" "$@"
