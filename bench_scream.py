#!/usr/bin/env python
"""Scream benchmarks: each subcommand measures one thing side by side and prints markdown tables.

    python bench_scream.py train    # our jitted train step vs transformers' PyTorch Whisper + AdamW (CPU)
    python bench_scream.py input    # host examples/s per core: our pipeline vs host log-mel features
    python bench_scream.py compile  # time to compile the train step: unrolled vs scan_layers
    python bench_scream.py tpu      # compile-only on TPU v4 slices: memory per chip, largest batch that fits
    python bench_scream.py generate --num_beams 1 2 5  # eval decoding per example: beam search vs greedy

Every subcommand takes --tiny: toy sizes that run in seconds. Timings are medians of alternating
runs (ours, theirs, ours, theirs, ...), so a busy machine slows both sides alike; each table's
caption gives the load average it ran under. Everything runs on this machine's CPU
(JAX_PLATFORMS=cpu); `tpu` needs libtpu (pip install "jax[tpu]") but no TPU.
"""

from __future__ import annotations

import argparse
import functools
import importlib.machinery
import importlib.metadata
import importlib.util
import io
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

# --- model sizes ---
# Whisper's released dimensions (vocab 51865, 80 mel bins, 30 s windows = 1500 encoder positions,
# 448 decoder positions). "toy" is what --tiny uses: the same code paths in seconds.

MODEL_DIMS = {
    "toy": dict(d_model=64, layers=2, heads=4, ffn=256, vocab=512),
    "tiny": dict(d_model=384, layers=4, heads=6, ffn=1536),
    "base": dict(d_model=512, layers=6, heads=8, ffn=2048),
    "small": dict(d_model=768, layers=12, heads=12, ffn=3072),
    "medium": dict(d_model=1024, layers=24, heads=16, ffn=4096),
    "large-v2": dict(d_model=1280, layers=32, heads=20, ffn=5120),
    "large-v3": dict(d_model=1280, layers=32, heads=20, ffn=5120, mel_bins=128, vocab=51866),
}
SAMPLING_RATE = 16000
HOP_LENGTH = 160  # mel frames every 10 ms; the encoder's stride-2 conv halves them


def v4_usable_bytes() -> int:  # what XLA can use of a v4 chip (run_scream.DEVICE_SPECS); the TPU tables are of v4
    import run_scream as rs

    return int(rs.device_spec("TPU v4")[3] * 2**30)


def whisper_config(name: str, chunk_s: float = 30.0):
    """A WhisperConfig with the named model's dimensions, for windows of `chunk_s` seconds."""
    from transformers import WhisperConfig

    dims = MODEL_DIMS[name]
    vocab = dims.get("vocab", 51865)
    eot = vocab - 2 if name == "toy" else 50257
    per_stack = {"layers": dims["layers"], "attention_heads": dims["heads"], "ffn_dim": dims["ffn"]}
    return WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=dims.get("mel_bins", 80),
        d_model=dims["d_model"],
        max_source_positions=int(chunk_s * SAMPLING_RATE / HOP_LENGTH) // 2,
        max_target_positions=448,
        decoder_start_token_id=eot + 1,
        **{f"{stack}_{key}": value for stack in ("encoder", "decoder") for key, value in per_stack.items()},
        **dict.fromkeys(("dropout", "attention_dropout", "activation_dropout"), 0.0),
        **dict.fromkeys(("pad_token_id", "bos_token_id", "eos_token_id"), eot),
    )


def mel_filters_for(config, chunk_s: float) -> np.ndarray:
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins, chunk_length=int(chunk_s))
    return np.asarray(extractor.mel_filters, np.float32)


# --- output ---

LOAD_SAMPLES: list[float] = []  # 1-minute load averages sampled before each timed round
median = statistics.median


def sample_load():
    LOAD_SAMPLES.append(os.getloadavg()[0])


def load_range() -> str:
    return f"1-minute load average during the timed rounds {min(LOAD_SAMPLES):.1f}-{max(LOAD_SAMPLES):.1f}"


