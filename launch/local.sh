#!/usr/bin/env bash
# One node: all chosen GPUs, or NPROC CPU workers when GPUS is empty.
#   CONFIG=configs/msra_m3e_small_quick.yaml NPROC=2 bash launch/local.sh [key=value ...]
#   CONFIG=... GPUS=0,1 bash launch/local.sh amp=fp16
# MAX_RESTARTS=N relaunches a job that failed (a killed or crashed worker) up to N times; each
# relaunch resumes from the newest complete training state (set save_interval so there is one).
# Exit codes 2 (bad config, data or checkpoint_dir) and 3 (NaN/Inf stop) are not retried:
# the same input would fail the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:?set CONFIG to a YAML preset, e.g. configs/msra_m3e_small_quick.yaml}
PYTHON=${PYTHON:-.venv/bin/python}
LOG_DIR=${LOG_DIR:-log}
MAX_RESTARTS=${MAX_RESTARTS:-0}
if [ -n "${GPUS:-}" ]; then
  # Paddle's launcher dies with a traceback (ValueError in launch/context/device.py) when --gpus names
  # GPUs it cannot see: check first and say so.
  if ! "$PYTHON" -m pipeline.device >/dev/null; then
    echo "launch/local.sh: GPUS=$GPUS but no GPU found (above); unset GPUS to run NPROC CPU workers" >&2
    exit 2
  fi
  command=("$PYTHON" -m paddle.distributed.launch --gpus "$GPUS" --log_dir "$LOG_DIR"
           train_dist.py --config "$CONFIG" use_gpu=true "$@")
else
  # The launcher reads any CUDA_VISIBLE_DEVICES, even an empty one, as a request for GPUs.
  unset CUDA_VISIBLE_DEVICES
  command=("$PYTHON" -m paddle.distributed.launch --nproc_per_node "${NPROC:-2}" --log_dir "$LOG_DIR"
           train_dist.py --config "$CONFIG" "$@")
fi
attempt=0
while :; do
  status=0
  "${command[@]}" || status=$?
  if [ "$status" -eq 0 ] || [ "$status" -eq 2 ] || [ "$status" -eq 3 ] || [ "$attempt" -ge "$MAX_RESTARTS" ]; then
    exit "$status"
  fi
  attempt=$((attempt + 1))
  echo "launch/local.sh: the job exited with status $status; relaunching ($attempt of $MAX_RESTARTS)," \
       "resuming from the newest training state" >&2
done
