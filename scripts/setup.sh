#!/usr/bin/env bash
# Create .venv (once) and install samkd with its test tools into it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# Pinned torch builds: a bare `torch` requirement would download a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install --quiet -e ".[test,dev,export,lora,view]"
# The browser test of `samkd view` drives Debian's chromium (`apt-get install chromium`;
# .ci/run installs it); without it that test is skipped outside CI.
if ! command -v chromium >/dev/null; then
    echo "note: no chromium here; the browser test of samkd view will be skipped" >&2
fi