def usable_cores() -> int:
    """What taskset allows, not what the machine has (where the OS can tell)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def heading(text: str):
    load = "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    print(f"## {text} ({usable_cores()} of {os.cpu_count()} CPU cores usable, {load} at start)")


def table(title: str, headers: list[str], rows: list[list], note: str | None = None):
    """Print one markdown table with a bold title line (and an optional note under it)."""

    def cell(value):
        if isinstance(value, float):
            return f"{value:.0f}" if 100 <= abs(value) < 1e5 else f"{value:.3g}"
        return str(value)

    print(f"\n**{title}**\n")
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(cell(v) for v in row) + " |")
    if note:
        print(f"\n{note}")
    sys.stdout.flush()


def timed_each(fn, steps: int) -> list[float]:
    """Seconds of each of `steps` calls, after one untimed call (compilation, first allocations)."""
    fn()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


# --- train: our step vs PyTorch, each side in its own process ---

SIDES = ("ours", "torch")


def build_our_step(config, mel_filters, devices=None, fsdp_size=1, state="float32/float32", **model_options):
    """(run_scream.JittedTrainStep as run() jits it, model) for `model_options` (dtype, scan_layers,
    remat): AdamW without clipping or weight decay, as the scripts pin it; `state` dtypes as
    "params/mu" (--param_dtype, --adam_mu_dtype)."""
    import jax

    import run_scream as rs

    param_dtype, adam_mu_dtype = state.split("/")
    model = rs.build_model(config, **model_options)
    train_args = rs.TrainingArguments(
        learning_rate=1e-5, max_grad_norm=0.0, weight_decay=0.0, num_train_steps=1000, adam_mu_dtype=adam_mu_dtype
    )
    optimizer = rs.make_optimizer(train_args, rs.learning_rate_schedule(1e-5, 0, 1000, "linear"))
    mesh = rs.make_mesh(fsdp_size, devices if devices is not None else jax.devices()[:1])
    return rs.jit_train_step(model, optimizer, mesh, mel_filters=mel_filters, param_dtype=param_dtype), model


def make_train_batch(config, batch_size: int, label_length: int, chunk_s: float) -> dict:
    """Noise as raw audio, and random full-length labels (every position counts)."""
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal((batch_size, int(chunk_s * SAMPLING_RATE)))).astype(np.float32)
    tokens = rng.integers(0, config.eos_token_id, (batch_size, label_length + 1)).astype(np.int32)
    return {"audio": audio, "decoder_input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


def our_train_step(config, batch: dict, mel_filters, threads: int):
    """run_scream's jitted step on one CPU device, float32, state donated step to step (XLA picks
    its own thread count). Returns a function that runs one step."""
    import jax

    import run_scream as rs

    step, model = build_our_step(config, mel_filters)
    box = {"state": rs.initial_train_state(step, model, seed=0)}
    batch = jax.device_put(batch, step.data_sharding)
    compiled = step.fn.lower(box["state"], batch).compile()

    def run():
        box["state"], metrics = compiled(box["state"], batch)
        jax.block_until_ready(metrics)

    return run


def torch_train_step(config, batch: dict, mel_filters, threads: int):
    """transformers' WhisperForConditionalGeneration (its default attention) with torch.optim.AdamW.
    It gets log-mel features computed beforehand (not timed), so it does less work per step than
    ours, which computes log-mel from the raw waveform inside its step."""
    import torch
    from transformers import WhisperForConditionalGeneration

    import run_scream as rs

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    inputs = {key: torch.from_numpy(batch[key].astype(np.int64)) for key in ("decoder_input_ids", "labels")}
    inputs["input_features"] = torch.from_numpy(np.array(rs.log_mel(batch["audio"], mel_filters)))

    def run():
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def matmul_gflops(side: str, n: int, repeats: int = 10) -> float:
    """The side's own framework's n^3 float32 matmul (jnp.dot or torch.matmul), GFLOP/s: the peak
    that side's fraction of peak is read against. The fastest of `repeats`: a peak, which another
    process's time slice can only lower."""
    if side == "ours":
        import jax
        import jax.numpy as jnp

        a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
        dot = jax.jit(jnp.dot)
        seconds = timed_each(lambda: dot(a, a).block_until_ready(), repeats)
    else:
        import torch

        a = torch.randn(n, n)
        seconds = timed_each(lambda: torch.matmul(a, a), repeats)
    return 2 * n**3 / min(seconds) / 1e9


class PathFinderWithoutTorch(importlib.machinery.PathFinder):
    """sys.meta_path's finder of installed packages, blind to torch."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.partition(".")[0] == "torch" else super().find_spec(name, path, target)


def hide_torch():
    """This process sees no torch from now on (find_spec finds none, no sys.modules entry, which
    datasets would import): else transformers loads torch's OpenMP and MKL next to XLA's."""
    sys.meta_path[:] = [PathFinderWithoutTorch if f is importlib.machinery.PathFinder else f for f in sys.meta_path]


def train_side(args):
    """One side of `train`, alone in this process (`bench_scream.py train-side`): one untimed step,
    then `--steps` steps timed one by one, then the side's own matmul peak. Prints one JSON line."""
    if args.side == "ours":
        hide_torch()
    (name,) = args.models
    config = whisper_config(name, args.chunk_s)
    batch = make_train_batch(config, args.batch_size, args.label_length, args.chunk_s)
    make_step = our_train_step if args.side == "ours" else torch_train_step
    step = make_step(config, batch, mel_filters_for(config, args.chunk_s), args.threads)
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    seconds = timed_each(step, args.steps)
    # CPU seconds of all this process's threads per wall second: how many cores the side kept busy
    cores_busy = (time.process_time() - cpu_start) / (time.perf_counter() - wall_start)
    result = {"seconds_per_step": seconds, "cores_busy": cores_busy, "pid": os.getpid()}
    print(json.dumps(result | {"matmul_gflops": matmul_gflops(args.side, args.matmul_n)}))


