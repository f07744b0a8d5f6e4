"""Decoding: our greedy and beam search give transformers' generate() token for token, on a toy model
that decodes like a real one (in process), with each row's own prefix, and through an evaluation run's
flags. (Real whisper-base's decoding: test_real_weights.py.)"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import WhisperFeatureExtractor

import run_scream as rs
from tests.support import (
    EVAL_BATCH,
    GLOBAL_BATCH,
    MODEL_MAX_NEW_TOKENS,
    NUM_EVAL,
    eval_only_env,
    model_decoding_settings,
    model_generate,
    model_prompts,
    run_to_end,
)

# Each case's extra DecodingSettings and whether some row's best hypothesis runs to max_new_tokens
# on these inputs (so hypotheses finished by the length limit, not <|endoftext|>, are compared too):
# greedy; one beam, which is transformers' greedy search whatever the length penalty says (their
# beam search is never used with one beam); transformers' defaults for Whisper (length penalty 1.0,
# no early stopping) at 2 and 5 beams; and the other length-penalty and early-stopping branches.
DECODING_CASES = {
    "greedy": ({}, True),
    "one_beam": (dict(num_beams=1, length_penalty=0.3), True),
    "beams_2": (dict(num_beams=2, length_penalty=1.0, early_stopping=False), True),
    "beams_5": (dict(num_beams=5, length_penalty=1.0, early_stopping=False), False),
    "beams_5_short_early": (dict(num_beams=5, length_penalty=0.5, early_stopping=True), False),
    "beams_3_long_never": (dict(num_beams=3, length_penalty=2.0, early_stopping="never"), True),
}


def transformers_sequences(torch_model, features: np.ndarray, max_new_tokens: int, **kwargs) -> np.ndarray:
    """transformers' generate(...).sequences: prompt, tokens, eos, then pad to the longest row."""
    with torch.no_grad():
        return torch_model.generate(
            torch.from_numpy(features),
            do_sample=False,
            task="transcribe",
            max_new_tokens=max_new_tokens,
            return_dict_in_generate=True,
            **kwargs,
        ).sequences.numpy()


def assert_same_ids(ours: np.ndarray, theirs: np.ndarray, pad_token_id: int):
    """Ours are (B, P + max_new_tokens); theirs end at the longest row. Same ids, then pad only."""
    np.testing.assert_array_equal(ours[:, : theirs.shape[1]], theirs)
    assert (ours[:, theirs.shape[1] :] == pad_token_id).all()


@pytest.mark.parametrize("case", list(DECODING_CASES))
def test_generation_matches_transformers(model_generation_dir, case):
    """A batch of 6 under the generation config's prefix and suppressions, as transformers' generate
    decodes it; beam search finds other hypotheses than greedy's, and one beam is greedy."""
    directory, torch_model = model_generation_dir
    pretrained = rs.load_pretrained(str(directory))
    config, beam, reaches_max = pretrained.config, *DECODING_CASES[case]
    greedy_settings = model_decoding_settings(pretrained, MODEL_MAX_NEW_TOKENS)
    settings = model_decoding_settings(pretrained, MODEL_MAX_NEW_TOKENS, **beam)
    assert settings.suppress_tokens and settings.begin_suppress_tokens  # the generation config's, exercised
    ids = pretrained.tokenizer.convert_tokens_to_ids
    model, prompts = rs.build_model(config), model_prompts(pretrained, 6)
    assert tuple(prompts[0]) == tuple(ids(["<|startoftranscript|>", "<|no|>", "<|transcribe|>", "<|notimestamps|>"]))
    features = np.random.default_rng(4).normal(size=(6, 80, 100)).astype(np.float32)
    ours = np.asarray(model_generate(model, pretrained.params, features, prompts, settings))
    assert ours.shape == (6, settings.prompt_length + MODEL_MAX_NEW_TOKENS)
    theirs_beam = {k: v for k, v in beam.items() if settings.num_beams > 1 or k == "num_beams"}
    theirs = transformers_sequences(torch_model, features, MODEL_MAX_NEW_TOKENS, language="no", **theirs_beam)
    assert_same_ids(ours, theirs, config.pad_token_id)
    generated = ours[:, settings.prompt_length :]
    if reaches_max:
        assert (generated[:, -1] != config.eos_token_id).any(), generated
    if settings.num_beams > 1:
        greedy = np.asarray(model_generate(model, pretrained.params, features, prompts, greedy_settings))
        changed = [not np.array_equal(a, b) for a, b in zip(ours, greedy)]
        assert any(changed), "beam search picked the greedy hypothesis on every row: a weak comparison"
        assert len({tuple(row) for row in ours}) >= 2, ours
        return
    if case == "one_beam":
        greedy = np.asarray(model_generate(model, pretrained.params, features, prompts, greedy_settings))
        np.testing.assert_array_equal(ours, greedy)
        return
    # What generate() returns by default in transformers 5: the new tokens only, the final eos
    # dropped, pad (the same id as eos) to the longest row.
    with torch.no_grad():
        new_tokens = torch_model.generate(
            torch.from_numpy(features),
            num_beams=1,
            do_sample=False,
            language="no",
            task="transcribe",
            max_new_tokens=MODEL_MAX_NEW_TOKENS,
        ).numpy()
    np.testing.assert_array_equal(generated[:, : new_tokens.shape[1]], new_tokens)
    assert (generated[:, new_tokens.shape[1] :] == config.pad_token_id).all()
    ended_early = [(row == config.eos_token_id).any() for row in generated]
    assert any(ended_early) and not all(ended_early), generated  # both cases exercised
    assert len({tuple(row) for row in generated}) >= 3, generated  # the inputs really differ


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_takes_each_rows_prefix(model_generation_dir, num_beams):
    """Rows with different forced languages in one batch decode as transformers decodes each row
    alone; eval_step's beam search decodes from batch["prompt_ids"], and without it from the start of
    each row's decoder input (collate's <|startoftranscript|><|lang|><|task|><|notimestamps|> text ...)."""
    directory, torch_model = model_generation_dir
    pretrained = rs.load_pretrained(str(directory))
    model = rs.build_model(pretrained.config)
    settings = model_decoding_settings(pretrained, MODEL_MAX_NEW_TOKENS, num_beams=num_beams)
    # eval_step computes log-mel from the waveform: 100 mel frames of this 50-position model = 16,000 samples
    mel_filters = np.asarray(WhisperFeatureExtractor(feature_size=80).mel_filters, np.float32)
    audio = np.random.default_rng(6).normal(scale=0.1, size=(4, 16000)).astype(np.float32)
    features = np.array(rs.log_mel(audio, mel_filters))  # a writable copy, for torch
    assert features.shape == (4, 80, 100)
    languages, swapped = ["no", "en", "sv", "no"], ["sv", "no", "en", "en"]
    prompts = np.stack([model_prompts(pretrained, 1, language)[0] for language in languages])
    assert len({tuple(p) for p in prompts}) == 3
    ours = np.asarray(model_generate(model, pretrained.params, features, prompts, settings))
    for row, language in enumerate(languages):
        theirs = transformers_sequences(
            torch_model, features[row : row + 1], MODEL_MAX_NEW_TOKENS, language=language, num_beams=num_beams
        )
        assert_same_ids(ours[row : row + 1], theirs, pretrained.config.pad_token_id)
    # The language really steers this model: the two "no" rows aside, rows differ in their text too.
    assert len({tuple(row[settings.prompt_length :]) for row in ours}) >= 3, ours
    if num_beams == 1:
        return  # (greedy eval_step, each row in its language: test_evalsets_whisper_base_decodes_each_row_*)

    text = np.random.default_rng(7).integers(0, 200, (4, 6)).astype(np.int32)
    batch = {
        "audio": audio,
        "decoder_input_ids": np.concatenate([prompts, text], axis=1),
        "labels": np.concatenate([prompts[:, 1:], text, text[:, :1]], axis=1),
    }
    step = jax.jit(
        lambda params, batch: rs.eval_step(params, batch, model=model, mel_filters=mel_filters, decoding=settings)
    )
    np.testing.assert_array_equal(step(pretrained.params, batch)["generated"], ours)
    other = np.stack([model_prompts(pretrained, 1, language)[0] for language in swapped])
    from_prompt_ids = np.asarray(step(pretrained.params, {**batch, "prompt_ids": other})["generated"])
    np.testing.assert_array_equal(from_prompt_ids, model_generate(model, pretrained.params, features, other, settings))
    np.testing.assert_array_equal(from_prompt_ids[:, : settings.prompt_length], other)


