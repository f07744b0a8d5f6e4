#!/usr/bin/env bash
# NB's distillation of nb-whisper-large (NbAiLab/nb-whisper-large-distil-turbo-beta, November 2024,
# trained with distil-whisper's PyTorch run_distillation.py) with distil_scream.py: a 756M-parameter
# student, nb-whisper-large's encoder (frozen) and its first and last decoder layers.
#   data:        NbAiLab/annotated_distil_raw_ncc_speech_v7_large, already pseudo-labelled by the
#                teacher: the labels are the teacher's transcripts (column whisper_transcript,
#                distil-whisper's name; change --pseudo_label_column_name if the dataset's differs),
#                rows whose WER against the original text is above 20 are skipped (NB's value; the
#                distil-whisper paper's is 10). Make such a dataset with --do_pseudo_label.
#   loss:        0.8 x cross-entropy + 1.0 x KL(teacher || student) at temperature 2, times 4; the
#                teacher's logits come from the same step (its decoder only: the encoder is shared)
#   mix:         timestamps with probability 0.2, previous-text prompts with probability 0.2 (NB's)
#   slice:       TPU v4-32 (16 chips, 4 hosts); run this same script on every host
#   batch:       32 per chip (NB's per-device batch) = 512 global on 16 chips; parameters, optimizer
#                state and the teacher's bfloat16 decoder sharded over all chips (FSDP), layers
#                scanned, none rematerialised: the compiled step takes 16.7 GiB per chip of the 30.75
#                a v4 chip has (--remat full: 8.3 GiB; compile-only, --dry_run --dry_run_topology v4-32)
#   schedule:    AdamW 3e-4 constant after 500 warmup steps (NB's warmup is not recorded: 500 is the
#                paper's), 50k steps, gradient clipping 1.0, bfloat16 compute. The paper's own run:
#                TPU v4-8, batch 256, 80k steps, LR 1e-4 with linear decay, grad clip 1.0.
#   cost:        25.6 M examples (50k x 512); throughput not measured yet
#   result:      hub repo NbAiLab/scream_nb_distil (private)
# Launch on a pod:  gcloud compute tpus tpu-vm ssh NAME --worker=all --command "cd scream && bash run_nb_distil.sh"
# Dry run (plan and memory per chip of the distillation step, student + teacher, no data, no TPU):
#   bash run_nb_distil.sh --dry_run --dry_run_topology v4-32
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON=${PYTHON:-python}

# A copy of this script gets its own output directory and hub repo, named after the copy.
SCRIPT_NAME=$(basename "${BASH_SOURCE[0]}" .sh)
RUN_NAME=scream_nb_distil
[ "$SCRIPT_NAME" = run_nb_distil ] || RUN_NAME="scream_${SCRIPT_NAME#run_}"
OUTPUT_ROOT=${SCREAM_OUTPUT_ROOT:-runs}  # on a pod: a filesystem every host shares

"$PYTHON" distil_scream.py \
  --teacher_model_name_or_path NbAiLab/nb-whisper-large \
  --student_decoder_layers 2 \
  --freeze_encoder \
  --ce_weight 0.8 \
  --kl_weight 1.0 \
  --temperature 2 \
  --dataset_name NbAiLab/annotated_distil_raw_ncc_speech_v7_large \
  --streaming \
  --train_split_name train \
  --eval_split_name validation_norwegian_fleurs \
  --audio_column_name audio \
  --text_column_name text \
  --pseudo_label_column_name whisper_transcript \
  --wer_threshold 20 \
  --language no \
  --task transcribe \
  --language_column_name language \
  --timestamp_column_name timestamped_text \
  --timestamp_probability 0.2 \
  --prev_column_name previous_text \
  --prompt_probability 0.2 \
  --max_prev_length 120 \
  --max_label_length 328 \
  --max_duration_in_seconds 30 \
  --shuffle_buffer_size 500 \
  --per_device_train_batch_size 32 \
  --eval_batch_size 512 \
  --fsdp_size -1 \
  --scan_layers \
  --remat none \
  --dtype bfloat16 \
  --learning_rate 3e-4 \
  --lr_scaling none \
  --lr_scheduler_type constant \
  --warmup_steps 500 \
  --num_train_steps 50000 \
  --max_grad_norm 1.0 \
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
