#!/usr/bin/env bash
# Scream "septimus" experiment 2: whisper-tiny fine-tuned on all_v5 (NRK subtitles + NPSC+ v1 + NST).
# Compare with run_tiny_nrk.sh (same everything, NRK data only).
#   slice:       TPU v4-32 (16 chips, 4 hosts); run this same script on every host
#   batch:       512 global = 32 per chip, pure data parallel (tiny fits easily, see README)
#   schedule:    AdamW 2e-5, 10k warmup, linear decay to 0 at 250k steps, eval every 5k
#   throughput:  input needs ~3,000 examples/s per host at good utilisation (README, performance)
#   result:      hub repo NbAiLab/scream_tiny_sept_all (private), WER/CER on the validation split
# Launch on a pod:  gcloud compute tpus tpu-vm ssh NAME --worker=all --command "cd scream && bash run_tiny_all.sh"
# Dry run (plan and memory, no data):  bash run_tiny_all.sh --dry_run --dry_run_topology v4-32
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON=${PYTHON:-python}

# A copy of this script gets its own output directory and hub repo, named after the copy.
SCRIPT_NAME=$(basename "${BASH_SOURCE[0]}" .sh)
RUN_NAME=scream_tiny_sept_all
[ "$SCRIPT_NAME" = run_tiny_all ] || RUN_NAME="scream_${SCRIPT_NAME#run_}"
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
  --train_batch_size 512 \
  --eval_batch_size 512 \
  --gradient_accumulation_steps 1 \
  --fsdp_size 1 \
  --dtype bfloat16 \
  --learning_rate 2e-5 \
  --lr_scaling none \
  --lr_scheduler_type linear \
  --warmup_steps 10000 \
  --num_train_steps 250000 \
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
  --eval_steps 5000 \
  --save_steps 5000 \
  --logging_steps 100 \
  --run_name "$RUN_NAME" \
  --output_dir "$OUTPUT_ROOT/$RUN_NAME" \
  --push_to_hub \
  --hub_model_id "NbAiLab/$RUN_NAME" \
  --hub_private_repo \
  "$@"
