"""Issue 3's "must show" list: the input pipeline of run_scream.py, from parquet rows to batches.

References are outside our code: transformers' WhisperFeatureExtractor (its float64 numpy path)
for the log-mel features, the example ids written into the parquet files for what must arrive
(once, in order, on the right host, after a resume), FFT peaks of known tones for decoding, and
jax's own trace counter for recompiles.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import collections
import functools
import io
import json
import sys
import threading
from pathlib import Path

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import transformers.models.whisper.feature_extraction_whisper as feature_extraction_whisper
from datasets import Audio, Features, Value
from transformers import WhisperFeatureExtractor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_demo_dataset  # noqa: E402
import run_scream  # noqa: E402

DATA_SAMPLE_RATE = 16000
DATA_CHUNK_S = 3  # the demo model's window; the bad-data test uses Whisper's real 30 s
DATA_MAX_LABEL_LENGTH = 48
DATA_FEATURES = Features({"id": Value("string"), "audio": Audio(sampling_rate=DATA_SAMPLE_RATE),
                          "text": Value("string"), "source": Value("string")})


# --- fixtures ---


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
    tokenizer = make_demo_dataset.write_tokenizer(root / "tokenizer")
    config = make_demo_dataset.write_model_dir(root / "model", tokenizer, DATA_CHUNK_S, 80)
    tokenizer.set_prefix_tokens(language=run_scream.language_code("norwegian"), task="transcribe",
                                predict_timestamps=False)
    for name, num_train, shards in (("four_shards", 40, 4), ("three_shards", 30, 3)):
        make_demo_dataset.write_dataset(root / name, num_train, 6, 0, DATA_CHUNK_S, shards)
    feature_extractor = make_demo_dataset.make_feature_extractor(DATA_CHUNK_S, 80)
    return {"root": root, "tokenizer": tokenizer, "config": config, "model_dir": root / "model",
            "feature_extractor": feature_extractor, "four_shards": str(root / "four_shards"),
            "three_shards": str(root / "three_shards")}


def data_ids(split, num):
    return [f"{split}-{i:06d}" for i in range(num)]


def data_args(dataset_name, **overrides):
    return run_scream.DataArguments(dataset_name=dataset_name, **overrides)


def data_prepare(tokenizer, *, n_samples=DATA_CHUNK_S * DATA_SAMPLE_RATE, max_duration_s=DATA_CHUNK_S,
                 min_duration_s=0.0, max_label_length=DATA_MAX_LABEL_LENGTH):
    return functools.partial(
        run_scream.prepare_example, audio_column="audio", text_column="text", id_column="id", tokenizer=tokenizer,
        audio_settings=run_scream.AudioSettings(DATA_SAMPLE_RATE, n_samples, min_duration_s, max_duration_s),
        text_settings=run_scream.TextSettings(False, False, max_label_length))


def data_batches(env, dataset_name, *, batch_size, repeat, state=None, shuffle=None, num_workers=2,
                 prepare=None, n_samples=DATA_CHUNK_S * DATA_SAMPLE_RATE, max_label_length=DATA_MAX_LABEL_LENGTH,
                 **arg_overrides):
    """SpeechBatches wired as run() wires them (one host)."""
    args = data_args(dataset_name, **arg_overrides)
    make_source = functools.partial(run_scream.load_source, args, "train", process_index=0, process_count=1, seed=0,
                                    shuffle=repeat if shuffle is None else shuffle, max_samples=None)
    collate_fn = functools.partial(run_scream.collate, batch_size=batch_size, n_samples=n_samples,
                                   max_label_length=max_label_length, pad_token_id=env["config"].pad_token_id)
    return run_scream.SpeechBatches(lambda epoch: make_source(epoch=epoch), prepare or data_prepare(env["tokenizer"]),
                                    batch_size=batch_size, collate_fn=collate_fn, repeat=repeat,
                                    num_workers=num_workers, prefetch_batches=2, state=state)


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


# --- 1. log-mel on the device = WhisperFeatureExtractor ---


def data_clips(n_samples, rng):
    """Varied clips: silence, clipping, noise, tones, a chirp, a click, speech-like, loud and quiet, short."""
    t = np.arange(n_samples) / DATA_SAMPLE_RATE
    speech_text = make_demo_dataset.make_sentence(rng)
    speech = make_demo_dataset.synthesize(speech_text, rng, max_duration_s=n_samples / DATA_SAMPLE_RATE)
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
        extractor = WhisperFeatureExtractor(feature_size=n_mels, chunk_length=chunk_length_s,
                                            sampling_rate=DATA_SAMPLE_RATE)
        clips = data_clips(extractor.n_samples, rng)
        reference = np.stack([
            extractor(clip, sampling_rate=DATA_SAMPLE_RATE, padding="max_length", return_tensors="np").input_features[0]
            for clip in clips.values()])
        padded = np.stack([np.pad(clip, (0, extractor.n_samples - len(clip))) for clip in clips.values()])
        ours = np.asarray(jax.jit(run_scream.log_mel)(padded, np.asarray(extractor.mel_filters, np.float32)))
        assert ours.shape == reference.shape == (len(clips), n_mels, extractor.n_samples // 160)
        for name, difference in zip(clips, np.abs(ours - reference).max(axis=(1, 2))):
            worst[f"{chunk_length_s}s/{name}"] = float(difference)
    name, largest = max(worst.items(), key=lambda item: item[1])
    print(f"\nlog-mel {n_mels} bins: max abs difference {largest:.2e} ({name}) over {len(worst)} clips")
    assert len(worst) >= 20
    assert largest < 1e-3, worst


# --- 2. loading and decoding ---


@pytest.mark.parametrize("epoch", [0, 1])
def test_streaming_and_non_streaming_give_the_same_rows(data_env, epoch):
    """Same rows in the same order (the non-streaming path is iterated like a stream): with
    --shuffle_buffer_size 0 that is the files' order, in every epoch."""
    ids = {}
    for streaming in (False, True):
        source = run_scream.load_source(data_args(data_env["four_shards"], streaming=streaming, shuffle_buffer_size=0),
                                        "train", process_index=0, process_count=1, seed=0, shuffle=True, epoch=epoch,
                                        max_samples=None)
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
        make_demo_dataset.write_dataset(tmp_path / name / "data", num, 2, 1, DATA_CHUNK_S, 2)
        (tmp_path / name / "data" / "README.md").write_text(DATA_HUB_CARD)

    def loaded_ids(name):
        source = run_scream.load_source(data_args(str(tmp_path / name / "data")), "train", process_index=0,
                                        process_count=1, seed=0, shuffle=False, epoch=0, max_samples=None)
        return [row["id"] for row in source]

    write("first", 12)
    write("second", 7)
    assert loaded_ids("first") == data_ids("train", 12)
    assert loaded_ids("second") == data_ids("train", 7)
    write("first", 5)  # regenerated in place
    assert loaded_ids("first") == data_ids("train", 5)


