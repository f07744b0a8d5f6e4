"""Evaluation: WER as jiwer computes it from the predictions written, each eval example once, several
eval sets and test sets (per set, per source, per language, on two processes), the model card's
model-index, the best model exported and kept across a resume, evaluating an exported model alone."""

import json
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import make_demo_dataset as demo
import run_scream as rs
from tests.support import (
    CHUNK_S,
    EVAL_BATCH,
    EVALSETS_SIZES,
    EVALSETS_SOURCES,
    GLOBAL_BATCH,
    NUM_EVAL,
    NUM_STEPS,
    RUN_TIMEOUT_S,
    complete_checkpoints,
    eval_lines,
    evalsets_jiwer,
    exported_arrays,
    finish,
    launch,
    max_abs_diff,
    metrics_lines,
    prediction_rows,
    resumed_step,
    run_to_end,
    train_command,
)


def test_nb_metrics_by_language():
    rows = [
        {"language": "no", "reference": "hei du", "prediction": "hei deg"},  # 1 of 2 words wrong
        {"language": "no", "reference": "god dag", "prediction": "god dag"},
        {"language": "nn", "reference": "eg er her", "prediction": "eg er her"},
    ]
    metrics = rs.metrics_by_group(rows, "language")
    assert metrics["no/wer"] == pytest.approx(25.0) and metrics["nn/wer"] == 0.0
    assert metrics["no/cer"] == pytest.approx(100 * 2 / 13)  # "du" -> "deg": u->e, +g; 13 reference characters
    assert {k.split("/")[0] for k in metrics} == {"no", "nn"}


def test_predictions_each_eval_example_once(demo_dir, train_straight):
    straight, _ = train_straight
    rows = [
        json.loads(line)
        for line in (straight / "predictions" / "eval" / "validation" / f"step_{NUM_STEPS}.jsonl")
        .read_text()
        .splitlines()
    ]
    assert all(
        row.keys() == {"id", "language", "source", "reference", "prediction"}
        and (row["language"], row["source"]) == ("no", "demo")
        for row in rows
    )
    references = {f"validation-{i:06d}": demo.make_example(0, "validation", i, CHUNK_S)[0] for i in range(NUM_EVAL)}
    assert {row["id"]: row["reference"] for row in rows} == references
    assert len(rows) == NUM_EVAL  # 12 examples in batches of 8: the padded rows of the last batch are not counted
    # Eval tokens: every example's label tokens (prefix + text + eot, less the first), padding excluded.
    tokenizer = rs.load_pretrained(str(demo_dir / "model"), weights=False).tokenizer
    tokenizer.set_prefix_tokens(language="no", task="transcribe", predict_timestamps=False)
    num_tokens = sum(len(tokenizer(text).input_ids) - 1 for text in references.values())
    (final,) = eval_lines(straight)
    assert final["eval/num_tokens"] == num_tokens and final["eval/num_examples"] == NUM_EVAL
    # WER as jiwer computes it from these very rows.
    wer = rs.transcription_metrics([r["reference"] for r in rows], [r["prediction"] for r in rows])["wer"]
    assert final["eval/wer"] == pytest.approx(wer)


def test_eval_only_of_the_exported_model(demo_dir, one_device_env, train_straight, tmp_path):
    """--do_eval alone on the exported model: the final eval of training again, and
    --log_max_eval_predictions 3 writes 3 rows."""
    straight, _ = train_straight
    out = tmp_path / "eval"
    run_to_end(
        one_device_env,
        [
            "--model_name_or_path",
            str(straight),
            "--dataset_name",
            str(demo_dir / "data"),
            "--output_dir",
            str(out),
            "--do_eval",
            "--predict_with_generate",
            "--train_batch_size",
            str(GLOBAL_BATCH),
            "--eval_batch_size",
            str(EVAL_BATCH),
            "--max_label_length",
            "32",
            "--log_max_eval_predictions",
            "3",
            "--preprocessing_num_workers",
            "2",
            "--report_to",
            "none",
        ],
        tmp_path,
    )
    (final,), (again,) = eval_lines(straight), eval_lines(out)
    assert again["eval/loss"] == pytest.approx(final["eval/loss"], rel=1e-5)
    assert again["eval/num_examples"] == NUM_EVAL
    rows = (out / "predictions" / "eval" / "validation" / "step_0.jsonl").read_text().splitlines()
    assert len(rows) == 3


