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


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or local directory of a Whisper checkpoint to fine-tune."}
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Config (hub id or directory) to train from scratch; random init, seeded."}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    feature_extractor_name: str | None = field(
        default=None, metadata={"help": "Feature extractor, if not the model's."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Hugging Face cache directory."})
    dtype: str = field(
        default="float32", metadata={"help": "Compute dtype: float32 or bfloat16 (weights: --param_dtype)."}
    )
    scan_layers: bool = field(
        default=False, metadata={"help": "nn.scan over layers: much faster compiles for deep models."}
    )
    remat: str = field(
        default="none", metadata={"help": "Rematerialise layers: none, full, or dots (save matmul outputs)."}
    )
    dropout: float | None = field(default=None, metadata={"help": "Override the config's dropout."})
    attention_dropout: float | None = field(default=None, metadata={"help": "Override the config's attention_dropout."})
    activation_dropout: float | None = field(
        default=None, metadata={"help": "Override the config's activation_dropout (after the feed-forward GELU)."}
    )
    param_dtype: str = field(
        default="float32",
        metadata={
            "help": "Dtype of the trained parameters (and so of the gradients and Adam's second moment): float32, "
            "or bfloat16 as the 2024 NB-Whisper release trained large-v3. Losses and logits stay float32; "
            "the exported model is float32 either way."
        },
    )

    def __post_init__(self):
        for flag, value in (("--dtype", self.dtype), ("--param_dtype", self.param_dtype)):
            if value not in ("float32", "bfloat16"):
                raise ConfigError(f"{flag} {value!r} is not supported: use float32 or bfloat16.")
        if self.remat not in ("none", "full", "dots"):
            raise ConfigError(f"--remat {self.remat!r} is not supported: use none, full or dots.")


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Required. Hub id(s) or local path(s), comma-separated to mix several (see --dataset_probabilities)."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset config name(s), comma-separated."})
    dataset_probabilities: str | None = field(
        default=None, metadata={"help": "Sampling probabilities when mixing datasets, e.g. 0.7,0.3."}
    )
    train_split_name: str = field(default="train", metadata={"help": "Training split; 'a+b' joins splits."})
    eval_split_name: str = field(
        default="validation",
        metadata={
            "help": "Evaluation split(s): 'a+b' joins splits into one set; 'a,b' evaluates several sets, each "
            "logged as eval/<name>/... (name: the split, or <dataset>/<split> when --eval_dataset_name differs "
            "per set) and averaged into eval/loss, eval/wer, ..."
        },
    )
    eval_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Dataset of each evaluation set, comma-separated: one for all of --eval_split_name, or one per "
            "split (default: --dataset_name)."
        },
    )
    test_split_name: str | None = field(
        default=None,
        metadata={
            "help": "Test split(s) for --do_predict, comma-separated like --eval_split_name (logged as test/...)."
        },
    )
    test_dataset_name: str | None = field(
        default=None, metadata={"help": "Dataset of each test set, as --eval_dataset_name (default: --dataset_name)."}
    )
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset instead of downloading it first."})
    audio_column_name: str = field(default="audio", metadata={"help": "Column holding the audio."})
    text_column_name: str = field(default="text", metadata={"help": "Column holding the transcript."})
    id_column_name: str = field(
        default="id", metadata={"help": "Column with example ids, logged with predictions if present."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (per epoch)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})
    language: str = field(default="no", metadata={"help": "Language code or name, e.g. no or norwegian."})
    task: str = field(default="transcribe", metadata={"help": "transcribe or translate."})
    do_lower_case: bool = field(default=False, metadata={"help": "Lower-case transcripts before tokenizing."})
    do_remove_punctuation: bool = field(default=False, metadata={"help": "Strip punctuation from transcripts."})
    min_duration_in_seconds: float = field(default=0.0, metadata={"help": "Drop clips shorter than this."})
    max_duration_in_seconds: float = field(default=30.0, metadata={"help": "Drop clips longer than this."})
    max_label_length: int = field(
        default=128, metadata={"help": "Label tokens per example; longer labels are dropped."}
    )
    shuffle_buffer_size: int = field(
        default=500, metadata={"help": "Examples in the shuffle buffer (0: no shuffling)."}
    )
    preprocessing_num_workers: int = field(default=4, metadata={"help": "Threads decoding audio on each host."})
    prefetch_batches: int = field(default=4, metadata={"help": "Batches prepared ahead of the device."})
    read_retries: int = field(
        default=10,
        metadata={
            "help": "Failed reads of the dataset in a row (a dropped connection, a hub hiccup) before the run gives up; "
            "each retry resumes after the last row read. On top of huggingface_hub's and datasets' own "
            "retries of each file read."
        },
    )
    read_retry_wait_s: float = field(
        default=1.0,
        metadata={
            "help": "Wait before the first retry of a failed read; doubles with each failure in a row, up to 60 s."
        },
    )
    language_column_name: str | None = field(
        default=None,
        metadata={
            "help": "Column with each row's language (a Whisper code or name, e.g. no, nn, en); "
            "--language for rows without one. Evaluation decodes each row in its own language."
        },
    )
    task_column_name: str | None = field(
        default=None, metadata={"help": "Column with each row's task (transcribe or translate); --task otherwise."}
    )
    source_column_name: str | None = field(
        default=None,
        metadata={
            "help": "Evaluation column naming each row's source (e.g. nrk, stortinget): WER per source as "
            "eval/<set>/source/<source>/wer... (default: a column named 'source', where a set has one)."
        },
    )
    timestamp_column_name: str | None = field(
        default=None,
        metadata={
            "help": "Training column with the transcript with Whisper timestamps inline, e.g. "
            "'<|0.00|> Hei.<|1.52|><|1.80|> Takk.<|2.60|>'; such rows train without <|notimestamps|>."
        },
    )
    timestamp_probability: float = field(
        default=1.0,
        metadata={
            "help": "Chance that a row with timestamps trains in timestamp mode (else on the plain text column); "
            "drawn from (seed, epoch, example id), so a resumed run makes the same choices."
        },
    )
    prev_column_name: str | None = field(
        default=None,
        metadata={"help": "Training column with the previous segment's text, given as a <|startofprev|> prompt."},
    )
    prompt_probability: float = field(
        default=1.0,
        metadata={
            "help": "Chance that a row with previous text gets its prompt (seeded like --timestamp_probability)."
        },
    )
    max_prev_length: int = field(
        default=120,
        metadata={
            "help": "Decoder positions for the prompt, <|startofprev|> included: the previous text is cut from the "
            "left to max_prev_length - 1 tokens. With --prev_column_name every training row is "
            "max_prev_length + max_label_length positions long."
        },
    )
    bpe_dropout: float = field(
        default=0.0,
        metadata={"help": "BPE dropout of the training labels (the release used 0.2); evaluation never has it."},
    )

    def __post_init__(self):
        if self.task not in ("transcribe", "translate"):
            raise ConfigError(f"--task {self.task!r} is not supported: use transcribe or translate.")
        if self.max_label_length < 1:
            raise ConfigError("--max_label_length must be at least 1.")
        for flag, value in (
            ("--timestamp_probability", self.timestamp_probability),
            ("--prompt_probability", self.prompt_probability),
        ):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{flag} {value} is not a probability: give a value from 0 to 1.")
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
    output_dir: str | None = field(
        default=None, metadata={"help": "Required. Where checkpoints, logs and the model go."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow a non-empty output dir without checkpoints."}
    )
    do_train: bool = field(default=False, metadata={"help": "Train."})
    do_eval: bool = field(default=False, metadata={"help": "Evaluate every --eval_steps and at the end."})
    do_predict: bool = field(
        default=False,
        metadata={
            "help": "After training (or alone, on --model_name_or_path), evaluate the kept model on --test_split_name: "
            "test/... metrics, predictions/test/<set>/, and the model card's model-index."
        },
    )
    train_batch_size: int | None = field(default=None, metadata={"help": "Global training batch, over all hosts."})
    per_device_train_batch_size: int | None = field(
        default=None, metadata={"help": "Hugging Face spelling: global batch = this x number of devices."}
    )
    eval_batch_size: int | None = field(
        default=None, metadata={"help": "Global evaluation batch (default: training batch)."}
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per step, inside the step."})
    learning_rate: float = field(default=3e-5, metadata={"help": "Peak learning rate at --lr_reference_batch_size."})
    lr_scaling: str = field(default="none", metadata={"help": "Scale the LR with the batch: none, linear or sqrt."})
    lr_reference_batch_size: int | None = field(
        default=None, metadata={"help": "Global batch at which --learning_rate applies (needed with --lr_scaling)."}
    )
    lr_scheduler_type: str = field(
        default="linear",
        metadata={
            "help": "After the warmup: linear (decay to 0 at --num_train_steps) or constant (the peak); "
            "constant_with_warmup is the same as constant."
        },
    )
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup from 0 over this many steps (any schedule)."})
    num_train_steps: int = field(default=1000, metadata={"help": "Optimizer steps in the whole run."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    adam_mu_dtype: str = field(
        default="float32",
        metadata={
            "help": "Dtype of AdamW's first moment (optax's mu_dtype): float32 or bfloat16. optax keeps the "
            "second moment in the parameters' dtype (--param_dtype)."
        },
    )
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW decoupled weight decay (not on biases or LayerNorm)."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip gradients to this global norm (0: no clipping)."})
    label_smoothing_factor: float = field(default=0.0, metadata={"help": "Label smoothing."})
    seed: int = field(default=0, metadata={"help": "Seed for init, dropout and shuffling."})
    logging_steps: int = field(default=10, metadata={"help": "Write train metrics every this many steps."})
    eval_steps: int | None = field(
        default=None, metadata={"help": "Evaluate every this many steps (default: at the end)."}
    )
    save_steps: int | None = field(
        default=None,
        metadata={
            "help": f"Checkpoint every this many steps (default: every --eval_steps with --do_eval and --eval_steps, "
            f"else every {DEFAULT_SAVE_STEPS}); also at the last step and on SIGTERM."
        },
    )
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept."})
    resume_from_checkpoint: bool = field(
        default=True, metadata={"help": "Resume from the latest checkpoint in output_dir."}
    )
    predict_with_generate: bool = field(default=False, metadata={"help": "Greedy-decode in eval and compute WER/CER."})
    generation_max_length: int | None = field(
        default=None, metadata={"help": "New tokens per decode (default: max_label_length)."}
    )
    generation_num_beams: int = field(
        default=1, metadata={"help": "Beams per example in eval decoding (1: greedy), as transformers' num_beams."}
    )
    generation_length_penalty: float = field(
        default=1.0,
        metadata={"help": "With beams: a finished hypothesis scores sum_logprobs / new_tokens**this (transformers')."},
    )
    metric_for_best_model: str | None = field(
        default=None,
        metadata={
            "help": "The logged eval metric that picks the kept model, e.g. eval/wer_normalized (the mean over the "
            "eval sets; the default with --predict_with_generate, else eval/loss) or eval/<set>/wer. The "
            "exported model, model card and hub push are of the best evaluation so far; its checkpoint is "
            "never deleted by --save_total_limit."
        },
    )
    greater_is_better: bool | None = field(
        default=None,
        metadata={"help": "Whether a higher --metric_for_best_model is better (default: no for wer, cer and loss)."},
    )
    log_max_eval_predictions: int | None = field(
        default=None, metadata={"help": "Predictions written per eval (default: all)."}
    )
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard, wandb, 'tensorboard,wandb' or none."})
    wandb_project: str | None = field(default=None, metadata={"help": "Weights & Biases project (with wandb)."})
    wandb_entity: str | None = field(default=None, metadata={"help": "Weights & Biases entity (with wandb)."})
    run_name: str | None = field(default=None, metadata={"help": "Run name for logs (default: output_dir's name)."})
    run_description: str | None = field(
        default=None, metadata={"help": "Free text stored with the run in Weights & Biases (with wandb)."}
    )
    push_to_hub: bool = field(
        default=False, metadata={"help": "Push the exported model after each eval and at the end."}
    )
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository to push to."})
    hub_private_repo: bool = field(default=True, metadata={"help": "Create the hub repository private."})
    export_ctranslate2: str | None = field(
        default=None,
        metadata={
            "help": "Also write OUTPUT_DIR/ctranslate2/ for faster-whisper, quantized: float16, int8, int8_float16, "
            "float32, ... (needs ctranslate2 and torch)."
        },
    )
    dry_run: bool = field(default=False, metadata={"help": "Print the plan and the compiled step's memory, then exit."})
    dry_run_topology: str | None = field(
        default=None,
        metadata={"help": "With --dry_run: compile for a TPU slice (v4-8, v4-32, v4-64) from any machine."},
    )
    dry_run_compile: bool = field(
        default=True, metadata={"help": "With --dry_run: compile the train step to report its memory per device."}
    )

    def __post_init__(self):
        if self.adam_mu_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"--adam_mu_dtype {self.adam_mu_dtype!r} is not supported: use float32 or bfloat16.")
        if self.lr_scheduler_type not in ("linear", "constant", "constant_with_warmup"):
            raise ConfigError(
                f"--lr_scheduler_type {self.lr_scheduler_type!r} is not supported: use linear, constant or constant_with_warmup."
            )
        if self.lr_scaling not in ("none", "linear", "sqrt"):
            raise ConfigError(f"--lr_scaling {self.lr_scaling!r} is not supported: use none, linear or sqrt.")
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
        if not self.metric_for_best_model.startswith("eval/"):
            raise ConfigError(
                f"--metric_for_best_model {self.metric_for_best_model!r} is not an eval metric: give a name that "
                "evaluation logs, e.g. eval/wer_normalized, eval/loss or eval/<set>/wer."
            )
        if any(word in self.metric_for_best_model for word in ("wer", "cer")) and not self.predict_with_generate:
            raise ConfigError(
                f"--metric_for_best_model {self.metric_for_best_model} needs --predict_with_generate (WER and CER "
                "come from decoding): add it, or pick by eval/loss."
            )
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
    coordinator_address: str | None = field(
        default=None, metadata={"help": "host:port of process 0, off TPU pods (TPU pods find it themselves)."}
    )
    num_processes: int | None = field(
        default=None, metadata={"help": "Number of processes, with --coordinator_address."}
    )
    process_id: int | None = field(default=None, metadata={"help": "This process's index, with --coordinator_address."})
    fsdp_size: int = field(
        default=1,
        metadata={
            "help": "Devices that shard parameters and optimizer state (1: pure data parallel; -1: all devices)."
        },
    )
    distributed_timeout_s: int = field(default=300, metadata={"help": "Give up when a peer process stops answering."})


ARGUMENT_GROUPS = (ModelArguments, DataArguments, TrainingArguments, DistributedArguments)


def parse_arguments(argv: list[str] | None = None):
    """Flags to the four argument groups. Unknown flags are an argparse error (exit status 2)."""
    parser = HfArgumentParser(ARGUMENT_GROUPS, allow_abbrev=False)  # a typo must not silently match a flag
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
    data_args, train_args = groups[1], groups[2]
    for flag, value in (("--dataset_name", data_args.dataset_name), ("--output_dir", train_args.output_dir)):
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

SKIP_REASONS = (
    "undecodable",
    "empty_audio",
    "non_finite_audio",
    "too_short",
    "too_long",
    "empty_text",
    "too_many_tokens",
    "unknown_language",
    "unknown_task",
    "bad_timestamps",
)
# The flag to look at when every example is skipped for a reason.
SKIP_REASON_FLAGS = {
    "undecodable": "--audio_column_name",
    "empty_audio": "--audio_column_name",
    "non_finite_audio": "--audio_column_name",
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
class TextSettings:
    """What turns a transcript into decoder tokens (the layout is decoder_tokens')."""

    do_lower_case: bool
    do_remove_punctuation: bool
    max_label_length: int  # decoder positions from <|startoftranscript|> to the last text token
    language: str | None = "no"  # a Whisper code; None: an English-only model (no language token)
    task: str | None = "transcribe"  # None: an English-only model (no task token)
    language_column: str | None = None
    task_column: str | None = None
    timestamp_column: str | None = None
    timestamp_probability: float = 1.0
    prev_column: str | None = None
    prompt_probability: float = 1.0
    max_prev_length: int = 0  # decoder positions of <|startofprev|> + previous text; 0: no prompts
    seed: int = 0

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
    """An English-only (.en) Whisper: its generation config says so, or (without one) it has the .en
    vocabulary size. (Small test vocabularies with language tokens count as multilingual.)"""
    multilingual = getattr(generation_config, "is_multilingual", None)
    return not multilingual if multilingual is not None else config.vocab_size == ENGLISH_ONLY_VOCAB_SIZE


def prompt_language_and_task(tokenizer, language: str, task: str, *, english_only: bool):
    """(language, task) as the decoder prompt holds them: as given for a multilingual model; (None,
    None) for an English-only one, whose prompt <|startoftranscript|><|notimestamps|> has no language
    or task token (so any language but English, or translating, is an error there)."""
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
    """TextSettings of the training or the evaluation stream. Evaluation rows are plain text in
    their own language and task: no timestamps, no previous-text prompts."""
    prompts = train and data_args.prev_column_name is not None and data_args.prompt_probability > 0
    return TextSettings(
        do_lower_case=data_args.do_lower_case,
        do_remove_punctuation=data_args.do_remove_punctuation,
        max_label_length=data_args.max_label_length,
        language=language,
        task=task,
        language_column=data_args.language_column_name,
        task_column=data_args.task_column_name,
        timestamp_column=data_args.timestamp_column_name if train else None,
        timestamp_probability=data_args.timestamp_probability,
        prev_column=data_args.prev_column_name if prompts else None,
        prompt_probability=data_args.prompt_probability,
        max_prev_length=data_args.max_prev_length if prompts else 0,
        seed=seed,
    )


def training_tokenizer(tokenizer, bpe_dropout: float):
    """The tokenizer of the training labels: a copy whose BPE model drops each merge with
    probability `bpe_dropout` (tokenizers' own BPE dropout), so evaluation and decoding, which use
    `tokenizer` itself, never see it. Special and timestamp tokens are added tokens, never merged,
    so they are unaffected. The dropout draws from tokenizers' own unseeded generator: a resumed
    run tokenizes at the same rate, not into the same pieces."""
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
    """Ids of whole tokens such as <|no|> or <|1.52|>, each one id; a token the tokenizer does not
    have is a ConfigError (convert_tokens_to_ids alone would quietly return the unknown token)."""
    ids = tokenizer.convert_tokens_to_ids(tokens)
    for token, token_id in zip(tokens, ids):
        if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != token:
            raise ConfigError(f"The tokenizer has no {token} token; check --language / --tokenizer_name.")
    return ids


def decoder_prefix(tokenizer, language: str | None, task: str | None, *, timestamps: bool) -> list[int]:
    """The forced start of every transcript: <|startoftranscript|> <|lang|> <|task|>, then
    <|notimestamps|> unless the transcript has timestamps. language and task None (English-only
    models, whose vocabulary has no language tokens): <|startoftranscript|> <|notimestamps|>.
    The one place for this rule; computed per row, never through the tokenizer's prefix state."""
    tokens = ["<|startoftranscript|>"]
    tokens += [f"<|{language}|>"] if language is not None else []
    tokens += [f"<|{task}|>"] if task is not None else []
    tokens += [] if timestamps else ["<|notimestamps|>"]
    return special_token_ids(tokenizer, tokens)


def parse_timestamped_text(text: str, duration_s: float) -> list[tuple[float, str, float]] | None:
    """'<|0.00|> Hei.<|1.52|><|1.80|> Takk.<|2.60|>' -> [(0.0, ' Hei.', 1.52), (1.8, ' Takk.', 2.6)].

    None if malformed: text outside a (start, end) pair, an odd number of timestamps, a value not
    written with two decimals or off
    the 0.02 s grid, past MAX_TIMESTAMP_S or past the audio (one grid step of slack for rounding),
    or a timestamp before the one preceding it."""
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


def normalise_segment(segment: str, settings: TextSettings) -> str:
    """normalise_transcript for a timestamped segment, keeping its leading space (part of
    Whisper's segment tokens: ' Hei' is one token, 'Hei' another)."""
    if not (settings.do_lower_case or settings.do_remove_punctuation):
        return segment
    text = normalise_transcript(segment, settings)
    return " " + text if segment.startswith(" ") and text else text


def timestamped_text_ids(tokenizer, segments: list[tuple[float, str, float]], settings: TextSettings) -> list[int]:
    """<|start|> text <|end|> per segment. Timestamps are encoded as the single ids
    special_token_ids finds, and the text between them separately, so this does not rely on the
    tokenizer's handling of timestamp tokens inside text (some tokenizers split <|1.52|> into pieces)."""
    ids = []
    for start_s, segment, end_s in segments:
        start, end = special_token_ids(tokenizer, [f"<|{start_s:.2f}|>", f"<|{end_s:.2f}|>"])
        ids += [start, *tokenizer(normalise_segment(segment, settings), add_special_tokens=False).input_ids, end]
    return ids


def previous_text_prompt(tokenizer, text: str, max_prev_length: int) -> list[int]:
    """<|startofprev|> and the previous text's last max_prev_length - 1 tokens (cut from the left:
    the text nearest the segment matters most), with the leading space transformers'
    get_prompt_ids gives it."""
    ids = tokenizer(" " + text.strip(), add_special_tokens=False).input_ids
    return special_token_ids(tokenizer, ["<|startofprev|>"]) + ids[max(0, len(ids) - (max_prev_length - 1)) :]


def decoder_tokens(prefix: list[int], text_ids: list[int], eot_id: int, prompt: list[int] = ()) -> list[int]:
    """A row's whole token sequence: [prompt] prefix text <|endoftext|>, where prompt is
    <|startofprev|> + previous text (or nothing) and prefix decoder_prefix's. The model reads all
    but the last token and predicts all but the first; collate gives the first len(prompt) label
    positions (those whose input is a prompt token, predicting the prompt's next token or
    <|startoftranscript|>) no loss, so a row's loss-bearing labels are the same with or without a prompt:
    <|lang|> <|task|> [<|notimestamps|>] text <|endoftext|>."""
    return [*prompt, *prefix, *text_ids, eot_id]


def example_draw(seed: int, epoch: int, example_key: str, purpose: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, epoch, example, purpose): per-example random
    choices that a resumed run, or another host, makes the same way without shared RNG state."""
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


def resolve_language_and_task(row: dict, settings: TextSettings) -> tuple[str | None, str | None, str | None]:
    """(language, task, skip reason) of a row: its own columns' values, else the defaults."""
    language, task = settings.language, settings.task
    value = row.get(settings.language_column) if settings.language_column else None
    if value is not None and str(value).strip():
        try:
            code = language_code(str(value))
        except ConfigError:
            return None, None, "unknown_language"
        if settings.language is None and code != "en":  # an English-only model has no language tokens
            return None, None, "unknown_language"
        language = None if settings.language is None else code
    value = row.get(settings.task_column) if settings.task_column else None
    if value is not None and str(value).strip():
        value = str(value).strip().lower().removeprefix("<|").removesuffix("|>")
        if value not in ("transcribe", "translate") or (settings.task is None and value != "transcribe"):
            return None, None, "unknown_task"
        task = None if settings.task is None else value
    return language, task, None


def prepare_example(
    row: dict,
    *,
    tokenizer,
    audio_settings: AudioSettings,
    text_settings: TextSettings,
    label_tokenizer=None,
    audio_column: str = "audio",
    text_column: str = "text",
    id_column: str = "id",
    source_column: str | None = None,
):
    """One dataset row -> (example dict, None) or (None, skip reason). Never raises on bad data.
    The column names default to those of --audio_column_name, --text_column_name and --id_column_name.

    `label_tokenizer` (default `tokenizer`) tokenizes the transcript and previous text: the
    training stream passes training_tokenizer's BPE-dropout copy. The example carries `tokens`
    (decoder_tokens' layout), `prompt_length` (its leading positions without loss) and
    `decoding_prefix` (the forced prefix an evaluation decodes this row with: its own language and
    task, no timestamps)."""
    settings, label_tokenizer = text_settings, label_tokenizer or tokenizer
    try:
        audio = decode_audio(row[audio_column], audio_settings.sampling_rate)
    except Exception:  # any undecodable file is one counted skip, never a crash
        return None, "undecodable"
    if audio.size == 0:
        return None, "empty_audio"
    if not np.isfinite(audio).all():
        return None, "non_finite_audio"
    duration_s = audio.size / audio_settings.sampling_rate
    if duration_s < audio_settings.min_duration_s:
        return None, "too_short"
    if duration_s > audio_settings.max_duration_s:
        return None, "too_long"
    language, task, reason = resolve_language_and_task(row, settings)
    if reason:
        return None, reason
    try:
        decoding_prefix = decoder_prefix(tokenizer, language, task, timestamps=False)
    except ConfigError:  # a language this tokenizer has no token for
        return None, "unknown_language"
    text = normalise_transcript(row.get(text_column) or "", settings)
    example_id = row.get(id_column)
    # Without an id column the transcript stands in for the example in the seeded draws.
    example_key = str(example_id) if example_id is not None else text
    epoch = int(row.get(EPOCH_FIELD, 0))
    timestamped = row.get(settings.timestamp_column) if settings.timestamp_column else None
    use_timestamps = bool(timestamped) and (
        example_draw(settings.seed, epoch, example_key, "timestamps") < settings.timestamp_probability
    )
    if use_timestamps:
        segments = parse_timestamped_text(timestamped, duration_s)
        if segments is None:
            return None, "bad_timestamps"
        try:
            text_ids = timestamped_text_ids(label_tokenizer, segments, settings)
        except ConfigError:  # a timestamp token this tokenizer lacks
            return None, "bad_timestamps"
        text = "".join(segment for _, segment, _ in segments).strip()
        prefix = decoder_prefix(tokenizer, language, task, timestamps=True)
    else:
        text_ids = label_tokenizer(text, add_special_tokens=False).input_ids
        prefix = decoding_prefix
    if not text:
        return None, "empty_text"
    previous = row.get(settings.prev_column) if settings.prev_column else None
    previous = normalise_transcript(previous, settings) if previous else ""
    prompt = (
        previous_text_prompt(label_tokenizer, previous, settings.max_prev_length)
        if previous and example_draw(settings.seed, epoch, example_key, "prompt") < settings.prompt_probability
        else []
    )
    tokens = decoder_tokens(prefix, text_ids, tokenizer.convert_tokens_to_ids("<|endoftext|>"), prompt)
    if len(tokens) - len(prompt) - 1 > settings.max_label_length:
        return None, "too_many_tokens"
    return {
        "audio": audio[: audio_settings.n_samples],
        "tokens": np.asarray(tokens, np.int32),
        "prompt_length": len(prompt),
        "decoding_prefix": np.asarray(decoding_prefix, np.int32),
        "id": "" if example_id is None else str(example_id),
        "text": text,
        "language": language or "en",  # for the per-language metrics; English-only models: en
        "source": None if row.get(source_column) is None else str(row[source_column]),  # per-source metrics
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
    """Pad to fixed shapes so that no batch recompiles a step. Rows past len(examples) are
    padding: silence, and labels all -100, so they carry no loss.

    Every row is max_prev_length + max_label_length decoder positions, prompt or not; a row's
    first prompt_length labels are -100 (see decoder_tokens). With default_prompt_ids, the batch
    also carries `prompt_ids` (batch, len(default_prompt_ids)): each row's forced decoding prefix
    (<|startoftranscript|> <|lang|> <|task|> <|notimestamps|>), the default's on padding rows."""
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
        prompt_ids = np.tile(np.asarray(default_prompt_ids, np.int32), (batch_size, 1))
        for row, example in enumerate(examples):
            prompt_ids[row] = example["decoding_prefix"]
        batch["prompt_ids"] = prompt_ids
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
    """--<kind>_split_name and --<kind>_dataset_name as EvalSets: one dataset serves every split, or one
    dataset per split; without --<kind>_dataset_name every split is read from --dataset_name."""
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


def load_source(
    data_args: DataArguments,
    split: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
    seed: int = 0,
    shuffle: bool = False,
    epoch: int = 0,
    max_samples: int | None = None,
    dataset_name: str | None = None,
):
    """The rows of `split` that host `process_index` of `process_count` reads (default: a run on one
    host, unshuffled, epoch 0, all rows), as a datasets IterableDataset with a state_dict.
    `dataset_name` (default --dataset_name) is an evaluation set's own dataset(s); a name also in
    --dataset_name keeps its --dataset_config_name."""
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
        columns = list(source.column_names or [])
        for flag, column in (
            ("--audio_column_name", data_args.audio_column_name),
            ("--text_column_name", data_args.text_column_name),
        ):
            if column not in columns:
                raise ConfigError(
                    f"{flag} {column!r} is not a column of {name!r} (split {split!r}); it has: {', '.join(columns)}."
                )
        # Per-row language and task apply to every split; timestamps and prompts to training only.
        optional = [("--language_column_name", data_args.language_column_name, True)]
        optional += [("--task_column_name", data_args.task_column_name, True)]
        optional += [("--timestamp_column_name", data_args.timestamp_column_name, split == data_args.train_split_name)]
        optional += [("--prev_column_name", data_args.prev_column_name, split == data_args.train_split_name)]
        evaluating = split != data_args.train_split_name or dataset_name is not None
        source_column = data_args.source_column_name or ("source" if evaluating and "source" in columns else None)
        optional += [("--source_column_name", source_column, evaluating)]
        for flag, column, needed in optional:
            if column and needed and column not in columns:
                raise ConfigError(
                    f"{flag} {column!r} is not a column of {name!r} (split {split!r}); it has: {', '.join(columns)}."
                )
        source = source.cast_column(data_args.audio_column_name, datasets.Audio(decode=False))
        wanted = (data_args.audio_column_name, data_args.text_column_name, data_args.id_column_name)
        keep = list(dict.fromkeys(c for c in wanted + tuple(column for _, column, _ in optional) if c in columns))
        sources.append(source.select_columns(keep))
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


class SpeechBatches:
    """This host's stream of fixed-shape batches with a state a checkpoint can store.

    A reader thread pulls rows (remembering the source's state after each row), a thread pool
    decodes them in order, and finished batches wait in a bounded queue. The state of a batch is
    the source state after its last row (with a shuffle buffer, ShuffleBuffer's), so a restored
    iterator continues with the next batch, exactly as without the interruption. A failed read is
    retried from the state after the last row read (see _rows), so a flaky network loses and
    repeats nothing.
    """

    def __init__(
        self,
        make_source,
        prepare,
        *,
        batch_size: int,
        collate_fn,
        repeat: bool,
        num_workers: int,
        prefetch_batches: int,
        state: dict | None = None,
        read_retries: int = 10,
        read_retry_wait_s: float = 1.0,
    ):
        self.make_source = make_source  # epoch -> IterableDataset
        self.prepare = prepare
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.repeat = repeat
        self.num_workers = max(1, num_workers)
        self.prefetch_batches = max(1, prefetch_batches)
        self.read_retries = read_retries
        self.read_retry_wait_s = read_retry_wait_s
        state = state or {}
        self.epoch = state.get("epoch", 0)
        self.source_state = state.get("source")
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
        """(row, epoch, source state after the row), epoch after epoch when repeating.

        datasets and huggingface_hub retry a dropped connection within one file read, but not every
        request (opening the dataset, which happens every epoch and every evaluation, is not
        retried), so a read that still fails reopens the source at the state after the last row
        read, after a doubling wait: nothing is lost or read twice. Only `read_retries` failures
        in a row stop the run.
        """
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
    """Whisper's log-mel spectrogram on the device: (batch, samples) -> (batch, n_mels, samples // hop).

    The same arithmetic as transformers' WhisperFeatureExtractor: centred STFT with reflect
    padding and a periodic Hann window, power spectrum, slaney mel filters, log10 clamped at
    1e-10, the last frame dropped, floor at (max - 8) per example, then (x + 4) / 4.
    """
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
# Whisper in flax.linen, parameter for parameter the same model as transformers'
# WhisperForConditionalGeneration (pre-LayerNorm blocks, eps 1e-5, exact-erf GELU, k_proj without
# bias, queries scaled by head_dim**-0.5, output projection tied to the token embedding).
# Parameters stay float32; `dtype` is the compute dtype; logits and the loss are float32.


ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which transformers' Whisper uses


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
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{name: getattr(config, name) for name in names})


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's fixed encoder positions, with transformers' float32 products (np.log would make them
    float64). exp/sin are rounded from float64; torch's float32 kernels are within an ulp of that, so
    the table matches transformers' to ~1e-7 for short tables, not bit for bit."""
    increment = np.float32(-math.log(max_timescale) / (channels // 2 - 1))
    inv_timescales = np.exp(np.float64(increment * np.arange(channels // 2, dtype=np.float32))).astype(np.float32)
    scaled_time = np.float64(np.arange(length, dtype=np.float32)[:, None] * inv_timescales[None, :])
    return np.concatenate([np.sin(scaled_time), np.cos(scaled_time)], axis=1).astype(np.float32)


# The mesh's two axes (see make_mesh); a batch is split over both, parameters over "fsdp".
BATCH_AXES = ("data", "fsdp")


def keep_batch_sharded(x):
    """Pin an activation's leading (batch) axis to the mesh's batch axes, when the caller set one
    (train_step and eval_step do). Under FSDP the weights are split over "fsdp" along a feature
    axis, and without this pin XLA may follow them and move activations to a feature-split layout
    with all-to-alls (whisper-tiny, FSDP on a v4-32: 12.8 GiB per chip at 32 examples, 7.0 pinned;
    bench_scream.py tpu). Pinned, XLA gathers each weight instead, which is what FSDP means."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or tuple(mesh.axis_names) != BATCH_AXES:
        return x
    return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))


def attention(query, key, value, *, mask=None, is_causal=False, dropout_rate=0.0, dropout_rng=None):
    """Scaled dot-product attention over (batch, time, heads, head_dim).

    Long unmasked query sequences (the encoder's) go through blocked_attention; the rest through
    jax.nn.dot_product_attention (fused kernels on GPU), unless attention dropout is active, which
    that API does not offer.
    """
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
    """Queries per block for blocked_attention: a divisor of `length` from 128 down to 64 (125 for
    1500 positions, 75 for the demo's 150), or None when the queries fit one block (or no such
    divisor exists) and are attended at once."""
    if length <= 128:
        return None
    return next((size for size in range(128, 63, -1) if length % size == 0), None)


def cpu_query_block_size(length: int) -> int:
    """Queries per block on CPU: the largest divisor of `length` up to 768 (750 of the encoder's
    1500 positions). Per example, a (heads, 750, 1500) float32 block of scores is 27 MB, and the
    fewer, larger blocks keep XLA:CPU's batched matmuls busy: measured fastest of 125-1500."""
    return next(size for size in range(min(length, 768), 0, -1) if length % size == 0)


def blocked_attention(query, key, value, *, scale: float, block: int):
    """Unmasked attention one block of queries at a time, so the (batch, heads, T, S) scores
    (4 * batch * heads * 1500^2 bytes per layer) never exist at once, nor are they stored for the
    backward pass.

    On CPU: one example at a time, with flash attention's backward pass (example_flash_attention,
    cpu_query_block_size). Elsewhere each step takes a `block` of queries for the whole batch, big
    matmuls for the MXUs, its scores recomputed in the backward pass (query_block_attention)."""
    cpu_block = cpu_query_block_size(query.shape[1])
    return jax.lax.platform_dependent(
        query,
        key,
        value,
        cpu=lambda q, k, v: jax.lax.map(lambda qkv: example_flash_attention(*qkv, scale, cpu_block), (q, k, v)),
        default=functools.partial(query_block_attention, scale=scale, block=block),
    )


def query_block_attention(query, key, value, *, scale: float, block: int):
    batch, length, heads, head_dim = query.shape
    key, value = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)  # (B, heads, S, head_dim)

    def attend(query_block):  # (B, block, heads, head_dim)
        scores = jnp.einsum("bqhd,bhkd->bhqk", query_block, key, preferred_element_type=jnp.float32) * scale
        weights = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
        return jnp.einsum("bhqk,bhkd->bqhd", weights, value)

    blocks = query.reshape(batch, length // block, block, heads, head_dim).swapaxes(0, 1)  # (blocks, B, block, ...)
    out = jax.lax.map(jax.checkpoint(attend), blocks)
    return out.swapaxes(0, 1).reshape(query.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def example_flash_attention(query, key, value, scale: float, block: int):
    """One example's attention, `block` queries at a time: query (T, heads, head_dim), key and
    value (S, heads, head_dim). The forward pass keeps only the output and each query's
    log-sum-exp; the backward pass recomputes a block's probabilities from them and takes the
    gradients of all three inputs in one sweep (FlashAttention's backward), instead of
    recomputing the forward and differentiating the softmax."""
    return example_flash_forward(query, key, value, scale, block)[0]


def example_flash_forward(query, key, value, scale: float, block: int):
    key_t, value_t = key.transpose(1, 0, 2), value.transpose(1, 0, 2)  # (heads, S, head_dim)

    def attend(query_block):  # (block, heads, head_dim)
        scores = jnp.einsum("qhd,hkd->hqk", query_block, key_t, preferred_element_type=jnp.float32) * scale
        top = scores.max(-1, keepdims=True)
        exp = jnp.exp(scores - top)
        total = exp.sum(-1, keepdims=True)
        out = jnp.einsum("hqk,hkd->qhd", (exp / total).astype(value.dtype), value_t)
        return out, (top + jnp.log(total))[..., 0]  # (block, heads, head_dim), (heads, block)

    out, logsumexp = jax.lax.map(attend, query.reshape(-1, block, *query.shape[1:]))
    out = out.reshape(query.shape)
    return out, (query, key, value, out, logsumexp)


def example_flash_backward(scale: float, block: int, residuals, d_out):
    query, key, value, out, logsumexp = residuals
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    key_t, value_t = f32(key).transpose(1, 0, 2), f32(value).transpose(1, 0, 2)  # (heads, S, head_dim)
    # The softmax's backward needs sum_d(d_out * out) per query: once here, not per block.
    d_out = f32(d_out)
    delta = (d_out * f32(out)).sum(-1)  # (T, heads)

    def sweep(carry, block_inputs):
        d_key, d_value = carry  # (heads, S, head_dim): summed over the query blocks
        query_block, d_out_block, logsumexp_block, delta_block = block_inputs
        scores = jnp.einsum("qhd,hkd->hqk", f32(query_block), key_t) * scale
        probs = jnp.exp(scores - logsumexp_block[..., None])  # (heads, block, S)
        d_value = d_value + jnp.einsum("hqk,qhd->hkd", probs, d_out_block)
        d_probs = jnp.einsum("qhd,hkd->hqk", d_out_block, value_t)
        d_scores = probs * (d_probs - delta_block.T[..., None]) * scale
        d_key = d_key + jnp.einsum("hqk,qhd->hkd", d_scores, f32(query_block))
        return (d_key, d_value), jnp.einsum("hqk,hkd->qhd", d_scores, key_t)

    blocks = lambda x: x.reshape(-1, block, *x.shape[1:])  # noqa: E731
    zeros = jnp.zeros_like(key_t)
    (d_key, d_value), d_query = jax.lax.scan(
        sweep, (zeros, zeros), (blocks(query), blocks(d_out), logsumexp, blocks(delta))
    )
    return (
        d_query.reshape(query.shape).astype(query.dtype),
        d_key.transpose(1, 0, 2).astype(key.dtype),
        d_value.transpose(1, 0, 2).astype(value.dtype),
    )


example_flash_attention.defvjp(example_flash_forward, example_flash_backward)


class Attention(nn.Module):
    """Multi-head attention with transformers' projection names; methods for cached decoding."""

    d_model: int
    num_heads: int
    dropout_rate: float
    init_std: float
    dtype: Any
    deterministic: bool

    def setup(self):
        dense = functools.partial(
            nn.Dense,
            self.d_model,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.initializers.normal(self.init_std),
        )
        self.q_proj = dense()
        self.k_proj = dense(use_bias=False)
        self.v_proj = dense()
        self.out_proj = dense()

    def heads(self, x):  # (B, T, d_model) -> (B, T, heads, head_dim)
        return keep_batch_sharded(x.reshape(x.shape[:2] + (self.num_heads, self.d_model // self.num_heads)))

    def query(self, x):
        return self.heads(self.q_proj(x))

    def key_value(self, x):
        return self.heads(self.k_proj(x)), self.heads(self.v_proj(x))

    def attend(self, query, key, value, *, mask=None, is_causal=False):
        rng = None if self.deterministic or self.dropout_rate == 0.0 else self.make_rng("dropout")
        out = attention(
            query, key, value, mask=mask, is_causal=is_causal, dropout_rate=self.dropout_rate, dropout_rng=rng
        )
        return self.out_proj(keep_batch_sharded(out.reshape(out.shape[:2] + (self.d_model,))))

    def __call__(self, x, source=None, *, is_causal=False):
        key, value = self.key_value(x if source is None else source)
        return self.attend(self.query(x), key, value, is_causal=is_causal)


def feed_forward(x, ffn_dim: int, dims: WhisperDims, dtype, deterministic: bool):
    """fc1 -> activation -> dropout -> fc2, as submodules of the calling layer (transformers' names)."""
    dense = functools.partial(
        nn.Dense, dtype=dtype, param_dtype=jnp.float32, kernel_init=nn.initializers.normal(dims.init_std)
    )
    x = ACTIVATIONS[dims.activation_function](keep_batch_sharded(dense(ffn_dim, name="fc1")(x)))
    x = nn.Dropout(dims.activation_dropout)(x, deterministic=deterministic)
    return dense(dims.d_model, name="fc2")(x)


def layer_norm(name: str, dtype):
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype, param_dtype=jnp.float32, name=name)


class EncoderLayer(nn.Module):
    dims: WhisperDims
    dtype: Any
    deterministic: bool

    @nn.compact
    def __call__(self, hidden, _unused=None):  # (B, S, d) -> (B, S, d); scan-shaped signature
        d = self.dims
        drop = functools.partial(nn.Dropout(d.dropout), deterministic=self.deterministic)
        attn = Attention(
            d.d_model,
            d.encoder_attention_heads,
            d.attention_dropout,
            d.init_std,
            self.dtype,
            self.deterministic,
            name="self_attn",
        )
        hidden = hidden + drop(attn(layer_norm("self_attn_layer_norm", self.dtype)(hidden)))
        x = layer_norm("final_layer_norm", self.dtype)(hidden)
        hidden = hidden + drop(feed_forward(x, d.encoder_ffn_dim, d, self.dtype, self.deterministic))
        return keep_batch_sharded(hidden), None


def beams_cross_attention(cross_attn: Attention, x, cross_key, cross_value):
    """Cross-attention of x (B*N, T, d), N beams per row, to keys and values kept once per row
    (B, S, heads, head_dim): a row's beams are N*T queries of its one copy, the same per-query
    softmax as N copies without reading N copies at every decoding step. N = 1 outside beam search."""
    query = cross_attn.query(x)
    rows, beams = cross_key.shape[0], x.shape[0] // cross_key.shape[0]
    query = query.reshape((rows, beams * x.shape[1]) + query.shape[2:])
    return cross_attn.attend(query, cross_key, cross_value).reshape(x.shape)


class DecoderLayer(nn.Module):
    """A decoder block. With `cache` (this layer's keys/values), it decodes incrementally:
    new keys/values are written at `position`; cross-attention keys/values are computed when
    `encoder_hidden` is given (the prompt step) and read from the cache otherwise."""

    dims: WhisperDims
    dtype: Any
    deterministic: bool

    @nn.compact
    def __call__(self, hidden, encoder_hidden, cache, position):
        d = self.dims
        drop = functools.partial(nn.Dropout(d.dropout), deterministic=self.deterministic)
        attention_args = (
            d.d_model,
            d.decoder_attention_heads,
            d.attention_dropout,
            d.init_std,
            self.dtype,
            self.deterministic,
        )
        self_attn = Attention(*attention_args, name="self_attn")
        cross_attn = Attention(*attention_args, name="encoder_attn")

        x = layer_norm("self_attn_layer_norm", self.dtype)(hidden)
        query, key, value = self_attn.query(x), *self_attn.key_value(x)
        if cache is None:
            out = self_attn.attend(query, key, value, is_causal=True)
        else:
            key = jax.lax.dynamic_update_slice_in_dim(
                cache["self_k"], key.astype(cache["self_k"].dtype), position, axis=1
            )
            value = jax.lax.dynamic_update_slice_in_dim(
                cache["self_v"], value.astype(cache["self_v"].dtype), position, axis=1
            )
            query_positions = position + jnp.arange(x.shape[1])
            visible = jnp.arange(key.shape[1])[None, :] <= query_positions[:, None]  # (T_new, T_cache)
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


def stack_of_layers(layer_cls, *, num_layers: int, scan: bool, remat: str, in_axes, name: str, **kwargs):
    """Layers named `layers_{i}`, or one `layers` scanned over a leading layer axis."""
    if remat != "none":
        layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
    if scan:
        scanned = nn.scan(
            layer_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=in_axes,
            length=num_layers,
            metadata_params={nn.PARTITION_NAME: None},
        )
        return [scanned(name=name, **kwargs)]
    return [layer_cls(name=f"{name}_{i}", **kwargs) for i in range(num_layers)]


class Encoder(nn.Module):
    dims: WhisperDims
    dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: str = "none"

    @nn.compact
    def __call__(self, input_features, train: bool = False):  # (B, n_mels, 2S) -> (B, S, d)
        d = self.dims
        conv = functools.partial(
            nn.Conv,
            d.d_model,
            kernel_size=(3,),
            padding=((1, 1),),
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.initializers.normal(d.init_std),
        )
        gelu = ACTIVATIONS["gelu"]  # the stem always uses exact GELU, whatever the config says
        x = input_features.transpose(0, 2, 1).astype(self.dtype)  # (B, 2S, n_mels)
        x = gelu(conv(name="conv1")(x))
        x = gelu(conv(strides=(2,), name="conv2")(x))  # (B, S, d)
        embed_positions = nn.Embed(
            d.max_source_positions,
            d.d_model,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            embedding_init=lambda *_: jnp.asarray(sinusoids(d.max_source_positions, d.d_model)),
            name="embed_positions",
        )
        x = x + jax.lax.stop_gradient(embed_positions(jnp.arange(d.max_source_positions)))  # fixed, not trained
        x = keep_batch_sharded(nn.Dropout(d.dropout)(x, deterministic=not train))
        layers = stack_of_layers(
            EncoderLayer,
            num_layers=d.encoder_layers,
            scan=self.scan_layers,
            remat=self.remat,
            in_axes=(nn.broadcast,),
            name="layers",
            dims=d,
            dtype=self.dtype,
            deterministic=not train,
        )
        for layer in layers:
            x, _ = layer(x, None)
        return keep_batch_sharded(layer_norm("layer_norm", self.dtype)(x))


class Decoder(nn.Module):
    dims: WhisperDims
    dtype: Any = jnp.float32
    scan_layers: bool = False
    remat: str = "none"

    @nn.compact
    def __call__(self, input_ids, encoder_hidden, cache=None, position=0, train: bool = False):
        """(B, T) ids -> (B, T, vocab) float32 logits, and the updated cache (or None)."""
        d = self.dims

        def token_init(key, shape, dtype=jnp.float32):  # transformers zeroes the padding_idx row
            table = nn.initializers.normal(d.init_std)(key, shape, dtype)
            return table if d.pad_token_id is None else table.at[d.pad_token_id].set(0.0)

        embed_tokens = nn.Embed(
            d.vocab_size,
            d.d_model,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            embedding_init=token_init,
            name="embed_tokens",
        )
        embed_positions = nn.Embed(
            d.max_target_positions,
            d.d_model,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            embedding_init=nn.initializers.normal(d.init_std),
            name="embed_positions",
        )
        # No sqrt(d_model) factor even with config.scale_embedding: transformers' WhisperDecoder
        # reads that flag but never applies it (checked in transformers 5.23).
        positions = position + jnp.arange(input_ids.shape[1])
        x = embed_tokens(input_ids) + embed_positions(positions)[None]
        x = keep_batch_sharded(nn.Dropout(d.dropout)(x, deterministic=not train))
        layers = stack_of_layers(
            DecoderLayer,
            num_layers=d.decoder_layers,
            scan=self.scan_layers,
            remat=self.remat,
            in_axes=(nn.broadcast, 0, nn.broadcast),
            name="layers",
            dims=d,
            dtype=self.dtype,
            deterministic=not train,
        )
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
            # A decoding step: the cross-attention keys and values are the prompt step's. Passing the
            # input's own arrays on (not the layers' restacked copies) lets XLA keep them in place
            # through generate's while loop; restacked, they were copied at every step (measured on
            # whisper-base, 3 rows of 30 s: a decoding step took 78 ms with that copy, 41 ms without).
            new_cache = {**new_cache, "cross_k": cache["cross_k"], "cross_v": cache["cross_v"]}
        x = layer_norm("layer_norm", self.dtype)(x)
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
    heads, head_dim = dims.decoder_attention_heads, dims.d_model // dims.decoder_attention_heads
    self_shape = (dims.decoder_layers, batch_size, max_length, heads, head_dim)
    cross_shape = (dims.decoder_layers, batch_size, dims.max_source_positions, heads, head_dim)
    return {
        "self_k": jnp.zeros(self_shape, dtype),
        "self_v": jnp.zeros(self_shape, dtype),
        "cross_k": jnp.zeros(cross_shape, dtype),
        "cross_v": jnp.zeros(cross_shape, dtype),
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
    """(always, at_begin): (vocab,) masks of the tokens suppressed at every step, and at the first
    generated position (begin_suppress_tokens on top of suppress_tokens), as transformers'
    SuppressTokens- and SuppressTokensAtBeginLogitsProcessor do."""
    always = (
        jnp.zeros(vocab_size, bool)
        .at[jnp.asarray(settings.suppress_tokens, jnp.int32)]
        .set(len(settings.suppress_tokens) > 0)
    )
    at_begin = always.at[jnp.asarray(settings.begin_suppress_tokens, jnp.int32)].set(
        len(settings.begin_suppress_tokens) > 0
    )
    return always, at_begin


def generate(model: Whisper, params, input_features, prompt_ids, settings: DecodingSettings):
    """Greedy decoding (settings.num_beams == 1) or beam search, with a key/value cache and static
    shapes (jit it with model and settings static).

    prompt_ids: (B, P) int32, each row's forced prefix (P == settings.prompt_length).
    Returns (B, P + max_new_tokens) ids: the prompt, the generated tokens (of the best hypothesis)
    up to and including <|endoftext|>, then pad. Stops early once every row has ended.
    """
    encoder_hidden = model.apply({"params": params}, input_features, method=Whisper.encode)
    return generate_from_encoded(model, params, encoder_hidden, prompt_ids, settings)


def generate_from_encoded(model: Whisper, params, encoder_hidden, prompt_ids, settings: DecodingSettings):
    """generate() after the encoder: from its output (B, frames, d_model), so that one encoder pass
    serves several decodings (greedy and beam search of the same audio, as the tests compare them)."""
    batch_size, prompt_length = prompt_ids.shape
    if settings.num_beams < 1:
        raise ValueError(f"settings.num_beams is {settings.num_beams}: 1 (greedy) or more")
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
    """generate(num_beams=N) as transformers 5.23's GenerationMixin._beam_search does it, step for
    step: the same top-2N candidates, the same -1e9 bookkeeping, the same finished-hypothesis
    scores (sum of log-probs / generated_length**length_penalty, the prompt not counted) and the
    same early-stopping heuristic, so ties aside it picks the same hypothesis. first_logits are
    the prompt's (B, vocab); the cache holds B rows; its self-attention part is repeated here to B*N, one row per beam."""
    batch_size, prompt_length = prompt_ids.shape
    beams, vocab = settings.num_beams, model.dims.vocab_size
    total_length = prompt_length + settings.max_new_tokens
    candidates = 2 * beams  # their beams_to_keep: max(2, 1 + number of eos ids) * num_beams, one eos id
    always, at_begin = suppression_masks(settings, vocab)
    early_stopping = settings.early_stopping
    # generated_length**length_penalty for lengths 1..max_new_tokens, in Python floats as theirs is
    # (an int ** a float), then float32 as torch divides a float32 tensor by it.
    penalties = jnp.asarray(
        [float(n) ** settings.length_penalty for n in range(1, settings.max_new_tokens + 1)], jnp.float32
    )
    top_beams = jnp.arange(candidates) < beams  # their top_num_beam_mask
    rows = jnp.arange(batch_size)[:, None]

    def gather(x, index):  # x (B, K, ...), index (B, M) -> (B, M, ...): their _gather_beams
        return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)

    def penalised(scores, generated_length):
        return scores / penalties[generated_length - 1]

    def keep_going(carry):
        position, is_open, finished, all_hit = carry[0], carry[5], carry[4], carry[8]
        return (position < total_length) & is_open.any() & ~(finished.all() & (early_stopping is True)) & ~all_hit

    def step(carry):
        position, sequences, scores, best, finished, is_open, cache, next_logits, _ = carry
        best_sequences, best_scores = best
        # b. log-probs, then the suppressions (their logits processors run on log-probs), plus the beam's score
        log_probs = jax.nn.log_softmax(next_logits, axis=-1)  # (B*N, vocab)
        log_probs = jnp.where(jnp.where(position == prompt_length, at_begin, always), -jnp.inf, log_probs)
        totals = log_probs.reshape(batch_size, beams, vocab) + scores[:, :, None]
        # c. the top 2N continuations over all beams of a row
        top_scores, top_index = jax.lax.top_k(totals.reshape(batch_size, beams * vocab), candidates)  # (B, 2N)
        source, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
        top_sequences = gather(sequences, source)  # (B, 2N, T)
        top_sequences = jnp.where(jnp.arange(total_length) == position, token[:, :, None], top_sequences)
        # d. which of them end: <|endoftext|> or max_length (their EosTokenCriteria, MaxLengthCriteria)
        hits = (token == settings.eos_token_id) | (position + 1 >= total_length)
        # e. the best N that go on
        running_scores = top_scores + hits.astype(jnp.float32) * BEAM_NEG
        scores, keep = jax.lax.top_k(running_scores, beams)  # (B, N)
        sequences, beam_of = gather(top_sequences, keep), gather(source, keep)
        # f. the finished set: the top N candidates that just ended, if they beat the worst kept
        candidate_scores = penalised(top_scores, position + 1 - prompt_length)
        full = finished.all(axis=1, keepdims=True) & (early_stopping is True)
        candidate_scores += full.astype(jnp.float32) * BEAM_NEG
        candidate_scores += (~is_open[:, None]).astype(jnp.float32) * BEAM_NEG
        just_finished = hits & top_beams[None, :]
        candidate_scores += (~just_finished).astype(jnp.float32) * BEAM_NEG
        merged_scores = jnp.concatenate([best_scores, candidate_scores], axis=1)
        best_scores, pick = jax.lax.top_k(merged_scores, beams)
        best_sequences = gather(jnp.concatenate([best_sequences, top_sequences], axis=1), pick)
        finished = gather(jnp.concatenate([finished, just_finished], axis=1), pick)
        # g. each beam's self-attention key/value rows follow it (a beam only moves within its row;
        # the cross-attention cache is one per row, shared by its beams).
        flat = (rows * beams + beam_of).reshape(-1)  # (B*N,)
        cache = {**cache, "self_k": cache["self_k"][:, flat], "self_v": cache["self_v"][:, flat]}
        position = position + 1
        if early_stopping == "never" and settings.length_penalty > 0.0:
            best_possible = penalised(scores[:, :1], total_length - prompt_length)
        else:
            best_possible = penalised(scores[:, :1], position - prompt_length)
        worst_finished = jnp.where(finished, best_scores.min(axis=1, keepdims=True), BEAM_NEG)
        is_open = is_open & (best_possible > worst_finished).any(axis=1)
        # The next step's logits (at the last position their loop stops here, so does ours).
        write_at = jnp.minimum(position - 1, total_length - 1)
        next_tokens = sequences[:, :, position - 1].reshape(-1, 1)  # (B*N, 1)
        logits, cache = model.apply(variables, next_tokens, None, cache, write_at, method=Whisper.decode)
        return (
            position,
            sequences,
            scores,
            (best_sequences, best_scores),
            finished,
            is_open,
            cache,
            logits[:, -1],
            hits.all(),
        )

    tokens = (
        jnp.full((batch_size, total_length), settings.pad_token_id, jnp.int32).at[:, :prompt_length].set(prompt_ids)
    )
    sequences = jnp.repeat(tokens[:, None], beams, axis=1)  # (B, N, T)
    # Only the first beam starts open (the others are copies), as theirs: scores 0, -1e9, ...
    scores = jnp.where(jnp.arange(beams) == 0, 0.0, BEAM_NEG) * jnp.ones((batch_size, 1), jnp.float32)
    best = (sequences, jnp.full((batch_size, beams), BEAM_NEG, jnp.float32))
    # Self-attention rows (layers, B*N, ...), one per beam; cross-attention stays (layers, B, ...).
    cache = {**cache, **{k: jnp.repeat(cache[k], beams, axis=1) for k in ("self_k", "self_v")}}
    carry = (
        jnp.int32(prompt_length),
        sequences,
        scores,
        best,
        jnp.zeros((batch_size, beams), bool),
        jnp.ones(batch_size, bool),  # their is_early_stop_heuristic_unsatisfied
        cache,
        jnp.repeat(first_logits, beams, axis=0),  # (B*N, vocab)
        jnp.bool_(False),
    )
    return jax.lax.while_loop(keep_going, step, carry)[3][0][:, 0]


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
        (len(devices) // fsdp_size, fsdp_size),
        ("data", "fsdp"),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices,
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
    """NamedShardings for parameters, optimizer state (same rule, so moments follow their
    parameters) and scalars."""
    fsdp_size = mesh.shape["fsdp"]

    def leaf_sharding(path, leaf):
        stacked = any(getattr(key, "key", None) == "layers" for key in path)
        return NamedSharding(mesh, fsdp_partition_spec(tuple(leaf.shape), fsdp_size, stacked=stacked))

    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_tree)


def batch_sharding(mesh):
    return NamedSharding(mesh, P(BATCH_AXES))


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
    """0 -> peak over the warmup, then linear: down to 0 at num_train_steps, or constant (and its
    synonym constant_with_warmup): the peak."""
    after = (
        optax.linear_schedule(peak_lr, 0.0, max(1, num_train_steps - warmup_steps))
        if kind == "linear"
        else optax.constant_schedule(peak_lr)
    )
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
    """Floating parameters in `param_dtype` (--param_dtype): the train state's parameters, and so
    its gradients and Adam's second moment, take that dtype."""
    dtype = jnp.dtype(param_dtype)
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def token_losses(logits, labels, label_smoothing: float = 0.0):
    """Per-token cross-entropy (float32) and the mask of real label tokens (labels != -100).

    Label smoothing as PyTorch's CrossEntropyLoss does it: (1 - e) * nll + e * mean_v(-log p_v),
    computed without a (batch, time, vocab) one-hot.
    """
    logits = logits.astype(jnp.float32)
    mask = labels != -100
    log_normaliser = jax.nn.logsumexp(logits, axis=-1)
    label_logits = jnp.take_along_axis(logits, jnp.where(mask, labels, 0)[..., None], axis=-1)[..., 0]
    losses = log_normaliser - label_logits
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses + label_smoothing * (log_normaliser - logits.mean(axis=-1))
    return jnp.where(mask, losses, 0.0), mask


def on_mesh(mesh):
    """Make `mesh` the current one while a step is traced, for keep_batch_sharded."""
    return contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def train_step(
    state: TrainState,
    batch: dict,
    *,
    model: Whisper,
    optimizer,
    mel_filters,
    accumulation_steps: int,
    label_smoothing: float,
    mesh=None,
):
    """One optimizer step on the global batch: loss = sum of token losses / number of label tokens
    over the whole batch, whatever the sharding or the number of micro-batches."""
    with on_mesh(mesh):  # lets keep_batch_sharded pin activations, in the backward pass too
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
            (grads, loss_sum, num_tokens), _ = jax.lax.scan(
                accumulate,
                (zeros, jnp.float32(0), jnp.int32(0)),
                (jax.tree.map(split, batch), jnp.arange(accumulation_steps)),
            )
        denominator = jnp.maximum(num_tokens, 1).astype(jnp.float32)
        # Back to the parameters' dtype, so that the optimizer state keeps its dtypes from step to step.
        grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grads, state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss_sum / denominator, "grad_norm": optax.tree.norm(grads), "num_tokens": num_tokens}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def with_shardings(abstract_tree, shardings):
    """jax.ShapeDtypeStructs that carry their shardings: what restore and .lower() need."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


@dataclass(frozen=True)
class JittedTrainStep:
    """train_step as every caller runs it (run, bench_scream.py, the tests): state sharded over the
    mesh and donated, the batch split by rows."""

    fn: Any  # (TrainState, global batch) -> (TrainState, metrics)
    abstract_state: TrainState  # shapes, dtypes and shardings, no data
    state_sharding: TrainState  # a NamedSharding per leaf
    data_sharding: NamedSharding
    optimizer: optax.GradientTransformation


def jit_train_step(
    model: Whisper,
    optimizer,
    mesh,
    *,
    mel_filters,
    accumulation_steps: int = 1,
    label_smoothing: float = 0.0,
    param_dtype: str = "float32",
) -> JittedTrainStep:
    """eval_shape the state -> its shardings -> jit(partial(train_step)) with those shardings.
    Parameters are held in `param_dtype` (--param_dtype)."""
    abstract_params = jax.eval_shape(
        lambda rng: cast_params(init_params(model, rng), param_dtype), jax.random.PRNGKey(0)
    )
    abstract_state = jax.eval_shape(
        lambda p: TrainState(jnp.int32(0), p, optimizer.init(p), jax.random.PRNGKey(0)), abstract_params
    )
    state_sharding = state_shardings(abstract_state, mesh)
    data_sharding = batch_sharding(mesh)
    fn = jax.jit(
        functools.partial(
            train_step,
            model=model,
            optimizer=optimizer,
            mel_filters=mel_filters,
            accumulation_steps=accumulation_steps,
            label_smoothing=label_smoothing,
            mesh=mesh,
        ),
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
    return TrainState(
        jax.device_put(jnp.int32(0), sharding.step),
        params,
        opt_state,
        jax.device_put(jax.random.PRNGKey(seed + 1), sharding.rng),
    )


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
            out["generated"] = generate(model, params, features, prompt_ids, decoding)
        return out


# Model FLOPs and device peaks, for the throughput and MFU figures the training loop logs.
# Dense bfloat16 peak FLOP/s of one JAX device (a TPU chip, a GPU), from the vendors' spec sheets;
# matched against `device.device_kind` by prefix, most specific first. MFU is measured against
# the bfloat16 peak whatever the compute dtype (the convention of the PaLM paper), except on GPUs
# in float32, where XLA runs matmuls as TF32 and the TF32 peak is the fair one.
PEAK_FLOPS_PER_DEVICE = (  # (device_kind prefix, bfloat16 peak, float32/TF32 peak or None)
    ("TPU v6 lite", 918e12, None),  # v6e (Trillium)
    ("TPU v6e", 918e12, None),
    ("TPU v5 lite", 197e12, None),  # v5e
    ("TPU v5e", 197e12, None),
    ("TPU v5p", 459e12, None),
    ("TPU v5", 459e12, None),  # v5p reports itself as "TPU v5"
    ("TPU v4", 275e12, None),
    ("NVIDIA H200", 989e12, 494e12),
    ("NVIDIA H100", 989e12, 494e12),  # SXM; the PCIe card peaks lower
    ("NVIDIA A100", 312e12, 156e12),
)


def forward_flops(dims: WhisperDims, decoder_length: int) -> dict[str, float]:
    """Forward FLOPs of one example (a multiply-add is 2 FLOPs), part by part.

    Counts every matmul of the model: the conv stem (2S mel frames in, S positions out), the
    projections and MLPs, the attention score and value products (QK^T and AV, dense: the
    causal half is computed too), the decoder's cross-attention keys and values over all S
    encoder positions, and the tied vocab-wide output projection. Leaves out LayerNorm, GELU,
    softmax and the loss (elementwise, under 1%) and the log-mel front end (input, no gradient).
    Padded positions count: the step computes them (fixed shapes).
    """
    d, S, T, V = dims.d_model, dims.max_source_positions, decoder_length, dims.vocab_size
    f_enc, f_dec, L_enc, L_dec = dims.encoder_ffn_dim, dims.decoder_ffn_dim, dims.encoder_layers, dims.decoder_layers
    mels = dims.num_mel_bins
    return {
        "conv stem": 2 * (2 * S) * (3 * mels) * d + 2 * S * (3 * d) * d,
        "encoder projections + MLP": L_enc * (4 * 2 * S * d * d + 2 * 2 * S * d * f_enc),
        "encoder attention QK^T, AV": L_enc * (2 * 2 * S * S * d),
        "decoder projections + MLP": L_dec
        * (
            4 * 2 * T * d * d  # self-attention q, k, v, out
            + 2 * 2 * T * d * d  # cross-attention q, out
            + 2 * 2 * S * d * d  # cross-attention k, v over the encoder output
            + 2 * 2 * T * d * f_dec
        ),
        "decoder attention QK^T, AV": L_dec * (2 * 2 * T * T * d + 2 * 2 * T * S * d),
        "output projection": 2 * T * d * V,
    }


def training_flops_per_example(dims: WhisperDims, decoder_length: int) -> float:
    """Model FLOPs of one training example: forward + backward = 3 x forward (the backward pass
    does two matmuls per forward one). Rematerialisation is not counted: this is MFU, not HFU."""
    return 3 * sum(forward_flops(dims, decoder_length).values())


def measured_matmul_flops(n: int = 1024, repeats: int = 5, device=None) -> float:
    """FLOP/s of a float32 n^3 `jnp.dot` on one device (median of `repeats`): the peak used for
    MFU on a CPU, which has no spec-sheet figure that XLA reaches."""
    device = device or jax.devices()[0]
    a = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32), device)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, a).block_until_ready()
        seconds.append(time.perf_counter() - start)
    return 2 * n**3 / float(np.median(seconds))


def peak_flops_per_device(device_kind: str, compute_dtype: str) -> float | None:
    """The spec-sheet peak of one device of this kind (see PEAK_FLOPS_PER_DEVICE), None if unknown."""
    for prefix, bfloat16_peak, float32_peak in PEAK_FLOPS_PER_DEVICE:
        if device_kind.lower().startswith(prefix.lower()):
            return float32_peak if compute_dtype == "float32" and float32_peak else bfloat16_peak
    return None


def device_peak_flops(device, compute_dtype: str) -> float | None:
    """The peak MFU is measured against: the spec sheet's for a TPU or GPU, a measured float32
    matmul for a CPU (see measured_matmul_flops), None for a device kind we have no figure for."""
    if device.platform == "cpu":  # fake CPU devices (--xla_force_host_platform_device_count) share the cores
        return measured_matmul_flops(device=device) / jax.local_device_count()
    return peak_flops_per_device(device.device_kind, compute_dtype)


def throughput_metrics(
    *,
    steps: int,
    seconds: float,
    global_batch_size: int,
    audio_seconds: float,
    flops_per_example: float,
    num_devices: int,
    peak_flops: float | None,
) -> dict[str, float]:
    """What a logging window of `steps` train steps in `seconds` of training time achieved:
    examples/s, hours of (unpadded) audio per second, model TFLOP/s per device and MFU."""
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
    """WER and CER x100 as written and after Whisper's BasicTextNormalizer (jiwer).

    Pairs whose reference is empty after normalising are left out of the normalised scores
    (WER is undefined for them)."""
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
    """transcription_metrics of the rows sharing each value of row[key] (rows carry reference,
    prediction and key; rows whose value is None are in no group), keyed '<value>/<metric>', e.g.
    'nn/wer' for key 'language'."""
    groups: dict[str, list[dict]] = collections.defaultdict(list)
    for row in rows:
        if row.get(key) is not None:
            groups[row[key]].append(row)
    return {
        f"{value}/{name}": metric
        for value, group in sorted(groups.items())
        for name, metric in transcription_metrics(
            [r["reference"] for r in group], [r["prediction"] for r in group]
        ).items()
    }


def local_rows(array) -> np.ndarray:
    """This host's rows of a batch-sharded global array, in the order the host supplied them."""
    if array.is_fully_addressable:
        return np.asarray(array)
    shards = {shard.index[0].start or 0: shard.data for shard in array.addressable_shards}
    return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])


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
    """Loss (and WER/CER when `generate`) over one whole evaluation set, each example counted once:
    hosts read disjoint shares, pad their last batch, and take part in every step until all are
    done. Returns (metrics without a prefix, every host's prediction rows) on every host."""
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
            generated = local_rows(out["generated"])[: len(examples)]
            texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
            rows += [
                {"id": e["id"], "language": e["language"], "reference": e["text"], "prediction": text.strip()}
                | ({"source": e["source"]} if e.get("source") is not None else {})
                for e, text in zip(examples, texts)
            ]
    rows = [row for host_rows in allgather_json(rows) for row in host_rows]
    results = {"loss": loss_sum / max(num_tokens, 1), "num_tokens": num_tokens}
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
    """Each set's metrics under <kind>/<set>/, plus <kind>/<metric>: the mean over the sets of the
    AVERAGED_METRICS that every set has, the sum of the SUMMED_METRICS."""
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
    if best is None:
        return True
    return value > best["value"] if greater_is_better else value < best["value"]


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
            directory = Path(  # ... or a CTranslate2 (faster-whisper) model
                huggingface_hub.snapshot_download(
                    name_or_path,
                    cache_dir=cache_dir,
                    allow_patterns=patterns + ["pytorch_model*.bin", "model.bin", "model.bin.part*"],
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


# CTranslate2 (faster-whisper) Whisper directories: model.bin in ctranslate2's binary format (its
# python/ctranslate2/specs/model_spec.py writes it: an int32 version, the spec name, an int32
# revision, the variables, then the aliases), config.json with the suppress lists, language ids and
# alignment heads, and tokenizer.json. A model.bin too large for one file (a wheel, an upload limit)
# may come split into model.bin.part1, .part2, ...: read in order as one stream, never joined on disk.

CT2_BINARY_VERSION = 6  # the version ctranslate2 4.x writes
CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")  # ctranslate2's DataType ids
CT2_ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "swish", 3: "gelu"}  # its common_spec.Activation
# The spec's scalar switches and the values transformers' Whisper allows (None: any; read as a
# dimension, or ctranslate2's alignment defaults, which config.json's alignment_heads replace).
CT2_SCALARS = {
    "encoder/num_heads": None,
    "decoder/num_heads": None,
    "decoder/activation": tuple(CT2_ACTIVATIONS),
    "decoder/alignment_heads": None,
    "decoder/alignment_layer": None,
    "decoder/pre_norm": (1,),
    "decoder/scale_embeddings": (0, 1),  # off, or a factor of 1: transformers' Whisper never scales them
    "decoder/start_from_zero_embedding": (0,),
    "decoder/alibi": (0,),
    "decoder/alibi_use_positive_positions": None,  # both moot with alibi off
    "decoder/scale_alibi": None,
}
# Sub-layer names inside encoder/layer_N and decoder/layer_N -> transformers' module names; a tuple
# is a projection fused along the output axis, split back in this order.
CT2_LAYER_MODULES = {
    "self_attention/layer_norm": "self_attn_layer_norm",
    "self_attention/linear_0": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attention/linear_1": "self_attn.out_proj",
    "attention/layer_norm": "encoder_attn_layer_norm",
    "attention/linear_0": "encoder_attn.q_proj",
    "attention/linear_1": ("encoder_attn.k_proj", "encoder_attn.v_proj"),
    "attention/linear_2": "encoder_attn.out_proj",
    "ffn/layer_norm": "final_layer_norm",
    "ffn/linear_0": "fc1",
    "ffn/linear_1": "fc2",
}
CT2_MODULES = {
    "encoder/conv1": "encoder.conv1",
    "encoder/conv2": "encoder.conv2",
    "encoder/layer_norm": "encoder.layer_norm",
    "encoder/position_encodings": "encoder.embed_positions",
    "decoder/embeddings": "decoder.embed_tokens",
    "decoder/position_encodings": "decoder.embed_positions",
    "decoder/layer_norm": "decoder.layer_norm",
}
CT2_LEAVES = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias", "encodings": "weight"}


def ctranslate2_model_files(directory: Path) -> list[Path]:
    """[model.bin], or [model.bin.part1, model.bin.part2, ...] in order; [] when neither is there."""
    if (directory / "model.bin").exists():
        return [directory / "model.bin"]
    parts = []
    while (directory / f"model.bin.part{len(parts) + 1}").exists():
        parts.append(directory / f"model.bin.part{len(parts) + 1}")
    return parts


class JoinedFiles:
    """Read files one after the other as one stream, so a split model.bin needs no joined copy."""

    def __init__(self, paths: list[Path]):
        self.paths, self.index, self.file = list(paths), 0, open(paths[0], "rb")

    def read(self, size: int) -> bytes:
        chunks = []
        while size:
            chunk = self.file.read(size)
            if not chunk:
                if self.index + 1 == len(self.paths):
                    raise ConfigError(
                        f"{self.paths[-1]} ends in the middle of the model: a truncated download, or a "
                        f"missing part after {self.paths[-1].name}?"
                    )
                self.file.close()
                self.index += 1
                self.file = open(self.paths[self.index], "rb")
                continue
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    def at_end(self) -> bool:
        return self.index + 1 == len(self.paths) and not self.file.peek(1)

    def close(self):
        self.file.close()


def read_ctranslate2_variables(paths: list[Path]) -> tuple[str, dict[str, np.ndarray], dict[str, str]]:
    """(spec name, {name: array}, {alias: name it stands for}) from a model.bin (or its parts)."""
    stream = JoinedFiles(paths)
    try:

        def unpack(fmt: str) -> tuple:
            return pystruct.unpack("<" + fmt, stream.read(pystruct.calcsize("<" + fmt)))

        def text() -> str:
            (length,) = unpack("H")  # including the terminating NUL
            return stream.read(length)[:-1].decode()

        (version,) = unpack("I")
        if version != CT2_BINARY_VERSION:
            raise ConfigError(
                f"{paths[0]} is a CTranslate2 model of binary version {version}; this reader knows version "
                f"{CT2_BINARY_VERSION} (ctranslate2 4.x): convert it again with a current ctranslate2."
            )
        spec = text()
        unpack("I")  # the spec's revision: the names below are checked one by one instead
        variables = {}
        for _ in range(unpack("I")[0]):
            name = text()
            (rank,) = unpack("B")
            shape = unpack(f"{rank}I")
            dtype_id, num_bytes = unpack("B")[0], unpack("I")[0]
            dtype = jnp.bfloat16 if CT2_DTYPES[dtype_id] == "bfloat16" else np.dtype(CT2_DTYPES[dtype_id])
            variables[name] = np.frombuffer(stream.read(num_bytes), dtype).reshape(shape)
        aliases = {}
        for _ in range(unpack("I")[0]):
            alias = text()
            aliases[alias] = text()
        if not stream.at_end():
            raise ConfigError(f"{paths[-1]} has data after the model's last alias: not a CTranslate2 model.bin?")
    finally:
        stream.close()
    return spec, variables, aliases


def ctranslate2_to_torch(variables: dict[str, np.ndarray], aliases: dict[str, str], source: str):
    """CTranslate2 Whisper variables -> (transformers-named float32 state dict, the spec's scalars).

    Aliases (ctranslate2 stores a repeated tensor once) are resolved; fused projections are split
    (self-attention q|k|v, cross-attention k|v); the key slot of a fused bias is dropped, as
    transformers' k_proj has none (ctranslate2 stores zeros there, and a key bias cancels in the
    softmax anyway); int8/int16 weights are divided by their stored scales; everything is widened
    to float32. The output projection must be the token embedding (Whisper ties them)."""
    variables = dict(variables)
    for alias, target in aliases.items():
        if target not in variables:
            raise ConfigError(f"{source}: alias {alias} points at {target}, which the model does not hold.")
        variables[alias] = variables[target]
    for name in [n for n in variables if n.endswith("_scale") and n.removesuffix("_scale") in variables]:
        weight = variables.pop(name.removesuffix("_scale")).astype(np.float32)
        scale = variables.pop(name).astype(np.float32)
        variables[name.removesuffix("_scale")] = weight / scale.reshape(scale.shape + (1,) * (weight.ndim - scale.ndim))
    scalars = {name: variables.pop(name).item() for name in CT2_SCALARS if name in variables}
    projection = variables.pop("decoder/projection/weight", None)
    embedding = variables.get("decoder/embeddings/weight")
    if projection is not None and embedding is not None and not np.array_equal(projection, embedding):
        raise ConfigError(
            f"{source}: decoder/projection/weight differs from the token embedding; Whisper ties the two, "
            "so this model cannot be read as a Whisper checkpoint."
        )
    state, unmapped = {}, []
    for name, value in variables.items():
        layer = re.fullmatch(r"(encoder|decoder)/layer_(\d+)/(.+)/(\w+)", name)
        module, leaf = (layer.group(3), layer.group(4)) if layer else name.rsplit("/", 1)
        target = CT2_LAYER_MODULES.get(module) if layer else CT2_MODULES.get(module)
        if target is None or leaf not in CT2_LEAVES or not np.issubdtype(value.dtype, np.floating):
            unmapped.append(name)
            continue
        prefix = f"model.{layer.group(1)}.layers.{layer.group(2)}." if layer else "model."
        targets = target if isinstance(target, tuple) else (target,)
        for piece, part in zip(np.split(np.asarray(value, np.float32), len(targets)), targets):
            if not (part.endswith("k_proj") and leaf == "bias"):
                state[f"{prefix}{part}.{CT2_LEAVES[leaf]}"] = piece
    unknown = [
        f"{name}={scalars[name]}"
        for name, allowed in CT2_SCALARS.items()
        if allowed is not None and name in scalars and scalars[name] not in allowed
    ]
    if unmapped or unknown:
        raise ConfigError(
            f"{source} holds CTranslate2 variables that have no place in transformers' Whisper: "
            f"{', '.join(sorted(unmapped) + unknown)}. Only Whisper models converted by ctranslate2's "
            "TransformersConverter (or faster-whisper's conversions) can be read."
        )
    return state, scalars


def read_ctranslate2(directory: Path):
    """A CTranslate2 Whisper directory -> (WhisperConfig, unstacked float32 params, tokenizer,
    feature extractor, generation config).

    The dimensions come from the weights (mel bins from conv1), the special token ids from the
    tokenizer (or vocabulary.json/.txt; then tokenizer is None), the suppress lists and alignment heads
    from config.json, the language ids from the vocabulary; the .en vocabulary size marks an
    English-only model (is_english_only). config.json's lang_ids are not used: converters have written
    bogus ones for .en models."""
    spec, variables, aliases = read_ctranslate2_variables(ctranslate2_model_files(directory))
    if spec != "WhisperSpec":
        raise ConfigError(f"{directory} holds a CTranslate2 {spec}, not a Whisper model (WhisperSpec).")
    state, scalars = ctranslate2_to_torch(variables, aliases, str(directory))
    missing = [
        name
        for name in (
            "decoder/num_heads",
            "encoder/num_heads",
            "encoder/conv1/weight",
            "decoder/embeddings/weight",
            "encoder/position_encodings/encodings",
            "decoder/position_encodings/encodings",
            "encoder/layer_0/ffn/linear_0/weight",
            "decoder/layer_0/ffn/linear_0/weight",
        )
        if name not in variables and name not in scalars
    ]
    if missing:
        raise ConfigError(f"{directory}/model.bin lacks {', '.join(missing)}: not a complete CTranslate2 Whisper.")
    tokenizer = None  # without tokenizer.json: --tokenizer_name (a vocabulary list has no BPE merges)
    if (directory / "tokenizer.json").exists():
        tokenizer = WhisperTokenizer(tokenizer_file=str(directory / "tokenizer.json"), name_or_path=str(directory))
        vocab = tokenizer.get_vocab()
    elif (directory / "vocabulary.json").exists():
        vocab = {token: i for i, token in enumerate(json.loads((directory / "vocabulary.json").read_text()))}
    elif (directory / "vocabulary.txt").exists():
        vocab = {token: i for i, token in enumerate((directory / "vocabulary.txt").read_text().split("\n"))}
    else:
        raise ConfigError(
            f"{directory} has neither tokenizer.json nor vocabulary.json/.txt: not a CTranslate2 Whisper."
        )
    special = {token: vocab.get(f"<|{token}|>") for token in ("endoftext", "startoftranscript", "notimestamps")}
    if None in special.values():
        raise ConfigError(f"{directory}: the vocabulary lacks Whisper's special tokens ({special}).")

    def layers(part: str) -> int:
        return len({m.group(1) for n in variables for m in [re.match(rf"{part}/layer_(\d+)/", n)] if m})

    ct2_config = json.loads((directory / "config.json").read_text()) if (directory / "config.json").exists() else {}
    suppress = ct2_config.get("suppress_ids", [])
    begin_suppress = ct2_config.get("suppress_ids_begin", [vocab.get("Ġ", 220), special["endoftext"]])
    vocab_size, d_model = variables["decoder/embeddings/weight"].shape
    config = WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=variables["encoder/conv1/weight"].shape[1],  # (d_model, mel bins, 3)
        d_model=d_model,
        encoder_layers=layers("encoder"),
        encoder_attention_heads=int(scalars["encoder/num_heads"]),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_layers=layers("decoder"),
        decoder_attention_heads=int(scalars["decoder/num_heads"]),
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        activation_function=CT2_ACTIVATIONS.get(int(scalars.get("decoder/activation", 3)), "gelu"),
        pad_token_id=special["endoftext"],
        bos_token_id=special["endoftext"],
        eos_token_id=special["endoftext"],
        decoder_start_token_id=special["startoftranscript"],
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        suppress_tokens=suppress,
        begin_suppress_tokens=begin_suppress,
    )
    multilingual = not is_english_only(config)
    generation = {
        "decoder_start_token_id": special["startoftranscript"],
        "bos_token_id": special["endoftext"],
        "eos_token_id": special["endoftext"],
        "pad_token_id": special["endoftext"],
        "max_length": config.max_target_positions,
        "no_timestamps_token_id": special["notimestamps"],
        "prev_sot_token_id": vocab.get("<|startofprev|>"),
        "suppress_tokens": suppress,
        "begin_suppress_tokens": begin_suppress,
        "is_multilingual": multilingual,
        "return_timestamps": False,
    }
    if ct2_config.get("alignment_heads"):
        generation["alignment_heads"] = [list(head) for head in ct2_config["alignment_heads"]]
    if multilingual:  # an English-only model has no language or task tokens in its prompt
        generation["lang_to_id"] = {f"<|{code}|>": vocab[f"<|{code}|>"] for code in LANGUAGES if f"<|{code}|>" in vocab}
        generation["task_to_id"] = {task: vocab[f"<|{task}|>"] for task in ("transcribe", "translate")}
    generation_config = GenerationConfig(**generation)
    feature_extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    return config, torch_to_flax(state), tokenizer, feature_extractor, generation_config


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
            num_layers = jax.tree.leaves(stacked)[0].shape[0]
            for i in range(num_layers):
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
    """Config, weights (unstacked float32 numpy tree), tokenizer, feature extractor and generation
    config from a local directory or a hub id, in transformers' format (safetensors, pytorch_model.bin,
    flax_model.msgpack) or CTranslate2's (model.bin or model.bin.part1, .part2, ...)."""
    directory = resolve_checkpoint_dir(name_or_path, cache_dir)
    if ctranslate2_model_files(directory):  # a faster-whisper model: its config.json is CTranslate2's own
        config, params, tokenizer, feature_extractor, generation_config = read_ctranslate2(directory)
        model = build_model(config)
        check_parameter_tree(
            params, jax.eval_shape(functools.partial(init_params, model), jax.random.key(0)), str(directory)
        )
        return Pretrained(
            config, params if weights else None, tokenizer, feature_extractor, generation_config, str(directory)
        )
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
        model = build_model(config)
        check_parameter_tree(
            params, jax.eval_shape(functools.partial(init_params, model), jax.random.key(0)), str(directory)
        )
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
        generation_config.lang_to_id = {
            f"<|{code}|>": vocab[f"<|{code}|>"] for code in LANGUAGES if f"<|{code}|>" in vocab
        }
    if not getattr(generation_config, "task_to_id", None) and not english_only:
        generation_config.task_to_id = {t: vocab[f"<|{t}|>"] for t in ("transcribe", "translate")}
    generation_config.no_timestamps_token_id = vocab["<|notimestamps|>"]
    generation_config.is_multilingual = not english_only
    generation_config.decoder_start_token_id = config.decoder_start_token_id
    generation_config.eos_token_id = config.eos_token_id
    generation_config.pad_token_id = config.pad_token_id
    generation_config.bos_token_id = config.bos_token_id
    generation_config.max_length = config.max_target_positions
    if getattr(generation_config, "begin_suppress_tokens", None) is None:
        generation_config.begin_suppress_tokens = [vocab.get("Ġ", 220), config.eos_token_id]
    generation_config.language = None if english_only else language_code(language)
    generation_config.task = None if english_only else task
    generation_config.forced_decoder_ids = None
    generation_config._from_model_config = False  # otherwise transformers rebuilds it and loses lang_to_id
    return generation_config


def export_pretrained(params, config, out_dir, *, tokenizer, feature_extractor, generation_config) -> Path:
    """Write a directory that transformers' from_pretrained and pipeline() load unchanged."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    host_params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
    state = flax_to_torch(unstack_layers(host_params))
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    feature_extractor.save_pretrained(out_dir)
    return out_dir


def export_ctranslate2(export_dir, quantization: str) -> Path:
    """EXPORT_DIR/ctranslate2/: the transformers export converted by ctranslate2's own converter, for
    faster-whisper (tokenizer.json and preprocessor_config.json copied along, which faster-whisper reads)."""
    from ctranslate2.converters import TransformersConverter

    out_dir = Path(export_dir) / "ctranslate2"
    converter = TransformersConverter(str(export_dir), copy_files=["tokenizer.json", "preprocessor_config.json"])
    converter.convert(str(out_dir), quantization=quantization, force=True)
    return out_dir


# Orbax checkpoints in OUTPUT_DIR/checkpoints:# Orbax checkpoints in OUTPUT_DIR/checkpoints: the sharded train state (parameters, optimizer
# state, step, RNG) plus JSON metadata holding every host's data-iterator state. Written by all
# hosts, asynchronously, atomically (a half-written checkpoint is never the latest).


@functools.cache  # once per process: orbax's handler registry is global
def save_each_array_whole_on_cpu() -> None:
    """On CPU, turn off orbax's replica-parallel saving. It splits each replicated array across its
    replicas, which compiles one slice program per array shape (80 for the demo model, about 1.5 s
    of CPU per run), and CPU devices share one host's memory and disk, so there is nothing to
    parallelise. TPU and GPU keep orbax's default."""
    if jax.default_backend() == "cpu":
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
        )


def checkpoint_manager(
    output_dir: str, save_total_limit: int | None, best_metric: str = "eval/loss", greater_is_better: bool = False
):
    """Keeps the --save_total_limit latest checkpoints and, beyond them, the best evaluated one by
    `best_metric` (orbax's BestN over the metrics saved with each checkpoint, which hold the step;
    checkpoints saved without an evaluation never count as best)."""
    save_each_array_whole_on_cpu()

    def metric_of(metrics: dict) -> tuple[float, int]:
        # orbax keeps the last of the sorted keys; the step breaks ties towards the earlier evaluation,
        # as is_better does. One evaluated under another --metric_for_best_model ranks last.
        value = metrics.get(best_metric, -math.inf if greater_is_better else math.inf)
        return (value, -metrics["step"]) if greater_is_better else (value, metrics["step"])

    options = ocp.CheckpointManagerOptions(
        create=True,
        enable_async_checkpointing=True,
        best_fn=metric_of,  # makes orbax save and read the metrics (best_step()); retention is the policy's
        best_mode="max" if greater_is_better else "min",
        preservation_policy=AnyPreservationPolicy(
            [
                LatestN(n=save_total_limit),
                # BestN sorts ascending and keeps the last n: descending when lower is better.
                BestN(
                    get_metric_fn=metric_of, reverse=not greater_is_better, n=1, keep_checkpoints_without_metrics=False
                ),
            ]
        ),
    )
    return ocp.CheckpointManager(
        Path(output_dir).absolute() / "checkpoints", options=options, item_names=("state", "meta")
    )


def save_checkpoint(manager, step: int, state: TrainState, meta: dict, metrics: dict | None = None):
    """Save asynchronously; `metrics` (an evaluation's results at this step) rank it for keeping."""
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        metrics=metrics,
        force=True,
    )


def restore_checkpoint(manager, step: int, abstract_state):

    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    )
    return restored["state"], restored["meta"]


def model_index_results(eval_results: dict, sets: list[tuple[str, EvalSet]]) -> list:
    """huggingface_hub EvalResults (the hub's model-index) of each (kind, set) with a WER: task
    automatic-speech-recognition, the set's dataset and split, metrics wer and cer (raw and normalized)."""
    return [
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


def write_model_card(
    out_dir: Path, *, base_model: str, run_args: dict, eval_results: dict, sets: list[tuple[str, EvalSet]] = ()
):
    """README.md: huggingface_hub ModelCardData metadata (with the model-index of `sets`, so the hub
    shows WER per set), the results list, a faster-whisper snippet and the run's arguments."""
    results = model_index_results(eval_results, list(sets))
    card_data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="automatic-speech-recognition",
        tags=["whisper", "scream"],
        model_name=Path(out_dir).name,
        eval_results=results or None,
    )
    lines = [
        f"# {Path(out_dir).name}",
        "",
        f"Whisper fine-tuned with Scream from `{base_model}`.",
        "",
        "## Evaluation",
        "",
    ]
    lines += [f"- {name}: {value:.4g}" for name, value in sorted(eval_results.items())] or ["- not evaluated"]
    if (Path(out_dir) / "ctranslate2").is_dir():
        language = run_args.get("resolved", {}).get("language", "no")
        lines += [
            "",
            "## faster-whisper",
            "",
            "`ctranslate2/` holds this model in CTranslate2's format (written by `--export_ctranslate2`):",
            "",
            "```python",
            "from faster_whisper import WhisperModel",
            "",
            'model = WhisperModel("ctranslate2", device="cpu", compute_type="default")',
            f'segments, info = model.transcribe("audio.wav", beam_size=1, language="{language}", without_timestamps=True)',
            'print(" ".join(segment.text.strip() for segment in segments))',
            "```",
        ]
    lines += ["", "## Training arguments", "", "```json", json.dumps(run_args, indent=2, default=str), "```", ""]
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))
    card.save(Path(out_dir) / "README.md")


def push_to_hub_in_background(output_dir: str, repo_id: str, private: bool, message: str) -> threading.Thread:
    """Upload the exported model (not the checkpoints) without holding up training."""

    def upload():
        try:
            api = huggingface_hub.HfApi()
            api.create_repo(repo_id, private=private, exist_ok=True)
            api.upload_folder(
                repo_id=repo_id,
                folder_path=output_dir,
                commit_message=message,
                ignore_patterns=["checkpoints/*", "tensorboard/*"],
            )
        except Exception as error:  # a failed upload must not kill a week-long run
            warn(f"push to {repo_id} failed: {error}")

    thread = threading.Thread(target=upload, daemon=False, name="push-to-hub")
    thread.start()
    return thread


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

    def __init__(self, output_dir: str, report_to: str, config: dict, train: TrainingArguments, enabled: bool):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        targets = set(split_names(report_to))
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        if "tensorboard" in targets:
            self.tensorboard = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        if "wandb" in targets:
            import wandb

            self.wandb = wandb.init(
                project=train.wandb_project,
                entity=train.wandb_entity,
                name=train.run_name,
                notes=train.run_description,
                config=config,
                resume="allow",
            )

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and self.tensorboard is not None:
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
    timeouts = dict(
        initialization_timeout=dist.distributed_timeout_s,
        heartbeat_timeout_seconds=max(10, dist.distributed_timeout_s // 10),
    )
    if dist.coordinator_address:
        if dist.num_processes is None or dist.process_id is None:
            raise ConfigError("--coordinator_address needs --num_processes and --process_id.")
        jax.distributed.initialize(
            dist.coordinator_address,
            num_processes=dist.num_processes,
            process_id=dist.process_id,
            **timeouts,
        )
    elif len(split_names(os.environ.get("TPU_WORKER_HOSTNAMES", ""))) > 1:
        jax.distributed.initialize(**timeouts)  # a TPU slice finds its coordinator itself


def tpu_topology_devices(name: str):
    """The devices of a TPU v4 slice, for compile-only planning on any machine (needs libtpu)."""
    topologies = {
        "v4-8": "v4:2x2x1",
        "v4-16": "v4:2x2x2",
        "v4-32": "v4:2x2x4",
        "v4-64": "v4:2x4x4",
        "v4-128": "v4:4x4x4",
    }
    if name not in topologies:
        raise ConfigError(f"--dry_run_topology {name!r} is unknown; use one of {', '.join(topologies)}.")

    try:
        topology = jax_topologies.get_topology_desc(
            platform="tpu",
            topology_name=topologies[name],
            chip_config_name="megacore",
            chips_per_host_bounds=(2, 2, 1),
            num_slices=1,
        )
    except Exception as error:
        raise ConfigError(f"--dry_run_topology needs libtpu (pip install 'jax[tpu]'): {error}") from None
    return topology.devices


TPU_V4_USABLE_BYTES = int(30.75 * 2**30)


def compiled_memory(compiled) -> dict[str, int]:
    analysis = compiled.memory_analysis()
    fields = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "temp_size_in_bytes",
        "alias_size_in_bytes",
        "generated_code_size_in_bytes",
    )
    memory = {name: int(getattr(analysis, name, 0) or 0) for name in fields}
    memory["total_bytes"] = (
        memory["argument_size_in_bytes"]
        + memory["output_size_in_bytes"]
        + memory["temp_size_in_bytes"]
        - memory["alias_size_in_bytes"]
    )
    return memory


def abstract_batch(plan_rows: int, *, n_samples: int, max_label_length: int, sharding):
    """The shapes of a global batch as collate makes them, for compiling a step without data."""
    shapes = {
        "audio": ((plan_rows, n_samples), jnp.float32),
        "labels": ((plan_rows, max_label_length), jnp.int32),
        "decoder_input_ids": ((plan_rows, max_label_length), jnp.int32),
    }
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for k, (shape, dtype) in shapes.items()}


def resolve_components(model_args: ModelArguments, *, weights: bool = True) -> Pretrained:
    """Config, weights, tokenizer and feature extractor from --model_name_or_path, or a scratch
    model from --config_name; --tokenizer_name / --feature_extractor_name override."""
    if model_args.model_name_or_path:
        components = load_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir, weights=weights)
    elif model_args.config_name:
        components = load_pretrained(model_args.config_name, cache_dir=model_args.cache_dir, weights=False)
    else:
        raise ConfigError("Give --model_name_or_path (fine-tune) or --config_name (train from scratch).")
    if model_args.tokenizer_name:
        components.tokenizer = load_pretrained(
            model_args.tokenizer_name, weights=False, cache_dir=model_args.cache_dir
        ).tokenizer
    if model_args.feature_extractor_name:
        components.feature_extractor = load_pretrained(
            model_args.feature_extractor_name, weights=False, cache_dir=model_args.cache_dir
        ).feature_extractor
    for what, flag in (("tokenizer", "--tokenizer_name"), ("feature_extractor", "--feature_extractor_name")):
        if getattr(components, what) is None:
            raise ConfigError(f"{components.source} has no {what.replace('_', ' ')}: give {flag}.")
    for name, value in (
        ("dropout", model_args.dropout),
        ("attention_dropout", model_args.attention_dropout),
        ("activation_dropout", model_args.activation_dropout),
    ):
        if value is not None:
            setattr(components.config, name, value)
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
    components: Pretrained  # config, tokenizer, feature extractor; params None for a dry run or a scratch model
    generation_config: Any  # transformers GenerationConfig written with the exported model
    decoding: DecodingSettings
    devices: tuple
    mesh: jax.sharding.Mesh
    plan: BatchPlan
    schedule: Any  # optax schedule: step -> learning rate
    model: Whisper
    mel_filters: np.ndarray  # (n_freqs, n_mels)
    text_settings: dict  # {True: the training stream's TextSettings, False: evaluation's}
    train_step: JittedTrainStep
    eval_step: Any  # jitted eval_step: (params, global batch) -> loss sum, token count (and generated ids)
    run_config: dict  # the flags and what was resolved from them: printed, saved, and in the model card
    eval_sets: tuple[EvalSet, ...]  # --eval_split_name's sets (evaluated with --do_eval)
    test_sets: tuple[EvalSet, ...]  # --test_split_name's (with --do_predict)

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


def check_best_metric_name(metric: str, eval_sets: list[EvalSet]):
    """--metric_for_best_model must be eval/<averaged metric> or eval/<set>/<metric>; a per-language or
    per-source name (eval/<set>/<group>/...) can only be checked at the first evaluation."""
    set_names = [s.name for s in eval_sets]
    if metric.removeprefix("eval/") in AVERAGED_METRICS + SUMMED_METRICS:
        return
    if any(metric.startswith(f"eval/{name}/") for name in set_names):
        return
    raise ConfigError(
        f"--metric_for_best_model {metric} is not an eval metric: use one of "
        + ", ".join(f"eval/{m}" for m in AVERAGED_METRICS)
        + ", or eval/<set>/<metric> for a set of "
        + ", ".join(set_names)
        + " (e.g. eval/"
        + (set_names or ["validation"])[0]
        + "/wer_normalized)."
    )


def setup_run(
    model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments, dist_args: DistributedArguments
) -> RunSetup:
    """Components, decoding settings, mesh, batch plan, model and the jitted steps; no data read,
    no device memory used beyond what jit needs."""
    components = resolve_components(model_args, weights=not train_args.dry_run)
    config, tokenizer, feature_extractor = components.config, components.tokenizer, components.feature_extractor
    language = language_code(data_args.language)
    english_only = is_english_only(config, components.generation_config)
    prompt_language, prompt_task = prompt_language_and_task(
        tokenizer, language, data_args.task, english_only=english_only
    )
    prompt_ids = tuple(decoder_prefix(tokenizer, prompt_language, prompt_task, timestamps=False))
    # The exported tokenizer's default prefix (what pipeline() users get); our labels never read it.
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

    eval_sets = evaluation_sets(data_args.eval_split_name, data_args.eval_dataset_name, data_args.dataset_name, "eval")
    test_sets = evaluation_sets(data_args.test_split_name, data_args.test_dataset_name, data_args.dataset_name, "test")
    if train_args.do_predict and not test_sets:
        raise ConfigError("--do_predict needs --test_split_name: the split(s) to evaluate the kept model on.")
    check_best_metric_name(train_args.metric_for_best_model, eval_sets)
    text_settings = {
        train: text_settings_of(
            data_args, train=train, language=prompt_language, task=prompt_task, seed=train_args.seed
        )
        for train in (True, False)
    }
    if text_settings[True].decoder_length > config.max_target_positions:
        raise ConfigError(
            f"--max_label_length {data_args.max_label_length}"
            + (f" + --max_prev_length {data_args.max_prev_length}" if text_settings[True].max_prev_length else "")
            + f" exceeds the model's {config.max_target_positions} decoder positions: lower them."
        )

    devices = tpu_topology_devices(train_args.dry_run_topology) if train_args.dry_run_topology else jax.devices()
    num_processes = len({d.process_index for d in devices})
    mesh = make_mesh(dist_args.fsdp_size, devices)
    plan = plan_batches(train_args, len(devices), num_processes)
    peak_lr = effective_learning_rate(train_args, plan.global_batch_size)
    schedule = learning_rate_schedule(
        peak_lr, train_args.warmup_steps, train_args.num_train_steps, train_args.lr_scheduler_type
    )
    model = build_model(config, dtype=model_args.dtype, scan_layers=model_args.scan_layers, remat=model_args.remat)
    n_samples = feature_extractor.n_samples
    if n_samples // feature_extractor.hop_length != 2 * config.max_source_positions:
        raise ConfigError(
            f"The feature extractor's {feature_extractor.chunk_length} s chunks give "
            f"{n_samples // feature_extractor.hop_length} mel frames but the model expects "
            f"{2 * config.max_source_positions}: use a matching --feature_extractor_name."
        )
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
    eval_fn = jax.jit(
        functools.partial(
            eval_step,
            model=model,
            mel_filters=mel_filters,
            decoding=decoding if train_args.predict_with_generate else None,
            mesh=mesh,
        ),
        in_shardings=(step.state_sharding.params, step.data_sharding),
    )
    run_config = {
        "model": dataclasses.asdict(model_args),
        "data": dataclasses.asdict(data_args),
        "training": dataclasses.asdict(train_args),
        "distributed": dataclasses.asdict(dist_args),
        "resolved": {
            "processes": num_processes,
            "devices": len(devices),
            "device_kind": devices[0].device_kind,
            "mesh": dict(mesh.shape),
            **dataclasses.asdict(plan),
            "effective_learning_rate": peak_lr,
            "language": language,
            "task": data_args.task,
            "prompt_ids": list(prompt_ids),
            "decoder_length": text_settings[True].decoder_length,
            "total_train_examples": plan.global_batch_size * train_args.num_train_steps,
            "audio_samples_per_example": n_samples,
            "sampling_rate": feature_extractor.sampling_rate,
        },
    }
    return RunSetup(
        model_args=model_args,
        data_args=data_args,
        train_args=train_args,
        components=components,
        generation_config=generation_config,
        decoding=decoding,
        devices=tuple(devices),
        mesh=mesh,
        plan=plan,
        schedule=schedule,
        model=model,
        mel_filters=mel_filters,
        text_settings=text_settings,
        train_step=step,
        eval_step=eval_fn,
        run_config=run_config,
        eval_sets=tuple(eval_sets),
        test_sets=tuple(test_sets),
    )


RUN_IDENTITY = (
    ("model", "model_name_or_path"),
    ("model", "config_name"),
    ("data", "dataset_name"),
    ("data", "language"),
    ("data", "task"),
    ("training", "seed"),
)


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
    checkpoints_dir = output_dir / "checkpoints"
    has_checkpoints = checkpoints_dir.is_dir() and any(checkpoints_dir.iterdir())
    if (
        output_dir.is_dir()
        and any(p.name not in STARTUP_FILES for p in output_dir.iterdir())
        and not has_checkpoints
        and not train_args.overwrite_output_dir
        and train_args.do_train
    ):
        raise ConfigError(
            f"--output_dir {output_dir} is not empty and has no checkpoints to resume from: "
            "choose another --output_dir, or pass --overwrite_output_dir."
        )
    if (
        has_checkpoints
        and train_args.do_train
        and not train_args.resume_from_checkpoint
        and not train_args.overwrite_output_dir
    ):
        raise ConfigError(
            f"--output_dir {output_dir} has checkpoints but --resume_from_checkpoint is off: "
            "pass --overwrite_output_dir to start over, or resume."
        )
    # Every host looks at the directory before process 0 changes it: a host that looked after
    # process 0 wrote scream_config.json would refuse a fresh run as "not empty" and hang the rest.
    sync_hosts("output_dir checked")
    if train_args.overwrite_output_dir and train_args.do_train:
        if setup.is_main:
            for stale in ("checkpoints", "predictions", "tensorboard", "metrics.jsonl"):
                shutil.rmtree(output_dir / stale, ignore_errors=True) if (output_dir / stale).is_dir() else (
                    output_dir / stale
                ).unlink(missing_ok=True)
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
    data_args, train_args = setup.data_args, setup.train_args
    audio_settings = AudioSettings(
        setup.sampling_rate,
        setup.n_samples,
        data_args.min_duration_in_seconds,
        min(data_args.max_duration_in_seconds, setup.n_samples / setup.sampling_rate),
    )
    tokenizer, text_settings = setup.components.tokenizer, setup.text_settings[train]
    prepare = functools.partial(
        prepare_example,
        audio_column=data_args.audio_column_name,
        text_column=data_args.text_column_name,
        id_column=data_args.id_column_name,
        tokenizer=tokenizer,
        audio_settings=audio_settings,
        text_settings=text_settings,
        label_tokenizer=training_tokenizer(tokenizer, data_args.bpe_dropout) if train else tokenizer,
        source_column=data_args.source_column_name or "source",
    )
    make_source = functools.partial(
        load_source,
        data_args,
        split,
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
        default_prompt_ids=tuple(setup.run_config["resolved"]["prompt_ids"]),
    )
    return SpeechBatches(
        lambda epoch: make_source(epoch=epoch),
        prepare,
        batch_size=batch_size,
        collate_fn=collate_fn,
        repeat=train,
        num_workers=data_args.preprocessing_num_workers,
        prefetch_batches=data_args.prefetch_batches,
        state=state,
        read_retries=data_args.read_retries,
        read_retry_wait_s=data_args.read_retry_wait_s,
    )


def eval_batches(setup: RunSetup, eval_set: EvalSet):
    """One evaluation set, this host's share, one pass."""
    return make_batches(
        setup,
        eval_set.split,
        train=False,
        batch_size=setup.plan.per_host_eval_batch_size,
        dataset_name=eval_set.dataset_name,
    )


def check_eval_sets(setup: RunSetup):
    """Open every evaluation and test set now: a typo in a split fails at start-up, not after hours of training."""
    train_args = setup.train_args
    for eval_set in (setup.eval_sets if train_args.do_eval else ()) + (
        setup.test_sets if train_args.do_predict else ()
    ):
        eval_batches(setup, eval_set).make_source(0)


def evaluate(setup: RunSetup, params, step: int, log: RunLog, kind: str = "eval") -> dict:
    """Evaluate `params` on every set of `kind` (eval: --eval_split_name, test: --test_split_name):
    metrics logged (combine_set_metrics' names) and returned; each set's predictions written to
    predictions/<set>/step_N.jsonl (test sets: predictions/test/<set>/step_N.jsonl)."""
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
            directory = setup.output_dir / "predictions" / ("test" if kind == "test" else "") / eval_set.name
            write_predictions(directory / f"step_{step}.jsonl", rows, train_args.log_max_eval_predictions)
            table = "\n".join(f"| {r['reference']} | {r['prediction']} |" for r in rows[:10])
            tables.append((f"{kind}/{eval_set.name}/predictions", "| reference | prediction |\n|---|---|\n" + table))
    results = combine_set_metrics(kind, per_set)
    log.write(step, results)
    for tag, table in tables:
        log.text(step, tag, table)
    return results


def export(setup: RunSetup, params, step: int, eval_results: dict) -> threading.Thread | None:
    """Write the model in transformers' format and its model card into --output_dir; with
    --push_to_hub start the upload. Every host calls it (gathering parameters is a collective);
    returns the upload thread on process 0."""
    params = gather_params(params)
    if not setup.is_main:
        return None
    export_pretrained(
        params,
        setup.components.config,
        setup.output_dir,
        tokenizer=setup.components.tokenizer,
        feature_extractor=setup.components.feature_extractor,
        generation_config=setup.generation_config,
    )
    if setup.train_args.export_ctranslate2:
        export_ctranslate2(setup.output_dir, setup.train_args.export_ctranslate2)
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
    return push_to_hub_in_background(
        str(setup.output_dir),
        train_args.hub_model_id or train_args.run_name,
        train_args.hub_private_repo,
        f"step {step}",
    )


def stop_on_sigterm() -> threading.Event:
    """An event set by SIGTERM (a preemption notice on one host): the loop checkpoints and stops.
    Multi-host runs use JAX's own preemption notice instead (manager.reached_preemption)."""
    stop_requested = threading.Event()
    if jax.process_count() == 1:
        signal.signal(signal.SIGTERM, lambda *_: stop_requested.set())
    return stop_requested


def train_loop(
    setup: RunSetup,
    state: TrainState,
    *,
    train_batches,
    manager,
    log: RunLog,
    stop_requested: threading.Event,
    best: dict | None = None,
):
    """Steps until --num_train_steps or a stop request; logs, evaluates and checkpoints on cadence,
    and with --push_to_hub exports and pushes each evaluation that is a new best. `best` (from the
    checkpoint's metadata when resuming) is the best evaluation so far: {step, metric, value,
    results}. Returns (state, the best evaluation or None, whether it stopped early).

    Each step's metrics are read one step later, so the host never stalls the device; a
    non-finite loss still stops the run before the state after it can be checkpointed.
    """
    train_args, plan, schedule, is_main = setup.train_args, setup.plan, setup.schedule, setup.is_main
    step_fn, data_sharding = setup.train_step.fn, setup.train_step.data_sharding
    num_steps = train_args.num_train_steps
    step = int(jax.device_get(state.step))
    bar = tqdm(total=num_steps, initial=step, disable=not is_main, desc="train", dynamic_ncols=True)
    batch_iterator = iter(train_batches)
    flops_per_example = training_flops_per_example(setup.model.dims, setup.run_config["resolved"]["decoder_length"])
    peak_flops = device_peak_flops(setup.devices[0], setup.model_args.dtype)

    def new_window(losses=(), grad_norms=()):  # what the next logging line averages over
        return {
            "losses": list(losses),
            "grad_norms": list(grad_norms),
            "wait_s": 0.0,
            "audio_s": 0.0,
            "start": time.perf_counter(),
            "steps": 0,
        }

    window = new_window()
    shown: dict = {}  # the progress bar's throughput figures, from the last logging line
    # Where the wall time goes, cumulative since this launch: the pod's goodput is train_s / wall.
    clock = {"start": time.perf_counter(), "train_s": 0.0, "eval_s": 0.0, "checkpoint_s": 0.0}
    in_flight = None  # (step, device metrics) not yet read
    pushes: list[threading.Thread] = []
    metric, greater_is_better = train_args.metric_for_best_model, train_args.greater_is_better
    if best is not None and best["metric"] != metric:  # resumed under another --metric_for_best_model
        warn(f"the checkpoint's best evaluation was by {best['metric']}; from now on the best is by {metric}")
        best = None

    def settle():
        nonlocal in_flight
        if in_flight is None:
            return
        done_step, metrics = in_flight
        in_flight = None
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise TrainingStopped(
                f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {done_step}. Stopping; the last "
                f"checkpoint (step {manager.latest_step()}) is intact. Look for bad audio or labels around example "
                f"{(done_step - 1) * plan.global_batch_size}, or lower --learning_rate, then relaunch."
            )
        window["losses"].append(loss)
        window["grad_norms"].append(grad_norm)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{float(schedule(done_step - 1)):.2e}", **shown)

    stopped_early = False
    try:
        while step < num_steps:
            wait_start = time.perf_counter()
            host_batch, examples = next(batch_iterator)
            window["wait_s"] += time.perf_counter() - wait_start
            window["audio_s"] += sum(len(example["audio"]) for example in examples) / setup.sampling_rate
            state, metrics = step_fn(state, to_global_batch(host_batch, data_sharding))
            step += 1
            settle()
            in_flight = (step, metrics)
            window["steps"] += 1
            bar.update(1)

            stopping = stop_requested.is_set() or (jax.process_count() > 1 and manager.reached_preemption(step))
            is_last = step == num_steps
            do_log = step % train_args.logging_steps == 0 or is_last
            do_eval = train_args.do_eval and (step % train_args.eval_steps == 0 or is_last)
            # Every evaluation is checkpointed, so that the final export can restore the best one.
            do_save = step % train_args.save_steps == 0 or is_last or stopping or do_eval
            if do_log or do_eval or do_save:
                settle()
            if do_log:
                elapsed = time.perf_counter() - window["start"]
                clock["train_s"] += elapsed
                skipped = collections.Counter()
                hosts = allgather_json({"skipped": dict(train_batches.skipped), "audio_s": window["audio_s"]})
                for host in hosts:
                    skipped.update(host["skipped"])
                throughput = throughput_metrics(
                    steps=window["steps"],
                    seconds=elapsed,
                    global_batch_size=plan.global_batch_size,
                    audio_seconds=sum(host["audio_s"] for host in hosts),
                    flops_per_example=flops_per_example,
                    num_devices=len(setup.devices),
                    peak_flops=peak_flops,
                )
                wall_s = time.perf_counter() - clock["start"]
                log.write(
                    step,
                    {
                        "examples_seen": step * plan.global_batch_size,
                        "train/loss": float(np.mean(window["losses"])),
                        "train/learning_rate": float(schedule(step - 1)),
                        "train/grad_norm": float(np.mean(window["grad_norms"])),
                        "train/data_wait_fraction": window["wait_s"] / elapsed,
                        "train/epoch": train_batches.epoch,
                        **throughput,
                        "time/train_s": clock["train_s"],
                        "time/eval_s": clock["eval_s"],
                        "time/checkpoint_s": clock["checkpoint_s"],
                        "time/goodput": clock["train_s"] / wall_s,
                        **{f"data/skipped_{reason}": count for reason, count in sorted(skipped.items())},
                    },
                )
                shown["ex/s"] = f"{throughput['throughput/examples_per_s']:.3g}"
                if "throughput/mfu" in throughput:
                    shown["mfu"] = f"{throughput['throughput/mfu']:.1%}"
                window = new_window()
            elif do_eval or do_save:  # steps since the last logging line count as training time too
                clock["train_s"] += time.perf_counter() - window["start"]
            if do_eval:
                eval_start = time.perf_counter()
                eval_results = evaluate(setup, state.params, step, log)
                clock["eval_s"] += time.perf_counter() - eval_start
                if metric not in eval_results:
                    raise ConfigError(
                        f"--metric_for_best_model {metric} is not among the logged eval metrics: "
                        + ", ".join(sorted(eval_results))
                        + "."
                    )
                improved = is_better(eval_results[metric], best, greater_is_better)
                if improved:
                    best = {"step": step, "metric": metric, "value": eval_results[metric], "results": eval_results}
                if is_main:
                    averaged = {k: v for k, v in eval_results.items() if k.count("/") == 1}
                    bar.write(
                        " ".join(f"{k}={v:.4g}" for k, v in averaged.items())
                        + f" (step {step}; best {metric}={best['value']:.4g} at step {best['step']})"
                    )
            if do_save:
                save_start = time.perf_counter()
                meta = {
                    "step": step,
                    "examples_seen": step * plan.global_batch_size,
                    "num_processes": jax.process_count(),
                    "data_states": allgather_json(train_batches.state_dict()),
                    "best": best,  # resuming keeps knowing which evaluation to export
                }
                save_checkpoint(manager, step, state, meta, metrics={**eval_results, "step": step} if do_eval else None)
                clock["checkpoint_s"] += time.perf_counter() - save_start  # the asynchronous write's blocking part
            if do_eval and improved and train_args.push_to_hub and not is_last:  # run() exports the last
                pushes.append(export(setup, state.params, step, eval_results))
            if stopping and not is_last:
                stopped_early = True
                break
            if do_eval or do_save:  # time evaluation and saving apart from the steps
                window = new_window(window["losses"], window["grad_norms"])
    finally:
        manager.wait_until_finished()
        bar.close()
    for thread in pushes:
        if thread is not None:
            thread.join()
    return state, best, stopped_early


def kept_params(setup: RunSetup, manager, state: TrainState, best: dict | None):
    """The parameters to export and test: the best evaluation's, restored from its checkpoint when
    it is not the last step's; the last step's without evaluations."""
    if best is None or best["step"] == int(jax.device_get(state.step)):
        return state.params
    manager.wait_until_finished()
    say(f"exporting the best evaluation: step {best['step']} ({best['metric']}={best['value']:.4g})")
    return restore_checkpoint(manager, best["step"], setup.train_step.abstract_state)[0].params


class NotCompiled(Exception):
    """--no_dry_run_compile: the plan without the compiled step's memory."""


def dry_run(setup: RunSetup) -> int:
    """Print the plan and the compiled train step's memory per device; compile only, no data."""
    run_config, plan, train_args, data_args = setup.run_config, setup.plan, setup.train_args, setup.data_args
    resolved, model, devices = run_config["resolved"], setup.model, setup.devices
    abstract_state = setup.train_step.abstract_state
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state.params))
    batch = abstract_batch(
        plan.global_batch_size,
        n_samples=setup.n_samples,
        max_label_length=resolved["decoder_length"],
        sharding=setup.train_step.data_sharding,
    )
    plan_out = {
        "hosts": resolved["processes"],
        "devices": resolved["devices"],
        "device_kind": resolved["device_kind"],
        "mesh": resolved["mesh"],
        "global_batch": plan.global_batch_size,
        "per_host_batch": plan.per_host_batch_size,
        "per_device_batch": plan.per_device_batch_size,
        "micro_batch_per_device": plan.per_device_batch_size // train_args.gradient_accumulation_steps,
        "gradient_accumulation_steps": train_args.gradient_accumulation_steps,
        "eval_batch": plan.eval_batch_size,
        "learning_rate": train_args.learning_rate,
        "effective_learning_rate": resolved["effective_learning_rate"],
        "lr_scheduler_type": train_args.lr_scheduler_type,
        "warmup_steps": train_args.warmup_steps,
        "num_train_steps": train_args.num_train_steps,
        "total_train_examples": resolved["total_train_examples"],
        "eval_steps": train_args.eval_steps,
        "save_steps": train_args.save_steps,
        "model": run_config["model"]["model_name_or_path"] or run_config["model"]["config_name"],
        "dataset": data_args.dataset_name,
        "language": resolved["language"],
        "task": data_args.task,
        "dtype": str(model.dtype),
        "param_dtype": run_config["model"]["param_dtype"],
        "adam_mu_dtype": train_args.adam_mu_dtype,
        "decoder_length": resolved["decoder_length"],
        "bpe_dropout": data_args.bpe_dropout,
        "scan_layers": model.scan_layers,
        "remat": model.remat,
        "parameters": num_params,
        "output_dir": train_args.output_dir,
        "hub_model_id": train_args.hub_model_id,
    }
    try:
        if not train_args.dry_run_compile:
            raise NotCompiled
        compiled = setup.train_step.fn.lower(abstract_state, batch).compile()
        memory = compiled_memory(compiled)
        plan_out["memory_per_device_bytes"] = memory["total_bytes"]
        plan_out["fits"] = None
        if devices[0].platform == "tpu":
            plan_out["fits"] = memory["total_bytes"] <= TPU_V4_USABLE_BYTES
    except NotCompiled:
        plan_out["memory_per_device_bytes"] = plan_out["fits"] = None
    except Exception as error:  # XLA says RESOURCE_EXHAUSTED when a TPU step cannot fit
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        plan_out["memory_per_device_bytes"] = None
        plan_out["fits"] = False
    width = max(map(len, plan_out))
    for name, value in plan_out.items():
        print(f"{name:>{width}}  {value}")
    if plan_out.get("memory_per_device_bytes"):
        print(f"{'memory_per_device':>{width}}  {plan_out['memory_per_device_bytes'] / 2**30:.2f} GiB")
    if plan_out["fits"] is False:
        print(
            f"warning: the train step does not fit a {devices[0].device_kind} (about "
            f"{TPU_V4_USABLE_BYTES / 2**30:.2f} GiB usable): raise --fsdp_size, use --remat, or lower the per-device batch."
        )
    print("plan_json: " + json.dumps(plan_out, default=str), flush=True)
    return 0


