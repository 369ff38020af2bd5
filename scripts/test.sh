#!/usr/bin/env bash
# Set up and run the whole test suite (CPU, tiny random models; slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
unset CUDA_VISIBLE_DEVICES
exec .venv/bin/python -m pytest "$@"