def test_evalsets_two_sets_and_a_test_set_on_two_processes(train_two_processes):
    """The two-process run's evaluation at the end on two sets (the demo's validation split, and
    "other" of a second dataset, with three sources) and its test set: per set, per language and per
    source, WER as jiwer computes it from each set's predictions, which hold each example once over
    both processes; the mean over the sets."""
    out, _ = train_two_processes
    lines = metrics_lines(out)
    (final,) = [m for m in lines if "eval/loss" in m]
    (test,) = [m for m in lines if "test/loss" in m]
    assert final["step"] == test["step"] == NUM_STEPS
    sizes = {"validation": NUM_EVAL, **EVALSETS_SIZES}
    sources = {"validation": ("demo",), "other": EVALSETS_SOURCES, "test": EVALSETS_SOURCES}
    for kind, sets, line in (("eval", ("validation", "other"), final), ("test", ("test",), test)):
        for metric in ("loss", "wer", "cer", "wer_normalized", "cer_normalized"):
            per_set = [line[f"{kind}/{name}/{metric}"] for name in sets]
            assert line[f"{kind}/{metric}"] == pytest.approx(np.mean(per_set))  # the mean over sets
        assert line[f"{kind}/num_examples"] == sum(sizes[name] for name in sets)
        for name in sets:
            directory = out / "predictions" / kind / name
            rows = prediction_rows(directory / f"step_{NUM_STEPS}.jsonl")
            # each example of the set once, over both processes
            assert sorted(r["id"] for r in rows) == [f"{name}-{i:06d}" for i in range(sizes[name])]
            assert line[f"{kind}/{name}/num_examples"] == sizes[name]
            assert (line[f"{kind}/{name}/wer"], line[f"{kind}/{name}/cer"]) == pytest.approx(evalsets_jiwer(rows))
            assert line[f"{kind}/{name}/no/wer"] == pytest.approx(line[f"{kind}/{name}/wer"])  # one language
            assert {r["source"] for r in rows} == set(sources[name])
            for source in sources[name]:
                wer, cer = evalsets_jiwer([r for r in rows if r["source"] == source])
                assert line[f"{kind}/{name}/source/{source}/wer"] == pytest.approx(wer)
                assert line[f"{kind}/{name}/source/{source}/cer"] == pytest.approx(cer)
                assert f"{kind}/{name}/source/{source}/wer_normalized" in line


def test_evalsets_model_card_model_index_holds_the_test_wers(train_two_processes):
    from huggingface_hub import ModelCard

    out, _ = train_two_processes
    (test,) = [m for m in metrics_lines(out) if "test/loss" in m]
    card = ModelCard.load(out / "README.md")
    (model_index,) = card.data.to_dict()["model-index"]
    assert model_index["name"] == out.name
    results = {(r.dataset_name, r.dataset_split, r.metric_name): r for r in card.data.eval_results}
    for metric, name in (("wer", "WER"), ("cer", "CER"), ("wer_normalized", "WER (normalized)")):
        result = results["test", "test", name]
        assert result.task_type == "automatic-speech-recognition"
        assert result.metric_type == metric.removesuffix("_normalized")
        assert result.metric_value == pytest.approx(test[f"test/test/{metric}"], abs=1e-4)
    assert {r.dataset_name for r in card.data.eval_results} == {"test"}  # the test sets, not the eval sets
    assert f"- test/test/wer: {test['test/test/wer']:.4g}" in card.text


def evalsets_checkpoint(out: Path, step: int) -> tuple[dict[str, np.ndarray], dict]:
    """A checkpoint's parameters in the exported model's names and layout, and its metadata."""
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager((out / "checkpoints").absolute(), item_names=("state", "meta"))
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
    )
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), restored["state"]["params"])
    return rs.flax_to_torch(rs.unstack_layers(params)), restored["meta"]


