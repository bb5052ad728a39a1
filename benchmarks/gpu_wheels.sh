#!/usr/bin/env bash
# Download the wheels the GPU machine lacks (pinned in benchmarks/gpu_wheels.py) into
# gpu-wheels/, ignored by git, and check that samkd needs nothing else there. The folder
# travels with `carry: ["gpu-wheels"]`; benchmarks/gpu_check.sh installs it first.
set -euo pipefail
cd "$(dirname "$0")/.."
python=python3
if [[ -x .venv/bin/python ]]; then
    python=.venv/bin/python
fi
exec "$python" -m benchmarks.gpu_wheels "$@" download