def run_side(args, side: str, model: str) -> dict:
    """`train_side` in a fresh Python process: no thread pool or allocator of the other framework."""
    command = [sys.executable, str(Path(__file__).resolve()), "train-side", "--side", side, "--models", model]
    for name in ("batch_size", "chunk_s", "label_length", "steps", "threads", "matmul_n"):
        command += [f"--{name}", str(getattr(args, name))]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_train(args):
    import jax

    import run_scream as rs

    heading("train: our jitted step vs transformers PyTorch + AdamW")
    print(
        f"float32, 1 CPU device, batch {args.batch_size}, {args.chunk_s:g} s audio, {args.label_length}-token labels, "
        f"torch threads {args.threads}, XLA default threads, jax {jax.__version__}, "
        f"torch {importlib.metadata.version('torch')}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '(unset)')}"
    )
    rows, pids = [], set()
    LOAD_SAMPLES.clear()
    for name in args.models:
        config = whisper_config(name, args.chunk_s)
        flops = rs.training_flops_per_example(rs.WhisperDims.from_config(config), args.label_length)
        runs = {side: [] for side in SIDES}
        for round_index in range(args.rounds):  # alternate which side goes first
            for side in SIDES if round_index % 2 == 0 else SIDES[::-1]:
                sample_load()
                runs[side].append(run_side(args, side, name))
        pids |= {run["pid"] for side in SIDES for run in runs[side]}
        per_run = {side: [median(run["seconds_per_step"]) for run in runs[side]] for side in SIDES}
        torch_s = median(per_run["torch"])
        for side, label in (("ours", "ours: jit, log-mel in step"), ("torch", "PyTorch eager, features precomputed")):
            seconds = median(per_run[side])
            spread = f"{min(per_run[side]):.3g}-{max(per_run[side]):.3g}"
            row = [f"{name} ({label})", seconds, spread, args.batch_size / seconds, torch_s / seconds]
            peak_gflops = median([run["matmul_gflops"] for run in runs[side]])
            row += [median([run["cores_busy"] for run in runs[side]]), peak_gflops]
            rows.append(row + [flops * args.batch_size / seconds / 1e9 / peak_gflops])
        print(f"(ours vs PyTorch at {name} dims: {torch_s / median(per_run['ours']):.2f}x)", flush=True)
    headers = ["model", "s/step (median)", "s/step (range)", "examples/s", "vs PyTorch", "cores busy"]
    table(
        "Training step throughput",
        headers + ["own matmul peak GFLOP/s", "fraction of own peak"],
        rows,
        f"Each of {args.rounds} rounds runs each side in its own fresh process (alternating which goes first; "
        f"{len(pids - {os.getpid()})} processes in all, none of them this one); a run's figure is the median of "
        f"{args.steps} timed steps after an untimed one; the table gives the median and the range over runs. "
        f"Own peak: the side's own framework's {args.matmul_n}^3 float32 matmul (jnp.dot, torch.matmul), the fastest "
        "of 10 in each of its processes. Fraction of own peak = training FLOPs/example (run_scream.training_flops_per_example) "
        f"x examples/s / own peak. Cores busy = CPU seconds (all threads) per wall second over the timed steps, "
        f"of {usable_cores()}. {load_range()}.",
    )


# --- input: host pipeline ---


def speech_like(rng, seconds: float, rate: int) -> np.ndarray:
    """A waveform with speech's structure, for decode/resample costs and a realistic FLAC ratio:
    a glottal pulse train (pitch 80-260 Hz, drifting) through three formant resonators that move
    every syllable, unvoiced noise bursts for fricatives, pauses, and a quiet noise floor."""
    from scipy.signal import lfilter

    n = int(seconds * rate)
    out = np.zeros(n)
    t, f0 = 0, rng.uniform(90, 240)
    while t < n:
        if rng.random() < 0.12:  # a pause between phrases
            t += int(rng.uniform(0.15, 0.6) * rate)
            continue
        length = min(n - t, int(rng.uniform(0.12, 0.28) * rate))
        if rng.random() < 0.25:  # a fricative: high-band noise
            segment = lfilter([1, -0.95], [1], rng.standard_normal(length)) * rng.uniform(0.02, 0.08)
        else:  # a voiced syllable: pulse train through moving formants
            f0 = float(np.clip(f0 * rng.uniform(0.9, 1.1), 80, 260))
            phase = np.cumsum(f0 * (1 + 0.05 * np.sin(np.linspace(0, rng.uniform(1, 3), length))) / rate)
            segment = np.diff(np.floor(phase), prepend=0.0) + 0.01 * rng.standard_normal(length)
            formants = [(rng.uniform(300, 900), 80), (rng.uniform(900, 2400), 120), (rng.uniform(2400, 3400), 180)]
            for formant, bandwidth in formants:
                r, theta = np.exp(-np.pi * bandwidth / rate), 2 * np.pi * formant / rate
                segment = lfilter([1 - r], [1, -2 * r * np.cos(theta), r * r], segment)
            segment = segment / (np.abs(segment).max() + 1e-9) * rng.uniform(0.2, 0.7)
        out[t : t + length] += segment * np.sin(np.linspace(0, np.pi, length)) ** 0.5
        t += length
    out += 0.003 * rng.standard_normal(n)
    return np.clip(out, -1, 1).astype(np.float32)


