#!/usr/bin/env bash
# The seed's learning-rate search on a TPU v4-8 (4 chips, 1 host): defined in 2023, never run.
# Four whisper-tiny runs on all_v5, 512 global (128 per chip), 10k warmup, 100k steps, eval
# every 2.5k with a 128 eval batch, differing only in LR and schedule:
#   tiny_8tpu_1e5_constant  1e-5  constant after warmup
#   tiny_8tpu_1e5_linear    1e-5  linear decay
#   tiny_8tpu_2e5_linear    2e-5  linear decay
#   tiny_8tpu_3e5_linear    3e-5  linear decay
# Usage:  bash run_lr_search_v4-8.sh                      all four, one after another, then the table
#         bash run_lr_search_v4-8.sh tiny_8tpu_2e5_linear one run (extra flags may follow)
#         bash run_lr_search_v4-8.sh --table              only the table of best eval WER so far
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON=${PYTHON:-python}

SCRIPT_NAME=$(basename "${BASH_SOURCE[0]}" .sh)
PREFIX=scream_
[ "$SCRIPT_NAME" = run_lr_search_v4-8 ] || PREFIX="scream_${SCRIPT_NAME#run_}_"  # a copy writes elsewhere
OUTPUT_ROOT=${SCREAM_OUTPUT_ROOT:-runs}
RUNS=(tiny_8tpu_1e5_constant tiny_8tpu_1e5_linear tiny_8tpu_2e5_linear tiny_8tpu_3e5_linear)
declare -A LEARNING_RATE=([tiny_8tpu_1e5_constant]=1e-5 [tiny_8tpu_1e5_linear]=1e-5
                          [tiny_8tpu_2e5_linear]=2e-5 [tiny_8tpu_3e5_linear]=3e-5)
declare -A SCHEDULE=([tiny_8tpu_1e5_constant]=constant_with_warmup [tiny_8tpu_1e5_linear]=linear
                     [tiny_8tpu_2e5_linear]=linear [tiny_8tpu_3e5_linear]=linear)

run_one() {
  local name=$1
  shift
  "$PYTHON" run_scream.py \
    --model_name_or_path openai/whisper-tiny \
    --dataset_name NbAiLab/NCC_speech_all_v5 \
    --streaming \
    --train_split_name train \
    --eval_split_name validation \
    --audio_column_name audio \
    --text_column_name text \
    --language no \
    --task transcribe \
    --max_label_length 128 \
    --max_duration_in_seconds 30 \
    --shuffle_buffer_size 500 \
    --train_batch_size 512 \
    --eval_batch_size 128 \
    --gradient_accumulation_steps 1 \
    --fsdp_size 1 \
    --dtype bfloat16 \
    --learning_rate "${LEARNING_RATE[$name]}" \
    --lr_scaling none \
    --lr_scheduler_type "${SCHEDULE[$name]}" \
    --warmup_steps 10000 \
    --num_train_steps 100000 \
    --adam_beta1 0.9 \
    --adam_beta2 0.999 \
    --adam_epsilon 1e-8 \
    --weight_decay 0.0 \
    --label_smoothing_factor 0.0 \
    --max_grad_norm 0 \
    --seed 0 \
    --do_train \
    --do_eval \
    --predict_with_generate \
    --log_max_eval_predictions 100 \
    --eval_steps 2500 \
    --save_steps 2500 \
    --logging_steps 100 \
    --run_name "$PREFIX$name" \
    --output_dir "$OUTPUT_ROOT/$PREFIX$name" \
    --push_to_hub \
    --hub_model_id "NbAiLab/$PREFIX$name" \
    --hub_private_repo \
    "$@"
}

best_wer_table() {
  "$PYTHON" - "$OUTPUT_ROOT" "$PREFIX" "${RUNS[@]}" <<'PY'
import json, math, sys
from pathlib import Path
root, prefix, runs = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
print("| run | best eval WER (normalized) | at step | evals |")
print("|---|---|---|---|")
for run in runs:
    path = root / f"{prefix}{run}" / "metrics.jsonl"
    evals = [json.loads(line) for line in path.open()] if path.exists() else []
    evals = [e for e in evals if "eval/wer_normalized" in e]
    best = min(evals, key=lambda e: e["eval/wer_normalized"], default=None)
    print(f"| {run} | {best['eval/wer_normalized']:.2f} | {best['step']} | {len(evals)} |" if best
          else f"| {run} | - | - | 0 |")
PY
}

if [ "${1:-}" = --table ]; then
  best_wer_table
elif [ $# -gt 0 ] && [[ $1 != --* ]]; then
  name=$1
  shift
  [ -n "${LEARNING_RATE[$name]:-}" ] || { echo "error: unknown run '$name'; choose one of: ${RUNS[*]}" >&2; exit 2; }
  run_one "$name" "$@"
else
  for name in "${RUNS[@]}"; do
    run_one "$name" "$@"
  done
  best_wer_table
fi
