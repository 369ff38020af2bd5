#!/usr/bin/env bash
# Create .venv (once) and install the pinned stack into it. Idempotent.
# NERPIPE_ONNX=1 also installs the optional ONNX Runtime engine (requirements-onnx.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${NERPIPE_ONNX:-0}" in
  0|1) ;;
  *) echo "error: NERPIPE_ONNX must be 0 or 1, got '${NERPIPE_ONNX}'" >&2; exit 2 ;;
esac
# Our C++ layer norm (pipeline/native_layer_norm.py) is compiled with g++ on first use. Training works
# without it (Paddle's layer norm, one warning); its tests do not. Installed here where we can (root, apt).
if ! command -v g++ >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq g++ >/dev/null
  else
    echo "warning: no g++: training will use Paddle's slower layer norm (install g++ for ours)" >&2
  fi
fi
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
if [ "${NERPIPE_ONNX:-0}" = 1 ]; then
  .venv/bin/python -m pip install -q -r requirements-onnx.txt
fi
