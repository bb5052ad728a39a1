#!/usr/bin/env bash
# Set up .venv if needed and run the end-to-end demo (extra arguments go to the demo,
# e.g. a work folder or --fast). Nothing is downloaded beyond the Python packages.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c "import samkd" 2>/dev/null; then
    bash scripts/setup.sh
fi
exec .venv/bin/python -m samkd.demo "$@"
