#!/usr/bin/env bash
# Create .venv and install proxytune with everything its tests, server and training need.
# torch is pinned to the CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.lock
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
echo "installed: $(.venv/bin/python -c 'import proxytune, torch, transformers; print("proxytune", proxytune.__version__, "torch", torch.__version__, "transformers", transformers.__version__)')"
