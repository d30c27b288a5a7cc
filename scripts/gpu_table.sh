#!/usr/bin/env bash
# The GPU speed table (benchmarks/gpu_table.py) on a bare CUDA machine with torch and
# transformers installed: bash scripts/gpu_table.sh [OUTPUT_DIR] [more gpu_table.py options]
# OUTPUT_DIR defaults to $OUT if set, else runs/gpu-table. Exit 2: no CUDA (or no torch).
set -u
cd "$(dirname "$0")/.."
out="${1:-${OUT:-runs/gpu-table}}"
[ $# -gt 0 ] && shift
py=""
for c in "${PYTHON:-}" .venv/bin/python python3 python; do
  if [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && "$c" -c "import torch" 2>/dev/null; then
    py="$c"; break
  fi
done
if [ -z "$py" ]; then
  echo "gpu_table.sh: no python with torch found (set PYTHON=...)"; exit 2
fi
echo "gpu_table.sh: $("$py" -c 'import sys; print(sys.executable, sys.version.split()[0])'), output $out"
# the checkout's own sources first (the machine may have no install of proxytune)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"
"$py" benchmarks/gpu_table.py --out "$out" "$@" 2>&1 | tee "$out/log.txt"
exit "${PIPESTATUS[0]}"
