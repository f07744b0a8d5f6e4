#!/usr/bin/env python
"""Distil Whisper with Scream: distil-whisper's method (Gandhi et al., 2023) as NB used it for
nb-whisper-large-distil-turbo-beta, on run_scream.py's data, model, evaluation and checkpoints.

Two modes, one command line (run_scream.py's flags plus this file's DistilArguments):
  --do_pseudo_label  decode a split with the teacher and write it back as a hub-style parquet
                     dataset with the teacher's transcript and its WER per row (resumable);
  --do_train ...     train a student: the teacher's encoder (optionally frozen) and N of its
                     decoder layers, on 0.8 x cross-entropy + 1.0 x T^2 x KL(teacher || student),
                     with the teacher's logits from the same jitted step.
Everything else (evaluation, checkpoints, exact resume, export to transformers, CTranslate2 and
whisper.cpp) is run_scream.execute(): the student is an ordinary Whisper with fewer decoder layers.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pyarrow as pa
import pyarrow.parquet as pq
from jax.experimental import multihost_utils

import run_scream as rs
from run_scream import ConfigError, option

# --- arguments ---

PSEUDO_LABEL_COLUMN = "whisper_transcript"  # distil-whisper's name for the teacher's transcripts
OVER_WER = "over_wer_threshold"  # the skip reason of the WER filter
rs.SKIP_REASON_FLAGS.setdefault(OVER_WER, "--wer_threshold")  # named when a whole epoch is filtered out


@dataclass
class DistilArguments:
    teacher_model_name_or_path: str | None = option(None, "Required. The teacher: hub id or directory of a Whisper.")
    student_decoder_layers: int | None = option(
        None,
        "Build the student from the teacher: its encoder, embeddings, final layer norm and N of its decoder layers "
        "(decoder_layer_map: 2 = first and last), recorded as --config_name. Without it --model_name_or_path is "
        "the student.",
    )
    freeze_encoder: bool = option(
        False, "No gradients, no optimizer state for the encoder; the teacher then reuses the student's encoder output."
    )
    ce_weight: float = option(0.8, "Weight of the cross-entropy on the labels.")
    kl_weight: float = option(1.0, "Weight of KL(teacher || student) at --temperature T, times T^2.")
    temperature: float = option(2.0, "Softmax temperature of the KL term.")
    pseudo_label_column_name: str | None = option(
        None, f"Column of the teacher's transcripts (e.g. {PSEUDO_LABEL_COLUMN})."
    )
    train_on_pseudo_labels: bool = option(
        True, "Train on --pseudo_label_column_name (distil-whisper's way); --text_column_name is then the reference."
    )
    wer_threshold: float | None = option(
        None,
        "Skip (and count) training rows whose normalised WER x100 (eval's wer_normalized) between the text and "
        "pseudo-label columns is above this, or has no reference. distil-whisper's paper: 10.",
    )
    do_pseudo_label: bool = option(
        False,
        "Decode --pseudo_label_split_name with the teacher into OUTPUT_DIR/data/<split>-XXXXX-of-YYYYY.parquet: every "
        "column plus the transcript and <column>_wer; a relaunch resumes.",
    )
    pseudo_label_split_name: str | None = option(None, "Splits to pseudo-label, comma-separated (default: train).")
    pseudo_label_shard_rows: int = option(1000, "Rows per shard a host writes (a killed run redoes at most these).")

    def __post_init__(self):
        if self.temperature <= 0 or min(self.ce_weight, self.kl_weight) < 0 or self.pseudo_label_shard_rows < 1:
            raise ConfigError("--temperature and --pseudo_label_shard_rows must be positive, the weights at least 0.")
        if self.wer_threshold is not None and not self.pseudo_label_column_name:
            raise ConfigError("--wer_threshold compares with --pseudo_label_column_name: give that column too.")
        if (self.student_decoder_layers or 1) < 1:
            raise ConfigError("--student_decoder_layers must be at least 1.")


# --- student ---


def decoder_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """The teacher's decoder layers the student starts from: maximally spaced, the last always the
    teacher's last (distil-whisper's np.linspace(..., dtype=int), which rounds down)."""
    if student_layers > teacher_layers:
        raise ConfigError(f"--student_decoder_layers {student_layers} exceeds the teacher's {teacher_layers}.")
    chosen = np.linspace(0, teacher_layers - 1, student_layers).astype(int)
    chosen[-1] = teacher_layers - 1
    return chosen.tolist()


def student_from_teacher(teacher: rs.Pretrained, num_layers: int) -> rs.Pretrained:
    """The student: the teacher's config with `num_layers` decoder layers, its encoder, embeddings and
    final layer norm, decoder layers from decoder_layer_map (weights None for a dry run), and its
    generation config with the alignment heads of kept layers renumbered (none kept: Whisper's default)."""
    chosen = decoder_layer_map(teacher.config.decoder_layers, num_layers)
    config = copy.deepcopy(teacher.config)
    config.decoder_layers = num_layers
    params = None
    if teacher.params is not None:
        decoder = {k: v for k, v in teacher.params["decoder"].items() if not k.startswith("layers_")}
        decoder.update({f"layers_{i}": teacher.params["decoder"][f"layers_{j}"] for i, j in enumerate(chosen)})
        params = {"encoder": teacher.params["encoder"], "decoder": decoder}
    generation_config = copy.deepcopy(teacher.generation_config)
    if generation_config is not None and getattr(generation_config, "alignment_heads", None):
        position = {layer: i for i, layer in enumerate(chosen)}
        heads = [[position[layer], head] for layer, head in generation_config.alignment_heads if layer in position]
        generation_config.alignment_heads = heads or None
    source = f"{teacher.source} (decoder layers {chosen})"
    return rs.Pretrained(config, params, teacher.tokenizer, teacher.feature_extractor, generation_config, source)


def student_components(model_args, distil_args: DistilArguments, teacher: rs.Pretrained, *, weights: bool):
    """(the student's components, model_args as recorded): built from the teacher, or read from
    --model_name_or_path (checked to fit the teacher)."""
    if distil_args.student_decoder_layers:
        if model_args.model_name_or_path or model_args.config_name:
            raise ConfigError("--student_decoder_layers builds the student: drop --model_name_or_path / --config_name.")
        student = student_from_teacher(teacher, distil_args.student_decoder_layers)
        return student, dataclasses.replace(model_args, config_name=distil_args.teacher_model_name_or_path)
    if not model_args.model_name_or_path:
        raise ConfigError("Give --student_decoder_layers N (a student from the teacher) or --model_name_or_path.")
    student = rs.resolve_components(model_args, weights=weights)
    if student.config.vocab_size != teacher.config.vocab_size or student.config.d_model != teacher.config.d_model:
        raise ConfigError("The student's vocabulary or width differs from the teacher's: distil from its own teacher.")
    if distil_args.freeze_encoder and student.params is not None and teacher.params is not None:
        pairs = zip(jax.tree.leaves(student.params["encoder"]), jax.tree.leaves(teacher.params["encoder"]))
        if not all(np.array_equal(a, b) for a, b in pairs):
            raise ConfigError(
                "--freeze_encoder shares the teacher's encoder output, but the student's encoder differs."
            )
    return student, model_args


# --- loss and step ---


@dataclass(frozen=True)
class LossWeights:
    ce: float = 0.8
    kl: float = 1.0
    temperature: float = 2.0
    label_smoothing: float = 0.0


def distillation_loss(student_logits, teacher_logits, labels, weights: LossWeights) -> dict:
    """Sums over the label tokens (labels != -100: padding and previous-text prompts carry none) of
    weights.ce x cross-entropy + weights.kl x T^2 x KL(p_teacher || p_student), p = softmax(logits / T),
    with the parts and the token count; the step divides by the global token count."""
    ce, mask = rs.token_losses(student_logits, labels, weights.label_smoothing)
    t = weights.temperature
    teacher_log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    student_log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    kl = jnp.where(mask, (jnp.exp(teacher_log_p) * (teacher_log_p - student_log_p)).sum(axis=-1), 0.0)
    ce_sum, kl_sum = ce.sum(), kl.sum()
    loss = weights.ce * ce_sum + weights.kl * t * t * kl_sum
    return {"loss": loss, "ce": ce_sum, "kl": kl_sum, "num_tokens": mask.sum()}


def trained_part(params: dict, freeze_encoder: bool) -> dict:
    return {"decoder": params["decoder"]} if freeze_encoder else params


def trained_optimizer(optimizer, freeze_encoder: bool) -> optax.GradientTransformation:
    """`optimizer` over trained_part(params), initialised from the whole tree as
    run_scream.initial_train_state does it: with --freeze_encoder no state for the encoder."""
    return optax.GradientTransformation(
        lambda params: optimizer.init(trained_part(params, freeze_encoder)), optimizer.update
    )


def micro_batch_losses(trained, frozen, teacher_params, batch, rng, *, student, teacher, mel_filters, weights):
    """distillation_loss of a (micro-)batch as a function of the trained parameters. With a frozen
    encoder (in `frozen`) one deterministic encoder pass serves student and teacher, whose
    parameters then hold only its decoder."""
    params, rngs = {**frozen, **trained}, {"dropout": rng}
    features = rs.log_mel(batch["audio"], mel_filters)
    if "encoder" in frozen:
        encoded = teacher_encoded = student.apply({"params": params}, features, method=rs.Whisper.encode)
    else:
        encoded = student.apply({"params": params}, features, train=True, rngs=rngs, method=rs.Whisper.encode)
        teacher_encoded = teacher.apply({"params": teacher_params}, features, method=rs.Whisper.encode)
    ids = batch["decoder_input_ids"]
    logits, _ = student.apply({"params": params}, ids, encoded, train=True, rngs=rngs, method=rs.Whisper.decode)
    teacher_logits, _ = teacher.apply({"params": teacher_params}, ids, teacher_encoded, method=rs.Whisper.decode)
    sums = distillation_loss(logits, jax.lax.stop_gradient(teacher_logits), batch["labels"], weights)
    return sums["loss"], sums["num_tokens"]


def distil_train_step(
    state: rs.TrainState,
    teacher_params,
    batch: dict,
    *,
    student: rs.Whisper,
    teacher: rs.Whisper,
    optimizer,
    mel_filters,
    weights: LossWeights,
    freeze_encoder: bool,
    accumulation_steps: int = 1,
    mesh=None,
):
    """run_scream.train_step with the distillation loss: gradients of the trained part only, the
    teacher's logits computed here (no gradient); the loss is per label token of the global batch."""
    with rs.on_mesh(mesh):
        step_rng = jax.random.fold_in(state.rng, state.step)
        trained = trained_part(state.params, freeze_encoder)
        frozen = {k: v for k, v in state.params.items() if k not in trained}
        losses = functools.partial(
            micro_batch_losses, student=student, teacher=teacher, mel_filters=mel_filters, weights=weights
        )
        gradient_of = jax.value_and_grad(lambda p, b, rng: losses(p, frozen, teacher_params, b, rng), has_aux=True)
        if accumulation_steps == 1:
            (loss_sum, num_tokens), grads = gradient_of(trained, batch, step_rng)
        else:  # as run_scream.train_step: micro-batch a takes rows a, a+A, ...; gradients summed in float32

            def split(x):
                x = x.reshape((x.shape[0] // accumulation_steps, accumulation_steps) + x.shape[1:]).swapaxes(0, 1)
                sharding = None if mesh is None else rs.NamedSharding(mesh, rs.P(None, rs.BATCH_AXES))
                return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)

            def accumulate(carry, inputs):
                micro, micro_grads = gradient_of(trained, inputs[0], jax.random.fold_in(step_rng, inputs[1]))
                return jax.tree.map(jnp.add, carry, (micro_grads, *micro)), None

            zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trained), jnp.float32(0), jnp.int32(0))
            inputs = (jax.tree.map(split, batch), jnp.arange(accumulation_steps))
            (grads, loss_sum, num_tokens), _ = jax.lax.scan(accumulate, zeros, inputs)
        denominator = jnp.maximum(num_tokens, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grads, trained)
        updates, opt_state = optimizer.update(grads, state.opt_state, trained)
        params = {**state.params, **optax.apply_updates(trained, updates)}
        metrics = {"loss": loss_sum / denominator, "grad_norm": optax.tree.norm(grads), "num_tokens": num_tokens}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


