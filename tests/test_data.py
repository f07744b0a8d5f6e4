"""Data: on-device log-mel, datasets read and sharded over hosts, exact resume, bad rows skipped and
counted, collate; the 2024 recipe's labels (per-row language and task, timestamps, prompts, BPE dropout)."""

import collections
import copy
import dataclasses
import functools
import io
import itertools
import json
import re
import threading

import datasets
import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import soxr
import transformers.models.whisper.feature_extraction_whisper as feature_extraction_whisper
from datasets import Audio, Features, Value
from transformers import WhisperFeatureExtractor

import make_demo_dataset as demo
import run_scream as rs
from tests.support import (
    NB_MAX_LABELS,
    NB_MAX_PREV,
    NB_PREVIOUS,
    NB_SAMPLE_RATE,
    NB_TEXT,
    NB_TIMESTAMPED,
    REPO,
    nb_mixed_rows,
    nb_prepare,
    nb_row,
    run_and_wait,
)

DATA_SAMPLE_RATE = 16000


DATA_CHUNK_S = 3  # the demo model's window; the bad-data test uses Whisper's real 30 s


DATA_MAX_LABEL_LENGTH = 48


DATA_FEATURES = Features(
    {
        "id": Value("string"),
        "audio": Audio(sampling_rate=DATA_SAMPLE_RATE),
        "text": Value("string"),
        "source": Value("string"),
    }
)