def test_beam_search_eval_run_predicts_what_transformers_generates(model_generation_dir, demo_dir, run_env, tmp_path):
    """--do_eval with --generation_num_beams 3 --generation_length_penalty 0.7 (the random
    generation model, on the demo's 1 s clips): each prediction is transformers' generate(num_beams=3,
    length_penalty=0.7) of that clip, from the same FLAC bytes and log-mel as run_scream computes."""
    directory, torch_model = model_generation_dir
    out = tmp_path / "eval"
    run_to_end(
        eval_only_env(run_env, tmp_path),
        [
            "--model_name_or_path",
            str(directory),
            "--dataset_name",
            str(demo_dir / "data"),
            "--output_dir",
            str(out),
            "--train_batch_size",
            str(GLOBAL_BATCH),
            "--eval_batch_size",
            str(EVAL_BATCH),
            "--do_eval",
            "--predict_with_generate",
            "--max_label_length",
            "32",
            "--generation_max_length",
            str(MODEL_MAX_NEW_TOKENS),
            "--generation_num_beams",
            "3",
            "--generation_length_penalty",
            "0.7",
            "--report_to",
            "none",
        ],
        tmp_path / "logs",
    )
    predictions = {
        row["id"]: row["prediction"]
        for row in map(
            json.loads, (out / "predictions" / "eval" / "validation" / "step_0.jsonl").read_text().splitlines()
        )
    }
    assert len(predictions) == NUM_EVAL
    pretrained = rs.load_pretrained(str(directory))
    extractor = pretrained.feature_extractor
    (validation,) = (demo_dir / "data").glob("**/validation-*.parquet")
    table = pq.read_table(validation).to_pylist()
    audio = np.stack(
        [
            np.pad(clip[: extractor.n_samples], (0, extractor.n_samples - min(len(clip), extractor.n_samples)))
            for clip in (rs.decode_audio(row["audio"], extractor.sampling_rate) for row in table)
        ]
    )
    features = np.array(rs.log_mel(jnp.asarray(audio), np.asarray(extractor.mel_filters, np.float32)))

    def transcripts(**kwargs):
        with torch.no_grad():
            ids = torch_model.generate(
                torch.from_numpy(features), do_sample=False, max_new_tokens=MODEL_MAX_NEW_TOKENS, **kwargs
            ).numpy()
        texts = pretrained.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return {row["id"]: text.strip() for row, text in zip(table, texts)}

    assert transcripts(num_beams=3, length_penalty=0.7) == predictions
    greedy = transcripts(num_beams=1)
    assert sum(greedy[key] != predictions[key] for key in predictions) >= 2  # the flags reached the decoding