def evalsets_wait_for_eval(process: subprocess.Popen, out: Path, step: int):
    """Poll metrics.jsonl until the evaluation of `step` is logged; the run must still be going."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the run exited ({process.returncode}) before evaluating step {step}"
        path = out / "metrics.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                if json.loads(line)["step"] == step and "eval/loss" in line:
                    return
            except (json.JSONDecodeError, KeyError):  # a line being written
                pass
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"no evaluation of step {step} within {RUN_TIMEOUT_S} s")


def test_evalsets_best_model_is_exported_and_kept_across_a_resume(demo_dir, one_device_env, tmp_path):
    # Step 1 has learning rate 0 (the warmup's first step), so its evaluation is the initial model's;
    # then a learning rate of 1 wrecks the model. --save_total_limit 1 keeps only the latest
    # checkpoint, beyond the best one.
    out = tmp_path / "run"
    flags = train_command(
        demo_dir,
        out,
        *("--num_train_steps", "4", "--eval_steps", "1", "--learning_rate", "1.0", "--warmup_steps", "1"),
        *("--save_total_limit", "1", "--report_to", "none"),
    )
    first = launch(one_device_env, flags, tmp_path, "first")
    evalsets_wait_for_eval(first, out, 2)
    first.send_signal(signal.SIGTERM)
    returncode, stdout, stderr = finish(first, tmp_path, "first")
    assert returncode == 0, stderr[-3000:]
    assert "stopped by SIGTERM after step 3" in stdout, stdout[-2000:]
    assert not (out / "model.safetensors").exists()
    assert complete_checkpoints(out) == [1, 3]  # the best (step 1) outlives --save_total_limit 1
    assert evalsets_checkpoint(out, 3)[1]["best"]["step"] == 1

    stdout = run_to_end(one_device_env, flags, tmp_path, "relaunch")
    assert resumed_step(stdout) == 3
    assert "exporting the best evaluation: step 1" in stdout
    evals = {m["step"]: m for m in eval_lines(out)}
    assert sorted(evals) == [1, 2, 3, 4]
    wer = {step: m["eval/wer_normalized"] for step, m in evals.items()}
    # Measured: 100 at step 1, 111.4 at step 2 (the wrecked model's insertions), 100 at steps 3 and 4.
    assert wer[2] > wer[1] and min(wer[2], wer[3], wer[4]) >= wer[1], wer
    assert complete_checkpoints(out) == [1, 4]
    best_params, _ = evalsets_checkpoint(out, 1)
    last_params, _ = evalsets_checkpoint(out, 4)
    exported = exported_arrays(out)
    assert sorted(exported) == sorted(best_params)
    assert all(np.array_equal(exported[name], best_params[name]) for name in exported)
    assert max_abs_diff(exported, last_params) > 1e-2  # not the last step's model
    card = (out / "README.md").read_text()
    assert (
        f"- eval/loss: {evals[1]['eval/loss']:.4g}" in card and f"- eval/loss: {evals[4]['eval/loss']:.4g}" not in card
    )


def test_evalsets_predict_alone_on_the_exported_model(demo_dir, one_device_env, train_straight, tmp_path):
    """--do_predict alone on an exported model: the training run's final evaluation again, under test/."""
    straight, _ = train_straight
    out = tmp_path / "predict"
    flags = [
        *("--model_name_or_path", str(straight), "--dataset_name", str(demo_dir / "data"), "--output_dir", str(out)),
        *("--do_predict", "--test_split_name", "validation", "--predict_with_generate"),
        *("--eval_batch_size", str(EVAL_BATCH), "--max_label_length", "32", "--preprocessing_num_workers", "2"),
        *("--report_to", "none"),
    ]
    run_to_end(one_device_env, flags, tmp_path)
    (final,) = eval_lines(straight)
    (test,) = metrics_lines(out)
    assert not any(name.startswith("eval/") for name in test)
    assert test["test/validation/loss"] == test["test/loss"] == pytest.approx(final["eval/loss"], rel=1e-5)
    assert test["test/validation/num_examples"] == NUM_EVAL
    rows = prediction_rows(out / "predictions" / "test" / "validation" / "step_0.jsonl")
    trained = prediction_rows(straight / "predictions" / "eval" / "validation" / f"step_{NUM_STEPS}.jsonl")
    assert {r["id"]: r["prediction"] for r in rows} == {r["id"]: r["prediction"] for r in trained}
    assert test["test/wer"] == pytest.approx(final["eval/wer"])


def test_every_eval_example_is_scored_and_unreadable_ones_are_counted(
    demo_dir, one_device_env, train_straight, tmp_path
):
    """An eval transcript longer than --max_label_length is decoded and in the WER (its loss over
    the tokens that fit); a row whose audio cannot be read is a counted skip in metrics.jsonl,
    per set and reason."""
    straight, _ = train_straight
    table = pq.read_table(demo_dir / "data" / "data" / "validation-00000-of-00001.parquet")
    rows = table.to_pylist()
    long_text = " ".join(["hei du"] * 40)  # far over 16 label tokens
    rows += [{**rows[0], "id": "long", "text": long_text}, {**rows[1], "id": "unreadable"}]
    rows[-1]["audio"] = {**rows[-1]["audio"], "bytes": b"not audio at all"}
    (tmp_path / "data" / "data").mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist(rows, schema=table.schema),
        tmp_path / "data" / "data" / "validation-00000-of-00001.parquet",
    )
    out = tmp_path / "eval"
    flags = ["--model_name_or_path", str(straight), "--dataset_name", str(tmp_path / "data"), "--output_dir", str(out)]
    flags += ["--do_eval", "--predict_with_generate", "--eval_batch_size", str(EVAL_BATCH), "--max_label_length", "16"]
    run_to_end(one_device_env, [*flags, "--preprocessing_num_workers", "1", "--report_to", "none"], tmp_path)
    (line,) = eval_lines(out)
    assert line["eval/validation/num_examples"] == NUM_EVAL + 1 and line["eval/validation/skipped_undecodable"] == 1
    predictions = {r["id"]: r for r in prediction_rows(out / "predictions" / "eval" / "validation" / "step_0.jsonl")}
    assert predictions["long"]["reference"] == long_text and "unreadable" not in predictions
    assert (line["eval/validation/wer"], line["eval/validation/cer"]) == pytest.approx(
        evalsets_jiwer(list(predictions.values()))
    )