TRANSCRIPT = (
    "Det var en gang en liten gutt som bodde ved havet, og hver morgen gikk han ned til "
    "stranden for å se på båtene."
)  # 118 UTF-8 bytes: 122 label tokens with the byte-level tokenizer


def make_clips(num_clips: int, seconds: float, rate: int) -> list[dict]:
    """Dataset rows of 16-bit mono FLAC clips of speech_like audio, in memory."""
    import soundfile

    rows = []
    for index in range(num_clips):
        waveform = speech_like(np.random.default_rng([rate, index]), seconds, rate)
        buffer = io.BytesIO()
        soundfile.write(buffer, np.round(waveform * 32767).astype(np.int16), rate, format="FLAC", subtype="PCM_16")
        audio = {"bytes": buffer.getvalue(), "path": f"clip-{index:04d}.flac"}
        rows.append({"id": f"clip-{index:04d}", "text": TRANSCRIPT, "audio": audio, "source": "bench"})
    return rows


def numpy_feature_extractor(**kwargs):
    """WhisperFeatureExtractor as transformers runs it where torch is not installed (numpy STFT)."""
    from transformers import WhisperFeatureExtractor

    class NumpyWhisperFeatureExtractor(WhisperFeatureExtractor):
        def _torch_extract_fbank_features(self, waveform, device="cpu"):
            return self._np_extract_fbank_features(waveform, device)

    return NumpyWhisperFeatureExtractor(**kwargs)


def input_pipeline(args):
    """run_scream's prepare_example and collate, set up as a run sets them up."""
    import make_demo_dataset
    import run_scream as rs

    with tempfile.TemporaryDirectory() as work:
        tokenizer = make_demo_dataset.write_tokenizer(Path(work) / "tokenizer")
    tokenizer.set_prefix_tokens(language="no", task="transcribe", predict_timestamps=False)
    n_samples = int(args.chunk_s * SAMPLING_RATE)
    audio_settings = rs.AudioSettings(SAMPLING_RATE, n_samples, 0.0, args.chunk_s)
    text_settings = rs.TextSettings(False, False, args.label_length)
    prepare = functools.partial(
        rs.prepare_example, tokenizer=tokenizer, audio_settings=audio_settings, text_settings=text_settings
    )
    pad = tokenizer.eos_token_id
    sizes = dict(batch_size=args.batch_size, n_samples=n_samples, max_label_length=args.label_length)
    return prepare, functools.partial(rs.collate, pad_token_id=pad, **sizes)


def bench_input(args):
    from transformers import WhisperFeatureExtractor

    heading("input: host pipeline, examples/s per core")
    prepare, collate = input_pipeline(args)
    host = "host log-mel: the same + WhisperFeatureExtractor"
    sizes = dict(feature_size=80, chunk_length=int(args.chunk_s))
    pipelines = {"ours: decode + resample + tokenize + collate (log-mel on device)": None}
    pipelines[f"{host} (numpy, 1 thread)"] = numpy_feature_extractor(**sizes)
    if importlib.util.find_spec("torch"):  # transformers' extractor then computes with torch: one thread per core
        import torch

        torch.set_num_threads(1)
        pipelines[f"{host} (torch {torch.__version__}, 1 thread)"] = WhisperFeatureExtractor(**sizes)

    def per_example_s(rows, extractor):
        start = time.perf_counter()
        for i in range(0, len(rows), args.batch_size):
            prepared = [prepare(row) for row in rows[i : i + args.batch_size]]
            assert all(reason is None for _, reason in prepared), prepared
            if extractor is not None:  # the 2023 way: log-mel on the host, per example
                for example, _ in prepared:
                    extractor(example["audio"], sampling_rate=SAMPLING_RATE, return_tensors="np")
            collate([example for example, _ in prepared])
        return (time.perf_counter() - start) / len(rows)

    rows, sizes, clips = [], {}, {}
    LOAD_SAMPLES.clear()
    for rate in args.source_rates:
        clips[rate] = make_clips(args.num_clips, args.chunk_s, rate)
        sizes[rate] = median([len(c["audio"]["bytes"]) for c in clips[rate]]) / (args.chunk_s * rate * 2)
        timings = {name: [] for name in pipelines}
        for _ in range(args.rounds):  # alternate the pipelines
            sample_load()
            for name, extractor in pipelines.items():
                timings[name].append(per_example_s(clips[rate], extractor))
        ours_s = median(next(iter(timings.values())))
        for name, values in timings.items():
            seconds = median(values)
            rows.append([name, f"{rate / 1000:g} kHz", seconds * 1e3, 1 / seconds, seconds / ours_s])
    table(
        f"Host work per {args.chunk_s:g} s FLAC clip, one thread",
        ["pipeline", "source", "ms/example", "examples/s per core", "time vs ours"],
        rows,
        f"{args.num_clips} clips of synthetic speech (pulse train through moving formants, fricatives, pauses), "
        "16-bit mono FLAC in memory; FLAC size / raw PCM: "
        + ", ".join(f"{r / 1000:g} kHz {sizes[r]:.2f}" for r in args.source_rates)
        + f". Medians of {args.rounds} alternating passes over all clips; batches of {args.batch_size}, labels padded "
        f"to {args.label_length}. {load_range()}.",
    )
    bench_input_workers(args, prepare, collate, clips[args.source_rates[0]])


