#!/usr/bin/env bash
# One node: all chosen GPUs, or NPROC CPU workers when GPUS is empty.
#   CONFIG=configs/msra_m3e_small_quick.yaml NPROC=2 bash launch/local.sh [key=value ...]
#   CONFIG=... GPUS=0,1 bash launch/local.sh amp=fp16
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:?set CONFIG to a YAML preset, e.g. configs/msra_m3e_small_quick.yaml}
PYTHON=${PYTHON:-.venv/bin/python}
LOG_DIR=${LOG_DIR:-log}
if [ -n "${GPUS:-}" ]; then
  exec "$PYTHON" -m paddle.distributed.launch --gpus "$GPUS" --log_dir "$LOG_DIR" \
    train_dist.py --config "$CONFIG" use_gpu=true "$@"
fi
# The launcher reads any CUDA_VISIBLE_DEVICES, even an empty one, as a request for GPUs.
unset CUDA_VISIBLE_DEVICES
exec "$PYTHON" -m paddle.distributed.launch --nproc_per_node "${NPROC:-2}" --log_dir "$LOG_DIR" \
  train_dist.py --config "$CONFIG" "$@"
