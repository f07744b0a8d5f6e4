#!/usr/bin/env python
"""Build a small, local, deterministic Whisper fine-tuning setup for the Scream demo and tests.

Nothing can be downloaded here, so this script makes offline everything a real run would fetch
from the hub, in the same on-disk formats:

    OUTPUT_DIR/tokenizer/   a byte-level Whisper tokenizer (one token per byte, no merges) with
                            Whisper's special tokens in their canonical order
    OUTPUT_DIR/model/       config.json of a tiny Whisper, generation_config.json, the tokenizer
                            and preprocessor_config.json: a "pretrained-style" directory without
                            weights (the demo trains from scratch)
    OUTPUT_DIR/data/        a hub-style parquet dataset (splits train and validation) of short
                            Norwegian (language code "no") sentences and synthetic "speech" as
                            FLAC bytes

The speech is made to be learned fast by a tiny model on CPU: every letter is a fixed chord of
two sine tones, words are separated by clear silences, and the sentences come from a small
vocabulary. Each example is generated from its own random generator, seeded from (seed, split,
index), so any single example can be reproduced on its own.

Usage:
    python make_demo_dataset.py --output_dir DIR [--seed 0] [--num_train 2000] [--num_eval 64]
        [--chunk_length_s 3] [--num_mel_bins 80] [--num_train_shards 4]
"""

import argparse
import io
import itertools
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
from datasets import Audio, Features, Value
from tokenizers import AddedToken
from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.whisper.tokenization_whisper import LANGUAGES

SAMPLE_RATE = 16000

# --- tokenizer ---

# Whisper's special tokens in the order of the released vocabularies. The order matters:
# WhisperTokenizer computes a language's id as id(<|startoftranscript|>) + 1 + its index in
# LANGUAGES, and takes the first timestamp id to be the last special id + 1.
SPECIAL_TOKENS = (
    ["<|endoftext|>", "<|startoftranscript|>"]
    + [f"<|{code}|>" for code in LANGUAGES]
    + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>"]
    + ["<|notimestamps|>"]
)
# <|0.00|> ... <|30.00|> in steps of 0.02 s, as in Whisper; ordinary (non-special) added tokens,
# as on the hub, which the tokenizer strips from decoded text itself.
TIMESTAMP_TOKENS = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]


def write_tokenizer(out_dir):
    """Build a byte-level Whisper tokenizer offline, save it to `out_dir` and return it.

    The base vocabulary is the 256 byte-level characters (ids 0..255 in byte order) and there are
    no merges, so every UTF-8 byte of a transcript is one token: tiny, yet any text round-trips,
    æ, ø and å included (each is two bytes, so two tokens).
    """
    byte_to_char = bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    for token in SPECIAL_TOKENS + TIMESTAMP_TOKENS:
        vocab[token] = len(vocab)
    # The constructor takes the vocabulary itself (a `vocab_file=` argument is silently ignored).
    tokenizer = WhisperTokenizer(
        vocab=vocab,
        merges=[],
        pad_token="<|endoftext|>",
        extra_special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TIMESTAMP_TOKENS])
    tokenizer.save_pretrained(out_dir)
    return tokenizer


# --- model directory ---

# Tiny enough to train from scratch on two CPU cores in minutes.
D_MODEL = 64
NUM_LAYERS = 2
NUM_HEADS = 4
FFN_DIM = 256
MAX_TARGET_POSITIONS = 128
# Mel frames per second of audio (hop length 160 at 16 kHz).
FRAMES_PER_SECOND = 100


def make_feature_extractor(chunk_length_s, num_mel_bins):
    """Whisper's log-mel feature extractor for `chunk_length_s`-second windows at 16 kHz."""
    return WhisperFeatureExtractor(feature_size=num_mel_bins, chunk_length=chunk_length_s, sampling_rate=SAMPLE_RATE)


