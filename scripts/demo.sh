#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the demo: optimizes a small HF GPTNeoX, a small
# HF Mamba and the seed-style Mamba, prints the reports and writes pictures under out/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
exec .venv/bin/python examples/demo.py --out out/demo "$@"