@dataclass(frozen=True)
class WithTeacher:
    """The jitted distillation step as run_scream's loop and dry run call a train step, (state,
    batch): the teacher's parameters are its argument, sharded like the student's, never a constant."""

    jitted: Any
    teacher: Any  # device arrays; ShapeDtypeStructs with shardings for a dry run

    def __call__(self, state, batch):
        return self.jitted(state, self.teacher, batch)

    def lower(self, state, batch):
        return self.jitted.lower(state, self.teacher, batch)


def host_params(params, model: rs.Whisper, dtype, *, scan_layers: bool, freeze_encoder: bool = False):
    """Host parameters (unstacked) as the step takes them: stacked for --scan_layers, the frozen
    encoder left out, cast on the host to `dtype`."""
    params = trained_part(rs.stack_layers(params, model.dims) if scan_layers else params, freeze_encoder)
    return jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)


def jit_distil_step(setup: rs.RunSetup, distil_args: DistilArguments, teacher: rs.Pretrained) -> rs.JittedTrainStep:
    """run_scream.jit_train_step's shardings and abstract state for the student (optimizer state of
    the trained part), the teacher's parameters in the compute dtype sharded by the same rule, and
    the jitted distil_train_step holding them as its argument."""
    model_args, freeze = setup.model_args, distil_args.freeze_encoder
    optimizer = trained_optimizer(rs.make_optimizer(setup.train_args, setup.schedule), freeze)
    base = rs.jit_train_step(
        setup.model, optimizer, setup.mesh, mel_filters=setup.mel_filters, param_dtype=model_args.param_dtype
    )
    teacher_model = rs.build_model(teacher.config, dtype=model_args.dtype, scan_layers=model_args.scan_layers)
    abstract = jax.eval_shape(
        lambda: rs.cast_params(rs.init_params(teacher_model, jax.random.key(0)), model_args.dtype)
    )
    abstract = trained_part(abstract, freeze)  # frozen: the teacher's encoder is the student's
    sharding = rs.state_shardings(abstract, setup.mesh)
    weights = LossWeights(
        distil_args.ce_weight, distil_args.kl_weight, distil_args.temperature, setup.train_args.label_smoothing_factor
    )
    step = functools.partial(
        distil_train_step,
        student=setup.model,
        teacher=teacher_model,
        optimizer=optimizer,
        mel_filters=setup.mel_filters,
        weights=weights,
        freeze_encoder=freeze,
        accumulation_steps=setup.train_args.gradient_accumulation_steps,
        mesh=setup.mesh,
    )
    in_shardings = (base.state_sharding, sharding, base.data_sharding)
    jitted = jax.jit(step, in_shardings=in_shardings, out_shardings=(base.state_sharding, None), donate_argnums=0)
    if teacher.params is None:  # a dry run: shapes only
        value = rs.with_shardings(abstract, sharding)
    else:
        value = host_params(
            teacher.params, teacher_model, model_args.dtype, scan_layers=model_args.scan_layers, freeze_encoder=freeze
        )
        value = jax.device_put(value, sharding)
    return dataclasses.replace(base, fn=WithTeacher(jitted, value))