@pytest.mark.parametrize("fmt,subtype,lossy", [("WAV", "PCM_16", False), ("FLAC", "PCM_16", False),
                                               ("OGG", "VORBIS", True), ("MP3", "MPEG_LAYER_III", True)])
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
            decoded = run_scream.decode_audio(audio, DATA_SAMPLE_RATE)
            assert decoded.dtype == np.float32 and decoded.ndim == 1, name
            length_tolerance = 0.02 * seconds * DATA_SAMPLE_RATE if lossy else 0
            assert abs(len(decoded) - seconds * DATA_SAMPLE_RATE) <= length_tolerance, name
            expected_hz = 440 if name == "16k_mono" else 1000
            assert abs(data_peak_hz(decoded) - expected_hz) < 3, (name, data_peak_hz(decoded))
            middle = decoded[len(decoded) // 4: -len(decoded) // 4]  # away from codec edges and resampler ramps
            assert abs(np.abs(middle).max() - 0.4) < (0.1 if lossy else 0.005), (name, np.abs(middle).max())


# --- 3. hosts ---


@pytest.mark.parametrize("dataset,streaming,shuffle", [
    ("four_shards", True, False),  # 4 files / 2 hosts: each host reads its own 2 files
    ("three_shards", True, False),  # 3 files / 2 hosts: both read all and keep 1 row in 2
    ("three_shards", True, True),
    ("four_shards", False, True),  # non-streaming: 40 one-row shards, shuffled
])
def test_two_hosts_see_every_example_once(data_env, dataset, streaming, shuffle, capsys):
    num = 40 if dataset == "four_shards" else 30
    seen = []
    for process_index in range(2):
        source = run_scream.load_source(data_args(data_env[dataset], streaming=streaming, shuffle_buffer_size=8),
                                        "train", process_index=process_index, process_count=2, seed=0,
                                        shuffle=shuffle, epoch=1, max_samples=None)
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
        make_source = functools.partial(run_scream.load_source, data_args(data_env["three_shards"], streaming=True),
                                        "validation", process_index=process_index, process_count=2, seed=0,
                                        shuffle=False, max_samples=None)
        batches = run_scream.SpeechBatches(
            lambda epoch: make_source(epoch=epoch), data_prepare(data_env["tokenizer"]), batch_size=2,
            collate_fn=functools.partial(run_scream.collate, batch_size=2, n_samples=DATA_CHUNK_S * DATA_SAMPLE_RATE,
                                         max_label_length=DATA_MAX_LABEL_LENGTH,
                                         pad_token_id=data_env["config"].pad_token_id),
            repeat=False, num_workers=2, prefetch_batches=2)
        seen += [e["id"] for _, examples in batches for e in examples]
    assert sorted(seen) == data_ids("validation", 6)


# --- 4. resume ---


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_yields_the_next_batch_exactly(data_env, streaming):
    """No shuffle buffer: restored from the state after batch k, the iterator yields batch k+1,
    ids and arrays, also when k is past the first epoch (40 rows, batches of 6)."""
    make = functools.partial(data_batches, data_env, data_env["four_shards"], batch_size=6, repeat=True,
                             streaming=streaming, shuffle_buffer_size=0)
    reference = data_take(make(), 10)
    ids = [batch_ids for _, batch_ids, _ in reference]
    assert sum(ids, [])[:40] == data_ids("train", 40) and sum(ids, [])[40:] == data_ids("train", 20)
    assert [state["epoch"] for _, _, state in reference] == [0] * 6 + [1] * 4  # batch 7 spans the boundary
    for k in (3, 6, 7):
        resumed = data_take(make(state=reference[k - 1][2]), 3)
        for (batch, batch_ids, state), (want_batch, want_ids, want_state) in zip(resumed, reference[k: k + 3]):
            assert batch_ids == want_ids, k
            # (the source's own state may differ inside, e.g. how far it has read ahead)
            assert {key: state[key] for key in ("epoch", "examples_read", "skipped")} == {
                key: want_state[key] for key in ("epoch", "examples_read", "skipped")}, k
            for key in want_batch:
                np.testing.assert_array_equal(batch[key], want_batch[key], err_msg=f"{key} after k={k}")


def test_resume_with_shuffling_across_epochs(data_env):
    """With a shuffle buffer (16): every epoch is a new permutation of the split and the epoch
    counter moves on. A resume is exact only up to the buffer (datasets does not store its
    contents): the rest of the epoch is the unseen rows give or take 16, and from the next epoch
    on the order is exactly that of the uninterrupted run."""
    buffer_size = 16
    make = functools.partial(data_batches, data_env, data_env["four_shards"], batch_size=8, repeat=True,
                             shuffle_buffer_size=buffer_size)
    reference = data_take(make(), 15)  # 5 batches an epoch
    epochs = [sum((ids for _, ids, _ in reference[5 * e: 5 * e + 5]), []) for e in range(3)]
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


# --- 5. bad data ---

DATA_BAD_COUNTS = {"undecodable": 3, "empty_audio": 1, "non_finite_audio": 2, "too_short": 1, "too_long": 1,
                   "empty_text": 3, "too_many_tokens": 2}
DATA_MAX_LABELS_30S = 128


@pytest.fixture(scope="session")
def data_bad_dataset(data_env):
    """Good rows (FLAC, WAV by path, 8 kHz stereo, MP3, OGG, any Unicode, a label exactly at
    --max_label_length) between bad rows of every kind, in two hub-style parquet shards."""
    root = data_env["root"] / "bad"
    rng = np.random.default_rng(3)
    speech = [make_demo_dataset.synthesize("hei du", rng) for _ in range(4)]
    flac = [make_demo_dataset.encode_flac(s) for s in speech]
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
        ("bad-zero-length", audio(data_encode(np.zeros(0, np.float32), DATA_SAMPLE_RATE, "WAV")), "tekst",
         "empty_audio"),
        ("bad-nan", audio(data_encode(nan_audio, DATA_SAMPLE_RATE, "WAV", "FLOAT")), "tekst", "non_finite_audio"),
        ("bad-inf", audio(data_encode(inf_audio, DATA_SAMPLE_RATE, "WAV", "FLOAT")), "tekst", "non_finite_audio"),
        ("bad-too-short", audio(data_encode(data_tone(440, 0.02), DATA_SAMPLE_RATE, "WAV")), "tekst", "too_short"),
        ("bad-45s", audio(data_encode(data_tone(300, 45.0, amplitude=0.1), DATA_SAMPLE_RATE, "FLAC")), "tekst",
         "too_long"),
        ("bad-empty-text", audio(flac[0]), "", "empty_text"),
        ("bad-none-text", audio(flac[0]), None, "empty_text"),
        ("bad-blank-text", audio(flac[0]), " \t ", "empty_text"),
        ("bad-1000-tokens", audio(flac[0]), "x" * 1000, "too_many_tokens"),
        ("bad-label-over-limit", audio(flac[0]), at_limit + "a", "too_many_tokens"),
    ]
    assert collections.Counter(reason for *_, reason in bad) == DATA_BAD_COUNTS
    assert set(DATA_BAD_COUNTS) == set(run_scream.SKIP_REASONS)  # every kind there is
    rows = []
    for i in range(max(len(good), len(bad))):  # interleaved, so bad rows sit inside batches
        for table, kind in ((good, "good"), (bad, "bad")):
            if i < len(table):
                rows.append({"id": table[i][0], "audio": table[i][1], "text": table[i][2], "source": kind})
    path = data_write_parquet(root / "dataset", rows, 2)
    return {"path": path, "good": {g[0]: g[2] for g in good}, "num_rows": len(rows)}


