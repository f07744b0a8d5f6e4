#!/usr/bin/env python
"""Scream: fine-tune Whisper on TPU pods (or one CPU) with JAX.

One script, read top to bottom:
  arguments -> data -> model -> sharding -> steps -> evaluation -> checkpoints and export -> main.

The same command runs unchanged on every host of a pod. Each host streams its own share of the
data, decodes audio on its CPU cores and ships raw waveforms; log-mel features, the model, the
loss and greedy decoding all run inside jitted, sharded functions on the devices. The Whisper
model is our own Flax port and matches transformers' PyTorch `WhisperForConditionalGeneration`
to float32 rounding; the trained model is exported in transformers' format.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import copy
import dataclasses
import difflib
import functools
import hashlib
import io
import json
import math
import os
import queue
import re
import shutil
import signal
import string
import struct as pystruct  # flax.struct is `struct` here
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import datasets.distributed  # not imported by `import datasets`
import flax.linen as nn
import huggingface_hub
import jax
import jax.numpy as jnp
import jiwer
import numpy as np
import optax
import orbax.checkpoint as ocp
import soundfile
import soxr
from flax import struct, traverse_util
from flax.serialization import msgpack_restore
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import httpx  # the HTTP client huggingface_hub (and datasets) use
from jax.experimental import multihost_utils
from jax.experimental import topologies as jax_topologies
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN
from safetensors import safe_open
from safetensors.numpy import save_file
from tensorboardX import SummaryWriter
from tqdm import tqdm
from transformers import GenerationConfig, HfArgumentParser, WhisperConfig, WhisperFeatureExtractor, WhisperTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.whisper.english_normalizer import BasicTextNormalizer
from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

# Optional dependencies stay imported where they are used: torch and ctranslate2 (only for
# --export_ctranslate2 and pytorch_model.bin checkpoints) and wandb (only with --report_to wandb).

# --- arguments ---


class ConfigError(ValueError):
    """A misconfiguration: main() prints it as one paragraph and exits with status 2."""


class TrainingStopped(RuntimeError):
    """A run that must stop (non-finite loss, unreadable data): main() prints it and exits with status 1."""


def warn(message: str):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def option(default, help: str):  # a field HfArgumentParser turns into --<name> with this help
    return field(default=default, metadata={"help": help})


def check_choice(flag: str, value, choices: tuple[str, ...]):
    if value not in choices:
        raise ConfigError(f"{flag} {value!r} is not supported: use {', '.join(choices[:-1])} or {choices[-1]}.")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = option(None, "Hub id or local directory of a Whisper checkpoint to fine-tune.")
    config_name: str | None = option(None, "Config (hub id or directory) to train from scratch; random init, seeded.")
    tokenizer_name: str | None = option(None, "Tokenizer, if not the model's.")
    feature_extractor_name: str | None = option(None, "Feature extractor, if not the model's.")
    cache_dir: str | None = option(None, "Hugging Face cache directory.")
    dtype: str = option("float32", "Compute dtype: float32 or bfloat16 (weights: --param_dtype).")
    scan_layers: bool = option(False, "nn.scan over layers: much faster compiles for deep models.")
    remat: str = option("none", "Rematerialise layers: none, full, or dots (save matmul outputs).")
    dropout: float | None = option(None, "Override the config's dropout.")
    attention_dropout: float | None = option(None, "Override the config's attention_dropout.")
    activation_dropout: float | None = option(None, "Override the config's activation_dropout (after the FFN's GELU).")
    param_dtype: str = option(
        "float32",
        "Dtype of weights, grads and Adam's 2nd moment: float32 or bfloat16; losses, logits, export: float32.",
    )

    def __post_init__(self):
        check_choice("--dtype", self.dtype, ("float32", "bfloat16"))
        check_choice("--param_dtype", self.param_dtype, ("float32", "bfloat16"))
        check_choice("--remat", self.remat, ("none", "full", "dots"))


@dataclass
class DataArguments:
    dataset_name: str | None = option(None, "Required. Hub id(s) or local path(s); comma-separated ones are mixed.")
    dataset_config_name: str | None = option(None, "Dataset config name(s), comma-separated.")
    dataset_probabilities: str | None = option(None, "Sampling probabilities when mixing datasets, e.g. 0.7,0.3.")
    train_split_name: str = option("train", "Training split; 'a+b' joins splits.")
    eval_split_name: str = option(
        "validation",
        "Evaluation split(s): 'a+b' joins splits into one set; 'a,b' makes several sets, logged as eval/<set>/... "
        "(<set>: the split, or <dataset>/<split> if their datasets differ) and averaged as eval/loss, eval/wer, ...",
    )
    eval_dataset_name: str | None = option(
        None,
        "Dataset of the evaluation sets: one for all, or one per split, comma-separated (default: --dataset_name).",
    )
    test_split_name: str | None = option(None, "Test split(s) for --do_predict, as --eval_split_name (logs test/...).")
    test_dataset_name: str | None = option(None, "Dataset of the test sets, as --eval_dataset_name.")
    streaming: bool = option(False, "Stream the dataset instead of downloading it first.")
    audio_column_name: str = option("audio", "Column holding the audio.")
    text_column_name: str = option("text", "Column holding the transcript.")
    id_column_name: str = option("id", "Column with example ids, logged with predictions if present.")
    max_train_samples: int | None = option(None, "Truncate the training set (per epoch).")
    max_eval_samples: int | None = option(None, "Truncate the evaluation set.")
    language: str = option("no", "Language code or name, e.g. no or norwegian.")
    task: str = option("transcribe", "transcribe or translate.")
    do_lower_case: bool = option(False, "Lower-case transcripts before tokenizing.")
    do_remove_punctuation: bool = option(False, "Strip punctuation from transcripts.")
    min_duration_in_seconds: float = option(0.0, "Drop clips shorter than this.")
    max_duration_in_seconds: float = option(30.0, "Drop clips longer than this.")
    max_label_length: int = option(128, "Label tokens per example; longer labels are dropped.")
    shuffle_buffer_size: int = option(500, "Examples in the shuffle buffer (0: no shuffling).")
    preprocessing_num_workers: int = option(4, "Threads decoding audio on each host.")
    prefetch_batches: int = option(4, "Batches prepared ahead of the device.")
    read_retries: int = option(
        10,
        "Failed reads in a row before the run gives up, each retry resuming after the last row (beyond hub retries).",
    )
    read_retry_wait_s: float = option(1.0, "Wait before the first retry; doubles per failure in a row, up to 60 s.")
    language_column_name: str | None = option(
        None, "Column with each row's language (no, nn, en, or a name; else --language), also for decoding it in eval."
    )
    task_column_name: str | None = option(None, "Column with each row's task (transcribe or translate); else --task.")
    source_column_name: str | None = option(
        None,
        "Eval column with each row's source (nrk, ...): eval/<set>/source/<source>/wer... (default: 'source', if any).",
    )
    timestamp_column_name: str | None = option(
        None, "Training column of timestamped transcripts ('<|0.00|> Hei.<|1.52|>'), trained without <|notimestamps|>."
    )
    timestamp_probability: float = option(
        1.0, "Chance a row with timestamps trains on them (else on its text), drawn per (seed, epoch, id): repeatable."
    )
    prev_column_name: str | None = option(None, "Training column with the previous text, a <|startofprev|> prompt.")
    prompt_probability: float = option(1.0, "Chance a row with previous text gets it as a prompt (seeded, repeatable).")
    max_prev_length: int = option(
        120, "Positions of <|startofprev|> + previous text (cut from the left), in every row with --prev_column_name."
    )
    bpe_dropout: float = option(0.0, "BPE dropout of the training labels (the release used 0.2), never in eval.")

    def __post_init__(self):
        check_choice("--task", self.task, ("transcribe", "translate"))
        if self.max_label_length < 1:
            raise ConfigError("--max_label_length must be at least 1.")
        for flag in ("timestamp_probability", "prompt_probability"):
            if not 0.0 <= getattr(self, flag) <= 1.0:
                raise ConfigError(f"--{flag} {getattr(self, flag)} is not a probability: give a value from 0 to 1.")
        if not 0.0 <= self.bpe_dropout < 1.0:
            raise ConfigError(f"--bpe_dropout {self.bpe_dropout} must be at least 0 and below 1 (0: off).")
        if self.prev_column_name and self.max_prev_length < 2:
            raise ConfigError(
                f"--max_prev_length {self.max_prev_length} leaves no room for previous text: it counts "
                "<|startofprev|> too, so give at least 2 (the 2024 release used 120)."
            )


DEFAULT_SAVE_STEPS = 1000  # without an eval cadence: at most this many steps lost to a crash


@dataclass
class TrainingArguments:
    output_dir: str | None = option(None, "Required. Where checkpoints, logs and the model go.")
    overwrite_output_dir: bool = option(False, "Allow a non-empty output dir without checkpoints.")
    do_train: bool = option(False, "Train.")
    do_eval: bool = option(False, "Evaluate every --eval_steps and at the end.")
    do_predict: bool = option(
        False,
        "After training (or alone, on --model_name_or_path), evaluate the kept model on --test_split_name: "
        "test/... metrics, predictions/test/<set>/, and the model card's model-index.",
    )
    train_batch_size: int | None = option(None, "Global training batch, over all hosts.")
    per_device_train_batch_size: int | None = option(None, "Hugging Face spelling: global batch = this x devices.")
    eval_batch_size: int | None = option(None, "Global evaluation batch (default: training batch).")
    gradient_accumulation_steps: int = option(1, "Micro-batches per step, inside the step.")
    learning_rate: float = option(3e-5, "Peak learning rate at --lr_reference_batch_size.")
    lr_scaling: str = option("none", "Scale the LR with the batch: none, linear or sqrt.")
    lr_reference_batch_size: int | None = option(None, "Global batch --learning_rate is for (with --lr_scaling).")
    lr_scheduler_type: str = option(
        "linear", "After the warmup: linear (to 0 at --num_train_steps), constant or constant_with_warmup (= constant)."
    )
    warmup_steps: int = option(0, "Linear warmup from 0 over this many steps (any schedule).")
    num_train_steps: int = option(1000, "Optimizer steps in the whole run.")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    adam_epsilon: float = option(1e-8, "AdamW epsilon.")
    adam_mu_dtype: str = option(
        "float32", "Dtype of AdamW's first moment: float32 or bfloat16 (the second is --param_dtype's, as optax does)."
    )
    weight_decay: float = option(0.0, "AdamW decoupled weight decay (not on biases or LayerNorm).")
    max_grad_norm: float = option(1.0, "Clip gradients to this global norm (0: no clipping).")
    label_smoothing_factor: float = option(0.0, "Label smoothing.")
    seed: int = option(0, "Seed for init, dropout and shuffling.")
    logging_steps: int = option(10, "Write train metrics every this many steps.")
    eval_steps: int | None = option(None, "Evaluate every this many steps (default: at the end).")
    save_steps: int | None = option(
        None,
        f"Checkpoint every this many steps (default: every --eval_steps with --do_eval and --eval_steps, "
        f"else every {DEFAULT_SAVE_STEPS}); also at the last step and on SIGTERM.",
    )
    save_total_limit: int | None = option(2, "Checkpoints kept.")
    resume_from_checkpoint: bool = option(True, "Resume from the latest checkpoint in output_dir.")
    predict_with_generate: bool = option(False, "Decode in eval (greedy, or with beams) and compute WER/CER.")
    generation_max_length: int | None = option(None, "New tokens per decode (default: max_label_length).")
    generation_num_beams: int = option(1, "Beams per example in eval decoding (1: greedy), as transformers' num_beams.")
    generation_length_penalty: float = option(1.0, "With beams: a hypothesis scores sum_logprobs / new_tokens**this.")
    metric_for_best_model: str | None = option(
        None,
        "Eval metric that picks the kept model: eval/wer_normalized (the mean over sets; default with "
        "--predict_with_generate, else eval/loss), eval/<set>/wer, ... The export, model card and hub push "
        "are of the best evaluation so far, whose checkpoint --save_total_limit never deletes.",
    )
    greater_is_better: bool | None = option(
        None, "Whether a higher --metric_for_best_model is better (default: no for wer, cer and loss)."
    )
    log_max_eval_predictions: int | None = option(None, "Predictions written per eval (default: all).")
    report_to: str = option("tensorboard", "tensorboard, wandb, 'tensorboard,wandb' or none.")
    wandb_project: str | None = option(None, "Weights & Biases project (with wandb).")
    wandb_entity: str | None = option(None, "Weights & Biases entity (with wandb).")
    run_name: str | None = option(None, "Run name for logs (default: output_dir's name).")
    run_description: str | None = option(None, "Free text stored with the run in Weights & Biases (with wandb).")
    push_to_hub: bool = option(False, "Push the exported model after each eval and at the end.")
    hub_model_id: str | None = option(None, "Hub repository to push to.")
    hub_private_repo: bool = option(True, "Create the hub repository private.")
    export_ctranslate2: str | None = option(
        None, "Also write OUTPUT_DIR/ctranslate2/ for faster-whisper: float16, int8, ... (needs ctranslate2, torch)."
    )
    export_ggml: str | None = option(None, "Also write OUTPUT_DIR/ggml-model.bin for whisper.cpp: f16 or q8_0 (8-bit).")
    dry_run: bool = option(False, "Print the plan and the compiled step's memory, then exit.")
    dry_run_topology: str | None = option(None, "With --dry_run: compile for a TPU slice (v4-32, ...) on any machine.")
    dry_run_compile: bool = option(True, "With --dry_run: compile the train step to report its memory per device.")

    def __post_init__(self):
        check_choice("--adam_mu_dtype", self.adam_mu_dtype, ("float32", "bfloat16"))
        check_choice("--lr_scheduler_type", self.lr_scheduler_type, ("linear", "constant", "constant_with_warmup"))
        check_choice("--lr_scaling", self.lr_scaling, ("none", "linear", "sqrt"))
        if self.lr_scaling != "none" and not self.lr_reference_batch_size:
            raise ConfigError(
                "--lr_scaling needs --lr_reference_batch_size: the global batch that --learning_rate is for."
            )
        if self.warmup_steps > self.num_train_steps:
            raise ConfigError(f"--warmup_steps {self.warmup_steps} exceeds --num_train_steps {self.num_train_steps}.")
        if self.gradient_accumulation_steps < 1:
            raise ConfigError("--gradient_accumulation_steps must be at least 1.")
        for flag in ("logging_steps", "eval_steps", "save_steps"):
            value = getattr(self, flag)
            if value is not None and value < 1:
                raise ConfigError(f"--{flag} {value} is not a cadence: give a number of steps of at least 1.")
        if self.save_steps is None:
            self.save_steps = self.eval_steps if (self.do_eval and self.eval_steps) else DEFAULT_SAVE_STEPS
        if self.generation_num_beams < 1:
            raise ConfigError(
                f"--generation_num_beams {self.generation_num_beams} must be at least 1 (1 decodes greedily)."
            )
        if self.eval_steps is None:
            self.eval_steps = self.num_train_steps
        if self.metric_for_best_model is None:
            self.metric_for_best_model = "eval/wer_normalized" if self.predict_with_generate else "eval/loss"
        if self.greater_is_better is None:
            self.greater_is_better = not any(w in self.metric_for_best_model for w in ("wer", "cer", "loss"))
        if not self.dry_run:
            if self.dry_run_topology is not None:
                raise ConfigError(
                    f"--dry_run_topology {self.dry_run_topology} only plans a run: add --dry_run, or drop the flag."
                )
            if not self.dry_run_compile:
                raise ConfigError("--no_dry_run_compile only applies to a plan: add --dry_run, or drop the flag.")
        if "wandb" not in [target.strip() for target in self.report_to.split(",")]:
            for flag in ("wandb_project", "wandb_entity", "run_description"):
                if getattr(self, flag) is not None:
                    raise ConfigError(
                        f"--{flag} is only stored by Weights & Biases, but --report_to {self.report_to!r} does not "
                        "include wandb: add wandb to --report_to (e.g. --report_to tensorboard,wandb), or drop the flag."
                    )
        if self.run_name is None and self.output_dir is not None:
            self.run_name = Path(self.output_dir).name
        if self.export_ggml is not None and self.export_ggml not in GGML_TYPES:
            raise ConfigError(
                f"--export_ggml {self.export_ggml!r} is not a type we write: use one of {', '.join(GGML_TYPES)}."
            )
        if self.export_ctranslate2 is not None:  # checked now, not after a week of training
            try:
                import ctranslate2.specs.model_spec
                import torch  # noqa: F401  (ctranslate2's converter reads the exported model with it)
            except ImportError as error:
                raise ConfigError(
                    f"--export_ctranslate2 needs ctranslate2 and torch, which are not installed ({error}): "
                    "pip install ctranslate2 torch (the CPU build of torch is enough), or drop the flag."
                ) from None
            accepted = ctranslate2.specs.model_spec.ACCEPTED_MODEL_TYPES
            if self.export_ctranslate2 not in accepted:
                raise ConfigError(
                    f"--export_ctranslate2 {self.export_ctranslate2!r} is not a CTranslate2 quantization: use one "
                    f"of {', '.join(accepted)}."
                )


@dataclass
class DistributedArguments:
    coordinator_address: str | None = option(None, "host:port of process 0, off TPU pods (which find it themselves).")
    num_processes: int | None = option(None, "Number of processes, with --coordinator_address.")
    process_id: int | None = option(None, "This process's index, with --coordinator_address.")
    fsdp_size: int = option(1, "Devices sharding params and optimizer state (1: pure data parallel; -1: all).")
    distributed_timeout_s: int = option(300, "Give up when a peer process stops answering.")


ARGUMENT_GROUPS = (ModelArguments, DataArguments, TrainingArguments, DistributedArguments)


def parse_arguments(argv: list[str] | None = None, groups: tuple = ARGUMENT_GROUPS):
    """Flags to the argument groups. Unknown flags are an argparse error (exit status 2)."""
    parser = HfArgumentParser(groups, allow_abbrev=False)  # a typo must not silently match a flag
    *groups, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        known = [option for action in parser._actions for option in action.option_strings]
        hints = [
            f"{flag} -> {close[0]}"
            for flag in unknown
            if flag.startswith("--")
            for close in [difflib.get_close_matches(flag.split("=")[0], known, n=1)]
            if close
        ]
        raise ConfigError(
            f"Unrecognised arguments: {' '.join(unknown)}. "
            + (f"Did you mean: {', '.join(hints)}? " if hints else "")
            + "Every flag starts with -- and takes its value after a space; run with --help for the list."
        )
    for flag, value in (("--dataset_name", groups[1].dataset_name), ("--output_dir", groups[2].output_dir)):
        if not value:
            raise ConfigError(
                f"{flag} is required: the dataset(s) to read and the directory for checkpoints, logs and the model "
                "have no defaults, so that a script never trains on, or writes over, the demo's "
                "(run_demo.sh passes --dataset_name demo_data/data --output_dir demo_output)."
            )
    return groups


def effective_learning_rate(args: TrainingArguments, global_batch_size: int) -> float:
    """--learning_rate scaled from --lr_reference_batch_size to the actual global batch."""
    if args.lr_scaling == "none":
        return args.learning_rate
    ratio = global_batch_size / args.lr_reference_batch_size
    return args.learning_rate * (ratio if args.lr_scaling == "linear" else math.sqrt(ratio))


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch splits over hosts, devices and micro-batches."""

    global_batch_size: int
    per_host_batch_size: int
    per_device_batch_size: int
    micro_batch_size: int  # global examples in one accumulation micro-batch
    eval_batch_size: int
    per_host_eval_batch_size: int