# --- data ---


@dataclass(frozen=True)
class DistilColumns(rs.Columns):
    """The training stream's columns plus the pseudo-labels (select_columns keeps every field's column)."""

    pseudo_label: str | None = None


def row_wer(reference: str | None, hypothesis: str | None) -> float | None:
    """WER x100 of one row after Whisper's BasicTextNormalizer (eval's wer_normalized); None when the
    reference is empty after normalising."""
    return rs.transcription_metrics([reference or ""], [hypothesis or ""]).get("wer_normalized")


def distil_prepare(prepare, *, text_column: str, distil_args: DistilArguments):
    """The training rows' prepare_example behind the WER filter, reading the pseudo-labels as the
    transcript with --train_on_pseudo_labels."""
    column, threshold = distil_args.pseudo_label_column_name, distil_args.wer_threshold

    def prepare_row(row: dict):
        if column not in row:
            raise ConfigError(f"--pseudo_label_column_name {column!r} is not a column of the training data.")
        if threshold is not None:
            wer = row_wer(row.get(text_column), row[column])
            if wer is None or wer > threshold:
                return None, OVER_WER
        return prepare({**row, text_column: row[column]} if distil_args.train_on_pseudo_labels else row)

    return prepare_row


# --- pseudo-labelling ---
# Each host decodes its share of a split and appends rows to its own shards in
# OUTPUT_DIR/pseudo_labels/<split>/host<H>-<N>.parquet, each written whole (a temporary file, then
# a rename) with a JSON file holding the stream's state after its last row: a relaunch continues
# from the last shard. When every host is done, process 0 renames the shards to the hub's layout,
# OUTPUT_DIR/data/<split>-XXXXX-of-YYYYY.parquet, which load_dataset(OUTPUT_DIR) reads.