@pytest.mark.parametrize("streaming", [False, True])
def test_bad_examples_are_counted_and_good_ones_all_arrive(data_env, data_bad_dataset, streaming):
    """Whisper's 30 s window, --min_duration_in_seconds 0.05, --max_label_length 128, 4 decoding
    threads: each good row arrives once, intact; each bad one is one count of its reason."""
    tokenizer = data_env["tokenizer"]
    prepare = data_prepare(tokenizer, n_samples=30 * DATA_SAMPLE_RATE, max_duration_s=30.0, min_duration_s=0.05,
                           max_label_length=DATA_MAX_LABELS_30S)
    batches = data_batches(data_env, data_bad_dataset["path"], batch_size=4, repeat=False, shuffle=False,
                           num_workers=4, prepare=prepare, n_samples=30 * DATA_SAMPLE_RATE,
                           max_label_length=DATA_MAX_LABELS_30S, streaming=streaming)
    arrived, masks = {}, []
    for batch, examples in batches:
        masks.append(batch["example_mask"].tolist())
        for row, example in enumerate(examples):
            assert example["id"] not in arrived
            arrived[example["id"]] = (example, batch["audio"][row])
    assert sorted(arrived) == sorted(data_bad_dataset["good"])
    assert dict(batches.skipped) == DATA_BAD_COUNTS
    assert batches.examples_read == data_bad_dataset["num_rows"]
    assert masks[-1] == [1] * (len(arrived) % 4) + [0] * (4 - len(arrived) % 4)  # the ragged last batch
    for example_id, text in data_bad_dataset["good"].items():
        example, batch_audio = arrived[example_id]
        assert example["text"] == text.strip()
        # any character round-trips (byte-level tokens)
        assert tokenizer.decode(example["tokens"], skip_special_tokens=True) == text.strip()
        assert np.isfinite(batch_audio).all()
    stereo = arrived["good-8k-stereo"][0]["audio"]
    assert len(stereo) == int(1.25 * DATA_SAMPLE_RATE) and abs(data_peak_hz(stereo) - 600) < 3
    assert abs(np.abs(stereo[5000:15000]).max() - 0.4) < 0.01  # (0.5 + 0.3) / 2
    assert len(arrived["good-29s"][0]["audio"]) == 29 * DATA_SAMPLE_RATE