def write_model_dir(out_dir, tokenizer, chunk_length_s, num_mel_bins):
    """Write a weightless pretrained-style model directory and return its `WhisperConfig`.

    It holds config.json, generation_config.json, the tokenizer and preprocessor_config.json, so
    everything a run loads "from the model" is there; only the weights are missing.
    """
    token_id = tokenizer.convert_tokens_to_ids
    eot, sot = token_id("<|endoftext|>"), token_id("<|startoftranscript|>")
    # Specials the model should never emit while transcribing.
    suppress_tokens = [
        token_id(token)
        for token in ["<|startoftranscript|>", "<|translate|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>"]
    ]
    # As in Whisper: a transcript starts neither with a space nor empty.
    begin_suppress_tokens = [token_id(bytes_to_unicode()[ord(" ")]), eot]
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=num_mel_bins,
        d_model=D_MODEL,
        encoder_layers=NUM_LAYERS,
        decoder_layers=NUM_LAYERS,
        encoder_attention_heads=NUM_HEADS,
        decoder_attention_heads=NUM_HEADS,
        encoder_ffn_dim=FFN_DIM,
        decoder_ffn_dim=FFN_DIM,
        # The encoder's stride-2 convolution halves the mel frames, and it requires exactly
        # 2 * max_source_positions frames, i.e. one full chunk.
        max_source_positions=chunk_length_s * FRAMES_PER_SECOND // 2,
        max_target_positions=MAX_TARGET_POSITIONS,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
        suppress_tokens=suppress_tokens,
        begin_suppress_tokens=begin_suppress_tokens,
    )
    # Built explicitly rather than derived from the config: a generation_config.json marked
    # `_from_model_config` is rebuilt from config.json on load, which drops the Whisper fields
    # (lang_to_id, task_to_id, ...) that language/task-aware generation needs.
    generation_config = GenerationConfig(
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=MAX_TARGET_POSITIONS,
        is_multilingual=True,
        lang_to_id={f"<|{code}|>": token_id(f"<|{code}|>") for code in LANGUAGES},
        task_to_id={task: token_id(f"<|{task}|>") for task in ["transcribe", "translate"]},
        no_timestamps_token_id=token_id("<|notimestamps|>"),
        prev_sot_token_id=token_id("<|startofprev|>"),
        # Whisper's default: the first timestamp may be at most 1 s into the window.
        max_initial_timestamp_index=50,
        suppress_tokens=suppress_tokens,
        begin_suppress_tokens=begin_suppress_tokens,
    )
    config.save_pretrained(out_dir)
    generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    make_feature_extractor(chunk_length_s, num_mel_bins).save_pretrained(out_dir)
    return config


# --- sentences ---

# Common short bokmål words; with æ, ø and å so that the two-byte letters are exercised.
WORDS = (
    "jeg du han hun vi de det er var har kan skal vil ikke og i på til med en et god dag natt "
    "hus bil båt hund katt mat brød melk vann sol regn snø fjell skog sjø by barn mor far venn "
    "bok stor liten ny fin kald varm rød blå grønn hvit mørk gå se løp spis hjem her der nå "
    "også år blåbær vær lære ærlig søt høst"
).split()
# Longest transcript in UTF-8 bytes, i.e. tokens: keeps labels short (at most 33 tokens with
# Whisper's 4-token prefix and <|endoftext|>) and the speech well inside a 3-second chunk.
MAX_SENTENCE_BYTES = 28


def make_sentence(rng):
    """A sentence of 2-4 random words from WORDS, first letter capitalised, no punctuation.

    Capital letters sound like lowercase ones; the model learns the capital from its position.

    Punctuation is left out because it would be silent, and a silent character cannot be
    learned from the audio.
    """
    while True:
        words = rng.choice(WORDS, size=rng.integers(2, 5))
        sentence = " ".join(words)
        if len(sentence.encode()) <= MAX_SENTENCE_BYTES:
            return sentence[0].upper() + sentence[1:]


