#!/usr/bin/env bash
# Create .venv (once) and install the pinned stack into it. Idempotent.
# NERPIPE_ONNX=1 also installs the optional ONNX Runtime engine (requirements-onnx.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${NERPIPE_ONNX:-0}" in
  0|1) ;;
  *) echo "error: NERPIPE_ONNX must be 0 or 1, got '${NERPIPE_ONNX}'" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
if [ "${NERPIPE_ONNX:-0}" = 1 ]; then
  .venv/bin/python -m pip install -q -r requirements-onnx.txt
fi