def test_missing_column_is_a_config_error(data_env):
    with pytest.raises(run_scream.ConfigError) as error:
        run_scream.load_source(data_args(data_env["four_shards"], text_column_name="transcript"), "train",
                               process_index=0, process_count=1, seed=0, shuffle=False, epoch=0, max_samples=None)
    message = str(error.value)
    assert "--text_column_name 'transcript'" in message
    assert "id, audio, text, source" in message  # what the dataset has


def test_main_reports_a_missing_column_and_an_unknown_language(data_env, tmp_path, capsys):
    """What a user sees: exit status 2 and one `error:` line naming the flag."""
    common = ["--config_name", str(data_env["model_dir"]), "--dataset_name", data_env["four_shards"],
              "--do_eval", "--eval_batch_size", "8", "--train_batch_size", "8", "--report_to", "none"]
    assert run_scream.main(common + ["--output_dir", str(tmp_path / "a"), "--language", "klingon"]) == 2
    err = capsys.readouterr().err
    assert "error: --language 'klingon' is not a Whisper language" in err
    assert run_scream.main(common + ["--output_dir", str(tmp_path / "b"), "--audio_column_name", "speech"]) == 2
    err = capsys.readouterr().err
    assert "error: --audio_column_name 'speech' is not a column" in err and "id, audio, text, source" in err
    assert run_scream.language_code("norwegian") == run_scream.language_code("<|no|>") == "no"


