#!/usr/bin/env bash
# Scream "septimus" experiment 4: whisper-large-v2 on all_v5 at LR 8e-6 (run_large_2e6.sh: 2e-6).
#   slice:       TPU v4-64 (32 chips, 8 hosts); run this same script on every host
#   batch:       160 global = 5 per chip, as in 2023; parameters and optimizer state sharded over
#                all 32 chips (FSDP), layers scanned and fully rematerialised: the setting that
#                fits large-v2 best on a v4-64 (compile-only, bench_scream.py tpu: up to 76 per
#                chip, vs 15 with dots remat, 13 data parallel; the 2023 pmap run fit 5)
#   schedule:    AdamW 8e-6, 5k warmup, linear decay to 0 at 100k steps, eval every 2.5k
#   result:      hub repo NbAiLab/scream_large_sept_8e6 (private)
# Launch on a pod:  gcloud compute tpus tpu-vm ssh NAME --worker=all --command "cd scream && bash run_large_8e6.sh"
# Dry run (plan and memory, no data):  bash run_large_8e6.sh --dry_run --dry_run_topology v4-64
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON=${PYTHON:-python}

# A copy of this script gets its own output directory and hub repo, named after the copy.
SCRIPT_NAME=$(basename "${BASH_SOURCE[0]}" .sh)
RUN_NAME=scream_large_sept_8e6
[ "$SCRIPT_NAME" = run_large_8e6 ] || RUN_NAME="scream_${SCRIPT_NAME#run_}"
OUTPUT_ROOT=${SCREAM_OUTPUT_ROOT:-runs}  # on a pod: a filesystem every host shares

"$PYTHON" run_scream.py \
  --model_name_or_path openai/whisper-large-v2 \
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
  --train_batch_size 160 \
  --eval_batch_size 160 \
  --gradient_accumulation_steps 1 \
  --fsdp_size -1 \
  --scan_layers \
  --remat full \
  --dtype bfloat16 \
  --learning_rate 8e-6 \
  --lr_scaling none \
  --lr_scheduler_type linear \
  --warmup_steps 5000 \
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
  --run_name "$RUN_NAME" \
  --output_dir "$OUTPUT_ROOT/$RUN_NAME" \
  --push_to_hub \
  --hub_model_id "NbAiLab/$RUN_NAME" \
  --hub_private_repo \
  "$@"
