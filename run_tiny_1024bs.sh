#!/usr/bin/env bash
# Scream "septimus" experiment 5: run_tiny_all.sh with the global batch doubled to 1024.
# The LR follows the square-root rule from 2e-5 at 512 (2e-5 x sqrt(2) = 2.828e-5; the seed text
# calls it the linear rule but computes the square root), and steps, warmup, eval and log
# intervals are halved, so every log and eval line matches run_tiny_all.sh example for example.
#   slice:       TPU v4-32 (16 chips, 4 hosts); run this same script on every host
#   batch:       1024 global = 64 per chip, pure data parallel
#   schedule:    AdamW 2.828e-5, 5k warmup, linear decay to 0 at 125k steps, eval every 2.5k
#   result:      hub repo NbAiLab/scream_tiny_sept_all_1024bs (private)
# Launch on a pod:  gcloud compute tpus tpu-vm ssh NAME --worker=all --command "cd scream && bash run_tiny_1024bs.sh"
# Dry run (plan and memory, no data):  bash run_tiny_1024bs.sh --dry_run --dry_run_topology v4-32
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON=${PYTHON:-python}

# A copy of this script gets its own output directory and hub repo, named after the copy.
SCRIPT_NAME=$(basename "${BASH_SOURCE[0]}" .sh)
RUN_NAME=scream_tiny_sept_all_1024bs
[ "$SCRIPT_NAME" = run_tiny_1024bs ] || RUN_NAME="scream_${SCRIPT_NAME#run_}"
OUTPUT_ROOT=${SCREAM_OUTPUT_ROOT:-runs}  # on a pod: a filesystem every host shares

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
  --train_batch_size 1024 \
  --eval_batch_size 512 \
  --gradient_accumulation_steps 1 \
  --fsdp_size 1 \
  --dtype bfloat16 \
  --learning_rate 2e-5 \
  --lr_scaling sqrt \
  --lr_reference_batch_size 512 \
  --lr_scheduler_type linear \
  --warmup_steps 5000 \
  --num_train_steps 125000 \
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
  --logging_steps 50 \
  --run_name "$RUN_NAME" \
  --output_dir "$OUTPUT_ROOT/$RUN_NAME" \
  --push_to_hub \
  --hub_model_id "NbAiLab/$RUN_NAME" \
  --hub_private_repo \
  "$@"
