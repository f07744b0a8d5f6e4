#!/usr/bin/env bash
# The 2024 NB-Whisper release recipe (NbAiLab/nb-whisper, release_candidate/run_large_v3_RC4.sh):
# whisper-large-v3 (128 mel bins) on ncc_speech_v7 with per-row language (no / nn / en),
# timestamp training, previous-text prompts, BPE dropout 0.2 and bfloat16 parameters.
#   slice:       TPU v4-64 (32 chips, 8 hosts); run this same script on every host
#   batch:       256 global = 8 per chip (the release's per-device batch; its pod size is not
#                recorded); parameters and optimizer state sharded over all 32 chips (FSDP),
#                layers scanned and fully rematerialised, as run_large_*.sh
#   state:       bfloat16 parameters, so bfloat16 gradients and second moments, and a bfloat16
#                first moment, as the release's optax state had (mu followed the parameters):
#                about 4 x 3.1 GB for 1.55 B parameters, over 32 chips (float32 would be 4 x 6.2 GB)
#   sequence:    448 decoder positions = 120 for <|startofprev|> + previous text, 328 for the labels
#                (the release padded labels to 448 with at most 120 previous-text tokens)
#   mix:         a row with timestamps trains on them with probability 0.5, a row with previous
#                text gets it as a prompt with probability 0.5 (the release's loader expanded each
#                row into these variants); the English-text variants (text_en as <|en|>) are not
#                reproduced: one text column per run
#   schedule:    AdamW 7e-5 (b2 0.98, eps 1e-6, wd 0.01), 10k warmup, linear decay to 0 at 200k
#                steps, eval every 5k on the 7 validation splits joined (WER per language too)
#   cost:        51.2 M examples (200k x 256); throughput not measured yet (bench_scream.py tpu
#                gives the compile-only memory; see README, TPU tables)
#   result:      hub repo NbAiLab/scream_nb_large_v3 (private)
# Launch on a pod:  gcloud compute tpus tpu-vm ssh NAME --worker=all --command "cd scream && bash run_nb_large_v3.sh"
# Dry run (plan and memory, no data):  bash run_nb_large_v3.sh --dry_run --dry_run_topology v4-64
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON=${PYTHON:-python}

# A copy of this script gets its own output directory and hub repo, named after the copy.
SCRIPT_NAME=$(basename "${BASH_SOURCE[0]}" .sh)
RUN_NAME=scream_nb_large_v3
[ "$SCRIPT_NAME" = run_nb_large_v3 ] || RUN_NAME="scream_${SCRIPT_NAME#run_}"
OUTPUT_ROOT=${SCREAM_OUTPUT_ROOT:-runs}  # on a pod: a filesystem every host shares
EVAL_SPLITS=validation_audio_books_no+validation_norwegian_fleurs+validation_nrk_no+validation_nst
EVAL_SPLITS=$EVAL_SPLITS+validation_stortinget_no+validation_clean_audio_books_no+validation_clean_stortinget_no

"$PYTHON" run_scream.py \
  --model_name_or_path openai/whisper-large-v3 \
  --dataset_name NbAiLab/ncc_speech_v7 \
  --streaming \
  --train_split_name train \
  --eval_split_name "$EVAL_SPLITS" \
  --audio_column_name audio \
  --text_column_name text \
  --language no \
  --task transcribe \
  --language_column_name language \
  --timestamp_column_name timestamped_text \
  --timestamp_probability 0.5 \
  --prev_column_name previous_text \
  --prompt_probability 0.5 \
  --max_prev_length 120 \
  --max_label_length 328 \
  --bpe_dropout 0.2 \
  --max_duration_in_seconds 30 \
  --shuffle_buffer_size 500 \
  --train_batch_size 256 \
  --eval_batch_size 256 \
  --gradient_accumulation_steps 1 \
  --fsdp_size -1 \
  --scan_layers \
  --remat full \
  --dtype bfloat16 \
  --param_dtype bfloat16 \
  --adam_mu_dtype bfloat16 \
  --activation_dropout 0.1 \
  --learning_rate 7e-5 \
  --lr_scaling none \
  --lr_scheduler_type linear \
  --warmup_steps 10000 \
  --num_train_steps 200000 \
  --adam_beta1 0.9 \
  --adam_beta2 0.98 \
  --adam_epsilon 1e-6 \
  --weight_decay 0.01 \
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
