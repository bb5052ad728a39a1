#!/usr/bin/env bash
# Set up .venv if needed and run the test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c "import samkd, pytest, mobile_sam, onnxruntime, gradio, playwright" 2>/dev/null; then
    bash scripts/setup.sh
fi
exec .venv/bin/python -m pytest "$@"