@pytest.fixture(scope="session")
def data_hf_cache(tmp_path_factory):
    """A private datasets cache, so no run reads (or leaves) arrow files in the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("data_hf_cache")))
        yield


@pytest.fixture(scope="session")
def data_env(tmp_path_factory, data_hf_cache):
    """The demo tokenizer (prefix set from --language norwegian, as run() does), a weightless tiny
    model directory, and two small demo datasets: 40 train rows in 4 shards and 30 in 3."""
    root = tmp_path_factory.mktemp("data_env")
    tokenizer = demo.write_tokenizer(root / "tokenizer")
    config = demo.write_model_dir(root / "model", tokenizer, DATA_CHUNK_S, 80)
    tokenizer.set_prefix_tokens(language=rs.language_code("norwegian"), task="transcribe", predict_timestamps=False)
    for name, num_train, shards in (("four_shards", 40, 4), ("three_shards", 30, 3)):
        demo.write_dataset(root / name, num_train, 6, 0, DATA_CHUNK_S, shards)
    feature_extractor = demo.make_feature_extractor(DATA_CHUNK_S, 80)
    return {
        "root": root,
        "tokenizer": tokenizer,
        "config": config,
        "model_dir": root / "model",
        "feature_extractor": feature_extractor,
        "four_shards": str(root / "four_shards"),
        "three_shards": str(root / "three_shards"),
    }


def data_ids(split, num):
    return [f"{split}-{i:06d}" for i in range(num)]


def data_args(dataset_name, **overrides):
    return rs.DataArguments(dataset_name=dataset_name, **overrides)


def data_prepare(
    tokenizer,
    *,
    n_samples=DATA_CHUNK_S * DATA_SAMPLE_RATE,
    max_duration_s=DATA_CHUNK_S,
    min_duration_s=0.0,
    max_label_length=DATA_MAX_LABEL_LENGTH,
):
    return functools.partial(
        rs.prepare_example,
        tokenizer=tokenizer,
        audio_settings=rs.AudioSettings(DATA_SAMPLE_RATE, n_samples, min_duration_s, max_duration_s),
        text_settings=rs.TextSettings(False, False, max_label_length),
    )


def data_batches(
    env,
    dataset_name,
    *,
    batch_size,
    repeat,
    state=None,
    shuffle=None,
    num_workers=2,
    prepare=None,
    n_samples=DATA_CHUNK_S * DATA_SAMPLE_RATE,
    max_label_length=DATA_MAX_LABEL_LENGTH,
    **arg_overrides,
):
    """SpeechBatches wired as run() wires them (one host)."""
    args = data_args(dataset_name, **arg_overrides)
    make_source = functools.partial(
        rs.load_source,
        args,
        "train",
        shuffle=repeat if shuffle is None else shuffle,
    )
    collate_fn = functools.partial(
        rs.collate,
        batch_size=batch_size,
        n_samples=n_samples,
        max_label_length=max_label_length,
        pad_token_id=env["config"].pad_token_id,
    )
    return rs.SpeechBatches(
        lambda epoch: make_source(epoch=epoch),
        prepare or data_prepare(env["tokenizer"]),
        batch_size=batch_size,
        collate_fn=collate_fn,
        repeat=repeat,
        num_workers=num_workers,
        prefetch_batches=2,
        state=state,
    )


def data_take(batches, num):
    """The first `num` (batch, ids, state after it) of an iterator; stops its reader thread."""
    out = []
    iterator = iter(batches)
    for batch, examples in iterator:
        out.append((batch, [e["id"] for e in examples], json.loads(json.dumps(batches.state_dict()))))
        if len(out) == num:
            break
    iterator.close()
    return out


def data_encode(waveform, rate, fmt, subtype=None):
    buffer = io.BytesIO()
    sf.write(buffer, waveform, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def data_tone(freq_hz, seconds, rate=DATA_SAMPLE_RATE, amplitude=0.5):
    return (amplitude * np.sin(2 * np.pi * freq_hz * np.arange(int(round(seconds * rate))) / rate)).astype(np.float32)


def data_peak_hz(waveform, rate=DATA_SAMPLE_RATE):
    spectrum = np.abs(np.fft.rfft(waveform * np.hanning(len(waveform))))
    return np.argmax(spectrum) * rate / len(waveform)


def data_write_parquet(directory, rows, num_shards):
    """Rows as the hub stores them: data/train-0000i-of-0000N.parquet, audio as an Audio struct."""
    (directory / "data").mkdir(parents=True, exist_ok=True)
    for shard, indices in enumerate(np.array_split(np.arange(len(rows)), num_shards)):
        table = pa.Table.from_pylist([rows[i] for i in indices], schema=DATA_FEATURES.arrow_schema)
        pq.write_table(table, directory / "data" / f"train-{shard:05d}-of-{num_shards:05d}.parquet")
    return str(directory)


def data_clips(n_samples, rng):
    """Varied clips: silence, clipping, noise, tones, a chirp, a click, speech-like, loud and quiet, short."""
    t = np.arange(n_samples) / DATA_SAMPLE_RATE
    speech_text = demo.make_sentence(rng)
    speech = demo.synthesize(speech_text, rng, max_duration_s=n_samples / DATA_SAMPLE_RATE)
    click = np.zeros(n_samples, np.float32)
    click[n_samples // 3] = 1.0
    clips = {
        "silence": np.zeros(n_samples),
        "clipping_square": np.sign(np.sin(2 * np.pi * 220 * t)),  # +-1: the loudest input there is
        "clipped_loud_noise": np.clip(rng.normal(0, 2.0, n_samples), -1, 1),
        "white_noise": rng.normal(0, 0.1, n_samples),
        "quiet_noise": rng.normal(0, 1e-4, n_samples),
        "tone_100hz": 0.5 * np.sin(2 * np.pi * 100 * t),
        "tone_1khz_full_scale": np.sin(2 * np.pi * 1000 * t),
        "tone_7900hz": 0.3 * np.sin(2 * np.pi * 7900 * t),
        "tone_quiet": 1e-5 * np.sin(2 * np.pi * 3000 * t),
        "chirp": 0.4 * np.sin(2 * np.pi * (50 + 3000 * t / t[-1]) * t),
        "click": click,
        "dc_offset": 0.5 + 0.01 * rng.normal(0, 1, n_samples),
        "speech_like": speech,
        "short_0.1s_tone": data_tone(440, 0.1),
        "short_0.1s_noise": rng.normal(0, 0.3, int(0.1 * DATA_SAMPLE_RATE)),
        "half_chunk_speech": speech[: len(speech) // 2],
    }
    return {name: np.asarray(clip, np.float32) for name, clip in clips.items()}


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_whisper_feature_extractor(n_mels, monkeypatch):
    """16 clips in Whisper's real 30 s chunk and the same 16 in the demo's 3 s chunk, each row of
    one batch (so the max-minus-8 floor must be per example), against the extractor's numpy path."""
    monkeypatch.setattr(feature_extraction_whisper, "is_torch_available", lambda: False)  # the numpy reference
    rng = np.random.default_rng(n_mels)
    worst = {}
    for chunk_length_s in (30, 3):
        extractor = WhisperFeatureExtractor(
            feature_size=n_mels, chunk_length=chunk_length_s, sampling_rate=DATA_SAMPLE_RATE
        )
        clips = data_clips(extractor.n_samples, rng)
        reference = np.stack(
            [
                extractor(
                    clip, sampling_rate=DATA_SAMPLE_RATE, padding="max_length", return_tensors="np"
                ).input_features[0]
                for clip in clips.values()
            ]
        )
        padded = np.stack([np.pad(clip, (0, extractor.n_samples - len(clip))) for clip in clips.values()])
        ours = np.asarray(jax.jit(rs.log_mel)(padded, np.asarray(extractor.mel_filters, np.float32)))
        assert ours.shape == reference.shape == (len(clips), n_mels, extractor.n_samples // 160)
        for name, difference in zip(clips, np.abs(ours - reference).max(axis=(1, 2))):
            worst[f"{chunk_length_s}s/{name}"] = float(difference)
    name, largest = max(worst.items(), key=lambda item: item[1])
    print(f"\nlog-mel {n_mels} bins: max abs difference {largest:.2e} ({name}) over {len(worst)} clips")
    assert len(worst) >= 20
    assert largest < 1e-3, worst


@pytest.mark.parametrize("epoch", [0, 1])
def test_streaming_and_non_streaming_give_the_same_rows(data_env, epoch):
    """Same rows in the same order (the non-streaming path is iterated like a stream): with
    --shuffle_buffer_size 0 that is the files' order, in every epoch."""
    ids = {}
    for streaming in (False, True):
        source = rs.load_source(
            data_args(data_env["four_shards"], streaming=streaming, shuffle_buffer_size=0),
            "train",
            shuffle=True,
            epoch=epoch,
        )
        rows = list(source)
        ids[streaming] = [row["id"] for row in rows]
        assert set(rows[0]) == {"id", "audio", "text"}  # only the columns the run reads
        assert rows[0]["audio"]["bytes"][:4] == b"fLaC"  # not decoded by datasets
    assert ids[False] == ids[True] == data_ids("train", 40)


# The card push_to_hub writes: split -> file patterns. datasets keys its cache of a local directory
# with such a card by the directory's name and the card alone, not by the files.
DATA_HUB_CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: validation
    path: data/validation-*
---
"""


def test_local_dataset_is_not_read_from_a_stale_cache(tmp_path, data_hf_cache):
    """A second `data` directory, or one regenerated in place, must not load the first one's rows
    (non-streaming: the path that converts to a cached Arrow file)."""

    def write(name, num):
        demo.write_dataset(tmp_path / name / "data", num, 2, 1, DATA_CHUNK_S, 2)
        (tmp_path / name / "data" / "README.md").write_text(DATA_HUB_CARD)

    def loaded_ids(name):
        source = rs.load_source(
            data_args(str(tmp_path / name / "data")),
            "train",
        )
        return [row["id"] for row in source]

    write("first", 12)
    write("second", 7)
    assert loaded_ids("first") == data_ids("train", 12)
    assert loaded_ids("second") == data_ids("train", 7)
    write("first", 5)  # regenerated in place
    assert loaded_ids("first") == data_ids("train", 5)


@pytest.mark.parametrize(
    "fmt,subtype,lossy",
    [("WAV", "PCM_16", False), ("FLAC", "PCM_16", False), ("OGG", "VORBIS", True), ("MP3", "MPEG_LAYER_III", True)],
)
def test_decode_audio_formats(fmt, subtype, lossy, tmp_path):
    """16 kHz mono and 8 kHz stereo in each container: mono float32 at 16 kHz, same duration,
    same pitch; stereo is averaged (left 0.6 and right 0.2 of one tone give 0.4)."""
    seconds = 1.5
    cases = {
        "16k_mono": (data_tone(440, seconds, amplitude=0.4), DATA_SAMPLE_RATE),
        "8k_stereo": (np.stack([data_tone(1000, seconds, 8000, 0.6), data_tone(1000, seconds, 8000, 0.2)], 1), 8000),
    }
    for name, (waveform, rate) in cases.items():
        encoded = data_encode(waveform, rate, fmt, subtype)
        path = tmp_path / f"{name}.{fmt.lower()}"
        path.write_bytes(encoded)
        for audio in ({"bytes": encoded, "path": None}, {"bytes": None, "path": str(path)}):
            decoded = rs.decode_audio(audio, DATA_SAMPLE_RATE)
            assert decoded.dtype == np.float32 and decoded.ndim == 1, name
            length_tolerance = 0.02 * seconds * DATA_SAMPLE_RATE if lossy else 0
            assert abs(len(decoded) - seconds * DATA_SAMPLE_RATE) <= length_tolerance, name
            expected_hz = 440 if name == "16k_mono" else 1000
            assert abs(data_peak_hz(decoded) - expected_hz) < 3, (name, data_peak_hz(decoded))
            middle = decoded[len(decoded) // 4 : -len(decoded) // 4]  # away from codec edges and resampler ramps
            assert abs(np.abs(middle).max() - 0.4) < (0.1 if lossy else 0.005), (name, np.abs(middle).max())


@pytest.mark.parametrize(
    "dataset,streaming,shuffle",
    [
        ("four_shards", True, False),  # 4 files / 2 hosts: each host reads its own 2 files
        ("three_shards", True, False),  # 3 files / 2 hosts: both read all and keep 1 row in 2
        ("three_shards", True, True),
        ("four_shards", False, True),  # non-streaming: 40 one-row shards, shuffled
    ],
)
def test_two_hosts_see_every_example_once(data_env, dataset, streaming, shuffle, capsys):
    num = 40 if dataset == "four_shards" else 30
    seen = []
    for process_index in range(2):
        source = rs.load_source(
            data_args(data_env[dataset], streaming=streaming, shuffle_buffer_size=8),
            "train",
            process_index=process_index,
            process_count=2,
            shuffle=shuffle,
            epoch=1,
        )
        seen.append([row["id"] for row in source])
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == data_ids("train", num)
    assert abs(len(seen[0]) - len(seen[1])) <= num // 4  # a share each, not one host doing it all
    warning = capsys.readouterr().err
    if dataset == "three_shards" and streaming:
        assert "3 shards do not divide over 2 hosts" in warning and "keeps 1 in 2 rows" in warning
    else:
        assert "do not divide" not in warning


def test_two_hosts_batches_cover_the_split(data_env):
    """Through SpeechBatches (decoding and all): the two hosts' batches hold every id once."""
    seen = []
    for process_index in range(2):
        make_source = functools.partial(
            rs.load_source,
            data_args(data_env["three_shards"], streaming=True),
            "validation",
            process_index=process_index,
            process_count=2,
        )
        batches = rs.SpeechBatches(
            lambda epoch: make_source(epoch=epoch),
            data_prepare(data_env["tokenizer"]),
            batch_size=2,
            collate_fn=functools.partial(
                rs.collate,
                batch_size=2,
                n_samples=DATA_CHUNK_S * DATA_SAMPLE_RATE,
                max_label_length=DATA_MAX_LABEL_LENGTH,
                pad_token_id=data_env["config"].pad_token_id,
            ),
            repeat=False,
            num_workers=2,
            prefetch_batches=2,
        )
        seen += [e["id"] for _, examples in batches for e in examples]
    assert sorted(seen) == data_ids("validation", 6)


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_yields_the_next_batch_exactly(data_env, streaming):
    """No shuffle buffer: restored from the state after batch k, the iterator yields batch k+1,
    ids and arrays, also when k is past the first epoch (40 rows, batches of 6)."""
    make = functools.partial(
        data_batches,
        data_env,
        data_env["four_shards"],
        batch_size=6,
        repeat=True,
        streaming=streaming,
        shuffle_buffer_size=0,
    )
    reference = data_take(make(), 10)
    ids = [batch_ids for _, batch_ids, _ in reference]
    assert sum(ids, [])[:40] == data_ids("train", 40) and sum(ids, [])[40:] == data_ids("train", 20)
    assert [state["epoch"] for _, _, state in reference] == [0] * 6 + [1] * 4  # batch 7 spans the boundary
    for k in (3, 6, 7):
        resumed = data_take(make(state=reference[k - 1][2]), 3)
        for (batch, batch_ids, state), (want_batch, want_ids, want_state) in zip(resumed, reference[k : k + 3]):
            assert batch_ids == want_ids, k
            # (the source's own state may differ inside, e.g. how far it has read ahead)
            assert {key: state[key] for key in ("epoch", "examples_read", "skipped")} == {
                key: want_state[key] for key in ("epoch", "examples_read", "skipped")
            }, k
            for key in want_batch:
                np.testing.assert_array_equal(batch[key], want_batch[key], err_msg=f"{key} after k={k}")


def test_resume_with_shuffling_across_epochs(data_env):
    """With a shuffle buffer (16): every epoch is a new permutation of the split and the epoch
    counter moves on. A resume is exact only up to the buffer (datasets does not store its
    contents): the rest of the epoch is the unseen rows give or take 16, and from the next epoch
    on the order is exactly that of the uninterrupted run."""
    buffer_size = 16
    make = functools.partial(
        data_batches, data_env, data_env["four_shards"], batch_size=8, repeat=True, shuffle_buffer_size=buffer_size
    )
    reference = data_take(make(), 15)  # 5 batches an epoch
    epochs = [sum((ids for _, ids, _ in reference[5 * e : 5 * e + 5]), []) for e in range(3)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(epochs[2]) == data_ids("train", 40)
    assert len({tuple(epochs[0]), tuple(epochs[1]), tuple(epochs[2]), tuple(data_ids("train", 40))}) == 4
    assert [state["epoch"] for _, _, state in reference] == [0] * 5 + [1] * 5 + [2] * 5
    unseen = set(epochs[1][16:])  # after 2 batches of epoch 1
    resumed = data_take(make(state=reference[6][2]), 6)
    assert resumed[0][2]["epoch"] == 1 and resumed[-1][2]["epoch"] == 2
    resumed_ids = sum((ids for _, ids, _ in resumed), [])
    rest = next(r for r in range(len(resumed_ids) + 1) if resumed_ids[r:] == epochs[2][: len(resumed_ids) - r])
    assert len(unseen) - buffer_size <= rest <= len(unseen) + buffer_size
    assert len(unseen & set(resumed_ids[:rest])) >= len(unseen) - buffer_size
    assert len(resumed_ids) - rest >= 8  # a real stretch of epoch 2, in the uninterrupted order


DATA_BAD_COUNTS = {
    "undecodable": 3,
    "empty_audio": 1,
    "non_finite_audio": 2,
    "too_short": 1,
    "too_long": 1,
    "empty_text": 3,
    "too_many_tokens": 2,
}


DATA_MAX_LABELS_30S = 128


@pytest.fixture(scope="session")
def data_bad_dataset(data_env):
    """Good rows (FLAC, WAV by path, 8 kHz stereo, MP3, OGG, any Unicode, a label exactly at
    --max_label_length) between bad rows of every kind, in two hub-style parquet shards."""
    root = data_env["root"] / "bad"
    rng = np.random.default_rng(3)
    speech = [demo.synthesize("hei du", rng) for _ in range(4)]
    flac = [demo.encode_flac(s) for s in speech]
    wav_path = root / "files" / "on-disk.wav"
    wav_path.parent.mkdir(parents=True)
    wav_path.write_bytes(data_encode(speech[1], DATA_SAMPLE_RATE, "WAV"))
    stereo_8k = np.stack([data_tone(600, 1.25, 8000, 0.5), data_tone(600, 1.25, 8000, 0.3)], 1)
    prefix_tokens = len(data_env["tokenizer"].prefix_tokens)  # + text bytes + <|endoftext|>, minus 1 shifted
    at_limit = "a" * (DATA_MAX_LABELS_30S - prefix_tokens)
    nan_audio = speech[2].copy()
    nan_audio[100] = np.nan
    inf_audio = speech[3].copy()
    inf_audio[-1] = np.inf
    audio = lambda data: {"bytes": data, "path": None}  # noqa: E731
    good = [
        ("good-flac-0", audio(flac[0]), "Hei du"),
        ("good-wav-path", {"bytes": None, "path": str(wav_path)}, "Vi går hjem"),
        ("good-8k-stereo", audio(data_encode(stereo_8k, 8000, "WAV", "PCM_16")), "Stereo fra telefon"),
        ("good-mp3", audio(data_encode(speech[0], DATA_SAMPLE_RATE, "MP3")), "mp3"),
        ("good-ogg", audio(data_encode(speech[0], DATA_SAMPLE_RATE, "OGG", "VORBIS")), "ogg"),
        ("good-unicode", audio(flac[1]), "Ωmega 😀 中文 ŋ ß «æøå»"),
        ("good-label-at-limit", audio(flac[2]), at_limit),
        ("good-29s", audio(data_encode(data_tone(300, 29.0, amplitude=0.1), DATA_SAMPLE_RATE, "FLAC")), "lang"),
        ("good-flac-3", audio(flac[3]), "  Padded with spaces  "),
    ]
    bad = [
        ("bad-undecodable", audio(b"this is not audio at all"), "tekst", "undecodable"),
        ("bad-missing-file", {"bytes": None, "path": str(root / "nowhere.flac")}, "tekst", "undecodable"),
        ("bad-null-audio", None, "tekst", "undecodable"),
        (
            "bad-zero-length",
            audio(data_encode(np.zeros(0, np.float32), DATA_SAMPLE_RATE, "WAV")),
            "tekst",
            "empty_audio",
        ),
        ("bad-nan", audio(data_encode(nan_audio, DATA_SAMPLE_RATE, "WAV", "FLOAT")), "tekst", "non_finite_audio"),
        ("bad-inf", audio(data_encode(inf_audio, DATA_SAMPLE_RATE, "WAV", "FLOAT")), "tekst", "non_finite_audio"),
        ("bad-too-short", audio(data_encode(data_tone(440, 0.02), DATA_SAMPLE_RATE, "WAV")), "tekst", "too_short"),
        (
            "bad-45s",
            audio(data_encode(data_tone(300, 45.0, amplitude=0.1), DATA_SAMPLE_RATE, "FLAC")),
            "tekst",
            "too_long",
        ),
        ("bad-empty-text", audio(flac[0]), "", "empty_text"),
        ("bad-none-text", audio(flac[0]), None, "empty_text"),
        ("bad-blank-text", audio(flac[0]), " \t ", "empty_text"),
        ("bad-1000-tokens", audio(flac[0]), "x" * 1000, "too_many_tokens"),
        ("bad-label-over-limit", audio(flac[0]), at_limit + "a", "too_many_tokens"),
    ]
    assert collections.Counter(reason for *_, reason in bad) == DATA_BAD_COUNTS
    # Every kind there is, but those of the recipe's optional columns (test_nb_bad_rows_are_counted_skips).
    assert set(DATA_BAD_COUNTS) == set(rs.SKIP_REASON_FLAGS) - {
        "unknown_language",
        "unknown_task",
        "bad_timestamps",
        "over_wer_threshold",
    }
    rows = []
    for i in range(max(len(good), len(bad))):  # interleaved, so bad rows sit inside batches
        for table, kind in ((good, "good"), (bad, "bad")):
            if i < len(table):
                rows.append({"id": table[i][0], "audio": table[i][1], "text": table[i][2], "source": kind})
    path = data_write_parquet(root / "dataset", rows, 2)
    return {"path": path, "rows": rows, "good": {g[0]: g[2] for g in good}, "num_rows": len(rows), "flac": flac}


@pytest.mark.parametrize("streaming", [False, True])
def test_bad_examples_are_counted_and_good_ones_all_arrive(data_env, data_bad_dataset, streaming):
    """Whisper's 30 s window, --min_duration_in_seconds 0.05, --max_label_length 128, 4 decoding
    threads: each good row arrives once, intact; each bad one is one count of its reason."""
    tokenizer = data_env["tokenizer"]
    prepare = data_prepare(
        tokenizer,
        n_samples=30 * DATA_SAMPLE_RATE,
        max_duration_s=30.0,
        min_duration_s=0.05,
        max_label_length=DATA_MAX_LABELS_30S,
    )
    batches = data_batches(
        data_env,
        data_bad_dataset["path"],
        batch_size=4,
        repeat=False,
        shuffle=False,
        num_workers=4,
        prepare=prepare,
        n_samples=30 * DATA_SAMPLE_RATE,
        max_label_length=DATA_MAX_LABELS_30S,
        streaming=streaming,
    )
    arrived, last_batch = {}, None
    for batch, examples in batches:
        last_batch = (batch, len(examples))
        for row, example in enumerate(examples):
            assert example["id"] not in arrived
            arrived[example["id"]] = (example, batch["audio"][row])
    assert sorted(arrived) == sorted(data_bad_dataset["good"])
    assert dict(batches.skipped) == DATA_BAD_COUNTS
    assert batches.examples_read == data_bad_dataset["num_rows"]
    batch, filled = last_batch  # the ragged last batch: its padding rows are silence and carry no loss
    assert filled == len(arrived) % 4
    assert (batch["audio"][filled:] == 0).all() and (batch["labels"][filled:] == -100).all()
    for example_id, text in data_bad_dataset["good"].items():
        example, batch_audio = arrived[example_id]
        assert example["text"] == text.strip()
        # any character round-trips (byte-level tokens)
        assert tokenizer.decode(example["tokens"], skip_special_tokens=True) == text.strip()
        assert np.isfinite(batch_audio).all()
    # 8 kHz stereo becomes 16 kHz mono: the mean of the channels, resampled by soxr.
    stereo = arrived["good-8k-stereo"][0]["audio"]
    assert stereo.ndim == 1 and stereo.dtype == np.float32
    mean_8k = (data_tone(600, 1.25, 8000, 0.5) + data_tone(600, 1.25, 8000, 0.3)) / 2
    np.testing.assert_allclose(stereo, soxr.resample(mean_8k, 8000, DATA_SAMPLE_RATE), atol=1e-4)  # 16-bit WAV
    assert len(stereo) == int(1.25 * DATA_SAMPLE_RATE) and abs(data_peak_hz(stereo) - 600) < 3
    assert abs(np.abs(stereo[5000:15000]).max() - 0.4) < 0.01  # (0.5 + 0.3) / 2
    assert len(arrived["good-29s"][0]["audio"]) == 29 * DATA_SAMPLE_RATE


def test_bad_examples_in_a_whole_run_are_counted_in_its_metrics(data_env, data_bad_dataset, optimised_env, tmp_path):
    """The trainer over the same rows (Whisper's 30 s window, the downloaded Arrow path; the test
    above reads them streaming too), with 7 more good rows so that two steps of 8 take exactly the
    16 good ones: it trains, logs each bad row as one count of its reason in metrics.jsonl
    (data/skipped_<reason>), and exports its model."""
    model_dir = tmp_path / "model_30s"
    demo.write_model_dir(model_dir, data_env["tokenizer"], 30, 80)
    extra = [
        {"id": f"good-extra-{i}", "audio": {"bytes": data_bad_dataset["flac"][i % 4], "path": None}, "text": "Hei du"}
        for i in range(7)
    ]
    dataset = data_write_parquet(tmp_path / "bad_data", [*data_bad_dataset["rows"], *extra], 2)
    out = tmp_path / "run"
    # Its own process at XLA's default level: at -O0, this pytest process's, the 30 s windows' log-mel
    # and encoder ran 36 s -> 52 s (measured alone, two runs each).
    returncode, _, stderr = run_and_wait(
        optimised_env,
        [
            *("--config_name", str(model_dir), "--dataset_name", dataset, "--language", "norwegian"),
            *("--output_dir", str(out), "--do_train", "--train_batch_size", "8", "--num_train_steps", "2"),
            *("--max_label_length", str(DATA_MAX_LABELS_30S), "--min_duration_in_seconds", "0.05"),
            *("--shuffle_buffer_size", "0", "--logging_steps", "1", "--preprocessing_num_workers", "4"),
            *("--report_to", "none"),
        ],
        tmp_path,
        "run",
    )
    assert returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == 2 and last["train/epoch"] == 0 and last["examples_seen"] == 16
    skipped = {key.removeprefix("data/skipped_"): n for key, n in last.items() if key.startswith("data/skipped_")}
    assert skipped == DATA_BAD_COUNTS
    assert (out / "model.safetensors").exists()


def test_missing_column_is_a_config_error(data_env):
    with pytest.raises(rs.ConfigError) as error:
        rs.load_source(
            data_args(data_env["four_shards"], text_column_name="transcript"),
            "train",
        )
    message = str(error.value)
    assert "--text_column_name 'transcript'" in message
    assert "id, audio, text, timestamped_text, previous_text, language, source" in message  # what the dataset has


def test_no_surviving_example_stops_with_the_flag_to_fix(data_env):
    """Every clip longer than --max_duration_in_seconds: an error after one epoch, not an endless loop."""
    batches = data_batches(
        data_env,
        data_env["four_shards"],
        batch_size=4,
        repeat=True,
        prepare=data_prepare(data_env["tokenizer"], max_duration_s=0.2),
    )
    outcome = {}

    def consume():
        try:
            next(iter(batches))
        except Exception as error:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = error

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(60)  # only a guard against the old endless loop
    assert isinstance(outcome.get("error"), rs.ConfigError), outcome
    assert "too_long 40" in str(outcome["error"]) and "--max_duration_in_seconds" in str(outcome["error"])


def data_examples(env, texts_and_seconds):
    prepare = data_prepare(env["tokenizer"])
    rng = np.random.default_rng(5)
    examples = []
    for text, seconds in texts_and_seconds:
        waveform = rng.normal(0, 0.1, int(seconds * DATA_SAMPLE_RATE)).astype(np.float32)
        row = {"id": text, "audio": {"bytes": demo.encode_flac(waveform)}, "text": text}
        example, reason = prepare(row)
        assert reason is None, (text, reason)
        examples.append(example)
    return examples


def test_collate_pads_a_ragged_last_batch(data_env):
    tokenizer, pad = data_env["tokenizer"], data_env["config"].pad_token_id
    token_id = tokenizer.convert_tokens_to_ids
    examples = data_examples(data_env, [("Hei", 0.1), ("God dag på deg", 2.5), ("Søt høst", 3.0)])
    batch = rs.collate(
        examples,
        batch_size=4,
        n_samples=DATA_CHUNK_S * DATA_SAMPLE_RATE,
        max_label_length=DATA_MAX_LABEL_LENGTH,
        pad_token_id=pad,
    )
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "audio": ((4, 48000), np.float32),
        "labels": ((4, DATA_MAX_LABEL_LENGTH), np.int32),
        "decoder_input_ids": ((4, DATA_MAX_LABEL_LENGTH), np.int32),
    }
    assert (batch["audio"][3] == 0).all() and (batch["labels"][3] == -100).all()  # the padding row
    prefix = [token_id(t) for t in ("<|no|>", "<|transcribe|>", "<|notimestamps|>")]
    for row, example in enumerate(examples):
        text_ids = tokenizer.encode(example["text"], add_special_tokens=False)
        n = len(text_ids) + 4  # <|no|><|transcribe|><|notimestamps|> text <|endoftext|>
        assert batch["labels"][row, :n].tolist() == prefix + text_ids + [token_id("<|endoftext|>")]
        assert (batch["labels"][row, n:] == -100).all()
        assert batch["decoder_input_ids"][row, :n].tolist() == [token_id("<|startoftranscript|>")] + prefix + text_ids
        assert (batch["decoder_input_ids"][row, n:] == pad).all()
        length = len(example["audio"])
        np.testing.assert_array_equal(batch["audio"][row, :length], example["audio"])
        assert (batch["audio"][row, length:] == 0).all()
    assert (batch["audio"][3] == 0).all() and (batch["labels"][3] == -100).all()
    assert (batch["decoder_input_ids"][3] == pad).all()
    assert token_id("<|no|>") == 287 and token_id("<|startoftranscript|>") == 257  # the demo's canonical ids


def nb_reference(tokenizer, language, task, *, timestamps, previous, max_prev_length):
    """The row as transformers builds it: its own prefix state (set_prefix_tokens on a copy),
    timestamps kept as single tokens, and get_prompt_ids for the previous text."""
    reference = copy.deepcopy(tokenizer)
    reference.set_prefix_tokens(language=language, task=task, predict_timestamps=timestamps)
    tokens = reference(NB_TIMESTAMPED if timestamps else NB_TEXT).input_ids
    if previous is None:
        return tokens, 0
    prompt = reference.get_prompt_ids(previous).tolist()
    prompt = prompt[:1] + prompt[1:][-(max_prev_length - 1) :]  # <|startofprev|> + the text's last tokens
    return prompt + tokens, len(prompt)


@pytest.mark.parametrize("mode", ["plain", "timestamps", "prompt", "prompt+timestamps"])
@pytest.mark.parametrize(
    "language,task", [("no", "transcribe"), ("nn", "transcribe"), ("en", "transcribe"), ("no", "translate")]
)
def test_nb_label_layouts_token_for_token(nb_tokenizer, mode, language, task):
    timestamps, prompt = "timestamps" in mode, "prompt" in mode
    max_prev_length, max_label_length = (8 if prompt else 0), 40
    prepare = nb_prepare(
        nb_tokenizer,
        timestamp_column="timestamped_text" if timestamps else None,
        prev_column="previous_text" if prompt else None,
        max_prev_length=max_prev_length,
    )
    # Names as well as codes: 'nynorsk' is <|nn|>; the defaults (--language no) never apply here.
    spelled = {"nn": "nynorsk", "en": "English"}.get(language, language)
    row = nb_row(spelled, task, timestamped_text=NB_TIMESTAMPED, previous_text=NB_PREVIOUS)
    example, reason = prepare(row)
    assert reason is None
    expected, prompt_length = nb_reference(
        nb_tokenizer,
        language,
        task,
        timestamps=timestamps,
        previous=NB_PREVIOUS if prompt else None,
        max_prev_length=max_prev_length,
    )
    assert example["tokens"].tolist() == expected
    assert example["prompt_length"] == prompt_length
    # Timestamps are single ids in this tokenizer: 4 of them, each one token.
    names = nb_tokenizer.convert_ids_to_tokens(expected)
    assert sum(re.fullmatch(r"<\|\d+\.\d\d\|>", n) is not None for n in names) == (4 if timestamps else 0)
    assert ("<|notimestamps|>" in names) != timestamps
    assert names[prompt_length : prompt_length + 3] == ["<|startoftranscript|>", f"<|{language}|>", f"<|{task}|>"]

    batch = rs.collate(
        [example],
        batch_size=2,
        n_samples=3 * NB_SAMPLE_RATE,
        max_label_length=max_label_length,
        pad_token_id=50257,
        max_prev_length=max_prev_length,
        default_prompt_ids=tuple(rs.decoder_prefix(nb_tokenizer, "no", "transcribe", timestamps=False)),
    )
    length = max_prev_length + max_label_length
    assert batch["labels"].shape == batch["decoder_input_ids"].shape == (2, length)
    labels, inputs = batch["labels"][0], batch["decoder_input_ids"][0]
    n = len(expected) - 1
    assert inputs[:n].tolist() == expected[:-1] and (inputs[n:] == 50257).all()
    # No loss exactly where the decoder reads <|startofprev|> or previous text.
    no_loss = np.flatnonzero(labels[:n] == -100).tolist()
    assert no_loss == list(range(prompt_length))
    assert names[:prompt_length] == (["<|startofprev|>"] + names[1:prompt_length] if prompt else [])
    assert labels[prompt_length:n].tolist() == expected[prompt_length + 1 :] and (labels[n:] == -100).all()
    # The loss-bearing labels decode back to the source text.
    trained = labels[labels != -100].tolist()
    assert nb_tokenizer.decode(trained, skip_special_tokens=True).strip() == NB_TEXT
    if timestamps:
        # After <|lang|> <|task|>, up to <|endoftext|>: timestamp tokens by name, the text between them
        # decoded (transformers 5.23's decode_with_timestamps shifts every time by 2.12 s).
        pieces = itertools.groupby(trained[2:-1], key=lambda i: nb_tokenizer.convert_ids_to_tokens(i).startswith("<|"))
        assert (
            "".join(
                "".join(nb_tokenizer.convert_ids_to_tokens(list(ids))) if special else nb_tokenizer.decode(list(ids))
                for special, ids in pieces
            )
            == NB_TIMESTAMPED
        )
    # Evaluation decodes each row with its own plain prefix; the padding row with the default.
    assert batch["prompt_ids"].tolist() == [
        nb_tokenizer.convert_tokens_to_ids(
            ["<|startoftranscript|>", f"<|{language}|>", f"<|{task}|>", "<|notimestamps|>"]
        ),
        nb_tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|no|>", "<|transcribe|>", "<|notimestamps|>"]),
    ]


@pytest.mark.parametrize(
    "columns,reason",
    [
        (dict(language="klingon"), "unknown_language"),
        (dict(language="xx"), "unknown_language"),
        (dict(task="summarize"), "unknown_task"),
        (dict(timestamped_text="<|0.00|> Hei.<|1.52|><|1.40|> Takk.<|2.60|>"), "bad_timestamps"),  # decreasing
        (dict(timestamped_text="<|0.00|> Hei.<|1.52|><|1.80|> Takk.<|3.20|>"), "bad_timestamps"),  # past 3 s audio
        (dict(timestamped_text="<|0.00|> Hei.<|1.53|><|1.80|> Takk.<|2.60|>"), "bad_timestamps"),  # off the grid
        (dict(timestamped_text="<|0.00|> Hei.<|1.52|><|1.80|> Takk."), "bad_timestamps"),  # unpaired
        (dict(timestamped_text="<|0.00|> Hei.<|1.52|> og <|1.80|> Takk.<|2.60|>"), "bad_timestamps"),  # text between
        (dict(timestamped_text="<|0.00|> Hei.<|1.5|>"), "bad_timestamps"),
        (dict(timestamped_text="<|0.00|> Hei.<|31.00|>"), "bad_timestamps"),  # past 30 s
        (dict(language="Norwegian", task="TRANSLATE"), None),
        (dict(language="", task=None), None),  # no value: the defaults
        (dict(timestamped_text=""), None),  # no timestamps: the plain text
    ],
)
def test_nb_bad_rows_are_counted_skips(nb_tokenizer, columns, reason):
    prepare = nb_prepare(nb_tokenizer, timestamp_column="timestamped_text")
    row = {**nb_row("no", "transcribe"), **columns}
    example, got = prepare(row)
    assert got == reason
    if reason is None:
        names = nb_tokenizer.convert_ids_to_tokens(example["tokens"].tolist())
        expected_task = "translate" if columns.get("task") == "TRANSLATE" else "transcribe"
        assert names[:4] == ["<|startoftranscript|>", "<|no|>", f"<|{expected_task}|>", "<|notimestamps|>"]


def test_nb_english_only_prefix_and_languages(nb_tokenizer):
    """decoder_prefix without language and task is an English-only model's; such a model takes
    English rows and skips the others (it has no token for them)."""
    sot, nt = nb_tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    assert rs.decoder_prefix(nb_tokenizer, None, None, timestamps=False) == [sot, nt]
    assert rs.decoder_prefix(nb_tokenizer, None, None, timestamps=True) == [sot]
    with pytest.raises(rs.ConfigError, match="<\\|xx\\|>"):
        rs.decoder_prefix(nb_tokenizer, "xx", "transcribe", timestamps=False)
    prepare = nb_prepare(nb_tokenizer, language=None, task=None)
    example, reason = prepare(nb_row("en", "transcribe"))
    assert reason is None and example["tokens"].tolist()[:2] == [sot, nt] and example["language"] == "en"
    assert prepare(nb_row("nn", "transcribe"))[1] == "unknown_language"
    assert prepare(nb_row("en", "translate"))[1] == "unknown_task"


def test_nb_timestamp_and_prompt_choices_are_seeded_per_example(nb_tokenizer):
    """--timestamp_probability / --prompt_probability: drawn from (seed, epoch, example id), so the
    same rows choose the same way when read again (a resume), at about the set rate, anew each epoch."""
    prepare = nb_prepare(
        nb_tokenizer,
        timestamp_column="timestamped_text",
        timestamp_probability=0.3,
        prev_column="previous_text",
        prompt_probability=0.6,
        max_prev_length=8,
        seed=5,
    )
    rows = [nb_row("no", "transcribe", seconds=3.0, timestamped_text=NB_TIMESTAMPED, previous_text=NB_PREVIOUS)]
    modes = {}
    for epoch in (0, 1):
        for index in range(400):
            row = {**rows[0], "id": f"row-{index}", rs.EPOCH_FIELD: epoch}
            example = prepare(row)[0]
            modes[epoch, index] = (example["timestamps"], example["prompt_length"] > 0)
    again = [prepare({**rows[0], "id": f"row-{i}", rs.EPOCH_FIELD: 0})[0] for i in range(50)]
    assert [(e["timestamps"], e["prompt_length"] > 0) for e in again] == [modes[0, i] for i in range(50)]
    for epoch in (0, 1):
        timestamps = np.mean([modes[epoch, i][0] for i in range(400)])
        prompts = np.mean([modes[epoch, i][1] for i in range(400)])
        assert abs(timestamps - 0.3) < 0.075 and abs(prompts - 0.6) < 0.075, (timestamps, prompts)  # 3 sigma
    changed = np.mean([modes[0, i] != modes[1, i] for i in range(400)])
    assert changed > 0.3  # independent draws per epoch: about 1 - (0.3^2 + 0.7^2)(0.6^2 + 0.4^2) = 0.70


def test_nb_bpe_dropout_changes_training_labels_at_the_set_rate(nb_tokenizer):
    """' a' is one merge (Ġ + a), so BPE dropout p leaves it split with probability p exactly.
    The training stream's labels show that rate; the evaluation stream's, built from the same
    tokenizer object, never change; both decode to the same text."""
    dropout = 0.2
    train_tokenizer = rs.training_tokenizer(nb_tokenizer, dropout)
    assert nb_tokenizer.backend_tokenizer.model.dropout is None  # the original is untouched
    words = 600
    row = {**nb_row("no", "transcribe"), "text": "a" + " a" * (words - 1)}
    train = nb_prepare(nb_tokenizer, max_label_length=2 * words, label_tokenizer=train_tokenizer)
    evaluate = nb_prepare(nb_tokenizer, max_label_length=2 * words)
    plain = evaluate(row)[0]["tokens"].tolist()
    assert len(plain) == 4 + words + 1  # prefix, one token per word, <|endoftext|>
    split_rates = []
    for _ in range(3):
        tokens = train(row)[0]["tokens"].tolist()
        assert nb_tokenizer.decode(tokens, skip_special_tokens=True) == row["text"]
        assert tokens[:4] == plain[:4] and tokens[-1] == plain[-1]  # specials never drop
        split_rates.append((len(tokens) - len(plain)) / (words - 1))
        assert evaluate(row)[0]["tokens"].tolist() == plain
    # tokenizers draws the dropout from an unseeded generator: one sigma over 3 x 599 merges is 0.0094,
    # and a 3-sigma bound failed once in the suite (0.2305); 4.8 sigma fails one run in a million.
    assert abs(np.mean(split_rates) - dropout) < 0.045, split_rates
    # A real sentence: tokenized differently now and then, never in evaluation.
    sentence = {**nb_row("no", "transcribe"), "text": "Stortingsrepresentantene diskuterte budsjettforslaget grundig."}
    reference = evaluate(sentence)[0]["tokens"].tolist()
    variants = {tuple(train(sentence)[0]["tokens"].tolist()) for _ in range(20)}
    assert len(variants) > 1 and all(
        tuple(evaluate(sentence)[0]["tokens"].tolist()) == tuple(reference) for _ in range(5)
    )


def test_nb_evaluation_rows_are_plain_and_carry_their_own_prefix(nb_tokenizer):
    """The evaluation stream's settings drop timestamps and prompts but keep per-row language and
    task; its batches carry each row's forced prefix as `prompt_ids`, the decoder input's start."""
    data_args = rs.DataArguments(
        language_column_name="language",
        task_column_name="task",
        timestamp_column_name="timestamped_text",
        prev_column_name="previous_text",
        max_prev_length=NB_MAX_PREV,
        max_label_length=NB_MAX_LABELS,
    )
    train = rs.text_settings_of(data_args, train=True, language="no", task="transcribe", seed=0)
    evaluation = rs.text_settings_of(data_args, train=False, language="no", task="transcribe", seed=0)
    assert train.decoder_length == NB_MAX_PREV + NB_MAX_LABELS and evaluation.decoder_length == NB_MAX_LABELS
    columns = rs.columns_of(data_args, train=False)
    assert (columns.timestamps, columns.previous_text, columns.language) == (None, None, "language")
    prepare = functools.partial(
        rs.prepare_example,
        tokenizer=nb_tokenizer,
        audio_settings=rs.AudioSettings(NB_SAMPLE_RATE, NB_SAMPLE_RATE, 0.0, 1.0),
        text_settings=evaluation,
        columns=columns,
    )
    rows = [row for batch in nb_mixed_rows()[:1] for row in batch]
    examples = [prepare(row)[0] for row in rows]
    default = tuple(rs.decoder_prefix(nb_tokenizer, "no", "transcribe", timestamps=False))
    batch = rs.collate(
        examples,
        batch_size=6,
        n_samples=NB_SAMPLE_RATE,
        max_label_length=NB_MAX_LABELS,
        pad_token_id=50257,
        default_prompt_ids=default,
    )
    assert [e["language"] for e in examples] == ["no", "nn", "en", "no"]
    assert batch["prompt_ids"].shape == (6, 4)
    for row, (raw, example) in enumerate(zip(rows, examples)):
        own = rs.decoder_prefix(nb_tokenizer, raw["language"], raw["task"], timestamps=False)
        assert batch["prompt_ids"][row].tolist() == own == batch["decoder_input_ids"][row, :4].tolist()
        assert not example["timestamps"] and example["prompt_length"] == 0 and example["text"] == NB_TEXT
    assert batch["prompt_ids"][4:].tolist() == [list(default)] * 2


def test_nb_demo_dataset_exercises_the_recipe_columns(tmp_path, data_hf_cache):
    """make_demo_dataset's new columns, read with run_demo.sh's flags: every row is used, in all
    three languages, some with timestamps and some with prompts, and the timestamps lie on the
    words' sounds; a misnamed column is an error naming its flag."""
    tokenizer = demo.write_tokenizer(tmp_path / "tokenizer")
    demo.write_dataset(tmp_path / "data", 60, 4, 0, 3, 1)
    demo_flags = (REPO / "run_demo.sh").read_text()
    for flag in ("--language_column_name language", "--timestamp_column_name timestamped_text"):
        assert flag in demo_flags
    data_args = rs.DataArguments(
        dataset_name=str(tmp_path / "data"),
        language_column_name="language",
        timestamp_column_name="timestamped_text",
        timestamp_probability=0.5,
        prev_column_name="previous_text",
        prompt_probability=0.5,
        max_prev_length=32,
        max_label_length=48,
    )
    source = rs.load_source(data_args, "train")
    prepare = functools.partial(
        rs.prepare_example,
        tokenizer=tokenizer,
        audio_settings=rs.AudioSettings(16000, 48000, 0.0, 3.0),
        text_settings=rs.text_settings_of(data_args, train=True, language="no", task="transcribe", seed=0),
        columns=rs.columns_of(data_args, train=True),
    )
    rows = list(source)
    examples = [prepare(row) for row in rows]
    assert [reason for _, reason in examples] == [None] * 60
    examples = [e for e, _ in examples]
    assert {e["language"] for e in examples} == {"no", "nn", "en"}
    assert 15 < sum(e["timestamps"] for e in examples) < 45 and 10 < sum(e["prompt_length"] > 0 for e in examples) < 45
    for row in rows[:10]:
        text, waveform = demo.make_example(0, "train", int(row["id"].split("-")[1]), 3)
        assert row["text"] == text  # the new columns changed no text (nor sound: same generator)
        segments = rs.parse_timestamped_text(row["timestamped_text"], len(waveform) / 16000)
        assert "".join(segment for _, segment, _ in segments).strip() == text
        loud = np.flatnonzero(np.abs(waveform) > 0.05) / 16000  # the letters' chords, not the noise floor
        assert segments[0][0] <= loud[0] + 0.02 and segments[-1][2] >= loud[-1] - 0.02
    with pytest.raises(rs.ConfigError, match="--language_column_name 'lang'"):
        rs.load_source(
            dataclasses.replace(data_args, language_column_name="lang"),
            "train",
        )


def test_decoder_prefix_rule_for_multilingual_and_english_only_models(tmp_path):
    """The rule as pure functions: multilingual prompts carry language and task, English-only ones neither,
    and an English-only model refuses another language or task."""
    tokenizer = demo.write_tokenizer(tmp_path / "tokenizer")
    ids = tokenizer.convert_tokens_to_ids
    language, task = rs.prompt_language_and_task(tokenizer, "no", "translate", english_only=False)
    assert rs.decoder_prefix(tokenizer, language, task, timestamps=False) == ids(
        ["<|startoftranscript|>", "<|no|>", "<|translate|>", "<|notimestamps|>"]
    )
    language, task = rs.prompt_language_and_task(tokenizer, "en", "transcribe", english_only=True)
    assert rs.decoder_prefix(tokenizer, language, task, timestamps=False) == ids(
        ["<|startoftranscript|>", "<|notimestamps|>"]
    )
    with pytest.raises(rs.ConfigError, match="--task 'translate'"):
        rs.prompt_language_and_task(tokenizer, "en", "translate", english_only=True)
