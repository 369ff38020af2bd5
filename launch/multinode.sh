#!/usr/bin/env bash
# One node of a multi-node job: run the SAME command on every node, with that node's variables.
#
#   MASTER_ADDR=<node 0 address> MASTER_PORT=<free port> NNODES=2 NODE_RANK=0 \
#   CONFIG=configs/msra_m3e_small_quick.yaml GPUS=0,1,2,3 bash launch/multinode.sh [key=value ...]
#   ... TASK=predict GPUS=0,1,2,3 bash launch/multinode.sh --checkpoint DIR/best_model --input IN --output OUT
#
# Variables (nothing is hard-coded; every value comes from the environment):
#   MASTER_ADDR  address of the rendezvous node (node rank 0). Paddle's launcher starts its
#                key-value master only on the node whose own address equals MASTER_ADDR (or when
#                it is the loopback address), so give the IP that node 0 resolves its hostname to, or set
#                HOST_IP on every node to the address the others reach it by.
#   MASTER_PORT  a free TCP port on the master node.
#   NNODES       number of nodes; or MIN:MAX for an elastic job (see below).
#   NODE_RANK    this node's rank, 0..NNODES-1. Optional: without it nodes are ranked in
#                arrival order (the master's own node first).
#   TASK         train (default): train_dist.py --config CONFIG, the arguments of this script are key=value
#                overrides; predict: predict.py, the arguments are its flags (--checkpoint, --input,
#                --output...), and --device gpu or cpu follows the workers below. Rank 0 alone reads the
#                input and writes the output; a rerun of the same command continues it.
#   CONFIG       YAML preset for train_dist.py (TASK=train).
#   GPUS         device ids of this node (e.g. "0,1", as listed in CUDA_VISIBLE_DEVICES if set);
#   GPUS_PER_NODE  or a count: that many workers on the first visible GPUs.
#                Neither set (or 0): NPROC CPU workers over gloo.
#   NPROC        CPU workers per node when GPUS is empty (default 1).
#   LOG_DIR      per-node log directory (default log/node-$NODE_RANK): workerlog.N per local worker.
#   JOB_ID       name shared by the nodes of one job (default: nerpipe).
#   HOST_IP      optional: this node's address as the other nodes see it (launcher's --host).
#   PYTHON       interpreter (default .venv/bin/python if present, else python).
#
# Elastic form (not used by the tests): replace the HTTP master by an etcd server and give a
# node range; nodes may join or leave between MIN and MAX and the job relaunches with the new
# world size (resume: auto then restores weights, optimiser and step, but the position inside
# the epoch was counted in batches of the old world size: prefer a fixed node count):
#   MASTER_ADDR=etcd://<etcd host> MASTER_PORT=<etcd port> NNODES=2:4 bash launch/multinode.sh
# which runs `python -m paddle.distributed.launch --master etcd://HOST:PORT --nnodes 2:4 ...`.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0 (or etcd://HOST for elastic)}"
: "${MASTER_PORT:?set MASTER_PORT to a free port on the master}"
: "${NNODES:?set NNODES to the number of nodes (or MIN:MAX)}"
TASK=${TASK:-train}
case $TASK in
  train)
    CONFIG=${CONFIG:?set CONFIG to a YAML preset, e.g. configs/msra_m3e_small_quick.yaml}
    program=(train_dist.py --config "$CONFIG"); on_gpu=(use_gpu=true); on_cpu=() ;;
  predict)
    # The device follows the launcher's workers: a GPU build on a node whose GPUs are not used must not pick one.
    program=(predict.py); on_gpu=(--device gpu); on_cpu=(--device cpu) ;;
  *)
    echo "launch/multinode.sh: TASK must be train or predict, got '$TASK'" >&2; exit 2 ;;
