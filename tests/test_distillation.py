"""distil_scream.py: distil-whisper's method on Scream (issue 29).

  the student starts as the teacher's chosen layers; its export is an ordinary Whisper   test_student_*
  a frozen encoder stays bit for bit and has no optimizer state; one compiled step        test_step_*
  the loss is CE + T^2 KL of the formula (NumPy), masked like run_scream's              test_loss_*
  the WER filter skips and counts; pseudo-labels carry jiwer's WER; a killed labelling
  run resumes without repeating or dropping a row                                         test_pseudo_labels_*
  a whole distillation run evaluates, checkpoints, resumes exactly and exports            test_run_*
  run_nb_distil.sh pins NB's values; the dry run counts the teacher's memory              test_script_*, test_dry_run_*
  real whisper-base: pseudo-labels = eval's transcripts; a 2-layer student learns it     test_real_*

Toy teachers are random Whispers over the demo tokenizer (1 s windows) written by
make_demo_dataset's helpers; whole runs are subprocesses with 8 (or 1) fake CPU devices.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses
import json
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jiwer
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.english_normalizer import BasicTextNormalizer

import distil_scream as ds
import make_demo_dataset as demo
import run_scream as rs
from tests.support import REAL_EVAL_FLAGS, with_devices, write_speech_dataset

REPO = Path(__file__).resolve().parent.parent
CHUNK_S = 1  # the toy models' window: 100 mel frames
NUM_TRAIN, NUM_EVAL = 24, 8
RUN_TIMEOUT_S = 420

# --- toy teachers and data ---


def toy_teacher(directory: Path, tokenizer, *, decoder_layers: int, seed: int = 0) -> Path:
    """A random Whisper (the demo's dimensions, `decoder_layers` decoder layers) saved as a
    transformers checkpoint with weights."""
    demo.write_model_dir(directory, tokenizer, CHUNK_S, 80)
    config = WhisperConfig.from_pretrained(directory)
    config.decoder_layers = decoder_layers
    params = rs.init_params(rs.build_model(config), jax.random.PRNGKey(seed))
    # Weights 5x init's scale: peakier logits, so the teacher's greedy transcripts differ from row to row.
    params = jax.tree_util.tree_map_with_path(lambda path, x: x * 5.0 if path[-1].key == "kernel" else x, params)
    generation_config = rs.whisper_generation_config(
        tokenizer, config, "no", "transcribe", GenerationConfig.from_pretrained(directory)
    )
    feature_extractor = demo.make_feature_extractor(CHUNK_S, 80)
    components = rs.Pretrained(config, params, tokenizer, feature_extractor, generation_config, str(directory))
    rs.export_pretrained(params, components, directory, generation_config)
    return directory


def with_pseudo_labels(data_dir: Path, out_dir: Path) -> tuple[Path, int]:
    """The demo's train split with a whisper_transcript column: every third row's words all wrong
    (WER 100), the others equal to the text (WER 0); validation as is. Returns (dir, rows over 20)."""
    (out_dir / "data").mkdir(parents=True)
    over = 0
    for path in sorted((data_dir / "data").glob("*.parquet")):
        table = pq.read_table(path)
        if path.name.startswith("train"):
            rows = table.to_pylist()
            for row in rows:
                wrong = int(row["id"].split("-")[1]) % 3 == 0
                row["whisper_transcript"] = " ".join("x" for _ in row["text"].split()) if wrong else row["text"]
                over += wrong
            table = pa.Table.from_pylist(rows, schema=table.schema.append(pa.field("whisper_transcript", pa.string())))
        pq.write_table(table, out_dir / "data" / path.name)
    return out_dir, over


@pytest.fixture(scope="session")
def distil_demo(tmp_path_factory):
    """The demo tokenizer, toy teachers of 4 and 6 decoder layers, the demo data (24 train rows in 2
    shards, 8 eval) and the same with pseudo-labels."""
    root = tmp_path_factory.mktemp("distil_demo")
    tokenizer = demo.write_tokenizer(root / "tokenizer")
    teachers = {n: toy_teacher(root / f"teacher{n}", tokenizer, decoder_layers=n, seed=n) for n in (4, 6)}
    demo.write_dataset(root / "data", NUM_TRAIN, NUM_EVAL, seed=0, chunk_length_s=CHUNK_S, num_shards=2)
    labelled, over = with_pseudo_labels(root / "data", root / "labelled")
    return {
        "root": root,
        "tokenizer": tokenizer,
        "teachers": teachers,
        "data": root / "data",
        "labelled": labelled,
        "over": over,
    }


@pytest.fixture(scope="session")
def distil_env(run_env, tmp_path_factory):
    """run_env (8 CPU devices at -O0, offline, the suite's compilation cache) with a private HF home."""
    return {**run_env, "HF_HOME": str(tmp_path_factory.mktemp("hf_home"))}


def one_device(env: dict, optimised: bool = False) -> dict:
    return with_devices(env, 1, optimised)


def launch(env: dict, args: list[str], log: Path, script: str | None = None) -> subprocess.Popen:
    command = [sys.executable, "-c", script] if script else [sys.executable, str(REPO / "distil_scream.py")]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        return subprocess.Popen(command + args, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def run_to_end(env: dict, args: list[str], log: Path, script: str | None = None, timeout: float = RUN_TIMEOUT_S) -> str:
    process = launch(env, args, log, script)
    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"{log.name} did not finish in {timeout} s:\n{log.read_text()[-4000:]}")
    assert returncode == 0, f"exit {returncode}:\n{log.read_text()[-4000:]}"
    return log.read_text()


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def distil_args(teacher: Path, data: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--teacher_model_name_or_path", str(teacher),
        "--student_decoder_layers", "2",
        "--dataset_name", str(data),
        "--output_dir", str(output_dir),
        "--train_batch_size", "8",
        "--eval_batch_size", "8",
        "--max_label_length", "32",
        "--generation_max_length", "8",
        "--shuffle_buffer_size", "0",
        "--preprocessing_num_workers", "2",
        "--report_to", "none",
        *extra,
    ]  # fmt: skip


def in_process_setup(argv: list[str]):
    """distil_scream.run's setup, in this process (its 8 CPU devices): (setup, teacher)."""
    model_args, data_args, train_args, dist_args, distil = rs.parse_arguments(
        argv, rs.ARGUMENT_GROUPS + (ds.DistilArguments,)
    )
    teacher_args = dataclasses.replace(
        model_args, model_name_or_path=distil.teacher_model_name_or_path, config_name=None
    )
    teacher = rs.resolve_components(teacher_args, weights=not train_args.dry_run)
    return ds.setup_distillation(model_args, data_args, train_args, dist_args, distil, teacher), teacher


# --- student ---

LAYER_MAPS = {(4, 2): [0, 3], (4, 3): [0, 1, 3], (6, 2): [0, 5], (6, 3): [0, 2, 5]}  # distil-whisper's rule


@pytest.mark.parametrize("teacher_layers, student_layers", sorted(LAYER_MAPS))
def test_student_starts_as_the_chosen_teacher_layers(distil_demo, teacher_layers, student_layers):
    teacher = rs.load_pretrained(str(distil_demo["teachers"][teacher_layers]))
    student = ds.student_from_teacher(teacher, student_layers)
    chosen = LAYER_MAPS[(teacher_layers, student_layers)]
    assert student.config.decoder_layers == student_layers and teacher.config.decoder_layers == teacher_layers
    expected = {
        "encoder": teacher.params["encoder"],
        "decoder": {
            **{k: v for k, v in teacher.params["decoder"].items() if not k.startswith("layers_")},
            **{f"layers_{i}": teacher.params["decoder"][f"layers_{j}"] for i, j in enumerate(chosen)},
        },
    }
    flat, want = rs.traverse_util.flatten_dict(student.params), rs.traverse_util.flatten_dict(expected)
    assert flat.keys() == want.keys()
    assert all(np.array_equal(flat[k], want[k]) for k in want)
    shapes = jax.eval_shape(lambda: rs.init_params(rs.build_model(student.config), jax.random.key(0)))
    rs.check_parameter_tree(student.params, shapes, "the student")  # the student's own config fits its weights
    # Word-timestamp heads follow their layers: the teacher's are its upper half (Whisper's default).
    heads = teacher.generation_config.alignment_heads
    kept = [[chosen.index(layer), head] for layer, head in heads if layer in chosen]
    assert student.generation_config.alignment_heads == kept and kept


def test_student_export_loads_in_transformers_with_our_logits(distil_demo, tmp_path):
    import torch
    from transformers import WhisperForConditionalGeneration

    teacher = rs.load_pretrained(str(distil_demo["teachers"][6]))
    student = ds.student_from_teacher(teacher, 2)
    generation_config = rs.whisper_generation_config(
        student.tokenizer, student.config, "no", "transcribe", student.generation_config
    )
    rs.export_pretrained(student.params, student, tmp_path, generation_config)
    torch_model = WhisperForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert torch_model.config.decoder_layers == 2 and len(torch_model.model.decoder.layers) == 2
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2, 80, 2 * student.config.max_source_positions)).astype(np.float32)
    ids = rng.integers(0, student.config.vocab_size, size=(2, 6)).astype(np.int32)
    ours = rs.build_model(student.config).apply({"params": student.params}, features, ids)
    with torch.no_grad():
        theirs = torch_model(input_features=torch.from_numpy(features), decoder_input_ids=torch.from_numpy(ids).long())
    np.testing.assert_allclose(np.asarray(ours), theirs.logits.numpy(), atol=1e-4)
    assert GenerationConfig.from_pretrained(tmp_path).alignment_heads == student.generation_config.alignment_heads


