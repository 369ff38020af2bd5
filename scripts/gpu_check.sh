#!/usr/bin/env bash
# What the GPU paths do on a real card, in under 10 minutes on a machine with 1+ GPUs:
#   bash scripts/gpu_check.sh
# On up to 2 GPUs under Paddle's launcher, 30 steps each on a slice of MSRA-NER (m3e-small):
#   fp16 O1, fp16 O2, bf16 (or, on a card without bfloat16, that train_dist.py refuses it at start),
#   a run killed after its first training state and relaunched (it must resume, not restart),
#   export of the fp16 O1 model, predict.py --device gpu: dynamic graph, static fp32 and static fp16.
# One PASS/FAIL/SKIP line per check, with its throughput; logs under $OUT (default outputs/gpu_check).
# Exit status: the number of failed checks. Without a GPU it says so and exits 0, running nothing.
# Needs the assets: python -m pipeline.assets fetch.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
OUT=${OUT:-outputs/gpu_check}
STEPS=${STEPS:-30}

if ! count=$("$PYTHON" -m pipeline.device 2>/dev/null); then
  reason=$("$PYTHON" -m pipeline.device 2>&1 >/dev/null | tail -n 1)
  echo "gpu_check: ${reason:-no GPU found}: nothing to check, nothing run"
  exit 0
fi
if [ "$count" -ge 2 ]; then GPUS=0,1; else GPUS=0; fi
mkdir -p "$OUT"
echo "gpu_check: $count GPU(s) visible; training on GPU(s) $GPUS; logs in $OUT"
failures=0
result() {  # result PASS|FAIL|SKIP name detail
  printf '%-4s %-22s %s\n' "$1" "$2" "$3"
  if [ "$1" = FAIL ]; then failures=$((failures + 1)); fi
}
# The mean tokens/s of a run's logged steps (train_metrics.jsonl), and its last step.
throughput() {
  "$PYTHON" - "$1/train_metrics.jsonl" <<'EOF'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1], encoding="utf-8")]
print(f"{sum(r['tokens_per_second'] for r in records) / len(records):.0f} tokens/s", records[-1]["step"])
EOF
}
OVERRIDES=(max_steps="$STEPS" max_train_examples=4000 max_dev_examples=200 max_test_examples=200
           eval_interval="$STEPS" log_interval=5 use_vdl=false use_gpu=true)
launch() {  # launch NAME key=value...: train under the launcher; its log in $OUT/NAME.log
  local name=$1; shift
  "$PYTHON" -m paddle.distributed.launch --gpus "$GPUS" --log_dir "$OUT/$name-log" \
    train_dist.py --config configs/msra_m3e_small_quick.yaml checkpoint_dir="$OUT/$name" "${OVERRIDES[@]}" "$@" \
    >"$OUT/$name.log" 2>&1
}
train_check() {  # train_check NAME key=value...: a fresh run to the last step, on the GPU, with a best model
  local name=$1; shift
  rm -rf "${OUT:?}/$name" "$OUT/$name-log"
  if ! launch "$name" resume=off "$@"; then
    result FAIL "$name" "exit status $? (see $OUT/$name.log and $OUT/$name-log/workerlog.0)"; return
  fi
  read -r rate unit step < <(throughput "$OUT/$name")
  if [ "$step" != "$STEPS" ] || [ ! -f "$OUT/$name/best_model/model.pdparams" ]; then
    result FAIL "$name" "stopped at step $step or wrote no best_model"
  elif ! grep -q "device: gpu" "$OUT/$name-log/workerlog.0"; then
    result FAIL "$name" "the first log line does not name a GPU (see $OUT/$name-log/workerlog.0)"
  else
    result PASS "$name" "$rate $unit"
  fi
}

train_check fp16_o1 amp=fp16 amp_level=O1
train_check fp16_o2 amp=fp16 amp_level=O2
if "$PYTHON" -c "import paddle, sys; paddle.set_device('gpu'); sys.exit(not paddle.amp.is_bfloat16_supported())" \
    2>/dev/null; then
  train_check bf16_o1 amp=bf16 amp_level=O1
