"""What users ship, on real whisper-base: whisper.cpp's model file (--export_ggml) transcribes as
we do, and the export keeps the alignment heads that word-level timestamps need (transformers'
pipeline). Long recordings after fine-tuning: tests/longform_check.py."""

import numpy as np
import pytest
from transformers import GenerationConfig, pipeline
from transformers.models.whisper.english_normalizer import BasicTextNormalizer

import run_scream as rs
from tests.support import REAL_SAMPLE_RATE, espeak_synthesize, whisper_cpp
from tests.test_real_weights import our_greedy, real_export, real_features, real_prompt

# Sentences whisper-base hears clearly from espeak-ng (its greedy text is the sentence itself), so
# that two engines must agree on them; on unsure clips f16 weights and whisper.cpp's own log-mel flip tokens.
CLEAR_ENGLISH = (
    "Please open the window.",
    "Good morning.",
    "Thank you very much.",
    "I like to read books.",
    "Where is the station?",
    "My name is John.",
)


@pytest.fixture(scope="session")
def english_clips() -> list[dict]:
    return espeak_synthesize([("en", "en", sentence) for sentence in CLEAR_ENGLISH])


def ours(pretrained, clips, language: str) -> list[str]:
    prompts = [real_prompt(pretrained, language)] * len(clips)
    tokens = our_greedy(pretrained, real_features(pretrained, clips), prompts)
    return [text.strip() for text in pretrained.tokenizer.batch_decode(tokens, skip_special_tokens=True)]


def test_ggml_export_of_whisper_base_transcribes_in_whisper_cpp_as_we_do(whisper_base, english_clips, tmp_path):
    """Must show 1: the f16 file of unchanged whisper-base, written by export_ggml, loads and runs in
    whisper.cpp; on clips the model hears clearly its text is ours, word for word. (Norwegian, where
    unchanged whisper-base is unsure: whisper.cpp after a fine-tune, test_whisper_base_fine_tunes_*.)"""
    path = rs.export_ggml(whisper_base.params, whisper_base, tmp_path / "m.bin")
    english = ours(whisper_base, english_clips, "en")
    assert [BasicTextNormalizer()(t) for t in english] == [BasicTextNormalizer()(s) for s in CLEAR_ENGLISH]
    assert whisper_cpp(path, english_clips, "en") == english


def test_export_ggml_with_an_unknown_type_is_exit_2(capsys, tmp_path):
    status = rs.main(["--dataset_name", "d", "--output_dir", str(tmp_path), "--do_train", "--export_ggml", "q5_0"])
    error = capsys.readouterr().err
    assert status == 2 and "--export_ggml 'q5_0'" in error and "f16, q8_0" in error


def test_export_keeps_the_alignment_heads_for_word_timestamps(whisper_base, english_clips, tmp_path):
    """Must show 4: the export carries whisper-base's alignment heads into its generation config
    (CTranslate2's config.json: test_export_ctranslate2_*); transformers' pipeline gives one timestamp
    per word, increasing, inside the audio."""
    out = real_export(whisper_base, tmp_path / "export")
    heads = GenerationConfig.from_pretrained(out).alignment_heads
    assert heads == whisper_base.generation_config.alignment_heads and len(heads) == 8

    pause = np.zeros(REAL_SAMPLE_RATE // 2, np.float32)
    audio = np.concatenate([english_clips[0]["audio"], pause, english_clips[4]["audio"]])
    asr = pipeline("automatic-speech-recognition", model=str(out))
    result = asr(audio, return_timestamps="word", generate_kwargs={"language": "en", "num_beams": 1})
    words = result["chunks"]
    assert [w["text"].strip() for w in words] == result["text"].split()  # one chunk per word
    times = [t for w in words for t in w["timestamp"]]
    assert times == sorted(times) and 0 <= times[0] and times[-1] <= len(audio) / REAL_SAMPLE_RATE + 0.02
    first_sentence_end = len(english_clips[0]["audio"]) / REAL_SAMPLE_RATE
    assert words[len(CLEAR_ENGLISH[0].split())]["timestamp"][0] >= first_sentence_end - 0.3  # "Where" after the pause