def bench_input_workers(args, prepare, collate, clips: list[dict]):
    """Our pipeline through SpeechBatches (a run's reader, decoding thread pool and queue), 1, 2, ... workers."""
    import datasets

    import run_scream as rs

    def make_source(epoch):
        return datasets.Dataset.from_list(clips).to_iterable_dataset()

    def examples_per_s(workers):
        options = dict(batch_size=args.batch_size, collate_fn=collate, repeat=True, prefetch_batches=4)
        iterator = iter(rs.SpeechBatches(make_source, prepare, num_workers=workers, **options))
        next(iterator)  # start-up (threads, the first rows) is not throughput
        start = time.perf_counter()
        count = sum(len(next(iterator)[1]) for _ in range(args.scaling_batches))
        elapsed = time.perf_counter() - start
        iterator.close()
        return count / elapsed

    scaling = {workers: [] for workers in args.workers}
    LOAD_SAMPLES.clear()
    for _ in range(args.rounds):
        sample_load()
        for workers in args.workers:
            scaling[workers].append(examples_per_s(workers))
    table(
        f"Our pipeline through SpeechBatches over the same clips in memory ({args.source_rates[0] / 1000:g} kHz FLAC)",
        ["--preprocessing_num_workers", "examples/s", "examples/s per core used"],
        [[w, median(v), median(v) / min(w, usable_cores())] for w, v in scaling.items()],
        f"{args.scaling_batches} batches of {args.batch_size} after the first, medians of {args.rounds} "
        f"alternating runs; {usable_cores()} cores usable. {load_range()}.",
    )


# --- compile ---


def bench_compile(args):
    import jax

    import run_scream as rs

    heading("compile: train step lower + compile, unrolled vs scan_layers")
    rows = []
    for name in args.models:
        config = whisper_config(name, args.chunk_s)
        mel_filters = mel_filters_for(config, args.chunk_s)
        lower_s, total_s = {False: [], True: []}, {False: [], True: []}
        for _ in range(args.rounds if name not in args.single_round_models else 1):
            for scan in (False, True):
                sample_load()
                step, _ = build_our_step(config, mel_filters, dtype=args.dtype, scan_layers=scan, remat=args.remat)
                sizes = dict(n_samples=int(args.chunk_s * SAMPLING_RATE), max_label_length=args.label_length)
                batch = rs.abstract_batch(args.batch_size, sharding=step.data_sharding, **sizes)
                start = time.perf_counter()
                lowered = step.fn.lower(step.abstract_state, batch)
                lower_s[scan].append(time.perf_counter() - start)
                lowered.compile()
                total_s[scan].append(time.perf_counter() - start)
        unrolled, scanned = median(total_s[False]), median(total_s[True])
        layers = f"{config.encoder_layers}+{config.decoder_layers}"
        rows.append(
            [name, layers, median(lower_s[False]), unrolled, median(lower_s[True]), scanned, unrolled / scanned]
        )
    table(
        f"Train step compile time on CPU (s): {args.dtype}, remat {args.remat}, batch {args.batch_size}",
        ["model", "layers", "unrolled: lower", "unrolled: lower + compile", "scan: lower", "scan: lower + compile"]
        + ["scan speed-up"],
        rows,
        f"Abstract inputs (jax.ShapeDtypeStruct), no execution; jax {jax.__version__}. Medians of alternating "
        f"rounds ({args.rounds} for small models, 1 for {', '.join(args.single_round_models) or 'none'}). "
        f"{load_range()}.",
    )


