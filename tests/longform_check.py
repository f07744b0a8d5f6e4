"""Long-form after fine-tuning, in three engines (BENCHMARKS.md, "Long-form after fine-tuning").

Fine-tunes real whisper-base (from the test wheels) on espeak-ng Norwegian windows of 3-6 sentences
with timestamps (--timestamp_probability PROB), exports it for transformers, CTranslate2 and
whisper.cpp, then transcribes a 2-minute recording (the 16 sentences three times, with pauses) in
each engine and prints segments, coverage and WER. Minutes of CPU: run it by hand, not in CI:

    python tests/longform_check.py [PROB=0.5] [STEPS=40] [OUT=/tmp/longform]
"""

import io
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import jiwer
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
from transformers.models.whisper.english_normalizer import BasicTextNormalizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: the repository's tests package
import tests.support as support  # noqa: E402
from tests.test_export_formats import NORWEGIAN  # noqa: E402

PROB = sys.argv[1] if len(sys.argv) > 1 else "0.5"
STEPS = sys.argv[2] if len(sys.argv) > 2 else "40"
root = Path(sys.argv[3] if len(sys.argv) > 3 else "/tmp/longform") / f"p{PROB}_s{STEPS}"
root.mkdir(parents=True, exist_ok=True)
base = root.parent / "whisper_base"
if not (base / "model.safetensors").exists():
    first, second = support.whisper_base_wheel_dirs()
    support.convert_ctranslate2([first / "model.bin.part1", second / "model.bin.part2"], second, base)
NO = list(NORWEGIAN)  # the 16 sentences of the whisper.cpp check
clips = support.espeak_synthesize([("no", "nb", s) for s in NO])
rows = []
wrng = random.Random(1)


def window(idx):
    audio, segs, t = [], [], 0.0
    for i in idx:
        gap = round(wrng.uniform(0.3, 1.0) / 0.02) * 0.02
        audio.append(np.zeros(int(round(gap * 16000)), np.float32))
        t += gap
        start = t
        audio.append(clips[i]["audio"])
        t += len(clips[i]["audio"]) / 16000
        segs.append((start, clips[i]["text"], round(t / 0.02) * 0.02))
    return np.concatenate(audio), segs


for w in range(int(os.environ.get("WINDOWS", "24"))):
    idx = wrng.sample(range(len(clips)), wrng.randint(3, 6))
    a, segs = window(idx)
    b = io.BytesIO()
    sf.write(b, a, 16000, format="FLAC")
    ts = "".join(f"<|{round(s0 / 0.02) * 0.02:.2f}|> {txt}<|{s1:.2f}|>" for s0, txt, s1 in segs)
    rows.append(
        {
            "id": f"train-{w}",
            "audio": {"bytes": b.getvalue(), "path": f"{w}.flac"},
            "text": " ".join(t for _, t, _ in segs),
            "language": "no",
            "timestamped_text": ts,
        }
    )
data = root / "data"
(data / "data").mkdir(parents=True, exist_ok=True)
pq.write_table(pa.Table.from_pylist(rows), data / "data" / "train-00000-of-00001.parquet")
pq.write_table(pa.Table.from_pylist(rows[:4]), data / "data" / "validation-00000-of-00001.parquet")
out = root / "run"
if not (out / "ggml-model.bin").exists():
    flags = [
        "--model_name_or_path",
        str(base),
        "--dataset_name",
        str(data),
        "--output_dir",
        str(out),
        "--overwrite_output_dir",
        "--do_train",
        "--language",
        "no",
        "--train_batch_size",
        "4",
        "--num_train_steps",
        STEPS,
        "--learning_rate",
        "1e-4",
        "--lr_scheduler_type",
        "constant",
        "--warmup_steps",
        "0",
        "--max_label_length",
        "160",
        "--shuffle_buffer_size",
        "16",
        "--language_column_name",
        "language",
        "--timestamp_column_name",
        "timestamped_text",
        "--timestamp_probability",
        PROB,
        "--preprocessing_num_workers",
        "1",
        "--logging_steps",
        "10",
        "--export_ctranslate2",
        "float32",
        "--export_ggml",
        "f16",
        "--save_steps",
        "1000",
    ]
    t = time.time()
    result = subprocess.run(
        [sys.executable, str(REPO / "run_scream.py"), *flags],
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""),
    )
    print("train rc", result.returncode, time.time() - t, result.stderr[-1500:] if result.returncode else "")
rng = random.Random(0)
order = [i for _ in range(3) for i in rng.sample(range(len(clips)), len(clips))]
pieces, ref = [], []
for i in order:
    pieces += [clips[i]["audio"], np.zeros(int(16000 * rng.uniform(0.6, 1.2)), np.float32)]
    ref.append(clips[i]["text"])
long = np.concatenate(pieces)
print("recording s", len(long) / 16000)
norm = BasicTextNormalizer()


def wer(r, h):
    return 100 * jiwer.wer(norm(r), norm(h))


import transformers  # noqa: E402

pipe = transformers.pipeline("automatic-speech-recognition", model=str(out))
gk = {"num_beams": 1, "language": "no", "task": "transcribe"}
short = " ".join(pipe(c["audio"].copy(), generate_kwargs=gk)["text"].strip() for c in clips)
print("short-form WER", wer(" ".join(NO), short))
res = {}
t = time.time()
o = pipe(long.copy(), return_timestamps=True, generate_kwargs=gk)
res["transformers"] = [(c["timestamp"][0], c["timestamp"][1], c["text"]) for c in o["chunks"]]
print("tf s", time.time() - t)
from faster_whisper import WhisperModel  # noqa: E402

t = time.time()
segs, _ = WhisperModel(str(out / "ctranslate2"), device="cpu", cpu_threads=2).transcribe(
    long, language="no", beam_size=1, temperature=0.0
)
res["faster-whisper"] = [(s.start, s.end, s.text) for s in segs]
print("fw s", time.time() - t)
segs, _ = WhisperModel(str(out / "ctranslate2"), device="cpu", cpu_threads=2).transcribe(
    long, language="no", beam_size=1, temperature=0.0, condition_on_previous_text=False
)
res["faster-whisper, no previous-text prompt"] = [(s.start, s.end, s.text) for s in segs]
from pywhispercpp.model import Model  # noqa: E402

t = time.time()
segs = Model(
    str(out / "ggml-model.bin"), n_threads=2, print_progress=False, print_realtime=False, temperature_inc=0.0
).transcribe(long, language="no")
res["whisper.cpp"] = [(s.t0 / 100, s.t1 / 100, s.text) for s in segs]
print("cpp s", time.time() - t)
segs = Model(
    str(out / "ggml-model.bin"),
    n_threads=2,
    print_progress=False,
    print_realtime=False,
    temperature_inc=0.0,
    no_context=True,
).transcribe(long, language="no")
res["whisper.cpp, no previous-text prompt"] = [(s.t0 / 100, s.t1 / 100, s.text) for s in segs]
for k, segs in res.items():
    text = " ".join(s[2].strip() for s in segs)
    starts = [s[0] for s in segs]
    print(
        k,
        "segments",
        len(segs),
        "first",
        segs[0][:2] if segs else None,
        "last",
        segs[-1][:2] if segs else None,
        "WER",
        round(wer(" ".join(ref), text), 1),
        "monotonic",
        all(b >= a for a, b in zip(starts, starts[1:])),
    )
json.dump({k: v for k, v in res.items()}, open(root / "segments.json", "w"), default=str, ensure_ascii=False, indent=0)
w = pipe(long[: 16000 * 25].copy(), return_timestamps="word", generate_kwargs=gk)
print("words", w["chunks"][:8])
