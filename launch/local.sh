#!/usr/bin/env bash
# One node: all chosen GPUs, or NPROC CPU workers when GPUS is empty.
#   CONFIG=configs/msra_m3e_small_quick.yaml NPROC=2 bash launch/local.sh [key=value ...]
#   CONFIG=... GPUS=0,1 bash launch/local.sh amp=fp16
# MAX_RESTARTS=N relaunches a job that failed (a killed or crashed worker) up to N times, RESTART_DELAY
# seconds apart (default 10); each relaunch resumes from the newest complete training state (set
# save_interval so there is one). Exit codes 2 (bad config, data or checkpoint_dir) and 3 (NaN/Inf stop)
# are not retried: the same input would fail the same way. launch/supervise.sh runs the launcher and
# relaunches it; Ctrl-C reaches the launcher once, and the workers save a training state before they stop.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:?set CONFIG to a YAML preset, e.g. configs/msra_m3e_small_quick.yaml}
PYTHON=${PYTHON:-.venv/bin/python}
LOG_DIR=${LOG_DIR:-log}
for name in MAX_RESTARTS RESTART_DELAY NPROC; do
  if ! [[ ${!name:-0} =~ ^[0-9]{1,6}$ ]]; then
    echo "launch/local.sh: $name must be a whole number (0 or more), got '${!name}'" >&2
    exit 2
  fi
done
if [ "${NPROC:-2}" -lt 1 ]; then
  echo "launch/local.sh: NPROC must be at least 1, got '$NPROC'" >&2
  exit 2
fi
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
MAX_RESTARTS=${MAX_RESTARTS:-0} RESTART_DELAY=${RESTART_DELAY:-10} EXIT_CODES=plain \
  exec bash launch/supervise.sh "${command[@]}"