def plan_batches(args: TrainingArguments, num_devices: int, num_processes: int) -> BatchPlan:
    """Derive and check the batch split; errors say which numbers to change."""
    if args.train_batch_size is None and args.per_device_train_batch_size is None:
        if args.do_train or args.eval_batch_size is None:
            raise ConfigError("Set the global batch with --train_batch_size (or --per_device_train_batch_size).")
        global_batch = args.eval_batch_size  # evaluation only: the training batch is never used
    else:
        global_batch = args.train_batch_size or args.per_device_train_batch_size * num_devices
    if args.train_batch_size and args.per_device_train_batch_size:
        if args.per_device_train_batch_size * num_devices != args.train_batch_size:
            raise ConfigError(
                f"--train_batch_size {args.train_batch_size} != --per_device_train_batch_size "
                f"{args.per_device_train_batch_size} x {num_devices} devices: set only one of them."
            )
    accumulation = args.gradient_accumulation_steps
    if global_batch % (num_devices * accumulation):
        raise ConfigError(
            f"--train_batch_size {global_batch} must be divisible by {num_devices} devices x "
            f"--gradient_accumulation_steps {accumulation} = {num_devices * accumulation}: "
            f"use a multiple of {num_devices * accumulation} (e.g. {max(1, global_batch // (num_devices * accumulation)) * num_devices * accumulation})."
        )
    eval_batch = args.eval_batch_size or global_batch
    if eval_batch % num_devices:
        raise ConfigError(
            f"--eval_batch_size {eval_batch} must be divisible by the {num_devices} devices: use a multiple of {num_devices}."
        )
    return BatchPlan(
        global_batch_size=global_batch,
        per_host_batch_size=global_batch // num_processes,
        per_device_batch_size=global_batch // num_devices,
        micro_batch_size=global_batch // accumulation,
        eval_batch_size=eval_batch,
        per_host_eval_batch_size=eval_batch // num_processes,
    )


# --- data ---
# Hosts do only what needs a CPU: read rows, decode audio, resample, tokenize, pad to fixed
# shapes. Log-mel features are computed on the device inside the jitted steps (see log_mel).

# Why prepare_example skips a row, and the flag to look at when every example is skipped for it
# (distil_scream.py adds its WER filter's).
SKIP_REASON_FLAGS = {
    **dict.fromkeys(("undecodable", "empty_audio", "non_finite_audio"), "--audio_column_name"),
    "too_short": "--min_duration_in_seconds",
    "too_long": "--max_duration_in_seconds",
    "empty_text": "--text_column_name",
    "too_many_tokens": "--max_label_length",
    "unknown_language": "--language_column_name",
    "unknown_task": "--task_column_name",
    "bad_timestamps": "--timestamp_column_name",
}
# SpeechBatches adds each row's epoch under this key, so that the per-example random choices
# (timestamp mode, prompt) are drawn from (seed, epoch, example) and replay exactly on resume.
EPOCH_FIELD = "__scream_epoch__"
# A Whisper timestamp token as written in a transcript; the value is checked by parse_timestamped_text.
TIMESTAMP_TOKEN = re.compile(r"<\|([0-9.]+)\|>")
TIMESTAMP_STEP_S = 0.02  # Whisper's timestamp grid
MAX_TIMESTAMP_S = 30.0  # the last timestamp token, <|30.00|>


@dataclass(frozen=True)
class Columns:
    """The dataset columns a stream reads, resolved once from the flags; None: not read."""

    audio: str = "audio"
    text: str = "text"
    id: str = "id"  # optional in a dataset: without it, the transcript stands in for the example
    source: str | None = None  # evaluation's per-source WER; the default "source" only where a set has it
    language: str | None = None
    task: str | None = None
    timestamps: str | None = None  # training only
    previous_text: str | None = None  # training only


DEFAULT_SOURCE_COLUMN = "source"


def columns_of(data_args: DataArguments, *, train: bool) -> Columns:
    """The training stream's columns, or evaluation's: no timestamps or prompts, and the source for per-source WER."""
    prompts = train and data_args.prompt_probability > 0
    return Columns(
        audio=data_args.audio_column_name,
        text=data_args.text_column_name,
        id=data_args.id_column_name,
        source=None if train else data_args.source_column_name or DEFAULT_SOURCE_COLUMN,
        language=data_args.language_column_name,
        task=data_args.task_column_name,
        timestamps=data_args.timestamp_column_name if train else None,
        previous_text=data_args.prev_column_name if prompts else None,
    )


@dataclass(frozen=True)
class TextSettings:
    """What turns a transcript into decoder tokens (the layout is prepare_example's)."""

    do_lower_case: bool
    do_remove_punctuation: bool
    max_label_length: int  # decoder positions from <|startoftranscript|> to the last text token
    language: str | None = "no"  # a Whisper code; None: an English-only model (no language token)
    task: str | None = "transcribe"  # None: an English-only model (no task token)
    timestamp_probability: float = 1.0
    prompt_probability: float = 1.0
    max_prev_length: int = 0  # decoder positions of <|startofprev|> + previous text; 0: no prompts
    seed: int = 0
    # Evaluation: a transcript longer than max_label_length is still decoded and scored in full;
    # its loss is over the tokens that fit. Training skips it (a cut label would teach a cut text).
    cut_long_labels: bool = False

    @property
    def decoder_length(self) -> int:
        """Decoder positions of every row, prompt or not: fixed, so no batch recompiles a step."""
        return self.max_prev_length + self.max_label_length


@dataclass(frozen=True)
class AudioSettings:
    sampling_rate: int
    n_samples: int  # fixed waveform length of a batch row: the feature extractor's chunk
    min_duration_s: float
    max_duration_s: float


def decode_audio(audio: dict, sampling_rate: int) -> np.ndarray:
    """Bytes or a path (as `Audio(decode=False)` yields them) -> mono float32 at `sampling_rate`."""
    source = io.BytesIO(audio["bytes"]) if audio.get("bytes") else audio.get("path")
    if source is None:
        raise ValueError("audio has neither bytes nor path")
    samples, rate = soundfile.read(source, dtype="float32", always_2d=True)
    samples = samples.mean(axis=1)  # downmix to mono
    if rate != sampling_rate and len(samples):
        samples = soxr.resample(samples, rate, sampling_rate).astype(np.float32)
    return samples


def normalise_transcript(text: str, settings: TextSettings) -> str:
    if settings.do_lower_case:
        text = text.lower()
    if settings.do_remove_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
        text = " ".join(text.split())
    return text.strip()


ENGLISH_ONLY_VOCAB_SIZE = 51864  # the .en checkpoints' vocabulary: GPT-2's, one token short of the multilingual 51865


def is_english_only(config, generation_config=None) -> bool:
    """A .en Whisper: its generation config says so, or without one it has the .en vocabulary size."""
    multilingual = getattr(generation_config, "is_multilingual", None)
    return not multilingual if multilingual is not None else config.vocab_size == ENGLISH_ONLY_VOCAB_SIZE


def prompt_language_and_task(tokenizer, language: str, task: str, *, english_only: bool):
    """(language, task) as the decoder prompt holds them: (None, None) for an English-only model, which has neither."""
    if not english_only:
        return language, task
    if language != "en" or task != "transcribe":
        flag = f"--language {language!r}" if language != "en" else f"--task {task!r}"
        raise ConfigError(
            f"{flag} needs a multilingual model, but {tokenizer.name_or_path or 'the model'} is English-only "
            "(a .en Whisper, whose prompt has no language or task token): pass --language en --task transcribe, "
            "or fine-tune a multilingual checkpoint."
        )
    return None, None


def text_settings_of(data_args: DataArguments, *, train: bool, language: str | None, task: str | None, seed: int):
    """TextSettings of the training or the evaluation stream (see columns_of)."""
    prompts = columns_of(data_args, train=train).previous_text is not None
    return TextSettings(
        do_lower_case=data_args.do_lower_case,
        do_remove_punctuation=data_args.do_remove_punctuation,
        max_label_length=data_args.max_label_length,
        language=language,
        task=task,
        timestamp_probability=data_args.timestamp_probability,
        prompt_probability=data_args.prompt_probability,
        max_prev_length=data_args.max_prev_length if prompts else 0,
        seed=seed,
        cut_long_labels=not train,
    )


def training_tokenizer(tokenizer, bpe_dropout: float):
    """A copy of `tokenizer` with tokenizers' own BPE dropout, for the training labels only (special
    tokens are never merged). Its RNG is unseeded: a resumed run drops merges as often, not the same ones."""
    if not bpe_dropout:
        return tokenizer
    dropped = copy.deepcopy(tokenizer)
    model = dropped.backend_tokenizer.model
    if not hasattr(model, "dropout"):
        raise ConfigError(
            f"--bpe_dropout needs a BPE tokenizer; this one's model is {type(model).__name__}. Use --bpe_dropout 0."
        )
    model.dropout = bpe_dropout
    return dropped


def special_token_ids(tokenizer, tokens: list[str]) -> list[int]:
    """Ids of whole tokens such as <|no|> or <|1.52|>; a missing one is an error, not the unknown token."""
    ids = tokenizer.convert_tokens_to_ids(tokens)
    for token, token_id in zip(tokens, ids):
        if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != token:
            raise ConfigError(f"The tokenizer has no {token} token; check --language / --tokenizer_name.")
    return ids


def decoder_prefix(tokenizer, language: str | None, task: str | None, *, timestamps: bool) -> list[int]:
    """<|startoftranscript|> [<|lang|> <|task|>] [<|notimestamps|>]: the forced start of each row (never
    through the tokenizer's prefix state); English-only models (language, task None) have no lang or task."""
    tokens = ["<|startoftranscript|>"]
    tokens += [f"<|{language}|>"] if language is not None else []
    tokens += [f"<|{task}|>"] if task is not None else []
    tokens += [] if timestamps else ["<|notimestamps|>"]
    return special_token_ids(tokenizer, tokens)


def parse_timestamped_text(text: str, duration_s: float) -> list[tuple[float, str, float]] | None:
    """'<|0.00|> Hei.<|1.52|><|1.80|> Takk.<|2.60|>' -> [(0.0, ' Hei.', 1.52), (1.8, ' Takk.', 2.6)]; None if
    text lies outside a pair, or a value is unpaired, not two decimals, off the grid, past 30 s or the audio
    (one grid step of slack), or before its predecessor."""
    parts = TIMESTAMP_TOKEN.split(text)  # [outside, t0, inside, t1, outside, t2, inside, t3, outside]
    between = parts[0::2]
    if any(not re.fullmatch(r"\d+\.\d\d", v) for v in parts[1::2]):  # Whisper writes <|1.50|>, never <|1.5|>
        return None
    values = [float(v) for v in parts[1::2]]
    if not values or len(values) % 2 or any(s.strip() for s in between[0::2]):
        return None
    limit_s = min(MAX_TIMESTAMP_S, duration_s + TIMESTAMP_STEP_S)
    for value in values:
        steps = value / TIMESTAMP_STEP_S
        if abs(steps - round(steps)) > 1e-6 or value > limit_s + 1e-9:
            return None
    if any(b < a for a, b in zip(values, values[1:])) or any("<|" in s or "|>" in s for s in between):
        return None
    return [(values[i], between[i + 1], values[i + 1]) for i in range(0, len(values), 2)]


def timestamped_text_ids(tokenizer, segments: list[tuple[float, str, float]], settings: TextSettings) -> list[int]:
    """<|start|> text <|end|> per segment, timestamps as single ids (some tokenizers split <|1.52|> in text)."""
    ids = []
    for start_s, segment, end_s in segments:
        start, end = special_token_ids(tokenizer, [f"<|{start_s:.2f}|>", f"<|{end_s:.2f}|>"])
        if settings.do_lower_case or settings.do_remove_punctuation:  # keep the leading space: ' Hei' != 'Hei'
            text = normalise_transcript(segment, settings)
            segment = " " + text if segment.startswith(" ") and text else text
        ids += [start, *tokenizer(segment, add_special_tokens=False).input_ids, end]
    return ids


def previous_text_prompt(tokenizer, text: str, max_prev_length: int) -> list[int]:
    """<|startofprev|> and the previous text's last max_prev_length - 1 tokens (nearest the segment), with
    the leading space transformers' get_prompt_ids gives it."""
    ids = tokenizer(" " + text.strip(), add_special_tokens=False).input_ids
    return special_token_ids(tokenizer, ["<|startofprev|>"]) + ids[max(0, len(ids) - (max_prev_length - 1)) :]