# --- loss and step ---


def numpy_distillation_loss(student, teacher, labels, ce_weight, kl_weight, temperature):
    """The formula in float64: sum over label tokens of ce_w * -log p_s(label) + kl_w * T^2 * KL(p_t^T || p_s^T)."""

    def log_softmax(x):
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    student, teacher = student.astype(np.float64), teacher.astype(np.float64)
    mask = labels != -100
    ce = -np.take_along_axis(log_softmax(student), np.where(mask, labels, 0)[..., None], axis=-1)[..., 0]
    log_t, log_s = log_softmax(teacher / temperature), log_softmax(student / temperature)
    kl = (np.exp(log_t) * (log_t - log_s)).sum(axis=-1)
    return (ce_weight * ce[mask].sum() + kl_weight * temperature**2 * kl[mask].sum()), mask.sum()


@pytest.mark.parametrize("ce_weight, kl_weight, temperature", [(0.8, 1.0, 2.0), (0.5, 0.3, 1.0), (0.0, 1.0, 4.0)])
def test_loss_is_ce_plus_scaled_kl_of_the_label_tokens(ce_weight, kl_weight, temperature):
    rng = np.random.default_rng(1)
    student = rng.normal(scale=3.0, size=(3, 7, 11)).astype(np.float32)
    teacher = rng.normal(scale=3.0, size=(3, 7, 11)).astype(np.float32)
    labels = rng.integers(0, 11, size=(3, 7)).astype(np.int32)
    labels[0, :2] = -100  # a previous-text prompt's positions
    labels[1, 5:] = -100  # padding after <|endoftext|>
    labels[2] = -100  # a padding row
    weights = ds.LossWeights(ce=ce_weight, kl=kl_weight, temperature=temperature)
    sums = ds.distillation_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(labels), weights)
    expected, tokens = numpy_distillation_loss(student, teacher, labels, ce_weight, kl_weight, temperature)
    assert int(sums["num_tokens"]) == tokens == 10
    assert float(sums["loss"]) == pytest.approx(expected, rel=1e-5)
    # The masked positions carry nothing: changing their logits changes no sum.
    student[2] += 100.0
    again = ds.distillation_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(labels), weights)
    assert float(again["loss"]) == pytest.approx(float(sums["loss"]), rel=1e-6)