def test_no_surviving_example_stops_with_the_flag_to_fix(data_env):
    """Every clip longer than --max_duration_in_seconds: an error after one epoch, not an endless loop."""
    batches = data_batches(data_env, data_env["four_shards"], batch_size=4, repeat=True,
                           prepare=data_prepare(data_env["tokenizer"], max_duration_s=0.2))
    outcome = {}

    def consume():
        try:
            next(iter(batches))
        except Exception as error:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = error

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(60)  # only a guard against the old endless loop
    assert isinstance(outcome.get("error"), run_scream.ConfigError), outcome
    assert "too_long 40" in str(outcome["error"]) and "--max_duration_in_seconds" in str(outcome["error"])


# --- 6. fixed shapes ---


def data_examples(env, texts_and_seconds):
    prepare = data_prepare(env["tokenizer"])
    rng = np.random.default_rng(5)
    examples = []
    for text, seconds in texts_and_seconds:
        waveform = rng.normal(0, 0.1, int(seconds * DATA_SAMPLE_RATE)).astype(np.float32)
        row = {"id": text, "audio": {"bytes": make_demo_dataset.encode_flac(waveform)}, "text": text}
        example, reason = prepare(row)
        assert reason is None, (text, reason)
        examples.append(example)
    return examples


def test_collate_pads_a_ragged_last_batch(data_env):
    tokenizer, pad = data_env["tokenizer"], data_env["config"].pad_token_id
    token_id = tokenizer.convert_tokens_to_ids
    examples = data_examples(data_env, [("Hei", 0.1), ("God dag på deg", 2.5), ("Søt høst", 3.0)])
    batch = run_scream.collate(examples, batch_size=4, n_samples=DATA_CHUNK_S * DATA_SAMPLE_RATE,
                               max_label_length=DATA_MAX_LABEL_LENGTH, pad_token_id=pad)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "audio": ((4, 48000), np.float32), "labels": ((4, DATA_MAX_LABEL_LENGTH), np.int32),
        "decoder_input_ids": ((4, DATA_MAX_LABEL_LENGTH), np.int32), "example_mask": ((4,), np.int32)}
    assert batch["example_mask"].tolist() == [1, 1, 1, 0]
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


def test_train_step_compiles_once(data_env):
    """Batches of clips from 0.1 s to the full chunk and labels from 5 to 30 tokens, a ragged one
    included: one trace, one compiled executable."""
    config = data_env["config"]
    model = run_scream.build_model(config)
    train_args = run_scream.TrainingArguments(learning_rate=1e-3, num_train_steps=10)
    optimizer = run_scream.make_optimizer(train_args, run_scream.learning_rate_schedule(1e-3, 0, 10, "linear"))
    params = run_scream.init_params(model, jax.random.PRNGKey(0))
    state = run_scream.TrainState(jnp.int32(0), params, optimizer.init(params), jax.random.PRNGKey(1))
    traces = []

    def counted_step(state, batch):
        traces.append(1)  # runs only while tracing
        return run_scream.train_step(state, batch, model=model, optimizer=optimizer,
                                     mel_filters=np.asarray(data_env["feature_extractor"].mel_filters, np.float32),
                                     accumulation_steps=1, label_smoothing=0.0)

    step = jax.jit(counted_step, donate_argnums=0)
    collate = functools.partial(run_scream.collate, batch_size=2, n_samples=DATA_CHUNK_S * DATA_SAMPLE_RATE,
                                max_label_length=DATA_MAX_LABEL_LENGTH, pad_token_id=config.pad_token_id)
    batches = [
        collate(data_examples(data_env, [("a", 0.1), ("Vi går hjem til mor og far nå", 3.0)])),
        collate(data_examples(data_env, [("Hei du", 1.2), ("Katt", 0.4)])),
        collate(data_examples(data_env, [("Stor hund i skogen", 2.2)])),  # ragged: one row masked
    ]
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert len(traces) == 1 and step._cache_size() == 1
    assert int(state.step) == 3 and all(np.isfinite(losses))
