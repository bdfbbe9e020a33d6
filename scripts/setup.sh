#!/usr/bin/env bash
# Creates (or reuses) .venv with fxopt and its test dependencies on a fresh CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first and pinned: an unpinned torch requirement pulls a multi-GB CUDA build,
# while torch 2.13.0 (CPU) installs from local disk. A venv that already has a torch
# in our supported range keeps it.
if ! .venv/bin/python -c "import torch, sys; v = tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])); sys.exit(not (2, 11) <= v < (2, 15))" 2>/dev/null; then
  .venv/bin/python -m pip install -q torch==2.13.0
fi
.venv/bin/python -m pip install -q -e ".[test]"
