"""The smoke test: one path through Scream end to end, on tiny shapes, in about a minute on two cores.

A tiny demo (make_demo_dataset's tokenizer, weightless model and clips) trains for a few steps on 8
fake CPU devices (data parallel), is stopped by SIGTERM and resumed from the checkpoint
that saved, evaluates with generation (WER), and exports a model that transformers loads with our
logits. Every feature's own tests are in tests/ (tests/support.py says which file tests what).

Run it alone: python -m pytest -q test_run_scream.py
The whole suite: python -m pytest -q -n 2 --dist loadgroup test_run_scream.py tests
"""

import json

import numpy as np
import pytest
import torch
from transformers import WhisperForConditionalGeneration, pipeline

import make_demo_dataset as demo
import run_scream as rs
from tests.support import (
    CHUNK_S,
    LOGITS_TOLERANCE,
    NUM_EVAL,
    NUM_STEPS,
    SAVE_LIMIT,
    SAVE_STEPS,
    assert_same_exported_params,
    complete_checkpoints,
    eval_lines,
    evalsets_jiwer,
    launch,
    logged_steps,
    model_torch_logits,
    prediction_rows,
    resumed_step,
    run_to_end,
    sigterm_after,
    train_command,
    train_lines,
)


def test_a_demo_run_trains_evaluates_resumes_and_exports(demo_dir, run_env, train_straight, tmp_path):
    straight, _ = train_straight
    out = tmp_path / "run"
    flags = train_command(demo_dir, out)

    # SIGTERM (a preempted VM): a checkpoint at the next step, beside the cadence's; nothing exported yet.
    stopped, _ = sigterm_after(launch(run_env, flags, tmp_path, "first"), out, 2, tmp_path, "first")
    assert 2 < stopped < NUM_STEPS
    assert complete_checkpoints(out) == [*range(SAVE_STEPS, stopped, SAVE_STEPS), stopped][-SAVE_LIMIT:]
    assert max(logged_steps(out)) == stopped and not (out / "model.safetensors").exists()

    # The same command resumes from that checkpoint and ends where the uninterrupted run ended: every
    # step logged once with its numbers, the same evaluation, the same exported parameters.
    assert resumed_step(run_to_end(run_env, flags, tmp_path, "relaunch")) == stopped
    resumed, reference = train_lines(out), train_lines(straight)
    assert sorted(resumed) == sorted(reference) == list(range(1, NUM_STEPS + 1))
    for step in reference:
        for key in ("train/loss", "train/grad_norm", "train/learning_rate", "examples_seen"):
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-6, abs=0), (step, key)
    assert reference[NUM_STEPS]["train/loss"] < reference[1]["train/loss"]  # it learns
    assert_same_exported_params(out, straight)
    (final,), (uninterrupted,) = eval_lines(out), eval_lines(straight)
    assert final["step"] == NUM_STEPS and final["eval/loss"] == pytest.approx(uninterrupted["eval/loss"], rel=1e-6)

    assert_the_files_a_user_reads(out, final)
    assert_the_export_loads_in_transformers_with_our_logits(out)


def assert_the_files_a_user_reads(out, final: dict):
    """metrics.jsonl's eval WER is jiwer's over the predictions written (each eval example once, with
    its reference); the last SAVE_LIMIT checkpoints; scream_config.json; the model card."""
    rows = prediction_rows(out / "predictions" / "eval" / "validation" / f"step_{NUM_STEPS}.jsonl")
    references = {f"validation-{i:06d}": demo.make_example(0, "validation", i, CHUNK_S)[0] for i in range(NUM_EVAL)}
    assert {row["id"]: row["reference"] for row in rows} == references
    assert all(isinstance(row["prediction"], str) for row in rows)
    wer, cer = evalsets_jiwer(rows)
    assert (final["eval/wer"], final["eval/cer"]) == pytest.approx((wer, cer))
    assert final["eval/num_examples"] == NUM_EVAL
    assert complete_checkpoints(out) == [NUM_STEPS - SAVE_STEPS, NUM_STEPS]
    resolved = json.loads((out / "scream_config.json").read_text())["resolved"]
    assert (resolved["devices"], resolved["hosts"], resolved["global_batch"]) == (8, 1, 8)
    card = (out / "README.md").read_text()
    assert f"- eval/wer: {final['eval/wer']:.4g}" in card and f"- eval/loss: {final['eval/loss']:.4g}" in card


def assert_the_export_loads_in_transformers_with_our_logits(out):
    """transformers loads the export (every weight in its place) with our logits on the demo's clips;
    its generation config keeps the run's language and task; pipeline() transcribes with it as is."""
    torch_model, info = WhisperForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ours = rs.load_pretrained(str(out))
    n_samples = ours.feature_extractor.n_samples
    clips = [demo.make_example(0, "validation", i, CHUNK_S)[1] for i in range(2)]
    audio = np.stack([np.pad(clip, (0, n_samples - len(clip))) for clip in clips])
    features = np.asarray(rs.log_mel(audio, np.asarray(ours.feature_extractor.mel_filters, np.float32)))
    decoder_ids = np.random.default_rng(0).integers(0, ours.config.vocab_size, (2, 12)).astype(np.int32)
    logits = np.asarray(rs.build_model(ours.config).apply({"params": ours.params}, features, decoder_ids))
    theirs = model_torch_logits(torch_model.eval(), features, decoder_ids)
    assert np.abs(theirs).max() > 0.5  # not a degenerate comparison
    np.testing.assert_allclose(logits, theirs, rtol=0, atol=LOGITS_TOLERANCE)

    saved = json.loads((out / "generation_config.json").read_text())
    assert saved["language"] == "no" and saved["task"] == "transcribe"
    assert saved["lang_to_id"]["<|no|>"] == ours.tokenizer.convert_tokens_to_ids("<|no|>")
    assert not saved.get("_from_model_config", False)
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json"):
        assert (out / name).exists(), name
    # (Its text is not compared with ours: its ASR decoding renders some lone bytes of this byte-level
    # vocabulary differently from tokenizer.decode; generate()'s ids are compared in tests/test_decoding.py.)
    with torch.no_grad():
        result = pipeline("automatic-speech-recognition", model=str(out), device="cpu")(clips[0])
    assert isinstance(result, dict) and isinstance(result["text"], str) and result["text"]