# --- generate: greedy vs beam search ---


def bench_generate(args):
    """run_scream.generate (as eval_step runs it) at each --num_beams: seconds per example and the
    ratio to greedy. <|endoftext|> is suppressed, so every variant decodes all --max_new_tokens
    (random weights would otherwise end at random lengths): the ratio is per decoded token."""
    import jax
    import jax.numpy as jnp

    import run_scream as rs

    heading("generate: eval decoding, greedy vs beam search")
    beam_counts = [1] + [n for n in args.num_beams if n != 1]  # greedy is the reference row
    rows = []
    for name in args.models:
        config = whisper_config(name, args.chunk_s)
        model = rs.build_model(config, dtype=args.dtype)
        params = jax.jit(functools.partial(rs.init_params, model))(jax.random.PRNGKey(0))
        shape = (args.batch_size, config.num_mel_bins, 2 * config.max_source_positions)  # 2 mel frames a position
        features = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
        prefix = [config.decoder_start_token_id, 1, 2, 3]  # <|startoftranscript|> and three stand-ins
        prompt_ids = jnp.asarray(np.tile(prefix, (args.batch_size, 1)), jnp.int32)
        eot = config.eos_token_id
        lengths = dict(prompt_length=len(prefix), max_new_tokens=args.max_new_tokens)
        compiled, compile_s, times = {}, {}, {n: [] for n in beam_counts}
        for beams in beam_counts:
            tokens = dict(eos_token_id=eot, pad_token_id=config.pad_token_id, suppress_tokens=(eot,))
            settings = rs.DecodingSettings(num_beams=beams, **lengths, **tokens)
            start = time.perf_counter()
            generate = jax.jit(functools.partial(rs.generate, model, settings=settings))
            compiled[beams] = generate.lower(params, features, prompt_ids).compile()
            compile_s[beams] = time.perf_counter() - start
            compiled[beams](params, features, prompt_ids).block_until_ready()  # the first run allocates: untimed
        for _ in range(args.rounds):
            for beams in beam_counts:
                sample_load()
                start = time.perf_counter()
                compiled[beams](params, features, prompt_ids).block_until_ready()
                times[beams].append(time.perf_counter() - start)
        # Beam search repeats the self-attention cache per beam; the cross-attention cache stays one
        # per row, shared by its beams.
        cache_length = len(prefix) + args.max_new_tokens
        row_cache = rs.empty_cache(model.dims, args.batch_size, cache_length, jnp.dtype(args.dtype))
        greedy = median(times[1]) / args.batch_size
        for beams in beam_counts:
            per_example = median(times[beams]) / args.batch_size
            cache = sum(x.nbytes * (beams if key.startswith("self_") else 1) for key, x in row_cache.items())
            rows.append([name, beams, per_example, per_example / greedy, compile_s[beams], cache / 2**20])
    table(
        f"Eval decoding on CPU: {args.dtype}, batch {args.batch_size}, {args.max_new_tokens} new tokens, "
        f"{args.chunk_s:g} s windows",
        ["model", "beams", "s per example", "x greedy", "compile s", "KV cache MiB"],
        rows,
        f"Random weights, <|endoftext|> suppressed (every row decodes all {args.max_new_tokens} tokens); the "
        f"encoder runs once per example, the decoder on batch x beams rows. Medians of {args.rounds} alternating "
        f"rounds. {load_range()}.",
    )


# --- tpu: compile-only on v4 slices ---


def tpu_compile(config, mel_filters, devices, per_chip_batch: int, *, args, fsdp_size, remat, scan, state) -> dict:
    """Compile run_scream's train step for the slice: {'bytes' per chip (None: RESOURCE_EXHAUSTED), 'fits'}."""
    import run_scream as rs

    options = dict(dtype=args.dtype, scan_layers=scan, remat=remat)
    step, _ = build_our_step(config, mel_filters, devices, fsdp_size, state, **options)
    sizes = dict(n_samples=int(args.chunk_s * SAMPLING_RATE), max_label_length=args.label_length)
    batch = rs.abstract_batch(per_chip_batch * len(devices), sharding=step.data_sharding, **sizes)
    try:
        compiled = step.fn.lower(step.abstract_state, batch).compile()
    except Exception as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return {"bytes": None, "fits": False}
    total = rs.compiled_memory_bytes(compiled)
    return {"bytes": total, "fits": total <= v4_usable_bytes()}