def count_leaves(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree) if np.ndim(x) > 0)


@pytest.mark.parametrize("freeze", [True, False])
def test_step_frozen_encoder_stays_and_one_compilation_trains_mixed_batches(distil_demo, tmp_path, monkeypatch, freeze):
    """Three steps over batches mixing languages, timestamps and prompts, bfloat16 compute: one
    trace; a frozen encoder is bit for bit the teacher's afterwards and has no optimizer state;
    the teacher is the step's argument (its parameters in the compute dtype), not a constant."""
    traces = []
    original_loss = ds.distillation_loss
    monkeypatch.setattr(ds, "distillation_loss", lambda *a, **k: traces.append(1) or original_loss(*a, **k))
    argv = distil_args(
        distil_demo["teachers"][4], distil_demo["data"], tmp_path / "out",
        "--do_train", "--dtype", "bfloat16", "--language_column_name", "language",
        "--timestamp_column_name", "timestamped_text", "--timestamp_probability", "0.5",
        "--prev_column_name", "previous_text", "--prompt_probability", "0.5", "--max_prev_length", "16",
        *(["--freeze_encoder"] if freeze else []),
    )  # fmt: skip
    setup, teacher = in_process_setup(argv)
    state = rs.initial_train_state(setup.train_step, setup.model, seed=0, params=setup.components.params)
    initial = jax.device_get(state.params)
    batches = iter(rs.make_batches(setup, "train", train=True, batch_size=setup.plan.per_host_batch_size))
    kinds = set()
    for _ in range(3):
        host_batch, examples = next(batches)
        kinds |= {(e["timestamps"], e["prompt_length"] > 0, e["language"]) for e in examples}
        state, step_metrics = setup.train_step.fn(state, rs.to_global_batch(host_batch, setup.train_step.data_sharding))
        assert np.isfinite(float(step_metrics["loss"]))
    assert {k[0] for k in kinds} == {True, False} and {k[1] for k in kinds} == {True, False}
    assert len({k[2] for k in kinds}) > 1
    assert len(traces) == 1 and setup.train_step.fn.jitted._cache_size() == 1
    final = jax.device_get(state.params)
    same = jax.tree.map(np.array_equal, initial["encoder"], final["encoder"])
    assert all(jax.tree.leaves(same)) == freeze
    assert not np.array_equal(
        initial["decoder"]["layers_0"]["fc1"]["kernel"], final["decoder"]["layers_0"]["fc1"]["kernel"]
    )
    # AdamW's two moments per trained parameter, and nothing else that is not a scalar.
    trained = initial["decoder"] if freeze else initial
    assert count_leaves(state.opt_state) == 2 * count_leaves(trained)
    teacher_arg = setup.train_step.fn.teacher
    assert set(teacher_arg) == ({"decoder"} if freeze else {"encoder", "decoder"})
    assert {x.dtype for x in jax.tree.leaves(teacher_arg)} == {jnp.dtype("bfloat16")}
    lowered = setup.train_step.fn.lower(state, rs.to_global_batch(host_batch, setup.train_step.data_sharding))
    assert len(jax.tree.leaves(lowered.args_info[0][1])) == len(jax.tree.leaves(teacher_arg))