def run(argv: list[str] | None = None) -> int:
    """One run, as its table of contents."""
    model_args, data_args, train_args, dist_args = parse_arguments(argv)
    if not (train_args.do_train or train_args.do_eval or train_args.do_predict or train_args.dry_run):
        raise ConfigError("Nothing to do: pass --do_train, --do_eval and/or --do_predict (or --dry_run).")
    if not train_args.dry_run:
        initialise_distributed(dist_args)
    setup = setup_run(model_args, data_args, train_args, dist_args)
    if train_args.dry_run:
        return dry_run(setup)

    prepare_output_dir(setup)
    manager = (
        checkpoint_manager(
            train_args.output_dir,
            train_args.save_total_limit,
            train_args.metric_for_best_model,
            train_args.greater_is_better,
        )
        if train_args.do_train
        else None
    )
    state, restored_meta = init_or_restore(setup, manager)
    check_eval_sets(setup)
    log = RunLog(train_args.output_dir, train_args.report_to, setup.run_config, train_args, enabled=setup.is_main)

    if not train_args.do_train:  # evaluate and/or test the given model
        step = int(jax.device_get(state.step))
        if train_args.do_eval:
            evaluate(setup, state.params, step, log)
        if train_args.do_predict:
            evaluate(setup, state.params, step, log, kind="test")
        log.close()
        return 0

    train_batches = make_batches(
        setup,
        data_args.train_split_name,
        train=True,
        batch_size=setup.plan.per_host_batch_size,
        state=restored_meta["data_states"][jax.process_index()] if restored_meta else None,
    )
    state, best, stopped_early = train_loop(
        setup,
        state,
        train_batches=train_batches,
        manager=manager,
        log=log,
        stop_requested=stop_on_sigterm(),
        best=restored_meta.get("best") if restored_meta else None,
    )
    if not stopped_early:  # the final export: the best evaluation's model (the last one without --do_eval)
        params = kept_params(setup, manager, state, best)
        results = dict(best["results"]) if best else {}
        if train_args.do_predict:
            results.update(evaluate(setup, params, int(jax.device_get(state.step)), log, kind="test"))
        push = export(setup, params, best["step"] if best else int(jax.device_get(state.step)), results)
        if push is not None:
            push.join()
    log.close()
    if stopped_early:
        say(f"stopped by SIGTERM after step {int(jax.device_get(state.step))}; checkpoint saved, relaunch to resume")
    else:
        say(f"done: model exported to {setup.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """run() with its errors as the user sees them: a ConfigError exits 2, TrainingStopped 1."""
    try:
        return run(argv)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    except TrainingStopped as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