def largest_fitting_batch(compile_at, seed_batch: int, max_batch: int, known: dict) -> int:
    """Largest per-chip batch that fits, in few compiles (`known` maps batch -> compile result and is
    filled in). Memory grows about linearly with the batch, so after the seed batch (and its
    double) each try follows the line through the largest batch that fits and the measured batch
    above it (else the nearest one below) to the usable bytes; bisection while nothing fits."""

    lo, hi, batch = 0, max_batch + 1, min(seed_batch, max_batch)  # lo fits (0: trivially), hi does not
    while hi - lo > 1:
        known[batch] = compile_at(batch)
        lo, hi = (batch, hi) if known[batch]["fits"] else (lo, batch)
        guess = 2 * lo if lo and hi > max_batch else (lo + hi) // 2
        measured = [b for b, result in known.items() if result["bytes"] is not None and b != lo]
        if lo and measured:
            near = hi if hi in measured else min(measured, key=lambda b: abs(b - lo))
            slope = (known[near]["bytes"] - known[lo]["bytes"]) / (near - lo)
            if slope > 0:
                guess = lo + int((v4_usable_bytes() - known[lo]["bytes"]) / slope)
        batch = min(max(guess, lo + 1), hi - 1)  # the next try lies strictly between lo and hi
    return lo


def gib(value) -> str | float:
    return "does not fit" if value is None else value / 2**30


def bench_tpu(args):
    import jax

    import run_scream as rs

    heading("tpu: compile-only for TPU v4 slices from this CPU")
    print(f"jax {jax.__version__}; usable HBM per v4 chip taken as {v4_usable_bytes() / 2**30:.2f} GiB")
    rows = []
    for plan, fsdp, remat, state in itertools.product(args.plans, args.fsdp, args.remats, args.state_dtypes):
        name, slice_name = plan.split("@")
        devices = rs.tpu_topology_devices(slice_name)
        config = whisper_config(name, args.chunk_s)
        fsdp_size = len(devices) if fsdp == "all" else int(fsdp)
        seed_batch, scan = args.seed_batch.get(name, 8), name in args.scan_models
        settings = dict(args=args, fsdp_size=fsdp_size, remat=remat, scan=scan, state=state)
        compile_at = functools.partial(tpu_compile, config, mel_filters_for(config, args.chunk_s), devices, **settings)
        known: dict = {}
        start = time.perf_counter()
        best = largest_fitting_batch(compile_at, seed_batch, args.max_batch, known)
        unblocked = "-"
        if name in args.compare_unblocked and fsdp_size == len(devices) and best:
            with mock.patch.object(rs, "query_block_size", lambda length: None):  # all queries at once
                unblocked = gib(compile_at(best)["bytes"])
        sharding = "data parallel" if fsdp_size == 1 else f"FSDP {fsdp_size}"
        row = [name, f"{slice_name} ({len(devices)} chips)", sharding, remat, "on" if scan else "off", state]
        row += [seed_batch, gib(known[seed_batch]["bytes"]), "yes" if known[seed_batch]["fits"] else "no"]
        row += ["none" if not best else f">= {best} (search cap)" if best == args.max_batch else best]
        row += ["-" if not best else gib(known[best]["bytes"]), unblocked]
        row += [", ".join(f"{b}:{'fits' if r['fits'] else 'no'}" for b, r in sorted(known.items()))]
        rows.append(row + [time.perf_counter() - start])
        print("  progress: | " + " | ".join(map(str, rows[-1])) + " |", flush=True)  # a long run loses nothing
    table(
        f"Per-chip memory of the real train step, compiled for TPU v4 ({args.dtype}, {args.chunk_s:g} s audio, "
        f"{args.label_length}-token labels)",
        ["model", "slice", "sharding", "remat", "scan", "state dtype (params/mu)", "seed batch/chip"]
        + ["GiB/chip at seed batch", "fits", "largest batch/chip", "GiB/chip there", "GiB/chip there, unblocked"]
        + ["batches compiled", "compile s"],
        rows,
        "memory = compiled.memory_analysis(): arguments + outputs + temporaries - aliased (donated) buffers. "
        f"Fits: no RESOURCE_EXHAUSTED and at most {v4_usable_bytes() / 2**30:.2f} GiB; searched up to "
        f"{args.max_batch} per chip. Unblocked: the encoder's attention without query blocks (--compare_unblocked "
        "models, FSDP over all chips), at the largest batch that fits blocked.",
    )


# --- main ---


def parse_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_seed_batches(text: str) -> dict[str, int]:
    return {model: int(batch) for model, batch in (part.split("=") for part in parse_list(text))}


def parse_ints(text: str) -> list[int]:
    return [int(part) for part in parse_list(text)]


def add_train_options(parser):
    """`train`'s options, which `train-side` takes too (run_side passes them on)."""
    parser.add_argument("--models", type=parse_list, default=["tiny", "base"])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--chunk_s", type=float, default=30.0)
    parser.add_argument("--label_length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="alternating runs of each side")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (XLA uses its default)")
    parser.add_argument("--matmul_n", type=int, default=2048, help="size of each side's own matmul peak")