# --- synthetic speech ---

ALPHABET = "abcdefghijklmnopqrstuvwxyzæøå"
# Ten tones from 500 Hz to 4 kHz, a factor 2^(1/3) apart, i.e. several mel bins apart even at the
# low end, where Whisper's 25 ms window smears a tone over about 80 Hz to each side.
TONES_HZ = 500.0 * 2.0 ** (np.arange(10) / 3.0)
# Each letter is a fixed chord of two tones at least two grid steps apart, so that no letter is
# a near-copy of another.
LETTER_TONES = dict(
    zip(ALPHABET, [(TONES_HZ[i], TONES_HZ[j]) for i, j in itertools.combinations(range(10), 2) if j - i > 1])
)
# Timing in seconds, all multiplied by a per-utterance speaking rate.
LETTER_S = (0.050, 0.075)
LETTER_GAP_S = (0.015, 0.030)  # short dips between letters, so that "ll" is heard as two letters
WORD_GAP_S = (0.080, 0.140)  # added to the letter gap: a space is a clear silence
LEAD_S = (0.05, 0.25)
TRAIL_S = 0.05
RAMP_S = 0.005  # raised-cosine attack and release, against clicks


def _envelope(num_samples, ramp_samples):
    """A flat envelope with raised-cosine attack and release of (at most) `ramp_samples`."""
    ramp = min(ramp_samples, num_samples // 2)
    envelope = np.ones(num_samples)
    rise = np.sin(0.5 * np.pi * np.arange(ramp) / ramp) ** 2
    envelope[:ramp] = rise
    envelope[num_samples - ramp :] = rise[::-1]
    return envelope


def synthesize(text, rng, sample_rate=SAMPLE_RATE, max_duration_s=3.0, return_word_spans=False):
    """Render `text` as synthetic speech: a float32 mono waveform in [-1, 1] (and with
    `return_word_spans` the (start_s, end_s) of each word's sound, for timestamps).

    Letters are two-tone chords (LETTER_TONES) of 50-75 ms with small gaps between them, capitals
    sound like lowercase letters and spaces are silences. The speaker's pitch (+-3%), speaking
    rate (+-10%), per-tone loudness, overall loudness (peak 0.1-0.8) and a light white-noise floor
    vary from clip to clip. A timeline longer than `max_duration_s` is sped up to fit, so a clip
    never exceeds it.
    """
    pitch = rng.uniform(0.97, 1.03)
    rate = rng.uniform(0.9, 1.1)
    letters = []  # (start_s, duration_s, letter)
    word_starts = [0]  # index into letters of each word's first letter
    t = rng.uniform(*LEAD_S)
    for char in text:
        if char == " ":
            t += rng.uniform(*WORD_GAP_S) * rate
            word_starts.append(len(letters))
            continue
        if char.lower() not in LETTER_TONES:
            raise ValueError(f"no sound for character {char!r} in {text!r}")
        duration = rng.uniform(*LETTER_S) * rate
        letters.append((t, duration, char.lower()))
        t += duration + rng.uniform(*LETTER_GAP_S) * rate
    total_s = t + TRAIL_S
    speedup = max(1.0, total_s / max_duration_s)
    # Rounding down keeps the clip within max_duration_s; the trailing silence keeps the letters
    # within the clip.
    waveform = np.zeros(int(total_s / speedup * sample_rate))
    for start_s, duration_s, letter in letters:
        start = int(start_s / speedup * sample_rate)
        num_samples = int(duration_s / speedup * sample_rate)
        times = np.arange(num_samples) / sample_rate
        chord = sum(
            rng.uniform(0.7, 1.0) * np.sin(2 * np.pi * freq * pitch * times + rng.uniform(0, 2 * np.pi))
            for freq in LETTER_TONES[letter]
        )
        waveform[start : start + num_samples] += chord * _envelope(num_samples, int(RAMP_S * sample_rate))
    peak = rng.uniform(0.1, 0.8)
    waveform *= peak / np.abs(waveform).max()
    waveform += rng.normal(0.0, peak * rng.uniform(0.003, 0.01), len(waveform))
    waveform = np.clip(waveform, -1.0, 1.0).astype(np.float32)
    if not return_word_spans:
        return waveform
    ends = word_starts[1:] + [len(letters)]
    spans = [
        (letters[a][0] / speedup, (letters[b - 1][0] + letters[b - 1][1]) / speedup) for a, b in zip(word_starts, ends)
    ]
    return waveform, spans


# --- dataset ---

SPLITS = ("train", "validation")
FEATURES = Features(
    {
        "id": Value("string"),
        "audio": Audio(sampling_rate=SAMPLE_RATE),
        "text": Value("string"),
        "timestamped_text": Value("string"),
        "previous_text": Value("string"),
        "language": Value("string"),
        "source": Value("string"),
    }
)
# The columns of NbAiLab's ncc_speech_v7 that Scream's 2024-recipe flags read. The language is a
# label only (the "speech" is the same for all three): it exercises per-row <|lang|> tokens.
LANGUAGE_SHARES = {"no": 0.8, "nn": 0.1, "en": 0.1}
PREVIOUS_TEXT_SHARE = 0.7  # the rest start a "recording": no previous text
# Small row groups, as the hub writes audio datasets, so streaming reads little at a time.
ROW_GROUP_SIZE = 100
# The card's metadata has no `configs:` (split to file pattern) entry: with one, datasets keys its
# Arrow cache on the patterns alone and serves stale data after a regeneration in place. Without
# it, the file names select the splits.
DATASET_CARD = """---
language:
- 'no'
task_categories:
- automatic-speech-recognition
---
# Scream demo data

Synthetic Norwegian "speech" made by make_demo_dataset.py: every letter is a two-tone chord and
every space a silence. Columns: id, audio (16 kHz mono FLAC), text, timestamped_text (Whisper
timestamps around the first and the last words), previous_text (the text of the example before),
language (no, nn or en: a label only) and source.
"""


def example_rng(seed, split, index):
    """The generator of one example: independent across seeds, splits and indices."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def make_example(seed, split, index, chunk_length_s):
    """Return (text, waveform) of example `index` of `split`."""
    rng = example_rng(seed, split, index)
    text = make_sentence(rng)
    return text, synthesize(text, rng, max_duration_s=chunk_length_s)


def timestamped(text, spans):
    """Whisper's timestamped format with two segments, the first word and the rest:
    '<|0.12|> Jeg<|0.40|><|0.52|> har en bil<|1.60|>', times on the 0.02 s grid (starts rounded
    down, ends up), each segment's text with its leading space. One word: one segment."""
    words = text.split(" ")
    cut = 1 if len(words) > 1 else len(words)
    segments = [(spans[0][0], " ".join(words[:cut]), spans[cut - 1][1])]
    if cut < len(words):
        segments.append((spans[cut][0], " ".join(words[cut:]), spans[-1][1]))
    return "".join(
        f"<|{np.floor(start / 0.02) * 0.02:.2f}|> {segment}<|{np.ceil(end / 0.02) * 0.02:.2f}|>"
        for start, segment, end in segments
    )


def make_row(seed, split, index, chunk_length_s):
    """The dataset row of example `index` of `split` (audio as FLAC bytes). Its text and audio are
    make_example's; language and previous text come from a generator of their own, so adding
    these columns changed no example's text or sound."""
    rng = example_rng(seed, split, index)
    text = make_sentence(rng)
    waveform, spans = synthesize(text, rng, max_duration_s=chunk_length_s, return_word_spans=True)
    labels = np.random.default_rng([seed, SPLITS.index(split), index, 1])
    language = labels.choice(list(LANGUAGE_SHARES), p=list(LANGUAGE_SHARES.values()))
    has_previous = index > 0 and labels.random() < PREVIOUS_TEXT_SHARE
    example_id = f"{split}-{index:06d}"
    return {
        "id": example_id,
        "audio": {"bytes": encode_flac(waveform), "path": f"{example_id}.flac"},
        "text": text,
        # Timestamps past the audio would be skipped by Scream: the trailing silence keeps them inside.
        "timestamped_text": timestamped(text, spans),
        "previous_text": make_sentence(example_rng(seed, split, index - 1)) if has_previous else None,
        "language": str(language),
        "source": "demo",
    }


def encode_flac(waveform, sample_rate=SAMPLE_RATE):
    """16-bit FLAC bytes of a float waveform; lossless for the int16 samples written."""
    pcm = np.clip(np.round(waveform * 32767.0), -32768, 32767).astype(np.int16)
    buffer = io.BytesIO()
    sf.write(buffer, pcm, sample_rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def write_dataset(out_dir, num_train, num_eval, seed, chunk_length_s, num_shards):
    """Write the train and validation splits as a hub-style parquet dataset under `out_dir`.

    Files are `data/train-0000i-of-0000N.parquet` and `data/validation-00000-of-00001.parquet`, as
    `push_to_hub` lays them out. The audio column is stored as datasets stores an `Audio` feature
    (a struct of FLAC bytes and a file name), and the schema carries datasets' feature metadata, so
    `load_dataset` reports it as `Audio`. It is written with pyarrow directly because datasets'
    own Audio encoding needs torch. A short dataset card goes to `out_dir/README.md`. Returns the
    written parquet paths.
    """
    data_dir = Path(out_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:  # shards of an earlier run with another shard count would be loaded too
        for stale in data_dir.glob(f"{split}-*.parquet"):
            stale.unlink()
    (Path(out_dir) / "README.md").write_text(DATASET_CARD)
    paths = []
    for split, num_examples, split_shards in [("train", num_train, num_shards), ("validation", num_eval, 1)]:
        for shard, indices in enumerate(np.array_split(np.arange(num_examples), split_shards)):
            rows = [make_row(seed, split, index, chunk_length_s) for index in indices.tolist()]
            path = data_dir / f"{split}-{shard:05d}-of-{split_shards:05d}.parquet"
            table = pa.Table.from_pylist(rows, schema=FEATURES.arrow_schema)
            pq.write_table(table, path, row_group_size=ROW_GROUP_SIZE)
            paths.append(path)
    return paths


# --- main ---


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="Directory to write tokenizer/, model/ and data/ into.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of all random choices.")
    parser.add_argument("--num_train", type=int, default=2000, help="Number of training examples.")
    parser.add_argument("--num_eval", type=int, default=64, help="Number of validation examples.")
    parser.add_argument(
        "--chunk_length_s", type=int, default=3, help="Model input window in seconds; no clip is longer."
    )
    parser.add_argument("--num_mel_bins", type=int, default=80, help="Mel bins of the feature extractor and model.")
    parser.add_argument("--num_train_shards", type=int, default=4, help="Number of parquet files of the train split.")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    tokenizer = write_tokenizer(output_dir / "tokenizer")
    write_model_dir(output_dir / "model", tokenizer, args.chunk_length_s, args.num_mel_bins)
    paths = write_dataset(
        output_dir / "data", args.num_train, args.num_eval, args.seed, args.chunk_length_s, args.num_train_shards
    )
    size_mb = sum(path.stat().st_size for path in paths) / 1e6
    print(
        f"Wrote {output_dir}: tokenizer ({len(tokenizer)} tokens), model config, "
        f"{args.num_train} train + {args.num_eval} validation examples ({size_mb:.1f} MB) "
        f"in {time.perf_counter() - start:.1f}s"
    )


if __name__ == "__main__":
    main()