def test_dry_run_memory_counts_the_teacher_as_an_argument(distil_demo, tmp_path):
    """The compiled step's arguments per device are the student's state, the teacher's decoder (in
    the compute dtype) and the batch, each at its sharding's shard size: the teacher is neither
    copied nor compiled in."""
    argv = distil_args(
        distil_demo["teachers"][6], distil_demo["data"], tmp_path / "out",
        "--do_train", "--dry_run", "--freeze_encoder", "--dtype", "bfloat16", "--fsdp_size", "2",
    )  # fmt: skip
    setup, _ = in_process_setup(argv)
    step = setup.train_step
    batch = rs.abstract_batch(
        setup.plan.global_batch_size, n_samples=setup.n_samples, max_label_length=setup.decoder_length,
        sharding=step.data_sharding,
    )  # fmt: skip

    def shard_bytes(tree):
        return sum(
            int(np.prod(x.sharding.shard_shape(x.shape))) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
        )

    compiled = step.fn.lower(step.abstract_state, batch).compile()
    expected = shard_bytes(step.abstract_state) + shard_bytes(step.fn.teacher) + shard_bytes(batch)
    assert compiled.memory_analysis().argument_size_in_bytes == expected
    teacher_decoder = count_leaves(step.fn.teacher["decoder"])
    assert teacher_decoder > count_leaves(step.abstract_state.params["decoder"])  # 6 layers vs the student's 2
    assert rs.compiled_memory_bytes(compiled) > expected


# --- pseudo-labels and the WER filter ---


def normalised_wer(reference: str, hypothesis: str) -> float | None:
    normalise = BasicTextNormalizer()
    reference, hypothesis = normalise(reference).strip(), normalise(hypothesis).strip()
    return 100.0 * jiwer.wer(reference, hypothesis) if reference else None


def test_pseudo_labels_wer_filter_skips_and_counts_rows_over_the_threshold(distil_demo, tmp_path):
    """One epoch of the training stream behind --wer_threshold 20: the rows whose pseudo-label is
    all wrong are skipped and counted, the others train on the pseudo-labels."""
    argv = distil_args(
        distil_demo["teachers"][4], distil_demo["labelled"], tmp_path / "out", "--do_train",
        "--pseudo_label_column_name", "whisper_transcript", "--wer_threshold", "20",
    )  # fmt: skip
    setup, _ = in_process_setup(argv)
    batches = rs.make_batches(setup, "train", train=True, batch_size=4)
    seen = []
    for _, examples in batches:
        seen += examples
        if batches.epoch > 0 or len(seen) == NUM_TRAIN - distil_demo["over"]:
            break
    assert batches.skipped == {ds.OVER_WER: distil_demo["over"]} and distil_demo["over"] == NUM_TRAIN // 3
    assert all(int(e["id"].split("-")[1]) % 3 for e in seen)
    assert len(seen) == NUM_TRAIN - distil_demo["over"]
    # The same filter as a function: rows with no reference cannot be measured, so they are skipped too.
    prepare = ds.distil_prepare(lambda row: (row, None), text_column="text", distil_args=setup.distil_args)
    assert prepare({"text": "", "whisper_transcript": "hei"}) == (None, ds.OVER_WER)
    assert prepare({"text": "hei du", "whisper_transcript": "hei"})[1] == ds.OVER_WER  # WER 50
    row = {"text": "Hei du der, ja", "whisper_transcript": "hei du der ja"}  # WER 0 after normalising
    assert prepare(row) == ({"text": "hei du der ja", "whisper_transcript": "hei du der ja"}, None)
    with pytest.raises(rs.ConfigError, match="--pseudo_label_column_name 'whisper_transcript'"):
        prepare({"text": "hei"})


@pytest.fixture(scope="session")
def labelling_data(distil_demo):
    """The demo's train split plus one row with unreadable audio (rows in 2 files)."""
    directory = distil_demo["root"] / "labelling"
    (directory / "data").mkdir(parents=True)
    for path in sorted((distil_demo["data"] / "data").glob("train-*.parquet")):
        table = pq.read_table(path)
        if path.name.startswith("train-00001"):
            rows = table.to_pylist()
            rows.insert(3, {**rows[0], "id": "bad-row", "audio": {"bytes": b"not audio", "path": "bad.flac"}})
            table = pa.Table.from_pylist(rows, schema=table.schema)
        pq.write_table(table, directory / "data" / path.name)
    return directory