TINY = {  # the same code paths at toy sizes, in seconds
    "train": "--models toy --batch_size 2 --chunk_s 3 --label_length 16 --rounds 1 --steps 1 --matmul_n 512",
    "input": "--num_clips 4 --chunk_s 2 --batch_size 2 --rounds 1 --scaling_batches 2",
    "compile": "--models toy --single_round_models= --rounds 1 --chunk_s 3 --label_length 16",
    "tpu": "--plans toy@v4-8 --scan_models toy --seed_batch toy=2 --max_batch 2 --chunk_s 3 --label_length 16 "
    "--remats dots --state_dtypes float32/float32,bfloat16/bfloat16 --compare_unblocked=",  # 1 compile a row
    "generate": "--models toy --num_beams 1 2 3 --batch_size 2 --max_new_tokens 6 --chunk_s 3 --rounds 1",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="our jitted train step vs PyTorch + AdamW on this CPU")
    add_train_options(train)
    side = commands.add_parser("train-side", help="one side of `train`, in its own process (used by `train`)")
    add_train_options(side)
    side.add_argument("--side", choices=SIDES, required=True)

    inputs = commands.add_parser("input", help="host pipeline examples/s per core")
    inputs.add_argument("--num_clips", type=int, default=32)
    inputs.add_argument("--chunk_s", type=float, default=30.0)
    inputs.add_argument("--source_rates", type=parse_ints, default=[16000, 48000])
    inputs.add_argument("--batch_size", type=int, default=8)
    inputs.add_argument("--label_length", type=int, default=128)
    inputs.add_argument("--rounds", type=int, default=3)
    inputs.add_argument("--workers", type=parse_ints, default=[1, 2])
    inputs.add_argument("--scaling_batches", type=int, default=8)

    compile_ = commands.add_parser("compile", help="train step compile time, unrolled vs scan_layers")
    compile_.add_argument("--models", type=parse_list, default=["tiny", "large-v2"])
    compile_.add_argument("--single_round_models", type=parse_list, default=["large-v2"], help="compiled once each")
    compile_.add_argument("--rounds", type=int, default=3)
    compile_.add_argument("--batch_size", type=int, default=1)
    compile_.add_argument("--chunk_s", type=float, default=30.0)
    compile_.add_argument("--label_length", type=int, default=128)
    compile_.add_argument("--dtype", default="float32")
    compile_.add_argument("--remat", default="none")

    tpu = commands.add_parser("tpu", help="compile-only on TPU v4 slices: memory per chip, largest batch")
    tpu.add_argument("--plans", type=parse_list, default=["large-v2@v4-64", "tiny@v4-32"], help="model@slice, ...")
    tpu.add_argument("--fsdp", type=parse_list, default=["1", "all"], help="fsdp sizes; 'all' = every chip")
    tpu.add_argument("--remats", type=parse_list, default=["none", "dots", "full"])
    tpu.add_argument("--scan_models", type=parse_list, default=["large-v2", "large-v3"])
    tpu.add_argument("--seed_batch", type=parse_seed_batches, default="large-v2=5,tiny=32", help="2023's per chip")
    tpu.add_argument("--max_batch", type=int, default=64)
    tpu.add_argument("--compare_unblocked", type=parse_list, default=["large-v2"], help="also compiled unblocked")
    tpu.add_argument("--state_dtypes", type=parse_list, default="float32/float32", help="params/mu dtypes")
    tpu.add_argument("--dtype", default="bfloat16")
    tpu.add_argument("--chunk_s", type=float, default=30.0)
    tpu.add_argument("--label_length", type=int, default=128)

    generate = commands.add_parser("generate", help="eval decoding per example: beam search vs greedy")
    generate.add_argument("--models", type=parse_list, default=["base"])
    generate.add_argument("--num_beams", type=int, nargs="+", default=[1, 2, 5])
    generate.add_argument("--batch_size", type=int, default=8)
    generate.add_argument("--max_new_tokens", type=int, default=64)
    generate.add_argument("--chunk_s", type=float, default=30.0)
    generate.add_argument("--rounds", type=int, default=3)
    generate.add_argument("--dtype", default="float32")

    for sub in (train, inputs, compile_, tpu, generate):
        sub.add_argument("--tiny", action="store_true", help="toy sizes that finish in seconds")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if getattr(args, "tiny", False):  # flags given after --tiny still count
        return parser.parse_args(argv[:1] + TINY[args.command].split() + argv[1:])
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # Everything here runs on this machine's CPU; `tpu` compiles for TPU slices without one, so
    # libtpu must look neither for a local TPU nor for a metadata server.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no TPU to guard with /tmp/libtpu_lockfile
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    commands = {"train": bench_train, "train-side": train_side, "input": bench_input, "compile": bench_compile}
    commands.update(tpu=bench_tpu, generate=bench_generate)
    commands[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
