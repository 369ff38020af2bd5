#!/usr/bin/env bash
# The main job: set up, fetch the offline assets, fine-tune m3e-small on MSRA-NER with
# two CPU workers, evaluate the best model on test, and predict PaddleHub's demo sentences.
# Extra arguments are config overrides, e.g. `bash scripts/main_job.sh max_steps=50`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pipeline.assets fetch
CONFIG=${CONFIG:-configs/msra_m3e_small_quick.yaml}
OUT=$(.venv/bin/python -c "import sys; from pipeline.config import load_config; print(load_config(sys.argv[1], sys.argv[2:]).checkpoint_dir)" "$CONFIG" "$@")
# The launcher treats any CUDA_VISIBLE_DEVICES, even an empty one, as a request for GPUs.
unset CUDA_VISIBLE_DEVICES
start=$(date +%s)
.venv/bin/python -m paddle.distributed.launch --nproc_per_node "${NPROC:-2}" --log_dir "$OUT/logs" \
  train_dist.py --config "$CONFIG" "$@"
echo "training + test evaluation took $(( $(date +%s) - start )) s; logs in $OUT/logs/workerlog.N"
echo "test metrics (best model on dev, evaluated once on test):"
.venv/bin/python -c "import json,sys; t=json.load(open(sys.argv[1]))['test']; print(json.dumps({k: round(t[k], 4) for k in ('precision','recall','f1')}), {k: round(v['f1'], 4) for k, v in t['per_type'].items()})" "$OUT/test_metrics.json"
.venv/bin/python predict.py --checkpoint "$OUT/best_model" --input examples/paddlehub_demo.txt \
  --output "$OUT/demo_predictions.jsonl"
.venv/bin/python -c "
import json, sys
for line in open(sys.argv[1], encoding='utf-8'):
    result = json.loads(line)
    print(result['text'])
    print('  ->', ', '.join(f\"{e['text']}/{e['type']}\" for e in result['entities']) or '(no entities)')
" "$OUT/demo_predictions.jsonl"
