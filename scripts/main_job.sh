#!/usr/bin/env bash
# The main job: set up, fetch the offline assets, fine-tune m3e-small on MSRA-NER with
# two CPU workers, evaluate the best model on test, and predict PaddleHub's demo sentences.
# Extra arguments are config overrides, e.g. `bash scripts/main_job.sh max_steps=50`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pipeline.assets fetch
CONFIG=${CONFIG:-configs/msra_m3e_small_quick.yaml}
OUT=$(.venv/bin/python train_dist.py --config "$CONFIG" --get checkpoint_dir "$@")
# The launcher treats any CUDA_VISIBLE_DEVICES, even an empty one, as a request for GPUs.
unset CUDA_VISIBLE_DEVICES
start=$(date +%s)
.venv/bin/python -m paddle.distributed.launch --nproc_per_node "${NPROC:-2}" --log_dir "$OUT/logs" \
  train_dist.py --config "$CONFIG" "$@"
echo "training + test evaluation took $(( $(date +%s) - start )) s; logs in $OUT/logs/workerlog.N"
echo "test metrics (best model on dev, evaluated once on test):"
.venv/bin/python -m pipeline.report metrics "$OUT/test_metrics.json"
.venv/bin/python predict.py --checkpoint "$OUT/best_model" --input examples/paddlehub_demo.txt \
  --output "$OUT/demo_predictions.jsonl"
.venv/bin/python -m pipeline.report entities "$OUT/demo_predictions.jsonl"
# The four demo sentences are MSRA-NER training sentences: the corpus's own annotation is their gold.
echo "the demo against MSRA-NER's annotation of the same sentences (examples/paddlehub_demo_gold.tsv):"
.venv/bin/python -m pipeline.report gold "$OUT/demo_predictions.jsonl" examples/paddlehub_demo_gold.tsv