WORK_DIR = "pseudo_labels"
FINISHED = "finished.json"  # in a split's work directory: its labelling is done, its final shard names
SUMMARY_FILE = "pseudo_labels.json"


def labelling_source(data_args, split: str):
    """(this host's share of `split`: every column, audio undecoded, streamed in file order; its features)."""
    try:
        source = datasets.load_dataset(
            data_args.dataset_name, data_args.dataset_config_name, split=split, streaming=True
        )
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
        raise ConfigError(
            f"Cannot read split {split!r} of --dataset_name {data_args.dataset_name!r}: {error}"
        ) from None
    features, source = source.features, source.cast_column(data_args.audio_column_name, datasets.Audio(decode=False))
    if jax.process_count() > 1:
        source = datasets.distributed.split_dataset_by_node(source, jax.process_index(), jax.process_count())
    return source, features


def labelling_example(row: dict, *, tokenizer, audio_settings, text_settings, columns):
    """A row -> ({audio, the forced prefix of its own language and task, the row}, None), or
    (None, skip reason) as prepare_example's: an undecodable row is counted, not written."""
    audio, reason = rs.decode_row_audio(row, columns.audio, audio_settings)
    language, task, reason = (
        (None, None, reason) if reason else rs.resolve_language_and_task(row, text_settings, columns)
    )
    if reason:
        return None, reason
    try:
        prefix = rs.decoder_prefix(tokenizer, language, task, timestamps=False)
    except ConfigError:
        return None, "unknown_language"
    row = {k: v for k, v in row.items() if k != rs.EPOCH_FIELD}
    return {"audio": audio[: audio_settings.n_samples], "prefix": np.asarray(prefix, np.int32), "row": row}, None


