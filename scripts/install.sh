#!/usr/bin/env bash
# Create .venv and install proxytune with everything its tests, server and training need
# (requirements.lock: every optional extra too, lm-eval included, so that no test skips).
# torch is pinned to the CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
# The lock includes llama-cpp-python (GGUF models on CPUs): pip builds it from source the first
# time (about 6 minutes on 2 cores; needs cmake and a C++ compiler) and caches the wheel.
.venv/bin/python -c "import llama_cpp" 2>/dev/null ||
    echo "building llama-cpp-python from source (the first time takes about 6 minutes)..."
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.lock
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
echo "installed: $(.venv/bin/python -c 'import proxytune, torch, transformers; print("proxytune", proxytune.__version__, "torch", torch.__version__, "transformers", transformers.__version__)')"