else
  rm -rf "${OUT:?}/bf16_refused"
  launch bf16_refused amp=bf16 resume=off; status=$?
  if [ "$status" -ne 0 ] && grep -q "no bfloat16 support" "$OUT/bf16_refused-log/workerlog.0"; then
    result PASS bf16_refused "no bfloat16 on this card: refused at start"
  else
    result FAIL bf16_refused "no bfloat16 on this card, yet exit status $status (see $OUT/bf16_refused.log)"
  fi
fi

# Kill and resume: killed once its first training state is complete, then the same command again.
name=resume
rm -rf "${OUT:?}/$name" "$OUT/$name-log"
setsid "$PYTHON" -m paddle.distributed.launch --gpus "$GPUS" --log_dir "$OUT/$name-log" \
  train_dist.py --config configs/msra_m3e_small_quick.yaml checkpoint_dir="$OUT/$name" "${OVERRIDES[@]}" \
  amp=fp16 save_interval=10 resume=auto >"$OUT/$name.log" 2>&1 &
launcher=$!
for _ in $(seq 600); do
  if [ -f "$OUT/$name/checkpoints/step-00000010/training_state.json" ] || ! kill -0 "$launcher" 2>/dev/null; then
    break
  fi
  sleep 0.5
done
kill -KILL -- "-$launcher" 2>/dev/null
wait "$launcher" 2>/dev/null
if launch "$name" amp=fp16 save_interval=10 resume=auto && grep -q "resumed from" "$OUT/$name-log/workerlog.0"; then
  read -r rate unit step < <(throughput "$OUT/$name")
  if [ "$step" = "$STEPS" ]; then result PASS resume "killed, resumed to step $step, $rate $unit"
  else result FAIL resume "resumed but stopped at step $step"; fi
else
  result FAIL resume "the relaunch did not resume (see $OUT/$name-log/workerlog.0)"
fi

# Export, then predict.py on one GPU: dynamic graph, static fp32, static fp16.
best=$OUT/fp16_o1/best_model
if "$PYTHON" -m pipeline.export --checkpoint "$best" >"$OUT/export.log" 2>&1; then
  result PASS export "$(dirname "$best")/inference"
else
  result FAIL export "see $OUT/export.log"
fi
# The first 1000 test sentences of MSRA-NER as plain text, one per line.
"$PYTHON" - "$("$PYTHON" -m pipeline.assets path msra_ner)/test.tsv" "$OUT/predict_input.txt" <<'EOF'
import sys
from pipeline.readers import read_examples
examples, _ = read_examples(sys.argv[1])
with open(sys.argv[2], "w", encoding="utf-8") as output:
    output.writelines("".join(example.tokens) + "\n" for example in examples[:1000])
EOF
chars=$(wc -m <"$OUT/predict_input.txt")
predict_check() {  # predict_check NAME predict.py-flags...
  local name=$1; shift
  local start end
  start=$(date +%s.%N)
  if CUDA_VISIBLE_DEVICES=${GPUS%%,*} "$PYTHON" predict.py --checkpoint "$best" --input "$OUT/predict_input.txt" \
      --output "$OUT/$name.jsonl" --device gpu "$@" >"$OUT/$name.log" 2>&1 \
      && [ "$(wc -l <"$OUT/$name.jsonl")" -eq "$(wc -l <"$OUT/predict_input.txt")" ]; then
    end=$(date +%s.%N)
    result PASS "$name" "$(awk -v c="$chars" -v s="$start" -v e="$end" 'BEGIN {printf "%.0f chars/s (with start-up)", c / (e - s)}')"
  else
    result FAIL "$name" "see $OUT/$name.log"
  fi
}
predict_check predict_dynamic --engine dynamic
predict_check predict_static_fp32 --engine static --precision fp32
predict_check predict_static_fp16 --engine static --precision fp16
if [ -f "$OUT/predict_dynamic.jsonl" ] && [ -f "$OUT/predict_static_fp32.jsonl" ]; then
  if cmp -s "$OUT/predict_dynamic.jsonl" "$OUT/predict_static_fp32.jsonl"; then
    result PASS static_equals_dynamic "static fp32 labels = dynamic graph labels"
  else
    result FAIL static_equals_dynamic "static fp32 and dynamic labels differ: diff $OUT/predict_dynamic.jsonl $OUT/predict_static_fp32.jsonl"
  fi
fi
echo "gpu_check: $failures check(s) failed"
exit "$failures"