esac
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
# A word where a number belongs (GPUS_PER_NODE=all, NNODES=two) would otherwise run something else
# silently (one CPU worker on a GPU node) or fail later in the launcher with a traceback.
fail() { echo "launch/multinode.sh: $*" >&2; exit 2; }
whole='^[0-9]{1,6}$'
[[ $NNODES =~ ^[0-9]{1,4}(:[0-9]{1,4})?$ ]] || fail "NNODES must be a node count or MIN:MAX, got '$NNODES'"
[[ $MASTER_PORT =~ $whole ]] && [ "$MASTER_PORT" -ge 1 ] && [ "$MASTER_PORT" -le 65535 ] ||
  fail "MASTER_PORT must be a TCP port (1-65535), got '$MASTER_PORT'"
for name in NODE_RANK GPUS_PER_NODE NPROC; do
  if [ -n "${!name:-}" ] && ! [[ ${!name} =~ $whole ]]; then
    fail "$name must be a whole number (0 or more), got '${!name}'"
  fi
done
[ "${NPROC:-1}" -ge 1 ] || fail "NPROC must be at least 1, got '$NPROC'"
# Counts the launcher would accept and then wait on forever: no node, MIN above MAX, a rank no node count has.
min_nodes=$((10#${NNODES%%:*})) max_nodes=$((10#${NNODES##*:}))
[ "$min_nodes" -ge 1 ] && [ "$min_nodes" -le "$max_nodes" ] ||
  fail "NNODES must be at least 1 (MIN:MAX with MIN <= MAX), got '$NNODES'"
if [ -n "${NODE_RANK:-}" ] && [ "$((10#$NODE_RANK))" -ge "$max_nodes" ]; then
  fail "NODE_RANK must be below the node count (0..$((max_nodes - 1)) for NNODES=$NNODES), got '$NODE_RANK'"
fi
if [ "$TASK" = train ] && [ ! -f "$CONFIG" ]; then
  fail "CONFIG must be a YAML preset (relative to $(pwd)), got '$CONFIG': no such file"
fi
if [ -n "${GPUS:-}" ] && ! [[ $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]]; then
  fail "GPUS must be device ids separated by commas (e.g. 0,1), got '$GPUS'"
fi
LOG_DIR=${LOG_DIR:-log/node-${NODE_RANK:-$(hostname)}}

args=(--master "${MASTER_ADDR}:${MASTER_PORT}" --nnodes "$NNODES" --job_id "${JOB_ID:-nerpipe}"
      --log_dir "$LOG_DIR")
if [ -n "${NODE_RANK:-}" ]; then args+=(--rank "$NODE_RANK"); fi
if [ -n "${HOST_IP:-}" ]; then args+=(--host "$HOST_IP"); fi

if [ -n "${GPUS:-}" ] || [ "${GPUS_PER_NODE:-0}" -gt 0 ]; then
  # Paddle's launcher dies with a traceback (ValueError in launch/context/device.py) when --gpus names
  # GPUs it cannot see: check first and say so.
  if ! "$PYTHON" -m pipeline.device >/dev/null; then
    echo "launch/multinode.sh: GPUS/GPUS_PER_NODE set but no GPU found (above); unset them to run NPROC CPU" \
         "workers" >&2
    exit 2
  fi
fi
if [ -n "${GPUS:-}" ]; then
  exec "$PYTHON" -m paddle.distributed.launch "${args[@]}" --gpus "$GPUS" "${program[@]}" "${on_gpu[@]}" "$@"
fi
if [ "${GPUS_PER_NODE:-0}" -gt 0 ]; then
  exec "$PYTHON" -m paddle.distributed.launch "${args[@]}" --nproc_per_node "$GPUS_PER_NODE" \
    "${program[@]}" "${on_gpu[@]}" "$@"
fi
# The launcher reads any CUDA_VISIBLE_DEVICES, even an empty one, as a request for GPUs.
unset CUDA_VISIBLE_DEVICES
exec "$PYTHON" -m paddle.distributed.launch "${args[@]}" --nproc_per_node "${NPROC:-1}" \
  "${program[@]}" "${on_cpu[@]}" "$@"