def example_draw(seed: int, epoch: int, example_key: str, purpose: str) -> float:
    """Uniform in [0, 1), fixed by its arguments: a resumed run or another host draws the same, with no RNG state."""
    digest = hashlib.blake2b(f"{seed}\0{epoch}\0{purpose}\0{example_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def language_code(language: str) -> str:
    """'no', 'norwegian' or '<|no|>' -> 'no'; anything else is a clear error."""
    key = language.strip().lower().removeprefix("<|").removesuffix("|>")
    if key in LANGUAGES:
        return key
    if key in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[key]
    raise ConfigError(
        f"--language {language!r} is not a Whisper language; use a code like 'no' or a name like "
        f"'norwegian' (known codes: {', '.join(sorted(LANGUAGES))})."
    )


def resolve_language_and_task(
    row: dict, settings: TextSettings, columns: Columns
) -> tuple[str | None, str | None, str | None]:
    """(language, task, skip reason) of a row: its own columns' values, else the defaults."""
    language, task = settings.language, settings.task
    value = row.get(columns.language) if columns.language else None
    if value is not None and str(value).strip():
        try:
            code = language_code(str(value))
        except ConfigError:
            return None, None, "unknown_language"
        if settings.language is None and code != "en":  # an English-only model has no language tokens
            return None, None, "unknown_language"
        language = None if settings.language is None else code
    value = row.get(columns.task) if columns.task else None
    if value is not None and str(value).strip():
        value = str(value).strip().lower().removeprefix("<|").removesuffix("|>")
        if value not in ("transcribe", "translate") or (settings.task is None and value != "transcribe"):
            return None, None, "unknown_task"
        task = None if settings.task is None else value
    return language, task, None


def decode_row_audio(row: dict, column: str, settings: AudioSettings) -> tuple[np.ndarray | None, str | None]:
    """(mono float32 samples, None) or (None, skip reason): any undecodable file is a counted skip."""
    try:
        audio = decode_audio(row[column], settings.sampling_rate)
    except Exception:
        return None, "undecodable"
    duration_s = audio.size / settings.sampling_rate
    for reason, bad in (
        ("empty_audio", audio.size == 0),
        ("non_finite_audio", not np.isfinite(audio).all()),
        ("too_short", duration_s < settings.min_duration_s),
        ("too_long", duration_s > settings.max_duration_s),
    ):
        if bad:
            return None, reason
    return audio, None


def prepare_example(
    row: dict,
    *,
    tokenizer,
    audio_settings: AudioSettings,
    text_settings: TextSettings,
    columns: Columns = Columns(),
    label_tokenizer=None,
):
    """One dataset row -> (example dict, None) or (None, skip reason); never raises on bad data.
    `label_tokenizer` (training: training_tokenizer's) tokenizes the transcript and previous text;
    `decoding_prefix` is what evaluation decodes the row with (its language and task, no timestamps)."""
    settings, label_tokenizer = text_settings, label_tokenizer or tokenizer
    audio, reason = decode_row_audio(row, columns.audio, audio_settings)
    language, task, reason = (None, None, reason) if reason else resolve_language_and_task(row, settings, columns)
    if reason:
        return None, reason
    try:
        decoding_prefix = decoder_prefix(tokenizer, language, task, timestamps=False)
    except ConfigError:  # a language this tokenizer has no token for
        return None, "unknown_language"
    text = normalise_transcript(row.get(columns.text) or "", settings)
    example_id = row.get(columns.id)
    example_key = str(example_id) if example_id is not None else text  # what the seeded draws are of
    epoch = int(row.get(EPOCH_FIELD, 0))
    timestamped = row.get(columns.timestamps) if columns.timestamps else None
    use_timestamps = bool(timestamped) and (
        example_draw(settings.seed, epoch, example_key, "timestamps") < settings.timestamp_probability
    )
    if use_timestamps:
        segments = parse_timestamped_text(timestamped, audio.size / audio_settings.sampling_rate)
        try:
            text_ids = None if segments is None else timestamped_text_ids(label_tokenizer, segments, settings)
        except ConfigError:  # a timestamp token this tokenizer lacks
            text_ids = None
        if text_ids is None:
            return None, "bad_timestamps"
        text = "".join(segment for _, segment, _ in segments).strip()
        prefix = decoder_prefix(tokenizer, language, task, timestamps=True)
    else:
        text_ids = label_tokenizer(text, add_special_tokens=False).input_ids
        prefix = decoding_prefix
    if not text:
        return None, "empty_text"
    previous = row.get(columns.previous_text) if columns.previous_text else None
    previous = normalise_transcript(previous, settings) if previous else ""
    prompt = (
        previous_text_prompt(label_tokenizer, previous, settings.max_prev_length)
        if previous and example_draw(settings.seed, epoch, example_key, "prompt") < settings.prompt_probability
        else []
    )
    # The model reads all but the last token and predicts all but the first; collate gives the prompt's
    # positions no loss, so the loss-bearing labels are the same with or without one.
    tokens = [*prompt, *prefix, *text_ids, tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    if len(tokens) - len(prompt) - 1 > settings.max_label_length:
        if not settings.cut_long_labels:
            return None, "too_many_tokens"
        tokens = tokens[: len(prompt) + settings.max_label_length + 1]
    return {
        "audio": audio[: audio_settings.n_samples],
        "tokens": np.asarray(tokens, np.int32),
        "prompt_length": len(prompt),
        "decoding_prefix": np.asarray(decoding_prefix, np.int32),
        "id": "" if example_id is None else str(example_id),
        "text": text,
        "language": language or "en",  # for the per-language metrics; English-only models: en
        "source": None if row.get(columns.source) is None else str(row[columns.source]),  # per-source metrics
        "timestamps": use_timestamps,
    }, None


def collate(
    examples: list[dict],
    *,
    batch_size: int,
    n_samples: int,
    max_label_length: int,
    pad_token_id: int,
    max_prev_length: int = 0,
    default_prompt_ids: tuple[int, ...] | None = None,
) -> dict[str, np.ndarray]:
    """Pad to fixed shapes, so that no batch recompiles a step: padding rows are silence with labels -100.
    With default_prompt_ids the batch carries `prompt_ids`, each row's decoding_prefix (padding: the default)."""
    length = max_prev_length + max_label_length
    audio = np.zeros((batch_size, n_samples), np.float32)
    labels = np.full((batch_size, length), -100, np.int32)
    decoder_input_ids = np.full((batch_size, length), pad_token_id, np.int32)
    for row, example in enumerate(examples):
        audio[row, : len(example["audio"])] = example["audio"]
        tokens = example["tokens"]
        labels[row, : len(tokens) - 1] = tokens[1:]
        labels[row, : example.get("prompt_length", 0)] = -100  # the previous-text prompt carries no loss
        decoder_input_ids[row, : len(tokens) - 1] = tokens[:-1]
    batch = {"audio": audio, "labels": labels, "decoder_input_ids": decoder_input_ids}
    if default_prompt_ids is not None:
        prompt_ids = [example["decoding_prefix"] for example in examples]
        batch["prompt_ids"] = np.array(prompt_ids + [default_prompt_ids] * (batch_size - len(examples)), np.int32)
    return batch


def split_names(spec: str) -> list[str]:
    return [part.strip() for part in spec.split(",") if part.strip()]


@dataclass(frozen=True)
class EvalSet:
    """One evaluation or test set: the name its metrics and predictions go under, and what it reads."""

    name: str  # the split, or <dataset>/<split> when the sets' datasets differ
    dataset_name: str  # as --dataset_name takes it (several comma-separated names are mixed)
    split: str


def evaluation_sets(
    splits_spec: str | None, datasets_spec: str | None, default_dataset: str, kind: str
) -> list[EvalSet]:
    """--<kind>_split_name and --<kind>_dataset_name (one for all splits, or one each) as EvalSets."""
    splits = split_names(splits_spec or "")
    datasets = split_names(datasets_spec or "") or [default_dataset]
    if len(datasets) == 1:
        datasets = datasets * len(splits)
    elif len(datasets) != len(splits):
        raise ConfigError(
            f"--{kind}_dataset_name names {len(datasets)} datasets for {len(splits)} splits in --{kind}_split_name: "
            "give one dataset for all splits, or one per split."
        )
    one_dataset = len(set(datasets)) <= 1
    sets = [
        EvalSet(split if one_dataset else f"{Path(dataset.rstrip('/')).name}/{split}", dataset, split)
        for dataset, split in zip(datasets, splits)
    ]
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise ConfigError(f"--{kind}_split_name / --{kind}_dataset_name name the same set twice: {', '.join(names)}.")
    return sets


COLUMN_FLAGS = {  # Columns field -> its flag
    **{name: f"--{name}_column_name" for name in ("audio", "text", "id", "source", "language", "task")},
    "timestamps": "--timestamp_column_name",
    "previous_text": "--prev_column_name",
}


def select_columns(source, columns: Columns, name: str, split: str):
    """The columns read, audio undecoded; a missing one is an error, but for id and the default source."""
    have = list(source.column_names or [])
    for field_name, flag in COLUMN_FLAGS.items():
        column = getattr(columns, field_name)
        optional = field_name == "id" or (field_name == "source" and column == DEFAULT_SOURCE_COLUMN)
        if column and column not in have and not optional:
            raise ConfigError(
                f"{flag} {column!r} is not a column of {name!r} (split {split!r}); it has: {', '.join(have)}."
            )
    keep = [c for c in dict.fromkeys(dataclasses.astuple(columns)) if c in have]
    return source.cast_column(columns.audio, datasets.Audio(decode=False)).select_columns(keep)


def load_source(
    data_args: DataArguments,
    split: str,
    *,
    columns: Columns | None = None,
    process_index: int = 0,
    process_count: int = 1,
    seed: int = 0,
    shuffle: bool = False,
    epoch: int = 0,
    max_samples: int | None = None,
    dataset_name: str | None = None,
):
    """The rows of `split` that host `process_index` of `process_count` reads, as a resumable
    IterableDataset of `columns` (default: the training stream's). `dataset_name` (default
    --dataset_name): an evaluation set's own; a name also in --dataset_name keeps its config."""
    columns = columns or columns_of(data_args, train=True)
    train_names = split_names(data_args.dataset_name)
    configs = split_names(data_args.dataset_config_name or "") or [None] * len(train_names)
    if len(configs) != len(train_names):
        raise ConfigError(
            f"--dataset_config_name has {len(configs)} entries for {len(train_names)} datasets in --dataset_name."
        )
    names = split_names(dataset_name or data_args.dataset_name)
    config_of = dict(zip(train_names, configs))
    sources = []
    for name, config in ((name, config_of.get(name)) for name in names):
        try:
            # datasets caches a local directory by its name and README alone, so a regenerated directory
            # (or another one named alike) would load stale rows; resolved files (with mtimes) key it right.
            files = (
                datasets.load_dataset_builder(name, config).config.data_files
                if os.path.isdir(name) and not data_args.streaming
                else None
            )
            source = datasets.load_dataset(
                name, config, split=split, streaming=data_args.streaming, data_files=dict(files) if files else None
            )
            if not data_args.streaming:  # one code path: downloaded data is iterated like a stream
                source = source.to_iterable_dataset(num_shards=max(1, min(len(source), 64)))
        except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
            raise ConfigError(
                f"--dataset_name {name!r} could not be found ({error}). Give a hub id or a local directory."
            ) from None
        except ValueError as error:
            if "split" in str(error).lower():
                raise ConfigError(
                    f"Split {split!r} not in dataset {name!r}: {error}. Set --train_split_name / --eval_split_name "
                    "/ --test_split_name (or --eval_dataset_name / --test_dataset_name)."
                ) from None
            raise
        sources.append(select_columns(source, columns, name, split))
    if len(sources) > 1:
        probabilities = [float(p) for p in split_names(data_args.dataset_probabilities or "")] or None
        if probabilities and len(probabilities) != len(sources):
            raise ConfigError(f"--dataset_probabilities has {len(probabilities)} values for {len(sources)} datasets.")
        source = datasets.interleave_datasets(
            sources, probabilities=probabilities, seed=seed, stopping_strategy="all_exhausted"
        )
    else:
        source = sources[0]
    if max_samples is not None:
        source = source.take(max_samples)
    if process_count > 1:
        if source.num_shards % process_count:
            warn(
                f"{split}: {source.num_shards} shards do not divide over {process_count} hosts, so every host "
                f"reads all data and keeps 1 in {process_count} rows; reshard the dataset for faster loading."
            )
        source = datasets.distributed.split_dataset_by_node(source, rank=process_index, world_size=process_count)
    if shuffle and data_args.shuffle_buffer_size > 0:
        # datasets' shuffle for the parts its state holds exactly: the shard order (by seed, and by
        # epoch through set_epoch) and reading up to 10 shards at once. Its buffer of 1 row never
        # holds one between reads (each round emits all but buffer_size // 2 = 0 rows), so the row
        # shuffle, whose buffer its state lacks, is ShuffleBuffer's.
        source = source.shuffle(seed=seed, buffer_size=1)
        # Only here: datasets reorders the shards of any epoch > 0, shuffled or not, which would
        # break --shuffle_buffer_size 0's promise of the files' own order.
        source.set_epoch(epoch)
        source = ShuffleBuffer(source, data_args.shuffle_buffer_size, (seed, epoch, process_index))
    return source


# datasets warns, on loading any state of a shuffled dataset, that its buffer's rows are lost; the
# buffer of 1 that load_source asks for holds none between rows, so the warning would be false.
datasets.utils.logging.get_logger("datasets.iterable_dataset").addFilter(
    lambda record: "without the buffer content" not in record.getMessage()
)
# datasets sleeps 5 s whenever a stream of several shards closes (every epoch of a shuffled or
# interleaved training stream, and its end), for a pyarrow hang at exit (apache/arrow#45214) that the
# pinned pyarrow 26 no longer has (datasets itself skips its other workaround above pyarrow 24). The
# reader stalls meanwhile and the accelerator waits on its batches.
datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0


class ShuffleBuffer:
    """The rows of `source` (an IterableDataset) shuffled by datasets' (5.2) buffer algorithm: read
    until `size` rows are held, emit them in a random order but for size // 2 that stay for the
    next round, repeat; at the end emit the rest. Its state names each held row by its position in
    the source rather than holding it (no audio in a checkpoint): a resume reads the source again
    from the oldest held row, without decoding, and continues exactly as the uninterrupted run
    would. Each round's order comes from `key` and the round's number, so no RNG state is kept."""

    def __init__(self, source, size: int, key: tuple[int, ...]):
        self.source, self.size, self.key = source, size, key
        # positions of the held rows, rows emitted of this round's order, rows read, and the
        # source's state before the oldest held row (or before the next row, holding none)
        self._state = {"round": 0, "held": [], "emitted": 0, "read": 0, "source": None}

    def state_dict(self) -> dict:
        return self._state  # a new dict after every row, never changed after: safe to keep

    def load_state_dict(self, state: dict):
        self._state = state

    def __iter__(self):
        round_, held, emitted, read, before = (self._state[k] for k in ("round", "held", "emitted", "read", "source"))
        if before is not None:
            self.source.load_state_dict(before)
        reader, wanted, rows = iter(self.source), set(held), {}  # rows: position -> (row, source state before it)
        for position in range(min(held, default=read), read):  # a resume: the held rows again
            row = next(reader)
            if position in wanted:
                rows[position] = (row, before)
            if position + 1 in wanted or position + 1 == read:
                before = self.source.state_dict()
        while True:
            held = list(held)  # a new list: states already handed out name the old one
            while len(held) < self.size and (row := next(reader, None)) is not None:
                rows[read] = (row, before)
                held.append(read)
                read, before = read + 1, self.source.state_dict()
            if not held:
                return
            order = np.random.default_rng((*self.key, round_)).permutation(len(held))
            out = len(held) - (self.size // 2 if len(held) == self.size else 0)  # the source's end: all
            kept = [held[i] for i in order[out:]]
            this_round = {"round": round_, "held": held, "read": read, "source": rows[min(held)][1]}
            next_round = {"round": round_ + 1, "held": kept, "emitted": 0, "read": read}
            next_round["source"] = rows[min(kept)][1] if kept else before
            for j in range(emitted, out):
                row = rows.pop(held[order[j]])[0]
                self._state = next_round if j + 1 == out else {**this_round, "emitted": j + 1}
                yield row
            round_, held, emitted = round_ + 1, kept, 0


@dataclass(eq=False)
class SpeechBatches:
    """This host's stream of fixed-shape batches with a state a checkpoint can store.

    A reader thread pulls rows (remembering the source's state after each row), a thread pool
    decodes them in order, and finished batches wait in a bounded queue. The state of a batch is
    the source state after its last row (with a shuffle buffer, ShuffleBuffer's), so a restored
    iterator continues with the next batch, exactly as without the interruption. A failed read is
    retried from the state after the last row read (see _rows), so a flaky network loses and
    repeats nothing.
    """

    make_source: Any  # epoch -> IterableDataset
    prepare: Any  # row -> (example, None) or (None, skip reason)
    _: dataclasses.KW_ONLY
    batch_size: int
    collate_fn: Any  # examples -> fixed-shape host batch
    repeat: bool
    num_workers: int
    prefetch_batches: int
    state: dict | None = None  # a state_dict() to resume from
    read_retries: int = 10
    read_retry_wait_s: float = 1.0

    def __post_init__(self):
        self.num_workers, self.prefetch_batches = max(1, self.num_workers), max(1, self.prefetch_batches)
        state = self.state or {}
        self.epoch, self.source_state = state.get("epoch", 0), state.get("source")
        self.skipped = collections.Counter(state.get("skipped", {}))
        self.examples_read = state.get("examples_read", 0)
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    def state_dict(self) -> dict:
        """State after the last batch handed out (JSON-serialisable)."""
        return {
            "epoch": self.epoch,
            "source": self.source_state,
            "skipped": dict(self.skipped),
            "examples_read": self.examples_read,
        }

    def _rows(self):
        """(row, epoch, source state after the row), epoch after epoch when repeating. datasets retries
        within a file read, not every request (opening the dataset each epoch and evaluation is not
        retried), so a failed read reopens the source after the last row read, after a doubling wait:
        nothing is lost or read twice. Only `read_retries` failures in a row stop the run."""
        epoch, state = self.epoch, self.source_state
        produced = state is not None  # a resumed epoch may have no rows left
        failures = 0
        while True:
            try:
                source = self.make_source(epoch)
                if state is not None:
                    source.load_state_dict(state)
                for row in source:
                    state, produced, failures = source.state_dict(), True, 0
                    yield row, epoch, state
            except (OSError, httpx.HTTPError) as error:  # ConfigError (a ValueError) is not retried
                failures += 1
                if failures > self.read_retries:
                    raise TrainingStopped(
                        f"Reading the dataset failed {failures} times in a row; giving up (last error: "
                        f"{type(error).__name__}: {error}). Check the network and --dataset_name, or allow more "
                        "with --read_retries; relaunching resumes from the last checkpoint."
                    ) from None
                wait_s = min(self.read_retry_wait_s * 2 ** (failures - 1), 60.0)
                warn(
                    f"reading the dataset failed ({type(error).__name__}: {error}); retry {failures} of "
                    f"{self.read_retries} in {wait_s:.1f} s"
                )
                if self._stop.wait(wait_s):  # closed while waiting
                    return
                continue
            if not self.repeat:
                return
            if not produced:
                raise ConfigError("The training split is empty: check --dataset_name and --train_split_name.")
            epoch, state, produced = epoch + 1, None, False

    def _produce(self):
        try:
            with concurrent.futures.ThreadPoolExecutor(self.num_workers) as pool:
                pending = collections.deque()
                examples, skipped, batch_state = [], collections.Counter(), None
                # An epoch whose every row is skipped would otherwise repeat forever without a batch.
                current_epoch, whole_epoch = self.epoch, self.source_state is None  # a resumed epoch is partial
                epoch_skipped, epoch_usable = collections.Counter(), 0
                rows = self._rows()
                exhausted = False
                while not self._stop.is_set():
                    while not exhausted and len(pending) < 2 * self.num_workers + self.batch_size:
                        try:
                            row, epoch, state = next(rows)
                        except StopIteration:
                            exhausted = True
                            break
                        pending.append((pool.submit(self.prepare, {**row, EPOCH_FIELD: epoch}), epoch, state))
                    if not pending:
                        break
                    future, epoch, state = pending.popleft()
                    example, reason = future.result()
                    if epoch != current_epoch:
                        if whole_epoch and not epoch_usable:
                            counts = ", ".join(f"{r} {n}" for r, n in epoch_skipped.most_common())
                            flags = ", ".join(dict.fromkeys(SKIP_REASON_FLAGS[r] for r in epoch_skipped))
                            raise ConfigError(
                                f"No example survived the filters in a whole epoch (skipped: {counts}); check {flags}."
                            )
                        current_epoch, whole_epoch, epoch_skipped, epoch_usable = epoch, True, collections.Counter(), 0
                    batch_state = (epoch, state)
                    if reason:
                        skipped[reason] += 1
                        epoch_skipped[reason] += 1
                    else:
                        examples.append(example)
                        epoch_usable += 1
                    if len(examples) == self.batch_size:
                        self._put((examples, skipped, batch_state))
                        examples, skipped = [], collections.Counter()
                if examples or skipped:
                    self._put((examples, skipped, batch_state))
            self._put(None)
        except BaseException as error:  # surfaced on the consuming thread
            self._put(error)

    def _put(self, item):
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self):
        self._queue = queue.Queue(maxsize=self.prefetch_batches)
        self._stop.clear()
        thread = threading.Thread(target=self._produce, daemon=True, name="speech-batches")
        thread.start()
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                examples, skipped, (epoch, state) = item
                self.skipped.update(skipped)
                self.epoch, self.source_state = epoch, state
                self.examples_read += len(examples) + sum(skipped.values())
                if examples:
                    yield self.collate_fn(examples), examples
        finally:
            self._stop.set()
            # The reader checks the flag between rows; wait for it, so that no thread is still inside
            # pyarrow when the interpreter exits (that can abort the process: apache/arrow#45214).
            thread.join(timeout=30)


def log_mel(audio, mel_filters, *, n_fft: int = 400, hop_length: int = 160):
    """Whisper's log-mel spectrogram on the device, (batch, samples) -> (batch, n_mels, samples // hop), with
    transformers' WhisperFeatureExtractor's arithmetic."""
    padded = jnp.pad(audio, ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
    num_frames = 1 + (padded.shape[1] - n_fft) // hop_length
    frame_starts = jnp.arange(num_frames)[:, None] * hop_length
    window = 0.5 - 0.5 * jnp.cos(2 * jnp.pi * jnp.arange(n_fft) / n_fft)  # periodic Hann
    frames = padded[:, frame_starts + jnp.arange(n_fft)[None, :]] * window  # (B, frames, n_fft)
    power = jnp.abs(jnp.fft.rfft(frames, axis=-1)) ** 2  # (B, frames, n_fft // 2 + 1)
    mel = jnp.matmul(power, mel_filters, precision=jax.lax.Precision.HIGHEST)  # (B, frames, n_mels)
    log_spec = jnp.log10(jnp.maximum(mel, 1e-10))[:, :-1]
    log_spec = jnp.maximum(log_spec, log_spec.max(axis=(1, 2), keepdims=True) - 8.0)
    return ((log_spec + 4.0) / 4.0).transpose(0, 2, 1)


# --- model ---
# Whisper in flax.linen, parameter for parameter transformers' WhisperForConditionalGeneration
# (pre-LayerNorm blocks, eps 1e-5, exact-erf GELU, k_proj without bias, queries scaled by
# head_dim**-0.5, output projection tied to the token embedding). Parameters stay float32;
# `dtype` is the compute dtype; logits and the loss are float32.


ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclass(frozen=True)
class WhisperDims:
    """The parts of a WhisperConfig the model reads (hashable, so it can be a module field)."""

    vocab_size: int
    num_mel_bins: int
    d_model: int
    encoder_layers: int
    encoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_layers: int
    decoder_attention_heads: int
    decoder_ffn_dim: int
    max_source_positions: int
    max_target_positions: int
    activation_function: str = "gelu"
    pad_token_id: int | None = None  # its token-embedding row starts at zero, as in transformers
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    init_std: float = 0.02

    @classmethod
    def from_config(cls, config) -> WhisperDims:
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's fixed encoder positions, with transformers' float32 products (np.log would give float64);
    exp/sin rounded from float64, within an ulp of torch's float32 kernels (~1e-7, not bit for bit)."""
    increment = np.float32(-math.log(max_timescale) / (channels // 2 - 1))
    inv_timescales = np.exp(np.float64(increment * np.arange(channels // 2, dtype=np.float32))).astype(np.float32)
    scaled_time = np.float64(np.arange(length, dtype=np.float32)[:, None] * inv_timescales[None, :])
    return np.concatenate([np.sin(scaled_time), np.cos(scaled_time)], axis=1).astype(np.float32)


# The mesh's two axes (see make_mesh); a batch is split over both, parameters over "fsdp".
BATCH_AXES = ("data", "fsdp")


def keep_batch_sharded(x):
    """Pin an activation's batch axis to the mesh's batch axes when the caller set a mesh. Unpinned, XLA
    may follow the FSDP-split weights into a feature-split layout with all-to-alls (whisper-tiny, FSDP
    on a v4-32: 12.8 GiB per chip at 32 examples, 7.0 pinned; bench_scream.py tpu)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or tuple(mesh.axis_names) != BATCH_AXES:
        return x
    return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))


def attention(query, key, value, *, mask=None, is_causal=False, dropout_rate=0.0, dropout_rng=None):
    """Scaled dot-product attention over (batch, time, heads, head_dim): long unmasked queries (the
    encoder's) in blocks, the rest fused by jax.nn.dot_product_attention, which has no dropout."""
    scale = query.shape[-1] ** -0.5
    if dropout_rng is None or dropout_rate == 0.0:
        block = query_block_size(query.shape[1]) if mask is None and not is_causal else None
        if block is not None:  # the encoder's 1500 positions
            return blocked_attention(query, key, value, scale=scale, block=block)
        return jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale, is_causal=is_causal)
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32) * scale
    if is_causal:
        causal = jnp.tril(jnp.ones((query.shape[1], key.shape[1]), bool))
        mask = causal if mask is None else mask & causal
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
    weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0).astype(value.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, value)


def query_block_size(length: int) -> int | None:
    """A divisor of `length` from 128 down to 64 (125 for 1500 positions, 75 for the demo's 150), or
    None when the queries fit one block or no such divisor exists."""
    if length <= 128:
        return None
    return next((size for size in range(128, 63, -1) if length % size == 0), None)


def blocked_attention(query, key, value, *, scale: float, block: int):
    """Unmasked attention a block of queries at a time, recomputed in the backward pass, so the
    (batch, heads, T, S) scores never exist at once nor are stored for the backward pass."""
    batch, length, heads, head_dim = query.shape
    key, value = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)  # (B, heads, S, head_dim)

    def attend(query_block):  # (B, block, heads, head_dim)
        scores = jnp.einsum("bqhd,bhkd->bhqk", query_block, key, preferred_element_type=jnp.float32) * scale
        weights = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
        return jnp.einsum("bhqk,bhkd->bqhd", weights, value)

    blocks = query.reshape(batch, length // block, block, heads, head_dim).swapaxes(0, 1)  # (blocks, B, block, ...)
    out = jax.lax.map(jax.checkpoint(attend), blocks)
    return out.swapaxes(0, 1).reshape(query.shape)


def float32_layer(cls, *args, dtype, init, **kwargs):
    """A flax layer computing in `dtype` on float32 parameters, its weights drawn by `init`: an initializer,
    or for a number normal(init) as transformers' are."""
    init = init if callable(init) else nn.initializers.normal(init)
    kwargs["embedding_init" if cls is nn.Embed else "kernel_init"] = init
    return cls(*args, dtype=dtype, param_dtype=jnp.float32, **kwargs)


def layer_norm(name: str, dtype):  # eps 1e-5: torch.nn.LayerNorm's default, which transformers' Whisper uses
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, name=name)


class Attention(nn.Module):
    """Multi-head attention with transformers' projection names; methods for cached decoding."""

    dims: WhisperDims
    num_heads: int
    dtype: Any
    deterministic: bool

    def setup(self):
        dense = functools.partial(float32_layer, nn.Dense, self.dims.d_model, dtype=self.dtype, init=self.dims.init_std)
        self.q_proj = dense()
        self.k_proj = dense(use_bias=False)
        self.v_proj = dense()
        self.out_proj = dense()

    def heads(self, x):  # (B, T, d_model) -> (B, T, heads, head_dim)
        return keep_batch_sharded(x.reshape(x.shape[:2] + (self.num_heads, self.dims.d_model // self.num_heads)))

    def query(self, x):
        return self.heads(self.q_proj(x))

    def key_value(self, x):
        return self.heads(self.k_proj(x)), self.heads(self.v_proj(x))

    def attend(self, query, key, value, *, mask=None, is_causal=False):
        rate = self.dims.attention_dropout
        rng = None if self.deterministic or rate == 0.0 else self.make_rng("dropout")
        out = attention(query, key, value, mask=mask, is_causal=is_causal, dropout_rate=rate, dropout_rng=rng)
        return self.out_proj(keep_batch_sharded(out.reshape(out.shape[:2] + (self.dims.d_model,))))

    def __call__(self, x, source=None, *, is_causal=False):
        key, value = self.key_value(x if source is None else source)
        return self.attend(self.query(x), key, value, is_causal=is_causal)


def feed_forward(x, ffn_dim: int, dims: WhisperDims, dtype, deterministic: bool):
    """fc1 -> activation -> dropout -> fc2, as submodules of the calling layer (transformers' names)."""
    dense = functools.partial(float32_layer, nn.Dense, dtype=dtype, init=dims.init_std)
    x = ACTIVATIONS[dims.activation_function](keep_batch_sharded(dense(ffn_dim, name="fc1")(x)))
    x = nn.Dropout(dims.activation_dropout)(x, deterministic=deterministic)
    return dense(dims.d_model, name="fc2")(x)


class EncoderLayer(nn.Module):
    dims: WhisperDims
    dtype: Any
    deterministic: bool

    @nn.compact
    def __call__(self, hidden, _unused=None):  # (B, S, d) -> (B, S, d); scan-shaped signature
        d = self.dims
        drop = functools.partial(nn.Dropout(d.dropout), deterministic=self.deterministic)
        attn = Attention(d, d.encoder_attention_heads, self.dtype, self.deterministic, name="self_attn")
        hidden = hidden + drop(attn(layer_norm("self_attn_layer_norm", self.dtype)(hidden)))
        x = layer_norm("final_layer_norm", self.dtype)(hidden)
        hidden = hidden + drop(feed_forward(x, d.encoder_ffn_dim, d, self.dtype, self.deterministic))
        return keep_batch_sharded(hidden), None


def beams_cross_attention(cross_attn: Attention, x, cross_key, cross_value):
    """Cross-attention of x (B*N, T, d), N beams per row, to keys and values kept once per row: a row's
    beams are N*T queries of its one copy, so no step reads N copies. N = 1 outside beam search."""
    query = cross_attn.query(x)
    rows, beams = cross_key.shape[0], x.shape[0] // cross_key.shape[0]
    query = query.reshape((rows, beams * x.shape[1]) + query.shape[2:])
    return cross_attn.attend(query, cross_key, cross_value).reshape(x.shape)


class DecoderLayer(nn.Module):
    """A decoder block. With `cache` (this layer's keys/values) it decodes incrementally, writing new
    keys/values at `position`; cross-attention's come from `encoder_hidden` if given, else the cache."""

    dims: WhisperDims
    dtype: Any
    deterministic: bool

    @nn.compact
    def __call__(self, hidden, encoder_hidden, cache, position):
        d = self.dims
        drop = functools.partial(nn.Dropout(d.dropout), deterministic=self.deterministic)
        self_attn = Attention(d, d.decoder_attention_heads, self.dtype, self.deterministic, name="self_attn")
        cross_attn = Attention(d, d.decoder_attention_heads, self.dtype, self.deterministic, name="encoder_attn")

        x = layer_norm("self_attn_layer_norm", self.dtype)(hidden)
        query, key, value = self_attn.query(x), *self_attn.key_value(x)
        if cache is None:
            out = self_attn.attend(query, key, value, is_causal=True)
        else:

            def write(cached, new):
                return jax.lax.dynamic_update_slice_in_dim(cached, new.astype(cached.dtype), position, axis=1)

            key, value = write(cache["self_k"], key), write(cache["self_v"], value)
            visible = jnp.arange(key.shape[1]) <= (position + jnp.arange(x.shape[1]))[:, None]  # (T_new, T_cache)
            out = self_attn.attend(query, key, value, mask=visible[None, None])
        hidden = hidden + drop(out)

        x = layer_norm("encoder_attn_layer_norm", self.dtype)(hidden)
        if encoder_hidden is not None:
            cross_key, cross_value = cross_attn.key_value(encoder_hidden)
        else:
            cross_key, cross_value = cache["cross_k"], cache["cross_v"]
        hidden = hidden + drop(beams_cross_attention(cross_attn, x, cross_key, cross_value))

        x = layer_norm("final_layer_norm", self.dtype)(hidden)
        hidden = hidden + drop(feed_forward(x, d.decoder_ffn_dim, d, self.dtype, self.deterministic))
        new_cache = (
            None if cache is None else {"self_k": key, "self_v": value, "cross_k": cross_key, "cross_v": cross_value}
        )
        return keep_batch_sharded(hidden), new_cache


REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def stack_of_layers(layer_cls, owner: nn.Module, num_layers: int, in_axes, train: bool):
    """The owner's layers named `layers_{i}`, or one `layers` scanned over a leading layer axis."""
    scan = owner.scan_layers
    if owner.remat != "none":
        layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[owner.remat], prevent_cse=not scan)
    kwargs = dict(dims=owner.dims, dtype=owner.dtype, deterministic=not train)
    if scan:
        scanned = nn.scan(
            layer_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=in_axes,
            length=num_layers,
            metadata_params={nn.PARTITION_NAME: None},
        )
        return [scanned(name="layers", **kwargs)]
    return [layer_cls(name=f"layers_{i}", **kwargs) for i in range(num_layers)]


class Encoder(nn.Module):
    dims: WhisperDims
    dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: str = "none"

    @nn.compact
    def __call__(self, input_features, train: bool = False):  # (B, n_mels, 2S) -> (B, S, d)
        d, dtype = self.dims, self.dtype
        conv = functools.partial(
            float32_layer, nn.Conv, d.d_model, kernel_size=(3,), padding=((1, 1),), dtype=dtype, init=d.init_std
        )
        gelu = ACTIVATIONS["gelu"]  # the stem always uses exact GELU, whatever the config says
        x = input_features.transpose(0, 2, 1).astype(dtype)  # (B, 2S, n_mels)
        x = gelu(conv(name="conv1")(x))
        x = gelu(conv(strides=(2,), name="conv2")(x))  # (B, S, d)
        embed_positions = float32_layer(
            nn.Embed,
            d.max_source_positions,
            d.d_model,
            dtype=dtype,
            init=lambda *_: jnp.asarray(sinusoids(d.max_source_positions, d.d_model)),
            name="embed_positions",
        )
        x = x + jax.lax.stop_gradient(embed_positions(jnp.arange(d.max_source_positions)))  # fixed, not trained
        x = keep_batch_sharded(nn.Dropout(d.dropout)(x, deterministic=not train))
        for layer in stack_of_layers(EncoderLayer, self, d.encoder_layers, (nn.broadcast,), train):
            x, _ = layer(x, None)
        return keep_batch_sharded(layer_norm("layer_norm", dtype)(x))


class Decoder(nn.Module):
    dims: WhisperDims
    dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: str = "none"

    @nn.compact
    def __call__(self, input_ids, encoder_hidden, cache=None, position=0, train: bool = False):
        """(B, T) ids -> (B, T, vocab) float32 logits, and the updated cache (or None)."""
        d, dtype = self.dims, self.dtype

        def token_init(key, shape, dtype=jnp.float32):  # transformers zeroes the padding_idx row
            table = nn.initializers.normal(d.init_std)(key, shape, dtype)
            return table if d.pad_token_id is None else table.at[d.pad_token_id].set(0.0)

        embed_tokens = float32_layer(
            nn.Embed, d.vocab_size, d.d_model, dtype=dtype, init=token_init, name="embed_tokens"
        )
        embed_positions = float32_layer(
            nn.Embed, d.max_target_positions, d.d_model, dtype=dtype, init=d.init_std, name="embed_positions"
        )
        # No sqrt(d_model) factor even with config.scale_embedding: transformers' WhisperDecoder
        # reads that flag but never applies it (checked in transformers 5.23).
        x = embed_tokens(input_ids) + embed_positions(position + jnp.arange(input_ids.shape[1]))[None]
        x = keep_batch_sharded(nn.Dropout(d.dropout)(x, deterministic=not train))
        layers = stack_of_layers(DecoderLayer, self, d.decoder_layers, (nn.broadcast, 0, nn.broadcast), train)
        if self.scan_layers:
            x, new_cache = layers[0](x, encoder_hidden, cache, position)
        else:
            new_layer_caches = []
            for i, layer in enumerate(layers):
                layer_cache = None if cache is None else jax.tree.map(lambda c: c[i], cache)
                x, layer_cache = layer(x, encoder_hidden, layer_cache, position)
                new_layer_caches.append(layer_cache)
            new_cache = None if cache is None else jax.tree.map(lambda *c: jnp.stack(c), *new_layer_caches)
        if cache is not None and encoder_hidden is None:
            # A decoding step passes the input's cross-attention keys/values on, not the layers' restacked
            # copies, so XLA keeps them in place through generate's loop (whisper-base, 3 rows of 30 s:
            # 78 ms a step with the copy, 41 ms without).
            new_cache = {**new_cache, "cross_k": cache["cross_k"], "cross_v": cache["cross_v"]}
        x = layer_norm("layer_norm", dtype)(x)
        logits = keep_batch_sharded(embed_tokens.attend(x))  # tied output projection
        return logits.astype(jnp.float32), new_cache


class Whisper(nn.Module):
    dims: WhisperDims
    dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: str = "none"

    def setup(self):
        kwargs = dict(dims=self.dims, dtype=self.dtype, scan_layers=self.scan_layers, remat=self.remat)
        self.encoder = Encoder(**kwargs)
        self.decoder = Decoder(**kwargs)

    def __call__(self, input_features, decoder_input_ids, train: bool = False):
        return self.decode(decoder_input_ids, self.encode(input_features, train=train), train=train)[0]

    def encode(self, input_features, train: bool = False):
        return self.encoder(input_features, train=train)

    def decode(self, decoder_input_ids, encoder_hidden, cache=None, position=0, train: bool = False):
        return self.decoder(decoder_input_ids, encoder_hidden, cache=cache, position=position, train=train)


def build_model(config, *, dtype: str = "float32", scan_layers: bool = False, remat: str = "none") -> Whisper:
    return Whisper(WhisperDims.from_config(config), dtype=jnp.dtype(dtype), scan_layers=scan_layers, remat=remat)


def init_params(model: Whisper, rng):
    """Random parameters as transformers initialises them (normal(init_std), zero biases)."""
    d = model.dims
    features = jnp.zeros((1, d.num_mel_bins, 2 * d.max_source_positions), jnp.float32)
    return model.init({"params": rng}, features, jnp.zeros((1, 1), jnp.int32))["params"]


def empty_cache(dims: WhisperDims, batch_size: int, max_length: int, dtype) -> dict:
    """Zero keys and values per decoder layer: self-attention's for max_length positions, cross-attention's for S."""
    heads, layers = dims.decoder_attention_heads, dims.decoder_layers
    lengths = {"self": max_length, "cross": dims.max_source_positions}
    return {
        f"{part}_{kv}": jnp.zeros((layers, batch_size, length, heads, dims.d_model // heads), dtype)
        for part, length in lengths.items()
        for kv in "kv"
    }


@dataclass(frozen=True)
class DecodingSettings:
    """Decoding as transformers' generate() does it for Whisper: greedy (num_beams=1) or beam search."""

    prompt_length: int  # P: <|startoftranscript|><|lang|><|task|><|notimestamps|>, per row in generate's prompt_ids
    max_new_tokens: int
    eos_token_id: int
    pad_token_id: int
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()
    num_beams: int = 1
    length_penalty: float = 1.0  # a finished hypothesis scores sum_logprobs / generated_length**length_penalty
    early_stopping: bool | str = False  # GenerationConfig.early_stopping: True, False or "never"


def suppression_masks(settings: DecodingSettings, vocab_size: int):
    """(vocab,) masks of the tokens suppressed at every step, and at the first generated one (begin_suppress_tokens
    too), as transformers' SuppressTokens- and SuppressTokensAtBeginLogitsProcessor do."""

    def suppress(mask, tokens):
        return mask.at[jnp.asarray(tokens, jnp.int32)].set(len(tokens) > 0)

    always = suppress(jnp.zeros(vocab_size, bool), settings.suppress_tokens)
    return always, suppress(always, settings.begin_suppress_tokens)


def generate(model: Whisper, params, input_features, prompt_ids, settings: DecodingSettings):
    """Greedy decoding or beam search with a key/value cache and static shapes (jit with model and settings
    static), from each row's prompt_ids (B, P). Returns (B, P + max_new_tokens) ids: the prompt, the best
    hypothesis up to and including <|endoftext|>, then pad. Stops once every row has ended."""
    encoder_hidden = model.apply({"params": params}, input_features, method=Whisper.encode)
    return generate_from_encoded(model, params, encoder_hidden, prompt_ids, settings)


def generate_from_encoded(model: Whisper, params, encoder_hidden, prompt_ids, settings: DecodingSettings):
    """generate() from the encoder's output (B, frames, d_model), so one encoder pass serves several decodings."""
    batch_size, prompt_length = prompt_ids.shape
    if prompt_length != settings.prompt_length:
        raise ValueError(
            f"prompt_ids has {prompt_length} tokens per row, settings.prompt_length {settings.prompt_length}"
        )
    total_length = prompt_length + settings.max_new_tokens
    if total_length > model.dims.max_target_positions:
        raise ConfigError(
            f"prompt + --generation_max_length = {total_length} exceeds the model's "
            f"max_target_positions {model.dims.max_target_positions}."
        )
    variables = {"params": params}
    prompt_ids = prompt_ids.astype(jnp.int32)
    # The prompt runs once per row (beam search then repeats its self-attention cache per beam).
    cache = empty_cache(model.dims, batch_size, total_length, model.dtype)
    logits, cache = model.apply(variables, prompt_ids, encoder_hidden, cache, 0, method=Whisper.decode)
    search = greedy_search if settings.num_beams == 1 else beam_search
    return search(model, variables, logits[:, -1], cache, prompt_ids, settings)


def greedy_search(model: Whisper, variables, first_logits, cache, prompt_ids, settings: DecodingSettings):
    """generate() with num_beams=1: the argmax token per row, from the prompt's logits (B, vocab)."""
    batch_size, prompt_length = prompt_ids.shape
    total_length = prompt_length + settings.max_new_tokens
    tokens = (
        jnp.full((batch_size, total_length), settings.pad_token_id, jnp.int32).at[:, :prompt_length].set(prompt_ids)
    )
    always, at_begin = suppression_masks(settings, model.dims.vocab_size)

    def keep_going(carry):
        _, _, _, position, done = carry
        return (position < total_length) & ~done.all()

    def step(carry):
        tokens, cache, next_logits, position, done = carry
        banned = jnp.where(position == prompt_length, at_begin, always)
        next_token = jnp.argmax(jnp.where(banned, -jnp.inf, next_logits), axis=-1).astype(jnp.int32)
        next_token = jnp.where(done, settings.pad_token_id, next_token)
        done = done | (next_token == settings.eos_token_id)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, next_token[:, None], position, axis=1)
        # The cache holds total_length positions; the last token's keys are never needed.
        write_at = jnp.minimum(position, total_length - 1)
        logits, cache = model.apply(variables, next_token[:, None], None, cache, write_at, method=Whisper.decode)
        return tokens, cache, logits[:, -1], position + 1, done

    carry = (tokens, cache, first_logits, jnp.int32(prompt_length), jnp.zeros(batch_size, bool))
    return jax.lax.while_loop(keep_going, step, carry)[0]


# transformers' beam search marks impossible candidates by adding this (float32) constant.
BEAM_NEG = -1.0e9


def beam_search(model: Whisper, variables, first_logits, cache, prompt_ids, settings: DecodingSettings):
    """generate(num_beams=N) step for step as transformers 5.23's _beam_search: the same top-2N candidates,
    -1e9 bookkeeping, finished scores (sum of log-probs / generated_length**length_penalty, prompt not
    counted) and early-stopping heuristic, so ties aside the same hypothesis. first_logits: the prompt's
    (B, vocab); the cache holds B rows (its self-attention part is repeated here to one row per beam)."""
    batch_size, prompt_length = prompt_ids.shape
    beams, vocab = settings.num_beams, model.dims.vocab_size
    total_length = prompt_length + settings.max_new_tokens
    candidates = 2 * beams  # their beams_to_keep: max(2, 1 + number of eos ids) * num_beams, one eos id
    always, at_begin = suppression_masks(settings, vocab)
    early_stopping = settings.early_stopping
    # generated_length**length_penalty for lengths 1..max_new_tokens as theirs (Python int ** float),
    # then float32 as torch divides a float32 tensor by it.
    penalties = jnp.asarray(
        [float(n) ** settings.length_penalty for n in range(1, settings.max_new_tokens + 1)], jnp.float32
    )
    top_beams = jnp.arange(candidates) < beams  # their top_num_beam_mask

    def penalised(scores, generated_length):
        return scores / penalties[generated_length - 1]

    def keep_going(carry):
        position, is_open, finished, all_hit = carry[0], carry[5], carry[4], carry[8]
        return (position < total_length) & is_open.any() & ~(finished.all() & (early_stopping is True)) & ~all_hit

    def step(carry):
        position, sequences, scores, best, finished, is_open, cache, next_logits, _ = carry
        # Log-probs, then the suppressions (their logits processors run on log-probs), plus the beam's score.
        log_probs = jax.nn.log_softmax(next_logits, axis=-1)  # (B*N, vocab)
        log_probs = jnp.where(jnp.where(position == prompt_length, at_begin, always), -jnp.inf, log_probs)
        totals = log_probs.reshape(batch_size, beams, vocab) + scores[:, :, None]
        top_scores, top_index = jax.lax.top_k(totals.reshape(batch_size, beams * vocab), candidates)  # (B, 2N)
        source, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
        top_sequences = gather_beams(sequences, source)  # (B, 2N, T)
        top_sequences = jnp.where(jnp.arange(total_length) == position, token[:, :, None], top_sequences)
        # Which end: <|endoftext|> or max_length (their EosTokenCriteria, MaxLengthCriteria); the best N go on.
        hits = (token == settings.eos_token_id) | (position + 1 >= total_length)
        running_scores = top_scores + hits.astype(jnp.float32) * BEAM_NEG
        scores, keep = jax.lax.top_k(running_scores, beams)  # (B, N)
        sequences, beam_of = gather_beams(top_sequences, keep), gather_beams(source, keep)
        # The finished set: the top N candidates that just ended, if they beat the worst kept.
        candidate_scores = penalised(top_scores, position + 1 - prompt_length)
        full = finished.all(axis=1, keepdims=True) & (early_stopping is True)
        candidate_scores += full.astype(jnp.float32) * BEAM_NEG
        candidate_scores += (~is_open[:, None]).astype(jnp.float32) * BEAM_NEG
        just_finished = hits & top_beams[None, :]
        candidate_scores += (~just_finished).astype(jnp.float32) * BEAM_NEG
        best, finished = merge_finished(best, finished, (top_sequences, candidate_scores, just_finished))
        # Each beam's self-attention cache rows follow it within its row (cross-attention's are per row).
        flat = (jnp.arange(batch_size)[:, None] * beams + beam_of).reshape(-1)  # (B*N,)
        cache = {**cache, "self_k": cache["self_k"][:, flat], "self_v": cache["self_v"][:, flat]}
        position = position + 1
        if early_stopping == "never" and settings.length_penalty > 0.0:
            best_possible = penalised(scores[:, :1], total_length - prompt_length)
        else:
            best_possible = penalised(scores[:, :1], position - prompt_length)
        worst_finished = jnp.where(finished, best[1].min(axis=1, keepdims=True), BEAM_NEG)
        is_open = is_open & (best_possible > worst_finished).any(axis=1)
        # The next step's logits (at the last position their loop stops here, so does ours).
        write_at = jnp.minimum(position - 1, total_length - 1)
        next_tokens = sequences[:, :, position - 1].reshape(-1, 1)  # (B*N, 1)
        logits, cache = model.apply(variables, next_tokens, None, cache, write_at, method=Whisper.decode)
        return position, sequences, scores, best, finished, is_open, cache, logits[:, -1], hits.all()

    carry = beam_search_start(first_logits, cache, prompt_ids, settings)
    return jax.lax.while_loop(keep_going, step, carry)[3][0][:, 0]


def gather_beams(x, index):
    """x (B, K, ...), index (B, M) -> (B, M, ...): transformers' _gather_beams."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def merge_finished(best, finished, candidates):
    """The N best finished hypotheses of those kept (best: sequences (B, N, T), scores (B, N)) and the
    candidates that just ended (scored -1e9 unless they did)."""
    (best_sequences, best_scores), (top_sequences, candidate_scores, just_finished) = best, candidates
    best_scores, pick = jax.lax.top_k(jnp.concatenate([best_scores, candidate_scores], axis=1), best_scores.shape[1])
    best_sequences = gather_beams(jnp.concatenate([best_sequences, top_sequences], axis=1), pick)
    return (best_sequences, best_scores), gather_beams(jnp.concatenate([finished, just_finished], axis=1), pick)


def beam_search_start(first_logits, cache, prompt_ids, settings: DecodingSettings):
    """beam_search's first carry: N copies of each row's prompt, only the first open (scores 0, -1e9, ...,
    as theirs), nothing finished, a self-attention cache row per beam (cross-attention's one per row)."""
    (batch_size, prompt_length), beams = prompt_ids.shape, settings.num_beams
    tokens = jnp.full((batch_size, prompt_length + settings.max_new_tokens), settings.pad_token_id, jnp.int32)
    sequences = jnp.repeat(tokens.at[:, :prompt_length].set(prompt_ids)[:, None], beams, axis=1)  # (B, N, T)
    scores = jnp.where(jnp.arange(beams) == 0, 0.0, BEAM_NEG) * jnp.ones((batch_size, 1), jnp.float32)
    best = (sequences, jnp.full((batch_size, beams), BEAM_NEG, jnp.float32))
    cache = {**cache, **{k: jnp.repeat(cache[k], beams, axis=1) for k in ("self_k", "self_v")}}
    is_open = jnp.ones(batch_size, bool)  # their is_early_stop_heuristic_unsatisfied
    finished = jnp.zeros((batch_size, beams), bool)
    logits = jnp.repeat(first_logits, beams, axis=0)  # (B*N, vocab)
    return (jnp.int32(prompt_length), sequences, scores, best, finished, is_open, cache, logits, jnp.bool_(False))


# --- sharding ---
# One mesh: ("data", "fsdp"). Batches split over both axes; parameters and optimizer state are
# sharded over "fsdp" along their largest divisible dimension (never the scanned layer axis),
# replicated over "data". fsdp_size 1 is plain data parallelism. No pmap.


def make_mesh(fsdp_size: int, devices=None):
    devices = list(devices if devices is not None else jax.devices())
    fsdp_size = len(devices) if fsdp_size == -1 else fsdp_size
    if fsdp_size < 1 or len(devices) % fsdp_size:
        raise ConfigError(
            f"--fsdp_size {fsdp_size} must divide the {len(devices)} devices: use one of "
            f"{[n for n in range(1, len(devices) + 1) if len(devices) % n == 0]}."
        )
    return jax.make_mesh(
        (len(devices) // fsdp_size, fsdp_size), BATCH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices
    )


def fsdp_partition_spec(shape: tuple[int, ...], fsdp_size: int, *, stacked: bool) -> P:
    """Shard the largest dimension divisible by fsdp_size; replicate when none is."""
    first = 1 if stacked else 0  # a scanned layer axis stays whole: scan slices it every iteration
    candidates = [axis for axis in range(first, len(shape)) if shape[axis] % fsdp_size == 0]
    if fsdp_size == 1 or not candidates:
        return P()
    axis = max(candidates, key=lambda a: shape[a])
    return P(*[("fsdp" if a == axis else None) for a in range(len(shape))])


def state_shardings(abstract_tree, mesh):
    """NamedShardings for parameters, optimizer state (same rule: moments follow their parameters), scalars."""
    fsdp_size = mesh.shape["fsdp"]

    def leaf_sharding(path, leaf):
        stacked = any(getattr(key, "key", None) == "layers" for key in path)
        return NamedSharding(mesh, fsdp_partition_spec(tuple(leaf.shape), fsdp_size, stacked=stacked))

    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_tree)


def to_global_batch(host_batch: dict[str, np.ndarray], sharding) -> dict:
    """Each host's rows -> global arrays split over the mesh (host i's rows follow host i-1's)."""
    return {name: jax.make_array_from_process_local_data(sharding, value) for name, value in host_batch.items()}


# --- steps ---


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key; each step folds in its step number


def learning_rate_schedule(peak_lr: float, warmup_steps: int, num_train_steps: int, kind: str):
    """0 -> peak over the warmup, then linear down to 0 at num_train_steps, or constant (constant_with_warmup)."""
    after = optax.constant_schedule(peak_lr)
    if kind == "linear":
        after = optax.linear_schedule(peak_lr, 0.0, max(1, num_train_steps - warmup_steps))
    if warmup_steps == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak_lr, warmup_steps), after], [warmup_steps])


def weight_decay_mask(params):
    """Decay matrices and embeddings; not biases, LayerNorm, or the fixed encoder positions."""

    def decays(path, _):
        names = [getattr(key, "key", "") for key in path]
        fixed = names[0] == "encoder" and "embed_positions" in names
        return names[-1] in ("kernel", "embedding") and not fixed

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(args: TrainingArguments, schedule) -> optax.GradientTransformation:
    adamw = optax.adamw(
        schedule,
        b1=args.adam_beta1,
        b2=args.adam_beta2,
        eps=args.adam_epsilon,
        mu_dtype=jnp.dtype(args.adam_mu_dtype),
        weight_decay=args.weight_decay,
        mask=weight_decay_mask,
    )
    if args.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(args.max_grad_norm), adamw)
    return adamw


def cast_params(params, param_dtype: str):
    """Floating parameters in --param_dtype, and so the gradients and Adam's second moment."""
    dtype = jnp.dtype(param_dtype)
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def token_losses(logits, labels, label_smoothing: float = 0.0):
    """Per-token float32 cross-entropy and the mask of label tokens (labels != -100); label smoothing as
    PyTorch's CrossEntropyLoss, (1 - e) * nll + e * mean_v(-log p_v), without a (B, T, vocab) one-hot."""
    logits = logits.astype(jnp.float32)
    mask = labels != -100
    log_normaliser = jax.nn.logsumexp(logits, axis=-1)
    label_logits = jnp.take_along_axis(logits, jnp.where(mask, labels, 0)[..., None], axis=-1)[..., 0]
    losses = log_normaliser - label_logits
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses + label_smoothing * (log_normaliser - logits.mean(axis=-1))
    return jnp.where(mask, losses, 0.0), mask


def on_mesh(mesh):
    """Make `mesh` the current one while a step is traced, for keep_batch_sharded (None: no mesh)."""
    return contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs that carry their shardings: what a restore and .lower() need."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


def train_step(
    state: TrainState, batch: dict, *, model, optimizer, mel_filters, accumulation_steps, label_smoothing, mesh=None
):
    """One optimizer step on the global batch: loss = sum of token losses / number of label tokens
    over the whole batch, whatever the sharding or the number of micro-batches."""
    # The mesh, current while tracing, lets keep_batch_sharded pin activations (the backward pass's too).
    with on_mesh(mesh):
        step_rng = jax.random.fold_in(state.rng, state.step)

        def summed_loss(params, micro_batch, rng):
            features = log_mel(micro_batch["audio"], mel_filters)
            logits = model.apply(
                {"params": params}, features, micro_batch["decoder_input_ids"], train=True, rngs={"dropout": rng}
            )
            losses, mask = token_losses(logits, micro_batch["labels"], label_smoothing)
            return losses.sum(), mask.sum()

        gradient_of = jax.value_and_grad(summed_loss, has_aux=True)
        if accumulation_steps == 1:
            (loss_sum, num_tokens), grads = gradient_of(state.params, batch, step_rng)
        else:
            # Micro-batch a takes rows a, a+A, a+2A...: every device keeps its own rows, no data moves.
            def split(x):
                x = x.reshape((x.shape[0] // accumulation_steps, accumulation_steps) + x.shape[1:]).swapaxes(0, 1)
                if mesh is not None:
                    x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, BATCH_AXES)))
                return x

            def accumulate(carry, inputs):
                grads, loss_sum, num_tokens = carry
                micro_batch, index = inputs
                (micro_loss, micro_tokens), micro_grads = gradient_of(
                    state.params, micro_batch, jax.random.fold_in(step_rng, index)
                )
                grads = jax.tree.map(jnp.add, grads, micro_grads)
                return (grads, loss_sum + micro_loss, num_tokens + micro_tokens), None

            # Summed in float32 even for bfloat16 parameters: micro-batch gradients add up without rounding.
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            start = (zeros, jnp.float32(0), jnp.int32(0))
            micro_batches = (jax.tree.map(split, batch), jnp.arange(accumulation_steps))
            (grads, loss_sum, num_tokens), _ = jax.lax.scan(accumulate, start, micro_batches)
        denominator = jnp.maximum(num_tokens, 1).astype(jnp.float32)
        # Back to the parameters' dtype, so that the optimizer state keeps its dtypes from step to step.
        grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grads, state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss_sum / denominator, "grad_norm": optax.tree.norm(grads), "num_tokens": num_tokens}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


@dataclass(frozen=True)
class JittedTrainStep:
    """train_step as run, bench_scream.py and the tests run it: state sharded and donated, batch split by rows."""

    fn: Any  # (TrainState, global batch) -> (TrainState, metrics)
    abstract_state: TrainState  # shapes, dtypes and shardings, no data
    state_sharding: TrainState  # a NamedSharding per leaf
    data_sharding: NamedSharding
    optimizer: optax.GradientTransformation


def jit_train_step(
    model: Whisper, optimizer, mesh, *, mel_filters, accumulation_steps=1, label_smoothing=0.0, param_dtype="float32"
) -> JittedTrainStep:
    """eval_shape the state (parameters in `param_dtype`) -> its shardings -> jit(partial(train_step))."""

    def fresh_state(rng):
        params = cast_params(init_params(model, rng), param_dtype)
        return TrainState(jnp.int32(0), params, optimizer.init(params), rng)

    abstract_state = jax.eval_shape(fresh_state, jax.random.PRNGKey(0))
    state_sharding = state_shardings(abstract_state, mesh)
    data_sharding = NamedSharding(mesh, P(BATCH_AXES))
    options = dict(accumulation_steps=accumulation_steps, label_smoothing=label_smoothing, mesh=mesh)
    fn = jax.jit(
        functools.partial(train_step, model=model, optimizer=optimizer, mel_filters=mel_filters, **options),
        in_shardings=(state_sharding, data_sharding),
        out_shardings=(state_sharding, None),
        donate_argnums=0,
    )
    return JittedTrainStep(fn, with_shardings(abstract_state, state_sharding), state_sharding, data_sharding, optimizer)


def initial_train_state(step: JittedTrainStep, model: Whisper, *, seed: int, params=None) -> TrainState:
    """Step 0, sharded from the start: `params` (pretrained, host arrays) or a random init from
    `seed`, fresh optimizer moments, and the dropout key seed + 1."""
    sharding = step.state_sharding
    param_dtype = jax.tree.leaves(step.abstract_state.params)[0].dtype  # what jit_train_step was told
    if params is not None:
        params = jax.device_put(cast_params(params, param_dtype), sharding.params)
    else:
        params = jax.jit(lambda rng: cast_params(init_params(model, rng), param_dtype), out_shardings=sharding.params)(
            jax.random.PRNGKey(seed)
        )
    opt_state = jax.jit(step.optimizer.init, out_shardings=sharding.opt_state)(params)
    step0, rng = jax.device_put((jnp.int32(0), jax.random.PRNGKey(seed + 1)), (sharding.step, sharding.rng))
    return TrainState(step0, params, opt_state, rng)


def eval_step(params, batch: dict, *, model: Whisper, mel_filters, decoding: DecodingSettings | None, mesh=None):
    """Summed token loss and token count of a batch (padded rows carry no labels), and with
    `decoding` the transcripts (greedy, or beam search with decoding.num_beams > 1)."""
    with on_mesh(mesh):
        features = log_mel(batch["audio"], mel_filters)
        logits = model.apply({"params": params}, features, batch["decoder_input_ids"])
        losses, mask = token_losses(logits, batch["labels"])
        out = {"loss_sum": losses.sum(), "num_tokens": mask.sum()}
        if decoding is not None:
            # Each row's forced prefix; until collate emits "prompt_ids", the start of its decoder input.
            prompt_ids = batch.get("prompt_ids", batch["decoder_input_ids"][:, : decoding.prompt_length])
            # Decoding waits for the loss's all-reduces through a term that is always 0: XLA:CPU runs
            # independent collectives at once, and one inside generate's loop beside one outside it
            # deadlocked its 8-device rendezvous (an optimization_barrier is removed before that).
            never = (out["num_tokens"] < 0) & (out["loss_sum"] < 0)
            prompt_ids = prompt_ids + never.astype(prompt_ids.dtype)
            out["generated"] = generate(model, params, features, prompt_ids, decoding)
        return out


# Model FLOPs and device peaks, for the throughput and MFU the training loop logs. Dense bfloat16 peak
# FLOP/s and usable memory of one device, from the vendors' spec sheets, matched to `device_kind` by
# prefix, most specific first. MFU is against the bfloat16 peak whatever the compute dtype (PaLM's
# convention), except float32 on GPUs, where XLA runs matmuls as TF32. --dry_run judges fit by the memory.
DEVICE_SPECS = (  # (device_kind prefix, bfloat16 peak, float32/TF32 peak or None, usable GiB)
    ("TPU v6 lite", 918e12, None, 32),  # v6e (Trillium)
    ("TPU v5 lite", 197e12, None, 16),  # v5e
    ("TPU v5", 459e12, None, 95),  # v5p, which reports itself as "TPU v5" (or "TPU v5p")
    ("TPU v4", 275e12, None, 30.75),  # 32 GiB of HBM, of which XLA can use 30.75
    ("NVIDIA H200", 989e12, 494e12, 141),
    ("NVIDIA H100", 989e12, 494e12, 80),  # SXM; the PCIe card peaks lower
    ("NVIDIA A100", 312e12, 156e12, 40),  # the 40 GB card (the 80 GB one fits more)
)


def device_spec(device_kind: str) -> tuple[str, float, float | None, float] | None:
    return next((s for s in DEVICE_SPECS if device_kind.lower().startswith(s[0].lower())), None)


def forward_flops(dims: WhisperDims, decoder_length: int) -> dict[str, float]:
    """Forward FLOPs of one example by part (a multiply-add is 2): every matmul, attention products dense
    (the causal half too), padded positions too (the step computes them). Leaves out LayerNorm, GELU,
    softmax, the loss (elementwise, under 1%) and the log-mel front end (no gradient)."""
    d, S, T, V = dims.d_model, dims.max_source_positions, decoder_length, dims.vocab_size
    f_enc, f_dec, L_enc, L_dec = dims.encoder_ffn_dim, dims.decoder_ffn_dim, dims.encoder_layers, dims.decoder_layers
    return {
        "conv stem": 2 * (2 * S) * (3 * dims.num_mel_bins) * d + 2 * S * (3 * d) * d,  # 2S mel frames in, S out
        "encoder projections + MLP": L_enc * (4 * 2 * S * d * d + 2 * 2 * S * d * f_enc),
        "encoder attention QK^T, AV": L_enc * (2 * 2 * S * S * d),
        # self-attention q, k, v, out and cross-attention q, out over T; cross-attention k, v over S; MLP
        "decoder projections + MLP": L_dec * (6 * 2 * T * d * d + 2 * 2 * S * d * d + 2 * 2 * T * d * f_dec),
        "decoder attention QK^T, AV": L_dec * (2 * 2 * T * T * d + 2 * 2 * T * S * d),
        "output projection": 2 * T * d * V,
    }


def training_flops_per_example(dims: WhisperDims, decoder_length: int) -> float:
    """Forward + backward = 3 x forward (two matmuls back per one forward); remat not counted: MFU, not HFU."""
    return 3 * sum(forward_flops(dims, decoder_length).values())


def peak_flops_per_device(device_kind: str, compute_dtype: str) -> float | None:
    """The spec-sheet peak of one device of this kind, None if unknown (a CPU: no MFU is logged)."""
    spec = device_spec(device_kind)
    return None if spec is None else (spec[2] if compute_dtype == "float32" and spec[2] else spec[1])


def throughput_metrics(
    *, steps, seconds, global_batch_size, audio_seconds, flops_per_example, num_devices, peak_flops
) -> dict[str, float]:
    """`steps` train steps in `seconds`: examples/s, hours of (unpadded) audio per second, TFLOP/s per device, MFU."""
    examples_per_s = steps * global_batch_size / seconds
    flops_per_device = examples_per_s * flops_per_example / num_devices
    metrics = {
        "throughput/examples_per_s": examples_per_s,
        "throughput/audio_hours_per_s": audio_seconds / 3600.0 / seconds,
        "throughput/tflops_per_device": flops_per_device / 1e12,
    }
    if peak_flops:
        metrics["throughput/mfu"] = flops_per_device / peak_flops
    return metrics


# --- evaluation ---


def transcription_metrics(references: list[str], predictions: list[str]) -> dict[str, float]:
    """WER and CER x100 as written and after Whisper's BasicTextNormalizer; empty references are left out."""
    normalise = BasicTextNormalizer()
    metrics = {}
    for suffix, transform in (("", lambda s: s), ("_normalized", normalise)):
        pairs = [(transform(r).strip(), transform(p).strip()) for r, p in zip(references, predictions)]
        pairs = [(r, p) for r, p in pairs if r]
        if not pairs:
            continue
        refs, preds = zip(*pairs)
        metrics[f"wer{suffix}"] = 100.0 * jiwer.wer(list(refs), list(preds))
        metrics[f"cer{suffix}"] = 100.0 * jiwer.cer(list(refs), list(preds))
    return metrics


def metrics_by_group(rows: list[dict], key: str) -> dict[str, float]:
    """transcription_metrics of the rows with each (not None) row[key], as '<value>/<metric>': 'nn/wer'."""
    groups: dict[str, list[dict]] = collections.defaultdict(list)
    for row in rows:
        if row.get(key) is not None:
            groups[row[key]].append(row)
    results = {}
    for value, group in sorted(groups.items()):
        metrics = transcription_metrics([r["reference"] for r in group], [r["prediction"] for r in group])
        results |= {f"{value}/{name}": metric for name, metric in metrics.items()}
    return results


def allgather_json(value) -> list:
    """Every host's JSON-serialisable value, in process order, on every host."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([data.size], np.int32))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: data.size] = data
    everything = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(everything[i][: int(lengths[i][0])])) for i in range(jax.process_count())]


def any_host(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.process_allgather(np.array([flag], np.int32)).max())


def sync_hosts(name: str):
    """Wait until every host gets here (a no-op on one host)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def run_evaluation(eval_fn, params, eval_batches: SpeechBatches, data_sharding, tokenizer, *, generate: bool):
    """(loss, WER/CER with `generate`, skipped_<reason> counts; every host's prediction rows) of one set, on
    every host: hosts read disjoint shares and join every step, with empty batches, until all are done."""
    loss_sum, num_tokens, rows = 0.0, 0, []
    batch_iterator = iter(eval_batches)
    empty_batch = eval_batches.collate_fn([])
    while True:
        item = next(batch_iterator, None)
        if not any_host(item is not None):
            break
        host_batch, examples = item if item is not None else (empty_batch, [])
        out = eval_fn(params, to_global_batch(host_batch, data_sharding))
        loss_sum += float(out["loss_sum"])
        num_tokens += int(out["num_tokens"])
        if "generated" in out:
            mesh, spec = data_sharding.mesh, data_sharding.spec
            generated = multihost_utils.global_array_to_host_local_array(out["generated"], mesh, spec)
            texts = tokenizer.batch_decode(np.asarray(generated)[: len(examples)], skip_special_tokens=True)
            rows += [
                {"id": e["id"], "language": e["language"], "reference": e["text"], "prediction": text.strip()}
                | ({"source": e["source"]} if e.get("source") is not None else {})
                for e, text in zip(examples, texts)
            ]
    hosts = allgather_json({"rows": rows, "skipped": dict(eval_batches.skipped)})
    rows = [row for host in hosts for row in host["rows"]]
    skipped = sum((collections.Counter(host["skipped"]) for host in hosts), collections.Counter())
    results = {"loss": loss_sum / max(num_tokens, 1), "num_tokens": num_tokens}
    results.update({f"skipped_{reason}": count for reason, count in sorted(skipped.items())})
    if generate:
        results["num_examples"] = len(rows)
        references, predictions = [r["reference"] for r in rows], [r["prediction"] for r in rows]
        results.update(transcription_metrics(references, predictions))
        results.update(metrics_by_group(rows, "language"))
        results.update({f"source/{name}": value for name, value in metrics_by_group(rows, "source").items()})
    return results, rows


AVERAGED_METRICS = ("loss", "wer", "cer", "wer_normalized", "cer_normalized")  # <kind>/<metric>: the mean over sets
SUMMED_METRICS = ("num_tokens", "num_examples")


def combine_set_metrics(kind: str, per_set: dict[str, dict]) -> dict[str, float]:
    """Each set's metrics as <kind>/<set>/..., and <kind>/<metric> over all sets (those every set has)."""
    results = {}
    for name in AVERAGED_METRICS + SUMMED_METRICS:
        values = [metrics[name] for metrics in per_set.values() if name in metrics]
        if values and len(values) == len(per_set):
            results[f"{kind}/{name}"] = sum(values) if name in SUMMED_METRICS else float(np.mean(values))
    for set_name, metrics in per_set.items():
        results.update({f"{kind}/{set_name}/{name}": value for name, value in metrics.items()})
    return results


def write_predictions(path: Path, rows: list[dict], limit: int | None):
    """One JSON line per prediction row (the first `limit`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows[:limit]:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def is_better(value: float, best: dict | None, greater_is_better: bool) -> bool:
    """Whether an evaluation's metric beats the best so far (the earlier evaluation wins a tie)."""
    return best is None or (value > best["value"] if greater_is_better else value < best["value"])


def gather_params(params):
    """Full parameters on every host, as numpy (a collective when parameters span hosts)."""
    if all(leaf.is_fully_addressable for leaf in jax.tree.leaves(params)):
        return jax.device_get(params)
    return multihost_utils.process_allgather(params, tiled=True)


# --- checkpoints and export ---
# Our parameter tree mirrors transformers' module names: `model.encoder.layers.3.fc1.weight` is
# params["encoder"]["layers_3"]["fc1"]["kernel"] (transposed); with scan_layers the layers are
# stacked under "layers" on a leading axis. proj_out is tied to the token embedding.

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "flax_model.msgpack")


@dataclass
class Pretrained:
    """Everything a checkpoint directory holds. params is None when training from scratch."""

    config: Any
    params: dict | None
    tokenizer: Any
    feature_extractor: Any
    generation_config: Any
    source: str


def resolve_checkpoint_dir(name_or_path: str, cache_dir: str | None = None) -> Path:
    """A local directory as is; a hub id through huggingface_hub (offline: from the local cache)."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    patterns = ["*.json", "*.txt", "*.safetensors", "*.msgpack", "*.model"]
    try:
        directory = Path(huggingface_hub.snapshot_download(name_or_path, cache_dir=cache_dir, allow_patterns=patterns))
        if not any((directory / name).exists() for name in WEIGHT_FILES):  # old repos: PyTorch pickle only
            directory = Path(
                huggingface_hub.snapshot_download(
                    name_or_path, cache_dir=cache_dir, allow_patterns=patterns + ["pytorch_model*.bin"]
                )
            )
    except Exception as error:
        raise ConfigError(
            f"Model {name_or_path!r} is neither a local directory nor a reachable hub repository "
            f"({type(error).__name__}: {error}). Check --model_name_or_path / --config_name, the "
            "network, or HF_HUB_OFFLINE with a populated cache."
        ) from None
    return directory


def read_torch_state_dict(directory: Path) -> dict[str, np.ndarray]:
    """PyTorch-named float32 numpy arrays from safetensors (single or sharded) or pytorch_model.bin."""

    def read_safetensors(path):
        with safe_open(str(path), framework="flax") as f:  # the flax reader also understands bfloat16
            return {name: np.asarray(f.get_tensor(name), np.float32) for name in f.keys()}

    if (directory / "model.safetensors").exists():
        return read_safetensors(directory / "model.safetensors")
    if (directory / "model.safetensors.index.json").exists():
        weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(read_safetensors(directory / shard))
        return state
    if (directory / "pytorch_model.bin").exists():
        try:
            import torch
        except ImportError:
            raise ConfigError(
                f"{directory / 'pytorch_model.bin'} is a PyTorch pickle and reading it needs torch: "
                "pip install torch, or convert the checkpoint to safetensors."
            ) from None
        state = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
        return {name: tensor.float().numpy() for name, tensor in state.items()}
    raise ConfigError(f"No weights in {directory}: expected one of {', '.join(WEIGHT_FILES)}.")


def torch_to_flax(state_dict: dict[str, np.ndarray]) -> dict:
    """transformers' names and layouts -> our unstacked parameter tree."""
    params: dict = {}
    for name, weight in state_dict.items():
        if name == "proj_out.weight":
            continue  # tied to model.decoder.embed_tokens.weight
        path = re.sub(r"\blayers\.(\d+)", r"layers_\1", name.removeprefix("model.")).split(".")
        module, leaf = path[-2], path[-1]
        if leaf == "weight":
            if "layer_norm" in module:
                leaf = "scale"
            elif module.startswith("embed_"):
                leaf = "embedding"
            else:  # Linear (out, in) -> (in, out); Conv1d (out, in, k) -> (k, in, out)
                leaf, weight = "kernel", weight.T if weight.ndim == 2 else weight.transpose(2, 1, 0)
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[leaf] = np.ascontiguousarray(weight)
    return params


def flax_to_torch(params: dict) -> dict[str, np.ndarray]:
    """Our unstacked parameter tree -> transformers' names and layouts (inverse of torch_to_flax)."""
    state = {}
    for path, weight in traverse_util.flatten_dict(params).items():
        *modules, leaf = path
        weight = np.asarray(weight, np.float32)
        if leaf == "kernel":
            weight = weight.T if weight.ndim == 2 else weight.transpose(2, 1, 0)
        name = "model." + ".".join(modules + ["bias" if leaf == "bias" else "weight"])
        state[re.sub(r"\blayers_(\d+)", r"layers.\1", name)] = np.ascontiguousarray(weight)
    return state


def read_old_flax_checkpoint(path: Path) -> dict:
    """transformers-Flax's flax_model.msgpack (the 2023 Scream checkpoints) -> our unstacked tree."""
    tree = msgpack_restore(path.read_bytes())
    tree = tree.get("model", tree)

    def convert(node):
        if not isinstance(node, dict):
            return np.asarray(node, np.float32)
        out = {}
        for key, value in node.items():
            if key == "layers" and all(k.isdigit() for k in value):
                out.update({f"layers_{k}": convert(v) for k, v in value.items()})
            else:
                out[key] = convert(value)
        return out

    return convert(tree)


def stack_layers(params: dict, dims: WhisperDims) -> dict:
    """layers_0..layers_{n-1} -> one `layers` subtree with a leading layer axis (for scan_layers)."""
    out = {}
    for part, num_layers in (("encoder", dims.encoder_layers), ("decoder", dims.decoder_layers)):
        node = {k: v for k, v in params[part].items() if not k.startswith("layers_")}
        node["layers"] = jax.tree.map(
            lambda *xs: np.stack(xs), *[params[part][f"layers_{i}"] for i in range(num_layers)]
        )
        out[part] = node
    return out


def unstack_layers(params: dict) -> dict:
    """Inverse of stack_layers; a tree without `layers` passes through."""
    out = {}
    for part, node in params.items():
        node = dict(node)
        if "layers" in node:
            stacked = node.pop("layers")
            for i in range(jax.tree.leaves(stacked)[0].shape[0]):
                node[f"layers_{i}"] = jax.tree.map(lambda x: x[i], stacked)
        out[part] = node
    return out


def check_parameter_tree(params: dict, expected: dict, source: str):
    """Same names and shapes as the model's, or an error that lists the differences."""
    got = {"/".join(k): np.shape(v) for k, v in traverse_util.flatten_dict(params).items()}
    want = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(expected).items()}
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    mismatched = sorted(f"{k}: {got[k]} vs expected {want[k]}" for k in set(got) & set(want) if got[k] != want[k])
    if missing or unexpected or mismatched:
        lines = [f"The weights in {source} do not fit the model config."]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if items:
                lines.append(f"{title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise ConfigError("\n".join(lines))


def load_pretrained(name_or_path: str, *, cache_dir: str | None = None, weights: bool = True) -> Pretrained:
    """A transformers checkpoint (safetensors, pytorch_model.bin or the 2023 runs' flax_model.msgpack), weights
    as an unstacked float32 numpy tree, from a directory or a hub id."""
    directory = resolve_checkpoint_dir(name_or_path, cache_dir)
    if not (directory / "config.json").exists():
        raise ConfigError(f"{directory} has no config.json: is {name_or_path!r} a Whisper checkpoint?")
    config = WhisperConfig.from_pretrained(directory)
    params = None
    if weights:
        if (directory / "flax_model.msgpack").exists() and not any(
            (directory / n).exists() for n in ("model.safetensors", "model.safetensors.index.json")
        ):
            params = read_old_flax_checkpoint(directory / "flax_model.msgpack")
        else:
            params = torch_to_flax(read_torch_state_dict(directory))
        expected = jax.eval_shape(functools.partial(init_params, build_model(config)), jax.random.key(0))
        check_parameter_tree(params, expected, str(directory))
    tokenizer = feature_extractor = generation_config = None
    if (directory / "tokenizer_config.json").exists() or (directory / "vocab.json").exists():
        tokenizer = WhisperTokenizer.from_pretrained(directory)
    if (directory / "preprocessor_config.json").exists():
        feature_extractor = WhisperFeatureExtractor.from_pretrained(directory)
    if (directory / "generation_config.json").exists():
        generation_config = GenerationConfig.from_pretrained(directory)
    return Pretrained(config, params, tokenizer, feature_extractor, generation_config, str(directory))


def whisper_generation_config(tokenizer, config, language: str, task: str, base=None, *, english_only=False):
    """A generation config that transformers' Whisper generate() and pipeline() accept as is. An
    English-only model's has no language, task, lang_to_id or task_to_id (generate() refuses them)."""
    generation_config = GenerationConfig.from_dict(base.to_dict()) if base is not None else GenerationConfig()
    vocab = tokenizer.get_vocab()
    if not getattr(generation_config, "lang_to_id", None) and not english_only:
        generation_config.lang_to_id = {t: vocab[t] for t in (f"<|{code}|>" for code in LANGUAGES) if t in vocab}
    if not getattr(generation_config, "task_to_id", None) and not english_only:
        generation_config.task_to_id = {t: vocab[f"<|{t}|>"] for t in ("transcribe", "translate")}
    generation_config.no_timestamps_token_id = vocab["<|notimestamps|>"]
    generation_config.is_multilingual = not english_only
    for name in ("decoder_start_token_id", "eos_token_id", "pad_token_id", "bos_token_id"):
        setattr(generation_config, name, getattr(config, name))
    generation_config.max_length = config.max_target_positions
    if getattr(generation_config, "begin_suppress_tokens", None) is None:
        generation_config.begin_suppress_tokens = [vocab.get("Ġ", 220), config.eos_token_id]
    generation_config.language = None if english_only else language_code(language)
    generation_config.task = None if english_only else task
    generation_config.forced_decoder_ids = None
    if not getattr(generation_config, "alignment_heads", None):  # word timestamps need them; OpenAI's default:
        layers, heads = config.decoder_layers, config.decoder_attention_heads  # every head of the upper half
        generation_config.alignment_heads = [[layer, h] for layer in range(layers // 2, layers) for h in range(heads)]
    generation_config._from_model_config = False  # otherwise transformers rebuilds it and loses lang_to_id
    return generation_config


def export_pretrained(params, components: Pretrained, out_dir, generation_config) -> Path:
    """Write `params` with the components' config, tokenizer and feature extractor, and
    `generation_config`: a directory that transformers' from_pretrained and pipeline() load unchanged."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = flax_to_torch(unstack_layers(jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)))
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for part in (components.config, generation_config, components.tokenizer, components.feature_extractor):
        part.save_pretrained(out_dir)
    return out_dir


def export_ctranslate2(export_dir, quantization: str) -> Path:
    """EXPORT_DIR/ctranslate2/ for faster-whisper, by ctranslate2's converter, with the files faster-whisper reads."""
    from ctranslate2.converters import TransformersConverter

    out_dir = Path(export_dir) / "ctranslate2"
    converter = TransformersConverter(str(export_dir), copy_files=["tokenizer.json", "preprocessor_config.json"])
    converter.convert(str(out_dir), quantization=quantization, force=True)
    return out_dir


# whisper.cpp's model file (its src/whisper.cpp reads it): a header of 12 int32, the log-mel
# filter bank it computes features with, the vocabulary as bytes, then every tensor under
# OpenAI's names, dims innermost first. The output projection is not stored (tied).
GGML_MAGIC = 0x67676D6C  # "ggml"
GGML_TYPES = {"f16": (1, 1), "q8_0": (7 + 2 * 1000, 8)}  # --export_ggml -> (header ftype, tensor type)
GGML_NAMES = (  # transformers' module names -> OpenAI's, in this order
    ("model.", ""),
    ("layers.", "blocks."),
    ("self_attn.k_proj", "attn.key"),
    ("self_attn.q_proj", "attn.query"),
    ("self_attn.v_proj", "attn.value"),
    ("self_attn.out_proj", "attn.out"),
    ("self_attn_layer_norm", "attn_ln"),
    ("encoder_attn.k_proj", "cross_attn.key"),
    ("encoder_attn.q_proj", "cross_attn.query"),
    ("encoder_attn.v_proj", "cross_attn.value"),
    ("encoder_attn.out_proj", "cross_attn.out"),
    ("encoder_attn_layer_norm", "cross_attn_ln"),
    ("fc1", "mlp.0"),
    ("fc2", "mlp.2"),
    ("final_layer_norm", "mlp_ln"),
    ("encoder.layer_norm", "encoder.ln_post"),
    ("decoder.layer_norm", "decoder.ln"),
    ("embed_positions.weight", "positional_embedding"),
    ("embed_tokens", "token_embedding"),
)


def ggml_tensor(name: str, weight: np.ndarray, ggml_type: str) -> bytes:
    """One tensor record. Biases, norms and positions stay float32 (as whisper.cpp's converter
    writes them), convolutions float16 (its CPU kernels take no other type), matrices `ggml_type`:
    q8_0 is blocks of 32 values, each an f16 scale and 32 int8."""
    if name.startswith("encoder.conv") and name.endswith(".bias"):
        weight = weight.reshape(-1, 1)
    floats = weight.ndim == 1 or name.endswith("bias") or "positional_embedding" in name
    kind = "f32" if floats else ("f16" if weight.ndim != 2 or ggml_type == "f16" else ggml_type)
    if kind == "q8_0":
        blocks = weight.astype(np.float32).reshape(-1, 32)
        scale = np.abs(blocks).max(axis=1, keepdims=True) / 127
        quantized = np.round(blocks / np.where(scale == 0, 1, scale)).astype(np.int8)
        data = np.concatenate([scale.astype(np.float16).view(np.int8), quantized], axis=1).tobytes()
    else:
        data = weight.astype(np.float32 if kind == "f32" else np.float16).tobytes()
    type_id = {"f32": 0, "f16": 1, "q8_0": GGML_TYPES["q8_0"][1]}[kind]
    header = pystruct.pack(f"<3i{weight.ndim}i", weight.ndim, len(name.encode()), type_id, *weight.shape[::-1])
    return header + name.encode() + data


def export_ggml(params, components: Pretrained, path, ggml_type: str = "f16") -> Path:
    """A whisper.cpp model file of `params` (unstacked numpy or device arrays), written directly:
    no torch, no conversion script, the feature extractor's own mel filters."""
    config, tokenizer, feature_extractor = components.config, components.tokenizer, components.feature_extractor
    state = flax_to_torch(unstack_layers(jax.tree.map(np.asarray, jax.device_get(params))))
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")  # whisper.cpp adds the special tokens itself
    words = [bytes(byte_of.get(c, 0) for c in tokenizer.convert_ids_to_tokens(i)) for i in range(eot)]
    filters = np.asarray(feature_extractor.mel_filters, np.float32).T  # (n_mels, n_fft // 2 + 1)
    c = config
    hparams = (c.vocab_size, c.max_source_positions, c.d_model, c.encoder_attention_heads, c.encoder_layers)
    hparams += (c.max_target_positions, c.d_model, c.decoder_attention_heads, c.decoder_layers, c.num_mel_bins)
    path = Path(path)
    with path.open("wb") as f:
        f.write(pystruct.pack("<12i", GGML_MAGIC, *hparams, GGML_TYPES[ggml_type][0]))
        f.write(pystruct.pack("<2i", *filters.shape) + filters.tobytes())
        f.write(pystruct.pack("<i", len(words)) + b"".join(pystruct.pack("<i", len(w)) + w for w in words))
        for name, weight in state.items():
            for ours, theirs in GGML_NAMES:
                name = name.replace(ours, theirs)
            f.write(ggml_tensor(name, weight, ggml_type))
    return path


# Orbax checkpoints in OUTPUT_DIR/checkpoints: the sharded train state (parameters, optimizer
# state, step, RNG) plus JSON metadata holding every host's data-iterator state. Written by all
# hosts, asynchronously, atomically (a half-written checkpoint is never the latest).


def checkpoint_manager(
    output_dir: str, save_total_limit: int | None, best_metric: str = "eval/loss", greater_is_better: bool = False
):
    """Keeps the --save_total_limit latest checkpoints and the best evaluated one by `best_metric` (orbax's
    BestN over the metrics saved with each checkpoint; one saved without an evaluation is never best)."""

    def metric_of(metrics: dict) -> tuple[float, int]:
        # orbax keeps the last of the sorted keys; the step breaks ties towards the earlier evaluation,
        # as is_better does. One evaluated under another --metric_for_best_model ranks last.
        value = metrics.get(best_metric, -math.inf if greater_is_better else math.inf)
        return (value, -metrics["step"]) if greater_is_better else (value, metrics["step"])

    # BestN sorts ascending and keeps the last n: descending when lower is better.
    best = BestN(get_metric_fn=metric_of, reverse=not greater_is_better, n=1, keep_checkpoints_without_metrics=False)
    options = ocp.CheckpointManagerOptions(
        create=True,
        enable_async_checkpointing=True,
        best_fn=metric_of,  # makes orbax save and read the metrics (best_step()); retention is the policy's
        best_mode="max" if greater_is_better else "min",
        preservation_policy=AnyPreservationPolicy([LatestN(n=save_total_limit), best]),
    )
    directory = Path(output_dir).absolute() / "checkpoints"
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def save_checkpoint(manager, step: int, state: TrainState, meta: dict, metrics: dict | None = None):
    """Save asynchronously; `metrics` (an evaluation's results at this step) rank it for keeping."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    manager.save(step, args=args, metrics=metrics, force=True)


def restore_checkpoint(manager, step: int, abstract_state):
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    restored = manager.restore(step, args=args)
    return restored["state"], restored["meta"]


def write_model_card(
    out_dir: Path, *, base_model: str, run_args: dict, eval_results: dict, sets: list[tuple[str, EvalSet]] = ()
):
    """README.md: metadata with the model-index of `sets` (the hub shows their WER), the results, how to run each
    exported format, and the run's arguments."""
    out_dir = Path(out_dir)
    results = [
        EvalResult(
            task_type="automatic-speech-recognition",
            task_name="Automatic Speech Recognition",
            dataset_type=eval_set.dataset_name,
            dataset_name=eval_set.name,
            dataset_split=eval_set.split,
            metric_type=metric.removesuffix("_normalized"),
            metric_name=metric.upper().replace("_NORMALIZED", " (normalized)"),
            metric_value=round(eval_results[f"{kind}/{eval_set.name}/{metric}"], 4),
        )
        for kind, eval_set in sets
        for metric in ("wer", "cer", "wer_normalized", "cer_normalized")
        if f"{kind}/{eval_set.name}/{metric}" in eval_results
    ]
    card_data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="automatic-speech-recognition",
        tags=["whisper", "scream"],
        model_name=out_dir.name,
        eval_results=results or None,
    )
    lines = [f"# {out_dir.name}", "", f"Whisper fine-tuned with Scream from `{base_model}`.", "", "## Evaluation", ""]
    lines += [f"- {name}: {value:.4g}" for name, value in sorted(eval_results.items())] or ["- not evaluated"]
    language = run_args.get("resolved", {}).get("language", "no")
    lines += ["", "## Use", "", "Scream's tests check each of these formats as it writes them:", "", "```python"]
    lines += ["from transformers import pipeline  # long recordings too, with segment or word timestamps", ""]
    lines += ['asr = pipeline("automatic-speech-recognition", model=".")']
    lines += ['print(asr("audio.wav", return_timestamps=True, generate_kwargs={"language": "' + language + '"}))']
    if (out_dir / "ctranslate2").is_dir():
        lines += ["", "from faster_whisper import WhisperModel  # ctranslate2/, written by --export_ctranslate2", ""]
        lines += ['segments, _ = WhisperModel("ctranslate2").transcribe("audio.wav", language="' + language + '")']
    if (out_dir / "ggml-model.bin").exists():
        lines += ["```", "", "whisper.cpp (`ggml-model.bin`, written by `--export_ggml`):", "", "```sh"]
        lines += [f"whisper-cli -m ggml-model.bin -l {language} -f audio.wav"]
    lines += ["```", "", "## Training arguments", "", "```json", json.dumps(run_args, indent=2, default=str), "```", ""]
    ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines)).save(out_dir / "README.md")


# --- main ---


def drop_metrics_after(path: Path, step: int):
    """Remove metrics.jsonl lines of steps after `step` (and a last line cut short by a kill)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(kept))


class RunLog:
    """Process 0's metrics: OUTPUT_DIR/metrics.jsonl, TensorBoard, optionally Weights & Biases."""

    def __init__(self, train: TrainingArguments, config: dict, enabled: bool):
        self.enabled, self.path = enabled, Path(train.output_dir) / "metrics.jsonl"
        targets = set(split_names(train.report_to)) if enabled else set()
        self.tensorboard = (
            SummaryWriter(str(Path(train.output_dir) / "tensorboard")) if "tensorboard" in targets else None
        )
        self.wandb = None
        if "wandb" in targets:
            import wandb

            run = dict(project=train.wandb_project, entity=train.wandb_entity, name=train.run_name)
            self.wandb = wandb.init(**run, notes=train.run_description, config=config, resume="allow")

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for name, value in metrics.items() if self.tensorboard is not None else ():
            self.tensorboard.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def text(self, step: int, tag: str, text: str):
        if self.enabled and self.tensorboard is not None:
            self.tensorboard.add_text(tag, text, step)

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def initialise_distributed(dist: DistributedArguments):
    """Join the other hosts: explicitly off TPU, by itself on a multi-host TPU slice; either way a
    dead peer stops the others within --distributed_timeout_s."""
    timeout_s = dist.distributed_timeout_s
    timeouts = dict(initialization_timeout=timeout_s, heartbeat_timeout_seconds=max(10, timeout_s // 10))
    if dist.coordinator_address:
        if dist.num_processes is None or dist.process_id is None:
            raise ConfigError("--coordinator_address needs --num_processes and --process_id.")
        jax.distributed.initialize(dist.coordinator_address, dist.num_processes, dist.process_id, **timeouts)
    elif len(split_names(os.environ.get("TPU_WORKER_HOSTNAMES", ""))) > 1:
        jax.distributed.initialize(**timeouts)  # a TPU slice finds its coordinator itself


# Compile-only TPU slices for --dry_run_topology: name -> (topology, chip config). v4 and v5p
# names count TensorCores (two per chip), v5e and v6e names count chips.
TPU_SLICE_SHAPES = {
    3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8"},
    2: {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
}


def tpu_topology_devices(name: str):
    """The devices of a TPU slice such as v4-32, v5p-64, v5e-16 or v6e-8, for compile-only
    planning on any machine (needs libtpu)."""
    generation, _, size = name.partition("-")
    cores_per_chip = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}.get(generation)
    chips = int(size) // cores_per_chip if cores_per_chip and size.isdigit() else None
    shape = TPU_SLICE_SHAPES[3 if cores_per_chip == 2 else 2].get(chips) if chips else None
    if shape is None:
        slices = [f"{g}-{n * c}" for g, c in (("v4", 2), ("v5p", 2), ("v5e", 1), ("v6e", 1)) for n in (4, 16)]
        raise ConfigError(f"--dry_run_topology {name!r} is not a TPU slice we know; e.g. {', '.join(slices)}.")
    try:
        topology = jax_topologies.get_topology_desc(
            platform="tpu",
            topology_name=f"{generation}:{shape}",
            chip_config_name="megacore" if cores_per_chip == 2 else "default",
            chips_per_host_bounds=(2, 2, 1) if cores_per_chip == 2 or chips == 4 else (2, 4, 1),
            num_slices=1,
        )
    except Exception as error:
        raise ConfigError(f"--dry_run_topology needs libtpu (pip install 'jax[tpu]'): {error}") from None
    return topology.devices


def compiled_memory_bytes(compiled) -> int:
    """Device memory of a compiled program: its arguments, outputs and temporaries, less what they alias."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def abstract_batch(plan_rows: int, *, n_samples: int, max_label_length: int, sharding):
    """The shapes of a global batch as collate makes them, for compiling a step without data."""
    audio = jax.ShapeDtypeStruct((plan_rows, n_samples), jnp.float32, sharding=sharding)
    tokens = jax.ShapeDtypeStruct((plan_rows, max_label_length), jnp.int32, sharding=sharding)
    return {"audio": audio, "labels": tokens, "decoder_input_ids": tokens}


def resolve_components(model_args: ModelArguments, *, weights: bool = True) -> Pretrained:
    """Config, weights, tokenizer and feature extractor from --model_name_or_path, or a scratch
    model from --config_name; --tokenizer_name / --feature_extractor_name override."""
    if model_args.model_name_or_path:
        components = load_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir, weights=weights)
    elif model_args.config_name:
        components = load_pretrained(model_args.config_name, cache_dir=model_args.cache_dir, weights=False)
    else:
        raise ConfigError("Give --model_name_or_path (fine-tune) or --config_name (train from scratch).")
    for what in ("tokenizer", "feature_extractor"):
        if getattr(model_args, f"{what}_name"):
            other = load_pretrained(getattr(model_args, f"{what}_name"), weights=False, cache_dir=model_args.cache_dir)
            setattr(components, what, getattr(other, what))
        if getattr(components, what) is None:
            raise ConfigError(f"{components.source} has no {what.replace('_', ' ')}: give --{what}_name.")
    for name in ("dropout", "attention_dropout", "activation_dropout"):
        if getattr(model_args, name) is not None:
            setattr(components.config, name, getattr(model_args, name))
    return components


def say(*parts):
    """print on process 0 only (every host runs the same code)."""
    if jax.process_index() == 0:
        print(*parts, flush=True)


@dataclass(frozen=True)
class RunSetup:
    """Everything a run derives from its flags before it touches the output directory or the data."""

    model_args: ModelArguments
    data_args: DataArguments
    train_args: TrainingArguments
    dist_args: DistributedArguments
    components: Pretrained  # config, tokenizer, feature extractor; params None for a dry run or a scratch model
    generation_config: Any  # transformers GenerationConfig written with the exported model
    language: str  # --language as a Whisper code
    prompt_ids: tuple[int, ...]  # the default forced decoding prefix (a row's own language may differ)
    decoding: DecodingSettings
    devices: tuple
    mesh: jax.sharding.Mesh
    plan: BatchPlan
    peak_learning_rate: float  # --learning_rate after --lr_scaling
    schedule: Any  # optax schedule: step -> learning rate
    model: Whisper
    mel_filters: np.ndarray  # (n_freqs, n_mels)
    text_settings: dict  # {True: the training stream's TextSettings, False: evaluation's}
    columns: dict  # {True: the training stream's Columns, False: evaluation's}
    train_step: JittedTrainStep
    eval_step: Any  # jitted eval_step: (params, global batch) -> loss sum, token count (and generated ids)
    eval_sets: tuple[EvalSet, ...]  # --eval_split_name's sets (evaluated with --do_eval)
    test_sets: tuple[EvalSet, ...]  # --test_split_name's (with --do_predict)
    wrap_train_prepare: Any = None  # prepare -> prepare of the training rows (distil_scream.py's WER filter)

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    @property
    def output_dir(self) -> Path:
        return Path(self.train_args.output_dir)

    @property
    def n_samples(self) -> int:
        return self.components.feature_extractor.n_samples

    @property
    def sampling_rate(self) -> int:
        return self.components.feature_extractor.sampling_rate

    @property
    def decoder_length(self) -> int:
        return self.text_settings[True].decoder_length

    @property
    def run_config(self) -> dict:
        """The flags and what was resolved from them: printed, planned, saved, and in the model card."""
        plan, params = self.plan, self.train_step.abstract_state.params
        resolved = {
            "hosts": len({d.process_index for d in self.devices}),
            "devices": len(self.devices),
            "device_kind": self.devices[0].device_kind,
            "mesh": dict(self.mesh.shape),
            "global_batch": plan.global_batch_size,
            "per_host_batch": plan.per_host_batch_size,
            "per_device_batch": plan.per_device_batch_size,
            "micro_batch_per_device": plan.micro_batch_size // len(self.devices),
            "eval_batch": plan.eval_batch_size,
            "effective_learning_rate": self.peak_learning_rate,
            "total_train_examples": plan.global_batch_size * self.train_args.num_train_steps,
            "language": self.language,
            "prompt_ids": list(self.prompt_ids),
            "decoder_length": self.decoder_length,
            "audio_samples_per_example": self.n_samples,
            "sampling_rate": self.sampling_rate,
            "parameters": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)),
        }
        groups = ("model", "data", "training", "distributed")
        args = (self.model_args, self.data_args, self.train_args, self.dist_args)
        return {**{g: dataclasses.asdict(a) for g, a in zip(groups, args)}, "resolved": resolved}


def check_best_metric_name(train_args: TrainingArguments, eval_sets: list[EvalSet]):
    """--metric_for_best_model must be eval/<averaged metric> or eval/<set>/...<metric>, and WER or
    CER needs decoding. (A per-language or per-source group is checked at the first evaluation.)"""
    metric, set_names = train_args.metric_for_best_model, [s.name for s in eval_sets]
    if metric.removeprefix("eval/") not in AVERAGED_METRICS + SUMMED_METRICS and not any(
        metric.startswith(f"eval/{name}/") for name in set_names
    ):
        raise ConfigError(
            f"--metric_for_best_model {metric} is not an eval metric: use one of "
            + ", ".join(f"eval/{m}" for m in AVERAGED_METRICS)
            + f", or eval/<set>/<metric> for a set of {', '.join(set_names)} "
            + f"(e.g. eval/{(set_names or ['validation'])[0]}/wer_normalized)."
        )
    if any(word in metric for word in ("wer", "cer")) and not train_args.predict_with_generate:
        raise ConfigError(
            f"--metric_for_best_model {metric} needs --predict_with_generate (WER and CER come from decoding): "
            "add it, or pick by eval/loss."
        )


def decoding_setup(components: Pretrained, data_args: DataArguments, train_args: TrainingArguments):
    """(language code, the default prompt's language and task, its ids, the exported generation
    config, eval's DecodingSettings). Also sets the exported tokenizer's default prefix (what
    pipeline() users get); our labels never read it."""
    config, tokenizer = components.config, components.tokenizer
    language = language_code(data_args.language)
    english_only = is_english_only(config, components.generation_config)
    prompt_language, prompt_task = prompt_language_and_task(
        tokenizer, language, data_args.task, english_only=english_only
    )
    prompt_ids = tuple(decoder_prefix(tokenizer, prompt_language, prompt_task, timestamps=False))
    tokenizer.language, tokenizer.task = prompt_language, prompt_task
    tokenizer.set_prefix_tokens(predict_timestamps=False)
    generation_config = whisper_generation_config(
        tokenizer, config, language, data_args.task, components.generation_config, english_only=english_only
    )
    decoding = DecodingSettings(
        prompt_length=len(prompt_ids),
        max_new_tokens=train_args.generation_max_length or data_args.max_label_length,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        suppress_tokens=tuple(generation_config.suppress_tokens or ()),
        begin_suppress_tokens=tuple(generation_config.begin_suppress_tokens or ()),
        num_beams=train_args.generation_num_beams,
        length_penalty=train_args.generation_length_penalty,
        early_stopping=generation_config.early_stopping or False,  # None (unset) is False in generate()
    )
    return language, (prompt_language, prompt_task), prompt_ids, generation_config, decoding


def check_lengths(components: Pretrained, data_args: DataArguments, train_text: TextSettings):
    """The decoder positions a training row takes, and the audio a batch row holds, fit the model."""
    config, feature_extractor = components.config, components.feature_extractor
    if train_text.decoder_length > config.max_target_positions:
        raise ConfigError(
            f"--max_label_length {data_args.max_label_length}"
            + (f" + --max_prev_length {data_args.max_prev_length}" if train_text.max_prev_length else "")
            + f" exceeds the model's {config.max_target_positions} decoder positions: lower them."
        )
    frames = feature_extractor.n_samples // feature_extractor.hop_length
    if frames != 2 * config.max_source_positions:
        raise ConfigError(
            f"The feature extractor's {feature_extractor.chunk_length} s chunks give {frames} mel frames but the "
            f"model expects {2 * config.max_source_positions}: use a matching --feature_extractor_name."
        )


def setup_run(
    model_args: ModelArguments,
    data_args: DataArguments,
    train_args: TrainingArguments,
    dist_args: DistributedArguments,
    components: Pretrained | None = None,
) -> RunSetup:
    """Components (default: resolve_components'), decoding settings, mesh, batch plan, model and the
    jitted steps; no data read, no device memory used beyond what jit needs."""
    components = components or resolve_components(model_args, weights=not train_args.dry_run)
    config, feature_extractor = components.config, components.feature_extractor
    language, (prompt_language, prompt_task), prompt_ids, generation_config, decoding = decoding_setup(
        components, data_args, train_args
    )
    eval_sets = evaluation_sets(data_args.eval_split_name, data_args.eval_dataset_name, data_args.dataset_name, "eval")
    test_sets = evaluation_sets(data_args.test_split_name, data_args.test_dataset_name, data_args.dataset_name, "test")
    if train_args.do_predict and not test_sets:
        raise ConfigError("--do_predict needs --test_split_name: the split(s) to evaluate the kept model on.")
    check_best_metric_name(train_args, eval_sets)
    prompt = dict(language=prompt_language, task=prompt_task, seed=train_args.seed)
    text_settings = {train: text_settings_of(data_args, train=train, **prompt) for train in (True, False)}
    check_lengths(components, data_args, text_settings[True])

    devices = tpu_topology_devices(train_args.dry_run_topology) if train_args.dry_run_topology else jax.devices()
    mesh = make_mesh(dist_args.fsdp_size, devices)
    plan = plan_batches(train_args, len(devices), len({d.process_index for d in devices}))
    peak_lr = effective_learning_rate(train_args, plan.global_batch_size)
    schedule = learning_rate_schedule(
        peak_lr, train_args.warmup_steps, train_args.num_train_steps, train_args.lr_scheduler_type
    )
    model = build_model(config, dtype=model_args.dtype, scan_layers=model_args.scan_layers, remat=model_args.remat)
    mel_filters = np.asarray(feature_extractor.mel_filters, np.float32)
    step = jit_train_step(
        model,
        make_optimizer(train_args, schedule),
        mesh,
        mel_filters=mel_filters,
        accumulation_steps=train_args.gradient_accumulation_steps,
        label_smoothing=train_args.label_smoothing_factor,
        param_dtype=model_args.param_dtype,
    )
    generate = decoding if train_args.predict_with_generate else None
    eval_fn = jax.jit(
        functools.partial(eval_step, model=model, mel_filters=mel_filters, decoding=generate, mesh=mesh),
        in_shardings=(step.state_sharding.params, step.data_sharding),
    )
    return RunSetup(
        model_args=model_args,
        data_args=data_args,
        train_args=train_args,
        dist_args=dist_args,
        components=components,
        generation_config=generation_config,
        language=language,
        prompt_ids=prompt_ids,
        decoding=decoding,
        devices=tuple(devices),
        mesh=mesh,
        plan=plan,
        peak_learning_rate=peak_lr,
        schedule=schedule,
        model=model,
        mel_filters=mel_filters,
        text_settings=text_settings,
        columns={train: columns_of(data_args, train=train) for train in (True, False)},
        train_step=step,
        eval_step=eval_fn,
        eval_sets=tuple(eval_sets),
        test_sets=tuple(test_sets),
    )


# The flags that make a run that run: a relaunch that changes one is refused, not resumed.
RUN_IDENTITY = [("model", "model_name_or_path"), ("model", "config_name"), ("data", "dataset_name")]
RUN_IDENTITY += [("data", "language"), ("data", "task"), ("training", "seed")]


def check_same_run(saved: dict, current: dict, path: Path):
    """Refuse to resume a different run from an output directory's checkpoints."""
    changed = [
        f"--{name}: {saved[group][name]!r} there, {current[group][name]!r} now"
        for group, name in RUN_IDENTITY
        if saved.get(group, {}).get(name) != current[group][name]
    ]
    if changed:
        raise ConfigError(
            f"--output_dir holds another run's checkpoints ({path} differs in "
            + "; ".join(changed)
            + "). Choose a new --output_dir, or pass --overwrite_output_dir to start over."
        )


# What a run writes before its first step: relaunching the fixed command after a misconfiguration
# found at start-up (a wrong column, a missing dataset) must not be refused as "not empty".
STARTUP_FILES = {"scream_config.json", "checkpoints", "tensorboard"}


def prepare_output_dir(setup: RunSetup):
    """Resume, refuse, or start: check --output_dir against the flags, clear it with
    --overwrite_output_dir, and write scream_config.json (process 0)."""
    train_args, output_dir = setup.train_args, setup.output_dir
    has_checkpoints = (output_dir / "checkpoints").is_dir() and any((output_dir / "checkpoints").iterdir())
    if train_args.do_train and not train_args.overwrite_output_dir:
        if (
            not has_checkpoints
            and output_dir.is_dir()
            and any(p.name not in STARTUP_FILES for p in output_dir.iterdir())
        ):
            raise ConfigError(
                f"--output_dir {output_dir} is not empty and has no checkpoints to resume from: "
                "choose another --output_dir, or pass --overwrite_output_dir."
            )
        if has_checkpoints and not train_args.resume_from_checkpoint:
            raise ConfigError(
                f"--output_dir {output_dir} has checkpoints but --resume_from_checkpoint is off: "
                "pass --overwrite_output_dir to start over, or resume."
            )
    # Every host looks at the directory before process 0 changes it: a host that looked after
    # process 0 wrote scream_config.json would refuse a fresh run as "not empty" and hang the rest.
    sync_hosts("output_dir checked")
    if train_args.overwrite_output_dir and train_args.do_train:
        if setup.is_main:
            for stale in ("checkpoints", "predictions", "tensorboard"):
                shutil.rmtree(output_dir / stale, ignore_errors=True)
            (output_dir / "metrics.jsonl").unlink(missing_ok=True)
        has_checkpoints = False
    saved_config_path = output_dir / "scream_config.json"
    if has_checkpoints and train_args.resume_from_checkpoint and saved_config_path.exists():
        check_same_run(json.loads(saved_config_path.read_text()), setup.run_config, saved_config_path)
    if setup.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        saved_config_path.write_text(json.dumps(setup.run_config, indent=2, default=str))
    sync_hosts("output_dir prepared")  # ... and no host opens the checkpoints before an overwrite removed them
    say(json.dumps(setup.run_config, indent=2, default=str))


def init_or_restore(setup: RunSetup, manager) -> tuple[TrainState, dict | None]:
    """The train state, sharded from the start: the latest checkpoint in --output_dir (with its
    metadata: step, examples seen, each host's data position), else the pretrained or random
    weights (metadata None)."""
    train_args = setup.train_args
    resume = manager is not None and train_args.resume_from_checkpoint and not train_args.overwrite_output_dir
    latest = manager.latest_step() if resume else None
    if latest is None:
        params = setup.components.params
        if params is not None and setup.model_args.scan_layers:
            params = stack_layers(params, setup.model.dims)
        return initial_train_state(setup.train_step, setup.model, seed=train_args.seed, params=params), None
    state, meta = restore_checkpoint(manager, latest, setup.train_step.abstract_state)
    if meta["num_processes"] != jax.process_count():
        raise ConfigError(
            f"The checkpoint at step {latest} was written by {meta['num_processes']} "
            f"processes; resume with the same number of hosts (now {jax.process_count()})."
        )
    say(f"resumed from {setup.output_dir / 'checkpoints' / str(latest)} (step {latest})")
    if setup.is_main:  # the steps after the checkpoint are redone: keep one log line per step
        drop_metrics_after(setup.output_dir / "metrics.jsonl", latest)
    return state, meta


def make_batches(
    setup: RunSetup,
    split: str,
    *,
    train: bool,
    batch_size: int,
    state: dict | None = None,
    dataset_name: str | None = None,
):
    """This host's SpeechBatches of `split` (of `dataset_name`, default --dataset_name): shuffled and
    repeated for training, one pass for evaluation; `state` resumes a training stream where a
    checkpoint left it."""
    data_args, train_args, rate = setup.data_args, setup.train_args, setup.sampling_rate
    max_duration_s = min(data_args.max_duration_in_seconds, setup.n_samples / rate)
    audio_settings = AudioSettings(rate, setup.n_samples, data_args.min_duration_in_seconds, max_duration_s)
    tokenizer, text_settings, columns = setup.components.tokenizer, setup.text_settings[train], setup.columns[train]
    label_tokenizer = training_tokenizer(tokenizer, data_args.bpe_dropout) if train else tokenizer
    settings = dict(audio_settings=audio_settings, text_settings=text_settings, columns=columns)
    prepare = functools.partial(prepare_example, tokenizer=tokenizer, label_tokenizer=label_tokenizer, **settings)
    if train and setup.wrap_train_prepare is not None:
        prepare = setup.wrap_train_prepare(prepare)
    make_source = functools.partial(
        load_source,
        data_args,
        split,
        columns=columns,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        seed=train_args.seed,
        shuffle=train,
        max_samples=data_args.max_train_samples if train else data_args.max_eval_samples,
        dataset_name=dataset_name,
    )
    collate_fn = functools.partial(
        collate,
        batch_size=batch_size,
        n_samples=setup.n_samples,
        max_label_length=data_args.max_label_length,
        pad_token_id=setup.components.config.pad_token_id,
        max_prev_length=text_settings.max_prev_length,
        default_prompt_ids=setup.prompt_ids,
    )
    return SpeechBatches(
        lambda epoch: make_source(epoch=epoch),
        prepare,
        batch_size=batch_size,
        collate_fn=collate_fn,
        repeat=train,
        state=state,
        **reading_options(data_args),
    )


def reading_options(data_args: DataArguments) -> dict:
    """SpeechBatches' reader threads, prefetch and read retries, as the flags set them."""
    retries = dict(read_retries=data_args.read_retries, read_retry_wait_s=data_args.read_retry_wait_s)
    return dict(num_workers=data_args.preprocessing_num_workers, prefetch_batches=data_args.prefetch_batches, **retries)


def eval_batches(setup: RunSetup, eval_set: EvalSet):
    """One evaluation set, this host's share, one pass."""
    batch_size = setup.plan.per_host_eval_batch_size
    return make_batches(setup, eval_set.split, train=False, batch_size=batch_size, dataset_name=eval_set.dataset_name)


def check_eval_sets(setup: RunSetup):
    """Open every evaluation and test set now: a typo in a split fails at start-up, not after hours of training."""
    train_args = setup.train_args
    sets = (setup.eval_sets if train_args.do_eval else ()) + (setup.test_sets if train_args.do_predict else ())
    for eval_set in sets:
        eval_batches(setup, eval_set).make_source(0)


def evaluate(setup: RunSetup, params, step: int, log: RunLog, kind: str = "eval") -> dict:
    """Evaluate `params` on every set of `kind` (eval: --eval_split_name, test: --test_split_name):
    metrics logged (combine_set_metrics' names) and returned; each set's predictions written to
    predictions/<kind>/<set>/step_N.jsonl."""
    train_args = setup.train_args
    per_set, tables = {}, []
    for eval_set in setup.eval_sets if kind == "eval" else setup.test_sets:
        per_set[eval_set.name], rows = run_evaluation(
            setup.eval_step,
            params,
            eval_batches(setup, eval_set),
            setup.train_step.data_sharding,
            setup.components.tokenizer,
            generate=train_args.predict_with_generate,
        )
        if setup.is_main and rows:
            directory = setup.output_dir / "predictions" / kind / eval_set.name
            write_predictions(directory / f"step_{step}.jsonl", rows, train_args.log_max_eval_predictions)
            table = "\n".join(f"| {r['reference']} | {r['prediction']} |" for r in rows[:10])
            tables.append((f"{kind}/{eval_set.name}/predictions", "| reference | prediction |\n|---|---|\n" + table))
    results = combine_set_metrics(kind, per_set)
    log.write(step, results)
    for tag, table in tables:
        log.text(step, tag, table)
    return results


def export(setup: RunSetup, params, step: int, eval_results: dict) -> concurrent.futures.Future | None:
    """Write the model in transformers' format and its model card into --output_dir; with
    --push_to_hub start the upload. Every host calls it (gathering parameters is a collective);
    returns the upload's future on process 0."""
    params = gather_params(params)
    if not setup.is_main:
        return None
    export_pretrained(params, setup.components, setup.output_dir, setup.generation_config)
    if setup.train_args.export_ctranslate2:
        export_ctranslate2(setup.output_dir, setup.train_args.export_ctranslate2)
    if setup.train_args.export_ggml:
        export_ggml(params, setup.components, setup.output_dir / "ggml-model.bin", setup.train_args.export_ggml)
    tested = any(name.startswith("test/") for name in eval_results)
    write_model_card(
        setup.output_dir,
        base_model=setup.model_args.model_name_or_path or setup.model_args.config_name,
        run_args=setup.run_config,
        eval_results=eval_results,
        sets=[("test", s) for s in setup.test_sets] if tested else [("eval", s) for s in setup.eval_sets],
    )
    train_args = setup.train_args
    if not train_args.push_to_hub:
        return None
    # In the background: training goes on during the upload, and a failed push is a warning, not
    # the end of a week-long run (wait_for_pushes reports it).
    repo_id, api = train_args.hub_model_id or train_args.run_name, huggingface_hub.HfApi()
    try:
        api.create_repo(repo_id, private=train_args.hub_private_repo, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=setup.output_dir,
            commit_message=f"step {step}",
            ignore_patterns=["checkpoints/*", "tensorboard/*"],
            run_as_future=True,
        )
    except Exception as error:
        warn(f"push to {repo_id} failed: {error}")
        return None


def wait_for_pushes(pushes: list):
    """Wait for export's uploads; a failed one is a warning."""
    for push in pushes:
        if push is not None and push.exception() is not None:
            warn(f"push to the hub failed: {push.exception()}")


def stop_on_sigterm() -> threading.Event:
    """An event set by SIGTERM (a preemption notice on one host): the loop checkpoints and stops.
    Multi-host runs use JAX's own preemption notice instead (manager.reached_preemption)."""
    stop_requested = threading.Event()
    if jax.process_count() == 1:
        signal.signal(signal.SIGTERM, lambda *_: stop_requested.set())
    return stop_requested


@dataclass
class LogWindow:
    """What the next train/... logging line averages over, and where this launch's wall time went
    (cumulative; the pod's goodput is train_s / wall)."""

    losses: list = field(default_factory=list)
    grad_norms: list = field(default_factory=list)
    wait_s: float = 0.0  # waiting for the host's next batch
    audio_s: float = 0.0  # unpadded audio trained on
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)
    clock: dict = field(
        default_factory=lambda: {"start": time.perf_counter(), "train_s": 0.0, "eval_s": 0.0, "checkpoint_s": 0.0}
    )

    def restart(self, keep_losses: bool = False) -> LogWindow:
        """The next window; losses still unlogged stay when evaluation or saving only paused the steps."""
        kept = (self.losses, self.grad_norms) if keep_losses else ([], [])
        return LogWindow(*kept, clock=self.clock)


def log_train_metrics(setup: RunSetup, log: RunLog, step: int, window: LogWindow, train_batches) -> dict:
    """The logging line of a window of steps: loss, learning rate, throughput, MFU, where the time
    went and the skipped rows of every host. Returns the throughput metrics."""
    elapsed = time.perf_counter() - window.start
    window.clock["train_s"] += elapsed
    hosts = allgather_json({"skipped": dict(train_batches.skipped), "audio_s": window.audio_s})
    skipped = sum((collections.Counter(host["skipped"]) for host in hosts), collections.Counter())
    throughput = throughput_metrics(
        steps=window.steps,
        seconds=elapsed,
        global_batch_size=setup.plan.global_batch_size,
        audio_seconds=sum(host["audio_s"] for host in hosts),
        flops_per_example=training_flops_per_example(setup.model.dims, setup.decoder_length),
        num_devices=len(setup.devices),
        peak_flops=peak_flops_per_device(setup.devices[0].device_kind, setup.model_args.dtype),
    )
    clock = window.clock
    line = {
        "examples_seen": step * setup.plan.global_batch_size,
        "train/loss": float(np.mean(window.losses)),
        "train/learning_rate": float(setup.schedule(step - 1)),
        "train/grad_norm": float(np.mean(window.grad_norms)),
        "train/data_wait_fraction": window.wait_s / elapsed,
        "train/epoch": train_batches.epoch,
        **throughput,
        **{f"time/{name}": clock[name] for name in ("train_s", "eval_s", "checkpoint_s")},
        "time/goodput": clock["train_s"] / (time.perf_counter() - clock["start"]),
        **{f"data/skipped_{reason}": count for reason, count in sorted(skipped.items())},
    }
    log.write(step, line)
    return throughput


def evaluate_and_keep_best(setup: RunSetup, params, step: int, log: RunLog, best: dict | None):
    """Evaluate; returns (results, the best evaluation so far: {step, metric, value, results}, whether this one is it)."""
    metric = setup.train_args.metric_for_best_model
    results = evaluate(setup, params, step, log)
    if metric not in results:
        raise ConfigError(
            f"--metric_for_best_model {metric} is not among the logged eval metrics: {', '.join(sorted(results))}."
        )
    improved = is_better(results[metric], best, setup.train_args.greater_is_better)
    if improved:
        best = {"step": step, "metric": metric, "value": results[metric], "results": results}
    if setup.is_main:  # tqdm.write keeps the progress bar whole
        averaged = " ".join(f"{k}={v:.4g}" for k, v in results.items() if k.count("/") == 1)
        tqdm.write(f"{averaged} (step {step}; best {metric}={best['value']:.4g} at step {best['step']})")
    return results, best, improved


def checkpoint(setup: RunSetup, manager, step: int, state: TrainState, train_batches, best, eval_results):
    """Save asynchronously, with every host's data position and the best evaluation so far; an
    evaluated checkpoint carries its metrics, which rank it for keeping."""
    meta = {
        "step": step,
        "examples_seen": step * setup.plan.global_batch_size,
        "num_processes": jax.process_count(),
        "data_states": allgather_json(train_batches.state_dict()),
        "best": best,  # resuming keeps knowing which evaluation to export
    }
    save_checkpoint(manager, step, state, meta, metrics={**eval_results, "step": step} if eval_results else None)


def check_finite(step: int, metrics: dict, manager, global_batch_size: int) -> tuple[float, float]:
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise TrainingStopped(
            f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}. Stopping; the last "
            f"checkpoint (step {manager.latest_step()}) is intact. Look for bad audio or labels around example "
            f"{(step - 1) * global_batch_size}, or lower --learning_rate, then relaunch."
        )
    return loss, grad_norm


def train_loop(setup: RunSetup, state: TrainState, train_batches, manager, log: RunLog, stop_requested, best=None):
    """Steps until --num_train_steps or a stop request; logs, evaluates, checkpoints (and with
    --push_to_hub exports each new best) on cadence. `best`: the best evaluation so far. Returns
    (state, best, whether it stopped early). Each step's metrics are read one step later, so the
    host never stalls the device, yet a non-finite loss stops the run before it is checkpointed."""
    train_args, num_steps = setup.train_args, setup.train_args.num_train_steps
    step = int(jax.device_get(state.step))
    bar = tqdm(total=num_steps, initial=step, disable=not setup.is_main, desc="train", dynamic_ncols=True)
    batch_iterator, window, shown, in_flight, pushes = iter(train_batches), LogWindow(), {}, None, []
    if best is not None and best["metric"] != train_args.metric_for_best_model:  # resumed under another metric
        warn(f"the checkpoint's best evaluation was by {best['metric']}; now the best is by the new metric")
        best = None

    def settle():  # read the metrics of the step in flight
        nonlocal in_flight
        if in_flight is not None:
            loss, grad_norm = check_finite(*in_flight, manager, setup.plan.global_batch_size)
            window.losses.append(loss)
            window.grad_norms.append(grad_norm)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{float(setup.schedule(in_flight[0] - 1)):.2e}", **shown)
            in_flight = None

    try:
        while step < num_steps:
            wait_start = time.perf_counter()
            host_batch, examples = next(batch_iterator)
            window.wait_s += time.perf_counter() - wait_start
            window.audio_s += sum(len(example["audio"]) for example in examples) / setup.sampling_rate
            state, metrics = setup.train_step.fn(state, to_global_batch(host_batch, setup.train_step.data_sharding))
            step, window.steps = step + 1, window.steps + 1
            settle()
            in_flight = (step, metrics)
            bar.update(1)

            stopping = stop_requested.is_set() or (jax.process_count() > 1 and manager.reached_preemption(step))
            is_last = step == num_steps
            do_log = step % train_args.logging_steps == 0 or is_last
            do_eval = train_args.do_eval and (step % train_args.eval_steps == 0 or is_last)
            # Every evaluation is checkpointed, so that the final export can restore the best one.
            do_save = step % train_args.save_steps == 0 or is_last or stopping or do_eval
            if not (do_log or do_save):
                continue
            settle()
            if do_log:
                throughput = log_train_metrics(setup, log, step, window, train_batches)
                shown["ex/s"] = f"{throughput['throughput/examples_per_s']:.3g}"
                if "throughput/mfu" in throughput:
                    shown["mfu"] = f"{throughput['throughput/mfu']:.1%}"
                window = window.restart()
            else:  # steps since the last logging line count as training time too
                window.clock["train_s"] += time.perf_counter() - window.start
            if not do_save:
                continue
            eval_results, improved, pause_start = {}, False, time.perf_counter()
            if do_eval:
                eval_results, best, improved = evaluate_and_keep_best(setup, state.params, step, log, best)
                window.clock["eval_s"] += time.perf_counter() - pause_start
            save_start = time.perf_counter()
            checkpoint(setup, manager, step, state, train_batches, best, eval_results)
            window.clock["checkpoint_s"] += time.perf_counter() - save_start  # the asynchronous write's blocking part
            if improved and train_args.push_to_hub and not is_last:  # run() exports the last
                pushes.append(export(setup, state.params, step, eval_results))
            if stopping and not is_last:
                return state, best, True
            window = window.restart(keep_losses=True)  # time evaluation and saving apart from the steps
    finally:
        manager.wait_until_finished()
        bar.close()
        wait_for_pushes(pushes)
    return state, best, False


def kept_params(setup: RunSetup, manager, state: TrainState, best: dict | None):
    """The parameters to export and test: the best evaluation's, restored from its checkpoint when
    it is not the last step's; the last step's without evaluations."""
    if best is None or best["step"] == int(jax.device_get(state.step)):
        return state.params
    manager.wait_until_finished()
    say(f"exporting the best evaluation: step {best['step']} ({best['metric']}={best['value']:.4g})")
    return restore_checkpoint(manager, best["step"], setup.train_step.abstract_state)[0].params


def compiled_step_memory(setup: RunSetup) -> int | None:
    """Bytes per device of the compiled train step (compile only, no data); None when XLA finds
    that it cannot fit (RESOURCE_EXHAUSTED, as a TPU compile says)."""
    step = setup.train_step
    sizes = dict(n_samples=setup.n_samples, max_label_length=setup.decoder_length)
    batch = abstract_batch(setup.plan.global_batch_size, sharding=step.data_sharding, **sizes)
    try:
        return compiled_memory_bytes(step.fn.lower(step.abstract_state, batch).compile())
    except Exception as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return None


def dry_run(setup: RunSetup) -> int:
    """Print the plan, each value once: every flag and what the run resolves from them (the same
    run_config it saves), and with --dry_run_compile the train step's memory per device, judged
    against the device's own usable memory (DEVICE_SPECS)."""
    plan = {name: value for group in setup.run_config.values() for name, value in group.items()}
    spec = device_spec(setup.devices[0].device_kind)
    plan["usable_memory_per_device_gib"] = spec and spec[3]
    plan["memory_per_device_bytes"] = plan["fits"] = None
    if setup.train_args.dry_run_compile:
        plan["memory_per_device_bytes"] = memory = compiled_step_memory(setup)
        plan["fits"] = None if spec is None else memory is not None and memory <= spec[3] * 2**30
    width = max(map(len, plan))
    for name, value in plan.items():
        print(f"{name:>{width}}  {value}")
    if plan["memory_per_device_bytes"]:
        print(f"{'memory_per_device':>{width}}  {plan['memory_per_device_bytes'] / 2**30:.2f} GiB")
    if plan["fits"] is False:
        print(
            f"warning: the train step does not fit a {spec[0]} ({spec[3]} GiB usable): raise --fsdp_size, "
            "use --remat, or lower the per-device batch."
        )
    print("plan_json: " + json.dumps(plan, default=str), flush=True)
    return 0


def run(argv: list[str] | None = None) -> int:
    """One run, as its table of contents."""
    model_args, data_args, train_args, dist_args = parse_arguments(argv)
    if not (train_args.do_train or train_args.do_eval or train_args.do_predict or train_args.dry_run):
        raise ConfigError("Nothing to do: pass --do_train, --do_eval and/or --do_predict (or --dry_run).")
    if not train_args.dry_run:
        initialise_distributed(dist_args)
    setup = setup_run(model_args, data_args, train_args, dist_args)
    return dry_run(setup) if train_args.dry_run else execute(setup)


def execute(setup: RunSetup) -> int:
    """Train, evaluate, test and export as the flags say, resuming from --output_dir's checkpoints."""
    train_args = setup.train_args
    prepare_output_dir(setup)
    manager = None
    if train_args.do_train:
        best_by = (train_args.metric_for_best_model, train_args.greater_is_better)
        manager = checkpoint_manager(train_args.output_dir, train_args.save_total_limit, *best_by)
    state, restored = init_or_restore(setup, manager)
    check_eval_sets(setup)
    log = RunLog(train_args, setup.run_config, enabled=setup.is_main)
    step = int(jax.device_get(state.step))
    if not train_args.do_train:  # evaluate and/or test the given model
        if train_args.do_eval:
            evaluate(setup, state.params, step, log)
        if train_args.do_predict:
            evaluate(setup, state.params, step, log, kind="test")
        log.close()
        return 0
    data_state = restored["data_states"][jax.process_index()] if restored else None
    train_batches = make_batches(
        setup, setup.data_args.train_split_name, train=True, batch_size=setup.plan.per_host_batch_size, state=data_state
    )
    best = restored.get("best") if restored else None
    state, best, stopped_early = train_loop(setup, state, train_batches, manager, log, stop_on_sigterm(), best)
    step = int(jax.device_get(state.step))
    if not stopped_early:  # the final export: the best evaluation's model (the last one without --do_eval)
        params, results = kept_params(setup, manager, state, best), dict(best["results"]) if best else {}
        if train_args.do_predict:
            results.update(evaluate(setup, params, step, log, kind="test"))
        wait_for_pushes([export(setup, params, best["step"] if best else step, results)])
    log.close()
    say(
        f"stopped by SIGTERM after step {step}; checkpoint saved, relaunch to resume"
        if stopped_early
        else f"done: model exported to {setup.output_dir}"
    )
    return 0


def main(argv: list[str] | None = None, run=run) -> int:
    """run() (or distil_scream.py's) with its errors as the user sees them: a ConfigError exits 2, TrainingStopped 1."""
    try:
        return run(argv)
    except (ConfigError, TrainingStopped) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2 if isinstance(error, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