def labelling_collate(examples: list[dict], *, batch_size: int, n_samples: int, default_prefix) -> dict:
    audio = np.zeros((batch_size, n_samples), np.float32)
    prompt_ids = np.tile(np.asarray(default_prefix, np.int32), (batch_size, 1))
    for i, example in enumerate(examples):
        audio[i, : len(example["audio"])] = example["audio"]
        prompt_ids[i] = example["prefix"]
    return {"audio": audio, "prompt_ids": prompt_ids}


def labelling_step(params, batch: dict, *, model: rs.Whisper, mel_filters, decoding, mesh=None):
    """Eval's decoding (run_scream.eval_step's generate) of a batch, without its loss."""
    with rs.on_mesh(mesh):
        return rs.generate(model, params, rs.log_mel(batch["audio"], mel_filters), batch["prompt_ids"], decoding)


def write_shard(path: Path, rows: list[dict], features, state: dict):
    """One shard, whole or not at all; its JSON state first, so a shard never lacks one."""
    path.with_suffix(".json").write_text(json.dumps(state))
    table = pa.Table.from_pylist(rows, schema=None if features is None else features.arrow_schema)
    pq.write_table(table, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def labelling_batches(setup: rs.RunSetup, split: str, state: dict | None) -> rs.SpeechBatches:
    """This host's SpeechBatches of `split` for labelling: one pass, every column, eval's batch size."""
    data_args, rate, batch_size = setup.data_args, setup.sampling_rate, setup.plan.per_host_eval_batch_size
    max_s = min(data_args.max_duration_in_seconds, setup.n_samples / rate)
    audio_settings = rs.AudioSettings(rate, setup.n_samples, data_args.min_duration_in_seconds, max_s)
    tokenizer, settings, columns = setup.components.tokenizer, setup.text_settings[False], setup.columns[False]
    return rs.SpeechBatches(
        lambda epoch: labelling_source(data_args, split)[0],
        functools.partial(
            labelling_example,
            tokenizer=tokenizer,
            audio_settings=audio_settings,
            text_settings=settings,
            columns=columns,
        ),
        batch_size=batch_size,
        collate_fn=functools.partial(
            labelling_collate, batch_size=batch_size, n_samples=setup.n_samples, default_prefix=setup.prompt_ids
        ),
        repeat=False,
        state=state,
        **rs.reading_options(data_args),
    )


def pseudo_label_split(setup: rs.RunSetup, params, label_fn, split: str, distil_args: DistilArguments) -> dict:
    """Label `split` on every host in step (a host out of rows decodes padding), writing each
    host's rows to its shards; resumes after this host's last shard. Returns this host's skips."""
    column = distil_args.pseudo_label_column_name or PSEUDO_LABEL_COLUMN
    work, host = setup.output_dir / WORK_DIR / split, jax.process_index()
    work.mkdir(parents=True, exist_ok=True)
    shards = sorted(work.glob(f"host{host:05d}-*.parquet"))
    state = json.loads(shards[-1].with_suffix(".json").read_text()) if shards else None
    batches, features = labelling_batches(setup, split, state), labelling_source(setup.data_args, split)[1]
    if features is not None:  # the dataset's own (Audio and all), so load_dataset reads the output alike
        features = datasets.Features(
            {**features, column: datasets.Value("string"), f"{column}_wer": datasets.Value("float64")}
        )
    sharding, text_column = setup.train_step.data_sharding, setup.columns[False].text
    rows, written, iterator = [], len(shards), iter(batches)
    while True:
        item = next(iterator, None)
        if not rs.any_host(item is not None):
            break
        host_batch, examples = item if item is not None else (batches.collate_fn([]), [])
        generated = label_fn(params, rs.to_global_batch(host_batch, sharding))
        ids = multihost_utils.global_array_to_host_local_array(generated, sharding.mesh, sharding.spec)
        texts = setup.components.tokenizer.batch_decode(np.asarray(ids)[: len(examples)], skip_special_tokens=True)
        for example, text in zip(examples, texts):
            wer = row_wer(example["row"].get(text_column), text.strip())
            rows.append({**example["row"], column: text.strip(), f"{column}_wer": wer})
        if len(rows) >= distil_args.pseudo_label_shard_rows:
            write_shard(work / f"host{host:05d}-{written:05d}.parquet", rows, features, batches.state_dict())
            rows, written = [], written + 1
    if rows:  # the last rows, fewer than a shard's worth
        write_shard(work / f"host{host:05d}-{written:05d}.parquet", rows, features, batches.state_dict())
    return dict(batches.skipped)


def finish_split(output_dir: Path, split: str, skipped: dict | None) -> dict:
    """Process 0, once every host is done: move the hosts' shards to OUTPUT_DIR/data/<split>-XXXXX-of-
    YYYYY.parquet. The names (and the skips) are fixed in FINISHED first, so a relaunch after a kill
    in here completes the same renames instead of labelling again. Returns the split's summary."""
    work, data = output_dir / WORK_DIR / split, output_dir / "data"
    if not (work / FINISHED).exists():
        shards = sorted(path.name for path in work.glob("host*.parquet"))
        names = {name: f"{split}-{i:05d}-of-{len(shards):05d}.parquet" for i, name in enumerate(shards)}
        (work / "finished.tmp").write_text(json.dumps({"shards": names, "skipped": skipped}))
        os.replace(work / "finished.tmp", work / FINISHED)
    finished = json.loads((work / FINISHED).read_text())
    data.mkdir(parents=True, exist_ok=True)
    for name, final in finished["shards"].items():
        if (work / name).exists():
            os.replace(work / name, data / final)
    shutil.rmtree(work)
    if not any(work.parent.iterdir()):
        work.parent.rmdir()
    rows = sum(pq.read_metadata(data / final).num_rows for final in finished["shards"].values())
    return {"rows": rows, "skipped": finished["skipped"]}


def pseudo_label(setup: rs.RunSetup, distil_args: DistilArguments) -> int:
    """--do_pseudo_label: every split in turn; a finished split (no work directory left) is kept.
    Writes OUTPUT_DIR/pseudo_labels.json: rows written and rows skipped (by reason) per split."""
    output_dir, is_main = setup.output_dir, setup.is_main
    if setup.train_args.overwrite_output_dir and is_main:
        for stale in ("data", WORK_DIR):
            shutil.rmtree(output_dir / stale, ignore_errors=True)
        (output_dir / SUMMARY_FILE).unlink(missing_ok=True)
    rs.sync_hosts("pseudo-label output checked")
    model_args, params_sharding = setup.model_args, setup.train_step.state_sharding.params
    # In --param_dtype, as evaluation holds a model's parameters: the same transcripts as eval's.
    params = host_params(
        setup.components.params, setup.model, model_args.param_dtype, scan_layers=model_args.scan_layers
    )
    params = jax.device_put(params, params_sharding)
    label_fn = jax.jit(
        functools.partial(
            labelling_step, model=setup.model, mel_filters=setup.mel_filters, decoding=setup.decoding, mesh=setup.mesh
        ),
        in_shardings=(params_sharding, setup.train_step.data_sharding),
    )
    summary_path = output_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for split in rs.split_names(distil_args.pseudo_label_split_name or setup.data_args.train_split_name):
        work = output_dir / WORK_DIR / split
        if not work.is_dir() and any((output_dir / "data").glob(f"{split}-*-of-*.parquet")):
            rs.say(f"{split}: already pseudo-labelled, kept")
            continue
        skipped = None
        if not (work / FINISHED).exists():
            hosts = rs.allgather_json(pseudo_label_split(setup, params, label_fn, split, distil_args))
            skipped = dict(sorted(sum((collections.Counter(host) for host in hosts), collections.Counter()).items()))
        rs.sync_hosts(f"{split} pseudo-labelled")
        if is_main:
            summary[split] = finish_split(output_dir, split, skipped)
            summary_path.write_text(json.dumps(summary, indent=2))
            rs.say(f"{split}: {summary[split]['rows']} rows pseudo-labelled, skipped {summary[split]['skipped']}")
        rs.sync_hosts(f"{split} written")
    return 0


# --- main ---


@dataclass(frozen=True)
class DistilSetup(rs.RunSetup):
    """run_scream's RunSetup of the student, whose run_config (printed by a dry run, saved in
    scream_config.json and the model card) also holds the distillation flags and the teacher's size."""

    distil_args: DistilArguments | None = None
    teacher_parameters: int = 0

    @property
    def run_config(self) -> dict:
        config = super().run_config
        config["resolved"]["teacher_parameters"] = self.teacher_parameters
        return {**config, "distillation": dataclasses.asdict(self.distil_args)}


def setup_distillation(model_args, data_args, train_args, dist_args, distil_args, teacher) -> DistilSetup:
    """run_scream.setup_run for the student, with the distillation step, the pseudo-label columns
    and the WER filter of the training rows."""
    student, model_args = student_components(model_args, distil_args, teacher, weights=teacher.params is not None)
    setup = rs.setup_run(model_args, data_args, train_args, dist_args, components=student)
    columns, wrap = dict(setup.columns), None
    if distil_args.pseudo_label_column_name:
        columns[True] = DistilColumns(
            **dataclasses.asdict(columns[True]), pseudo_label=distil_args.pseudo_label_column_name
        )
        wrap = functools.partial(distil_prepare, text_column=columns[True].text, distil_args=distil_args)
    teacher_shapes = jax.eval_shape(lambda: rs.init_params(rs.build_model(teacher.config), jax.random.key(0)))
    fields = {f.name: getattr(setup, f.name) for f in dataclasses.fields(rs.RunSetup)}
    fields.update(train_step=jit_distil_step(setup, distil_args, teacher), columns=columns, wrap_train_prepare=wrap)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(teacher_shapes))
    return DistilSetup(**fields, distil_args=distil_args, teacher_parameters=count)