def labelling_args(distil_demo, data: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--teacher_model_name_or_path", str(distil_demo["teachers"][4]),
        "--do_pseudo_label",
        "--dataset_name", str(data),
        "--output_dir", str(output_dir),
        "--eval_batch_size", "4",
        "--generation_max_length", "8",
        "--language_column_name", "language",
        "--pseudo_label_shard_rows", "16",  # 24 rows: a full shard, then a last one of 8
        "--preprocessing_num_workers", "2",
        *extra,
    ]  # fmt: skip


def labelled_rows(output_dir: Path) -> list[dict]:
    files = sorted((output_dir / "data").glob("train-*.parquet"))
    assert [f.name for f in files] == [f"train-{i:05d}-of-{len(files):05d}.parquet" for i in range(len(files))]
    return [row for path in files for row in pq.read_table(path).to_pylist()]


# Each written shard makes the run pause, so that the test can kill it between two shards.
SLOW_SHARDS = """
import sys, time
import distil_scream as ds

original = ds.write_shard


def write_shard(*args, **kwargs):
    original(*args, **kwargs)
    time.sleep(2)


ds.write_shard = write_shard
sys.exit(ds.main(sys.argv[1:]))
"""


def test_pseudo_labels_resume_after_kill_without_repeating_or_dropping_a_row(
    distil_demo, labelling_data, distil_env, tmp_path
):
    """A straight labelling run, and one killed (SIGKILL) after its first shard and relaunched,
    write the same rows: every readable row once, in order, with the teacher's transcript and its
    WER as jiwer computes it; the unreadable row is counted, not written."""
    env = one_device(distil_env)
    straight = tmp_path / "straight"
    run_to_end(env, labelling_args(distil_demo, labelling_data, straight), tmp_path / "straight.log")
    killed = tmp_path / "killed"
    process = launch(env, labelling_args(distil_demo, labelling_data, killed), tmp_path / "killed.log", SLOW_SHARDS)
    work = killed / ds.WORK_DIR / "train"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not list(work.glob("host*.parquet")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    shards_at_kill = sorted(p.name for p in work.glob("host*.parquet"))
    assert shards_at_kill == ["host00000-00000.parquet"], (tmp_path / "killed.log").read_text()[-3000:]
    assert not (killed / "data").exists()
    stdout = run_to_end(env, labelling_args(distil_demo, labelling_data, killed), tmp_path / "resumed.log")
    assert "train: 24 rows pseudo-labelled" in stdout
    rows, reference = labelled_rows(killed), labelled_rows(straight)
    assert [r["id"] for r in rows] == [r["id"] for r in reference] == [f"train-{i:06d}" for i in range(NUM_TRAIN)]
    assert [r["whisper_transcript"] for r in rows] == [r["whisper_transcript"] for r in reference]
    assert len({r["whisper_transcript"] for r in rows}) > 1  # the teacher says different things
    for row in rows:
        expected = normalised_wer(row["text"], row["whisper_transcript"])
        assert row["whisper_transcript_wer"] == pytest.approx(expected, abs=1e-9)
    original = {r["id"]: r for r in pq.read_table(labelling_data / "data").to_pylist()}
    assert all(
        row["audio"] == original[row["id"]]["audio"] and row["text"] == original[row["id"]]["text"] for row in rows
    )
    for output_dir in (straight, killed):
        summary = json.loads((output_dir / ds.SUMMARY_FILE).read_text())
        assert summary == {"train": {"rows": NUM_TRAIN, "skipped": {"undecodable": 1}}}
    assert not (killed / ds.WORK_DIR).exists()


def test_pseudo_labels_finish_completes_after_a_kill_between_renames(tmp_path, monkeypatch):
    """The hosts' shards get their final names in host order; a kill after the first rename, and a
    relaunch, end in the same files (no shard labelled again, the skips kept)."""
    work = tmp_path / ds.WORK_DIR / "train"
    work.mkdir(parents=True)
    shards = {"host00000-00000.parquet": [0, 1], "host00000-00001.parquet": [2], "host00001-00000.parquet": [3, 4]}
    for name, ids in shards.items():
        pq.write_table(pa.Table.from_pylist([{"id": i} for i in ids]), work / name)
    real_replace, moved = os.replace, []

    def killed_after_one_move(source, target):
        if Path(target).parent.name == "data":
            if moved:
                raise KeyboardInterrupt("killed")
            moved.append(target)
        real_replace(source, target)

    monkeypatch.setattr(ds.os, "replace", killed_after_one_move)
    with pytest.raises(KeyboardInterrupt):
        ds.finish_split(tmp_path, "train", {"undecodable": 1})
    monkeypatch.setattr(ds.os, "replace", real_replace)
    assert len(moved) == 1 and (work / ds.FINISHED).exists()
    summary = ds.finish_split(tmp_path, "train", None)  # the relaunch: labelling is not redone
    assert summary == {"rows": 5, "skipped": {"undecodable": 1}}
    files = sorted((tmp_path / "data").iterdir())
    assert [f.name for f in files] == [f"train-{i:05d}-of-00003.parquet" for i in range(3)]
    assert [row["id"] for f in files for row in pq.read_table(f).to_pylist()] == [0, 1, 2, 3, 4]
    assert not (tmp_path / ds.WORK_DIR).exists()


# --- whole runs ---


def test_run_distils_evaluates_resumes_exactly_and_exports(distil_demo, distil_env, tmp_path):
    """A 4-step distillation straight, and the same as 2 steps then a relaunch to 4: the same
    losses and the same exported student: an ordinary 2-layer Whisper, whose CTranslate2 export
    decodes as we do and whose whisper.cpp file says 2 layers. The WER filter's skips are logged
    with the other skipped rows."""
    args = [
        "--do_train", "--do_eval", "--predict_with_generate", "--freeze_encoder",
        "--pseudo_label_column_name", "whisper_transcript", "--wer_threshold", "20",
        "--lr_scheduler_type", "constant", "--learning_rate", "1e-3", "--logging_steps", "1",
        "--eval_steps", "2", "--export_ggml", "f16",
    ]  # fmt: skip
    teacher, data = distil_demo["teachers"][4], distil_demo["labelled"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    exports = ["--num_train_steps", "4", "--export_ctranslate2", "float32"]
    with_torch = with_devices(distil_env, 8, torch=True)  # ctranslate2's converter reads the export with it
    run_to_end(with_torch, distil_args(teacher, data, straight, *args, *exports), tmp_path / "a.log")
    run_to_end(distil_env, distil_args(teacher, data, resumed, *args, "--num_train_steps", "2"), tmp_path / "b.log")
    stdout = run_to_end(
        distil_env, distil_args(teacher, data, resumed, *args, "--num_train_steps", "4"), tmp_path / "c.log"
    )
    assert "resumed from" in stdout and "(step 2)" in stdout
    lines = {kind: [m for m in metrics(d) if "train/loss" in m] for kind, d in (("a", straight), ("b", resumed))}
    assert [m["step"] for m in lines["b"]] == [1, 2, 3, 4]
    assert [m["train/loss"] for m in lines["a"]] == [m["train/loss"] for m in lines["b"]]
    # 16 usable rows of 24 fill the first 2 steps of 8: every row over the threshold was read and counted.
    assert lines["a"][1]["data/skipped_over_wer_threshold"] == distil_demo["over"]
    from safetensors.numpy import load_file

    exported = {d: load_file(str(d / "model.safetensors")) for d in (straight, resumed)}
    assert exported[straight].keys() == exported[resumed].keys()
    assert all(np.array_equal(exported[straight][k], exported[resumed][k]) for k in exported[straight])
    assert not any(".layers.2." in name for name in exported[straight] if "decoder" in name)
    config = json.loads((straight / "config.json").read_text())
    assert config["decoder_layers"] == 2 and config["encoder_layers"] == 2
    header = struct.unpack("<12i", (straight / "ggml-model.bin").read_bytes()[:48])
    assert header[9] == 2  # whisper.cpp's n_text_layer
    ours, theirs = greedy_and_ctranslate2(straight)
    card = (straight / "README.md").read_text()
    assert 'WhisperModel("ctranslate2")' in card and "whisper-cli -m ggml-model.bin" in card
    assert len(theirs[0]) >= 4 and all(list(o[: len(t)]) == t for o, t in zip(ours, theirs))
    saved = json.loads((straight / "scream_config.json").read_text())
    assert saved["distillation"]["student_decoder_layers"] == 2 and saved["model"]["config_name"] == str(teacher)
    assert any("eval/wer" in m for m in metrics(straight))


def greedy_and_ctranslate2(export_dir: Path):
    """Our greedy decoding of two noise clips with the exported model, and ctranslate2's of its
    CTranslate2 export (float32, nothing suppressed): (our new tokens per row, theirs)."""
    import ctranslate2

    pretrained = rs.load_pretrained(str(export_dir))
    extractor = pretrained.feature_extractor
    audio = np.random.default_rng(0).normal(scale=0.1, size=(2, extractor.n_samples)).astype(np.float32)
    features = np.asarray(extractor(list(audio), sampling_rate=16000, return_tensors="np").input_features, np.float32)
    prompt = rs.decoder_prefix(pretrained.tokenizer, "no", "transcribe", timestamps=False)
    config = pretrained.config
    settings = rs.DecodingSettings(len(prompt), 8, config.eos_token_id, config.pad_token_id)
    prompts = np.tile(np.asarray(prompt, np.int32), (2, 1))
    ours = np.asarray(rs.generate(rs.build_model(config), pretrained.params, features, prompts, settings))
    model = ctranslate2.models.Whisper(str(export_dir / "ctranslate2"), device="cpu", compute_type="float32")
    results = model.generate(
        ctranslate2.StorageView.from_array(np.ascontiguousarray(features)), [prompt, prompt], beam_size=1,
        max_length=len(prompt) + 8, suppress_blank=False, suppress_tokens=[],
    )  # fmt: skip
    return ours[:, len(prompt) :], [list(result.sequences_ids[0]) for result in results]


# --- scripts ---

NB_TEACHER = "NbAiLab/nb-whisper-large"
LARGE_V3 = dict(
    vocab_size=51866, num_mel_bins=128, d_model=1280, encoder_layers=32, decoder_layers=32,
    encoder_attention_heads=20, decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120,
    max_source_positions=1500, max_target_positions=448, pad_token_id=50257, bos_token_id=50257,
    eos_token_id=50257, decoder_start_token_id=50258,
)  # fmt: skip


@pytest.fixture(scope="session")
def nb_hub_cache(distil_demo, tmp_path_factory):
    """A hub cache holding nb-whisper-large's config (large-v3's dimensions), as a machine that
    downloaded it has it; no weights (a dry run reads none)."""
    cache = tmp_path_factory.mktemp("hub_cache")
    repo = cache / ("models--" + NB_TEACHER.replace("/", "--"))
    commit = "1" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    WhisperConfig(**LARGE_V3).save_pretrained(snapshot)
    distil_demo["tokenizer"].save_pretrained(snapshot)
    WhisperFeatureExtractor(feature_size=128).save_pretrained(snapshot)
    return cache


def test_script_nb_distil_pins_nbs_values(nb_hub_cache):
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(nb_hub_cache),
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(REPO),
    )
    result = subprocess.run(
        ["bash", str(REPO / "run_nb_distil.sh"), "--dry_run", "--no_dry_run_compile"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = [line for line in result.stdout.splitlines() if line.startswith("plan_json: ")]
    plan = json.loads(line.removeprefix("plan_json: "))
    assert plan["teacher_model_name_or_path"] == NB_TEACHER and plan["config_name"] == NB_TEACHER
    assert plan["dataset_name"] == "NbAiLab/annotated_distil_raw_ncc_speech_v7_large"
    assert plan["student_decoder_layers"] == 2 and plan["freeze_encoder"] is True
    assert (plan["ce_weight"], plan["kl_weight"], plan["temperature"]) == (0.8, 1.0, 2.0)
    assert plan["wer_threshold"] == 20 and plan["pseudo_label_column_name"] == ds.PSEUDO_LABEL_COLUMN
    assert (plan["timestamp_probability"], plan["prompt_probability"]) == (0.2, 0.2)
    assert plan["effective_learning_rate"] == pytest.approx(3e-4) and plan["lr_scheduler_type"] == "constant"
    assert plan["num_train_steps"] == 50000 and plan["per_device_batch"] == 32
    assert plan["dtype"] == "bfloat16"
    assert abs(plan["parameters"] - 756e6) < 1e6  # the hub's nb-whisper-large-distil-turbo-beta: 756M
    assert plan["teacher_parameters"] > 1.5e9


# --- real weights ---
# whisper_base_dir and tiny_en_dir (OpenAI's whisper-base and tiny.en converted to transformers
# directories) and espeak_clips (12 synthesised clips, 8 Norwegian then 4 English) are
# tests/support.py's session fixtures.


@pytest.fixture(scope="session")
def real_pseudo_labels(whisper_base_dir, whisper_base_language_eval, distil_env, tmp_path_factory):
    """The clips of whisper_base_language_eval (2 Norwegian, 2 English) pseudo-labelled by
    whisper-base with its evaluation's settings (optimised XLA, one device): the labelled dataset."""
    data, _ = whisper_base_language_eval
    root = tmp_path_factory.mktemp("real_distil")
    args = [
        "--teacher_model_name_or_path", str(whisper_base_dir), "--do_pseudo_label", "--pseudo_label_split_name",
        "validation", "--dataset_name", str(data), "--output_dir", str(root / "labelled"), *REAL_EVAL_FLAGS,
    ]  # fmt: skip
    run_to_end(one_device(distil_env, optimised=True), args, root / "label.log")
    return root / "labelled"


def test_real_pseudo_labels_equal_eval_transcripts(real_pseudo_labels, whisper_base_language_eval):
    """Pseudo-labels are our evaluation's transcripts of the same rows, and their WER column is jiwer's."""
    predictions = whisper_base_language_eval[1] / "predictions" / "eval" / "validation" / "step_0.jsonl"
    evaluated = {row["id"]: row["prediction"] for row in map(json.loads, predictions.read_text().splitlines())}
    rows = pq.read_table(real_pseudo_labels / "data" / "validation-00000-of-00001.parquet").to_pylist()
    assert {r["id"]: r["whisper_transcript"] for r in rows} == evaluated and len(evaluated) == 4
    for row in rows:
        assert row["whisper_transcript_wer"] == pytest.approx(normalised_wer(row["text"], row["whisper_transcript"]))


# A 2-layer student of tiny.en (OpenAI's English-only tiny: 4 decoder layers) learns 2 clear English
# clips in batches of both, trained on their texts and the teacher's logits; a step takes ~1 s on this
# 2-core CPU. Measured (commit 605bb9b): the initial student says "You" to both (WER 100); after 8
# steps 44.4, after 10, 12 and 16 steps 0.0. (whisper-base as the teacher, 16 steps of ~2 s took
# the student's WER against its transcripts from 100 to 0.0: BENCHMARKS.md.)
REAL_STEPS, REAL_BATCH, REAL_INITIAL_WER = 12, 2, 100.0


def median_steps_per_s(output_dir: Path) -> float:
    """Steps/s of the logged windows after the first (which holds the compilation)."""
    windows = [m["throughput/examples_per_s"] for m in metrics(output_dir) if "throughput/examples_per_s" in m]
    return float(np.median(windows[1:])) / REAL_BATCH


def test_real_tiny_en_distils_into_a_two_layer_student(tiny_en_dir, espeak_clips, distil_env, tmp_path):
    """A 2-layer student of tiny.en (its first and last decoder layers, frozen encoder, the
    English-only prompt) distilled on 2 clear English clips: its WER falls below half the initial
    student's (REAL_INITIAL_WER), and the run trains, evaluates and exports an English-only model. Speed is a benchmark's, not a test's: with SCREAM_DISTIL_VS_PLAIN=1
    it also evaluates the initial student, times plain fine-tuning of it and prints the WER before
    and both steps/s (BENCHMARKS.md)."""
    english = [c for c in espeak_clips if c["language"] == "en"][:2]
    labelled = write_speech_dataset(tmp_path / "data", {"train": english, "validation": english})
    env = one_device(distil_env, optimised=True)
    data = [
        "--dataset_name", str(labelled), "--language", "en", "--train_batch_size", str(REAL_BATCH),
        "--eval_batch_size", "2", "--max_label_length", "48", "--report_to", "none", "--learning_rate", "1e-3",
        "--lr_scheduler_type", "constant", "--warmup_steps", "3",
    ]  # fmt: skip
    student = ["--teacher_model_name_or_path", str(tiny_en_dir), "--student_decoder_layers", "2", "--freeze_encoder"]
    evaluation = ["--do_eval", "--predict_with_generate", "--generation_max_length", "40"]
    steps = ["--do_train", "--num_train_steps", str(REAL_STEPS), "--logging_steps", "1"]
    run_to_end(env, [*student, *data, *evaluation, *steps, "--output_dir", str(tmp_path / "distil")],
               tmp_path / "distil.log", timeout=900)  # fmt: skip
    after = [m for m in metrics(tmp_path / "distil") if "eval/wer_normalized" in m][-1]["eval/wer_normalized"]
    distil_rate = median_steps_per_s(tmp_path / "distil")
    print(f"\ntiny.en -> 2 decoder layers: WER {after:.1f} after {REAL_STEPS} steps of {REAL_BATCH} 30 s windows, "
          f"{distil_rate:.3f} distillation steps/s on one CPU device")  # fmt: skip
    assert after < REAL_INITIAL_WER / 2, after
    # An English-only model's run: prompted without a language token, and exported as English-only.
    assert json.loads((tmp_path / "distil" / "scream_config.json").read_text())["resolved"]["prompt_ids"] == [
        50257,
        50362,
    ]  # <|startoftranscript|><|notimestamps|>
    saved = json.loads((tmp_path / "distil" / "generation_config.json").read_text())
    assert saved["is_multilingual"] is False and saved.get("language") is None
    if os.environ.get("SCREAM_DISTIL_VS_PLAIN") == "1":  # the initial student, and plain fine-tuning of it
        run_to_end(env, [*student, *data, *evaluation, "--output_dir", str(tmp_path / "before")],
                   tmp_path / "before.log", timeout=600)  # fmt: skip
        before = [m for m in metrics(tmp_path / "before") if "eval/wer_normalized" in m][0]["eval/wer_normalized"]
        print(f"the initial student's WER: {before:.1f}")
        initial = ds.student_from_teacher(rs.load_pretrained(str(tiny_en_dir)), 2)
        generation_config = rs.whisper_generation_config(
            initial.tokenizer, initial.config, "en", "transcribe", initial.generation_config, english_only=True
        )
        rs.export_pretrained(initial.params, initial, tmp_path / "student", generation_config)
        plain = [str(REPO / "run_scream.py"), "--model_name_or_path", str(tmp_path / "student"), *data, *steps[:1]]
        plain += ["--num_train_steps", "6", "--logging_steps", "1", "--output_dir", str(tmp_path / "plain")]
        subprocess.run([sys.executable, *plain], env=env, cwd=REPO, check=True, capture_output=True, timeout=900)
        print(f"plain fine-tuning of the same student: {median_steps_per_s(tmp_path / 'plain'):.3f} steps/s")