def run(argv: list[str] | None = None) -> int:
    """Pseudo-label, or distil (train, evaluate, export) as run_scream.execute does for fine-tuning."""
    groups = rs.parse_arguments(argv, rs.ARGUMENT_GROUPS + (DistilArguments,))
    model_args, data_args, train_args, dist_args, distil_args = groups
    if not distil_args.teacher_model_name_or_path:
        raise ConfigError("--teacher_model_name_or_path is required: the Whisper to distil (or to pseudo-label with).")
    actions = (train_args.do_train, train_args.do_eval, train_args.do_predict, train_args.dry_run)
    if distil_args.do_pseudo_label and any(actions):
        raise ConfigError(
            "--do_pseudo_label runs alone: pseudo-label first, then distil on OUTPUT_DIR in a second run."
        )
    if not (distil_args.do_pseudo_label or any(actions)):
        raise ConfigError(
            "Nothing to do: pass --do_pseudo_label, or --do_train / --do_eval / --do_predict / --dry_run."
        )
    if not train_args.dry_run:
        rs.initialise_distributed(dist_args)
    teacher_args = dataclasses.replace(
        model_args, model_name_or_path=distil_args.teacher_model_name_or_path, config_name=None
    )
    teacher = rs.resolve_components(teacher_args, weights=not train_args.dry_run)
    if distil_args.do_pseudo_label:
        return pseudo_label(
            rs.setup_run(teacher_args, data_args, train_args, dist_args, components=teacher), distil_args
        )
    setup = setup_distillation(model_args, data_args, train_args, dist_args, distil_args, teacher)
    return rs.dry_run(setup) if train_args.dry_run else rs.execute(setup)


def main(argv: list[str] | None = None) -> int:
    return rs.main(argv, run=run)  # run_scream's exits: a ConfigError exits 2, TrainingStopped 1


if __name__ == "__main__":
    sys.exit(main())
