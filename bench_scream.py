#!/usr/bin/env python
"""Scream benchmarks: each subcommand measures one thing side by side and prints markdown tables.

    python bench_scream.py train    # our jitted train step vs transformers' PyTorch Whisper + AdamW (CPU)
    python bench_scream.py input    # host examples/s per core: our pipeline vs host log-mel features
    python bench_scream.py compile  # time to compile the train step: unrolled vs scan_layers
    python bench_scream.py tpu      # compile-only on TPU v4 slices: memory per chip, largest batch that fits
    python bench_scream.py generate --num_beams 1 2 5  # eval decoding per example: beam search vs greedy

Every subcommand takes --tiny: toy sizes that run in seconds (the test suite runs them so the
script cannot rot). Timings are medians of alternating runs (ours, theirs, ours, theirs, ...), so
a busy machine slows both sides alike; each table's caption gives the load average it ran under.
Everything runs on this machine's CPU (JAX_PLATFORMS=cpu); `tpu` needs libtpu (pip install
"jax[tpu]") but no TPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.machinery
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

import numpy as np

# --- model sizes ---
# Whisper's released dimensions (vocab 51865, 80 mel bins, 30 s windows = 1500 encoder positions,
# 448 decoder positions). "toy" is what --tiny uses: the same code paths in seconds.

MODEL_DIMS = {
    "toy": dict(d_model=64, layers=2, heads=4, ffn=256),
    "tiny": dict(d_model=384, layers=4, heads=6, ffn=1536),
    "base": dict(d_model=512, layers=6, heads=8, ffn=2048),
    "small": dict(d_model=768, layers=12, heads=12, ffn=3072),
    "medium": dict(d_model=1024, layers=24, heads=16, ffn=4096),
    "large-v2": dict(d_model=1280, layers=32, heads=20, ffn=5120),
    "large-v3": dict(d_model=1280, layers=32, heads=20, ffn=5120, mel_bins=128, vocab=51866),
}
WHISPER_VOCAB = 51865
TOY_VOCAB = 512
SAMPLING_RATE = 16000
HOP_LENGTH = 160  # mel frames every 10 ms; the encoder's stride-2 conv halves them
TPU_V4_PEAK_BF16_FLOPS = 275e12  # per chip (Google's v4 spec sheet)
TPU_V4_CHIPS_PER_HOST = 4


def whisper_config(name: str, chunk_s: float = 30.0):
    """A WhisperConfig with the named model's dimensions, for windows of `chunk_s` seconds."""
    from transformers import WhisperConfig

    dims = MODEL_DIMS[name]
    vocab = TOY_VOCAB if name == "toy" else dims.get("vocab", WHISPER_VOCAB)
    eot = vocab - 2 if name == "toy" else 50257
    return WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=dims.get("mel_bins", 80),
        d_model=dims["d_model"],
        encoder_layers=dims["layers"],
        decoder_layers=dims["layers"],
        encoder_attention_heads=dims["heads"],
        decoder_attention_heads=dims["heads"],
        encoder_ffn_dim=dims["ffn"],
        decoder_ffn_dim=dims["ffn"],
        max_source_positions=int(chunk_s * SAMPLING_RATE / HOP_LENGTH) // 2,
        max_target_positions=448,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=eot + 1,
    )


def mel_filters_for(config, chunk_s: float) -> np.ndarray:
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins, chunk_length=int(chunk_s))
    return np.asarray(extractor.mel_filters, np.float32)


def forward_flops(config, label_length: int) -> dict[str, float]:
    """run_scream.forward_flops (the formula the training loop's MFU uses) for a WhisperConfig."""
    import run_scream as rs

    return rs.forward_flops(rs.WhisperDims.from_config(config), label_length)


def training_flops_per_example(config, label_length: int) -> float:
    import run_scream as rs

    return rs.training_flops_per_example(rs.WhisperDims.from_config(config), label_length)


# --- output ---


def load_average() -> str:
    try:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load average unknown"


LOAD_SAMPLES: list[float] = []  # 1-minute load averages sampled before each timed round


def sample_load():
    try:
        LOAD_SAMPLES.append(os.getloadavg()[0])
    except OSError:
        pass


def load_range() -> str:
    if not LOAD_SAMPLES:
        return "load not sampled"
    return f"1-minute load average during the timed rounds {min(LOAD_SAMPLES):.1f}-{max(LOAD_SAMPLES):.1f}"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what taskset allows, not what the machine has
    except AttributeError:
        return os.cpu_count() or 1


def machine_line() -> str:
    return f"{usable_cores()} of {os.cpu_count()} CPU cores usable, {load_average()} (at start)"


def table(title: str, headers: list[str], rows: list[list], note: str | None = None):
    """Print one markdown table with a bold title line (and an optional note under it)."""

    def cell(value):
        if isinstance(value, float):
            if value == 0 or 0.01 <= abs(value) < 1e5:
                return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
            return f"{value:.3g}"
        return str(value)

    print(f"\n**{title}** ({load_average()})\n")
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(cell(v) for v in row) + " |")
    if note:
        print(f"\n{note}")
    sys.stdout.flush()


def median(values):
    return statistics.median(values)


# --- train: our step vs PyTorch ---


def make_train_batch(config, batch_size: int, label_length: int, chunk_s: float, seed: int = 0):
    """Speech-band noise as raw audio, and random full-length labels (every position counts)."""
    rng = np.random.default_rng(seed)
    n_samples = int(chunk_s * SAMPLING_RATE)
    audio = (0.1 * rng.standard_normal((batch_size, n_samples))).astype(np.float32)
    tokens = rng.integers(0, config.eos_token_id, (batch_size, label_length + 1)).astype(np.int32)
    return {
        "audio": audio,
        "decoder_input_ids": tokens[:, :-1],
        "labels": tokens[:, 1:],
    }


def build_our_step(
    config,
    mel_filters,
    *,
    dtype="float32",
    scan_layers=False,
    remat="none",
    devices=None,
    fsdp_size=1,
    param_dtype="float32",
    adam_mu_dtype="float32",
):
    """run_scream's train step, jitted by run_scream.jit_train_step as run() jits it (shardings over
    a mesh, state donated). Returns (run_scream.JittedTrainStep, model).
    AdamW without clipping or weight decay, as the experiment scripts pin it; parameters (so
    gradients and second moments) in `param_dtype`, the first moment in `adam_mu_dtype`."""
    import jax

    import run_scream as rs

    model = rs.build_model(config, dtype=dtype, scan_layers=scan_layers, remat=remat)
    train_args = rs.TrainingArguments(
        learning_rate=1e-5, max_grad_norm=0.0, weight_decay=0.0, num_train_steps=1000, adam_mu_dtype=adam_mu_dtype
    )
    optimizer = rs.make_optimizer(train_args, rs.learning_rate_schedule(1e-5, 0, 1000, "linear"))
    mesh = rs.make_mesh(fsdp_size, devices if devices is not None else jax.devices()[:1])
    return rs.jit_train_step(model, optimizer, mesh, mel_filters=mel_filters, param_dtype=param_dtype), model


@contextlib.contextmanager
def attention_unblocked():
    """run_scream.attention without query blocks (one big matmul per product, no loop)."""
    import run_scream as rs

    saved = rs.query_block_size
    rs.query_block_size = lambda length: None
    try:
        yield
    finally:
        rs.query_block_size = saved


class OursTrainer:
    """run_scream's jitted step on one CPU device, float32, state donated step to step."""

    def __init__(self, config, batch: dict, mel_filters):
        import jax

        import run_scream as rs

        self.jax = jax
        step, model = build_our_step(config, mel_filters)
        self.state = rs.initial_train_state(step, model, seed=0)
        self.batch = jax.device_put(batch, step.data_sharding)
        start = time.perf_counter()
        self.step_fn = step.fn.lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - start
        # XLA counts a loop body once, so count FLOPs on the same step with attention unblocked.
        with attention_unblocked():
            cost = build_our_step(config, mel_filters)[0].fn.lower(self.state, self.batch).cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        self.xla_flops = float(cost.get("flops", 0.0))
        self.step()  # the first run allocates and warms caches

    def step(self):
        self.state, metrics = self.step_fn(self.state, self.batch)
        return float(self.jax.block_until_ready(metrics)["loss"])


class TorchTrainer:
    """transformers' WhisperForConditionalGeneration (its default attention) with torch.optim.AdamW.

    Gets log-mel features precomputed on the host (not timed): the PyTorch side does less work
    per step than ours, which computes log-mel from the raw waveform inside its step."""

    def __init__(self, config, batch: dict, mel_filters, threads: int):
        import torch
        from transformers import WhisperForConditionalGeneration

        import run_scream as rs

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.torch = torch
        self.model = WhisperForConditionalGeneration(config)
        self.model.train()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
        )
        features = np.array(rs.log_mel(batch["audio"], mel_filters))  # the same features ours computes
        self.inputs = {
            "input_features": torch.from_numpy(features),
            "decoder_input_ids": torch.from_numpy(batch["decoder_input_ids"].astype(np.int64)),
            "labels": torch.from_numpy(batch["labels"].astype(np.int64)),
        }
        self.attention = self.model.config._attn_implementation
        self.step()

    def step(self):
        loss = self.model(**self.inputs).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def matmul_gflops(n: int, repeats: int = 5) -> float:
    """jnp.dot n^3 float32 on one CPU device, GFLOP/s (median of `repeats`, like the steps)."""
    import run_scream as rs

    return rs.measured_matmul_flops(n, repeats) / 1e9


def torch_matmul_gflops(n: int, repeats: int = 5) -> float:
    """torch.matmul n^3 float32 with this process's torch threads, GFLOP/s: PyTorch's own peak, so
    each side's fraction of peak can be read against its own matmul library."""
    import torch

    a = torch.randn(n, n)
    b = torch.randn(n, n)
    seconds = timed_each(lambda: torch.matmul(a, b), repeats)
    return 2 * n**3 / median(seconds) / 1e9


def timed_each(fn, steps: int) -> list[float]:
    """Seconds of each of `steps` calls, after one untimed call (compilation, first allocations)."""
    fn()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


SIDES = ("ours", "torch")


class PathFinderWithoutTorch(importlib.machinery.PathFinder):
    """sys.meta_path's finder of installed packages, blind to torch: importlib.util.find_spec("torch")
    is None and `import torch` fails, as on a machine without it."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] == "torch":
            return None
        return super().find_spec(name, path, target)


def hide_torch():
    """From now on this process sees no torch. Our side's process calls it first: transformers
    imports torch when it finds it (3 s), which loads torch's OpenMP and MKL runtimes next to XLA's."""
    sys.meta_path[:] = [PathFinderWithoutTorch if f is importlib.machinery.PathFinder else f for f in sys.meta_path]


def train_side(args):
    """One side of the train comparison, alone in this process (`bench_scream.py train-side`).

    Builds that side's trainer, runs one untimed step, times `--steps` steps one by one, and for
    ours also the matmul peak and XLA's FLOP count; with --parts, times the model part by part
    instead. Prints one JSON line for the parent (`bench_train`)."""
    if args.side == "ours":
        hide_torch()
    config = whisper_config(args.model, args.chunk_s)
    mel_filters = mel_filters_for(config, args.chunk_s)
    if args.parts:
        print(json.dumps({"parts_ms": profile_parts(args.model, args, args.side), "pid": os.getpid()}))
        return
    batch = make_train_batch(config, args.batch_size, args.label_length, args.chunk_s)
    trainer = (
        OursTrainer(config, batch, mel_filters)
        if args.side == "ours"
        else TorchTrainer(config, batch, mel_filters, args.threads)
    )
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    seconds = timed_each(trainer.step, args.steps)
    # CPU seconds of all this process's threads per wall second: how many cores the side kept busy
    cores_busy = (time.process_time() - cpu_start) / (time.perf_counter() - wall_start)
    result = {"seconds_per_step": seconds, "cores_busy": cores_busy, "pid": os.getpid()}
    if args.side == "ours":
        result.update(
            compile_s=trainer.compile_s, xla_flops=trainer.xla_flops, matmul_gflops=matmul_gflops(args.matmul_n)
        )
    else:
        result.update(matmul_gflops=torch_matmul_gflops(args.matmul_n))
    print(json.dumps(result))


def run_side(args, side: str, model: str, *, parts: bool = False) -> dict:
    """`train_side` in a fresh Python process: no thread pool or allocator of the other framework."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "train-side",
        "--side",
        side,
        "--model",
        model,
        "--batch_size",
        str(args.batch_size),
        "--chunk_s",
        str(args.chunk_s),
        "--label_length",
        str(args.label_length),
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
        "--matmul_n",
        str(args.matmul_n),
        "--rounds",
        str(args.rounds),
    ] + (["--parts"] if parts else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def spread(values) -> str:
    return f"{min(values):.3g}-{max(values):.3g}"


def bench_train(args):
    import jax
    import torch

    print(f"## train: our jitted step vs transformers PyTorch + AdamW ({machine_line()})")
    print(
        f"float32, 1 CPU device, batch {args.batch_size}, {args.chunk_s:g} s audio, {args.label_length}-token labels, "
        f"torch threads {args.threads}, XLA default threads, jax {jax.__version__}, torch {torch.__version__}, "
        f"each side in its own fresh process, XLA_FLAGS={os.environ.get('XLA_FLAGS', '(unset)')}"
    )
    rows, flops_rows, matmul, pids = [], [], {side: [] for side in SIDES}, set()
    LOAD_SAMPLES.clear()
    for name in args.models:
        config = whisper_config(name, args.chunk_s)
        runs = {side: [] for side in SIDES}
        for round_index in range(args.rounds):  # alternate which side goes first
            for side in SIDES if round_index % 2 == 0 else SIDES[::-1]:
                sample_load()
                runs[side].append(run_side(args, side, name))
        per_run = {side: [median(r["seconds_per_step"]) for r in runs[side]] for side in SIDES}
        pids |= {r["pid"] for side in SIDES for r in runs[side]} - {os.getpid()}
        for side in SIDES:
            matmul[side] += [r["matmul_gflops"] for r in runs[side]]
        formula = training_flops_per_example(config, args.label_length)
        ours_s, theirs_s = median(per_run["ours"]), median(per_run["torch"])
        for side, label in (("ours", "ours: jit, log-mel in step"), ("torch", "PyTorch eager, features precomputed")):
            seconds = median(per_run[side])
            rows.append(
                [
                    f"{name} ({label})",
                    seconds,
                    spread(per_run[side]),
                    args.batch_size / seconds,
                    theirs_s / seconds,
                    median([r["cores_busy"] for r in runs[side]]),
                    formula * args.batch_size / seconds,
                    side,
                ]
            )
        xla = median([r["xla_flops"] for r in runs["ours"]]) / args.batch_size
        flops_rows.append(
            [
                name,
                formula / 1e9,
                xla / 1e9,
                xla / formula,
                *[v * 3 / 1e9 for v in forward_flops(config, args.label_length).values()],
            ]
        )
        print(f"(ours vs PyTorch at {name} dims: {theirs_s / ours_s:.2f}x)", flush=True)
    peak = {side: median(matmul[side]) * 1e9 for side in SIDES}
    for row in rows:  # model FLOP/s as a fraction of jnp.dot's peak, and of the side's own framework's
        flops_per_s, side = row[-2], row[-1]
        row[-2:] = [flops_per_s / peak["ours"], peak[side] / 1e9, flops_per_s / peak[side]]
    table(
        "Training step throughput",
        [
            "model",
            "s/step (median)",
            "s/step (spread)",
            "examples/s",
            "vs PyTorch",
            "cores busy",
            "fraction of matmul peak",
            "own matmul peak GFLOP/s",
            "fraction of own peak",
        ],
        rows,
        f"Each of {args.rounds} rounds runs each side in its own fresh process (alternating which goes first; "
        f"{len(pids)} processes in all, none of them this one); "
        f"a run's figure is the median of {args.steps} timed steps after an untimed one; the table gives the median "
        f"and the range over runs. Matmul peak: jnp.dot {args.matmul_n}^3 float32 = {peak['ours'] / 1e9:.1f} GFLOP/s "
        f"(median, measured in ours' processes); own peak: the side's own framework's {args.matmul_n}^3 float32 "
        f"matmul (torch.matmul: {peak['torch'] / 1e9:.1f} GFLOP/s). Fraction of peak = training FLOPs/example x "
        f"examples/s / peak. "
        f"Cores busy = the process's CPU seconds (all threads) per wall second over the timed steps, of "
        f"{usable_cores()}. {load_range()}.",
    )
    table(
        "Training FLOPs per example (GFLOP, forward + backward = 3 x forward)",
        ["model", "formula", "XLA cost_analysis", "XLA / formula", *list(forward_flops(config, 1))],
        flops_rows,
        "XLA's count (cost_analysis of the whole step, 1 device, unsharded, attention unblocked because XLA "
        "counts a loop body once) adds log-mel, elementwise ops and the optimizer update, and knows that no "
        "gradient flows into the mel features.",
    )
    if args.profile:
        for name in args.profile_models:
            profile_in_processes(name, args)


def profile_in_processes(name: str, args):
    """The per-part table: each side's parts timed in its own processes, alternating, medians."""
    timings = {side: [] for side in SIDES}
    for round_index in range(args.profile_rounds):
        for side in SIDES if round_index % 2 == 0 else SIDES[::-1]:
            timings[side].append(run_side(args, side, name, parts=True)["parts_ms"])
    config = whisper_config(name, args.chunk_s)
    rows = []
    for part in timings["ours"][0]:
        ot = median([t[part] for t in timings["ours"]])
        torch_times = [t[part] for t in timings["torch"] if part in t]
        tt = median(torch_times) if torch_times else None
        rows.append([part, ot, "-" if tt is None else tt, "-" if tt is None else tt / ot])
    table(
        f"Where the time goes: {name} dims, batch {args.batch_size}, forward + backward per part (ms)",
        ["part", "ours (jit)", "PyTorch", "PyTorch / ours"],
        rows,
        f"Medians over {args.profile_rounds} fresh processes per side (alternating), each part timed {args.steps} times "
        f"after an untimed call. Layer rows are one layer; the whole model has {config.encoder_layers} + "
        f"{config.decoder_layers}. PyTorch attention: scaled_dot_product_attention.",
    )


# Per-part microbenchmarks: the same layer forward + backward in both frameworks.


def profile_parts(name: str, args, side: str) -> dict[str, float]:
    """Where one side's step time goes: each part timed forward + backward, in ms (medians of
    `--steps` calls after an untimed one). Only `side`'s framework runs in this process; the
    parent (`profile_in_processes`) puts the two sides' figures side by side."""
    import jax
    import jax.numpy as jnp
    import optax

    import run_scream as rs

    ours = side == "ours"
    if not ours:
        import torch
        from transformers.models.whisper import modeling_whisper as hf

        torch.set_num_threads(args.threads)
    config = whisper_config(name, args.chunk_s)
    dims = rs.WhisperDims.from_config(config)
    B, S, T, d = args.batch_size, config.max_source_positions, args.label_length, config.d_model
    rng = np.random.default_rng(0)
    mel_filters = mel_filters_for(config, args.chunk_s)
    batch = make_train_batch(config, B, T, args.chunk_s)
    features = np.asarray(rs.log_mel(batch["audio"], mel_filters))
    enc_in = rng.standard_normal((B, S, d)).astype(np.float32)
    dec_in = rng.standard_normal((B, T, d)).astype(np.float32)
    key = jax.random.PRNGKey(0)
    config._attn_implementation = "sdpa"
    heads = config.encoder_attention_heads
    q = rng.standard_normal((B, S, heads, d // heads)).astype(np.float32)
    scale = (d // heads) ** -0.5
    labels = batch["labels"]
    embedding = (0.02 * rng.standard_normal((config.vocab_size, d))).astype(np.float32)
    parts = {}  # part -> this side's zero-argument function (absent: the part is ours only)

    def jax_grad_fn(module, *inputs, input_grads=True):
        """Gradients of sum(output) w.r.t. the parameters (and the float inputs, unless input_grads=False)."""
        params = module.init(key, *inputs)

        def loss(p, *xs):
            out = module.apply(p, *xs)
            return (out[0] if isinstance(out, tuple) else out).sum()

        argnums = tuple(range(len(inputs) + 1)) if input_grads else (0,)
        grad = jax.jit(jax.value_and_grad(loss, argnums=argnums))  # the value keeps the forward pass alive
        xs = [jnp.asarray(x) for x in inputs]
        return lambda: jax.block_until_ready(grad(params, *xs))

    def torch_grad_fn(module, *inputs, call, input_grads=True):
        module.train()
        xs = [torch.tensor(x, requires_grad=input_grads) for x in inputs]

        def run():
            out = call(module, *xs)
            (out[0] if isinstance(out, tuple) else out).sum().backward()
            module.zero_grad(set_to_none=True)
            for x in xs:
                x.grad = None

        return run

    stem_part = "conv stem (2 convs, GELU, positions, LayerNorm)"
    encoder_part, decoder_part = (
        f"encoder layer (x{config.encoder_layers})",
        f"decoder layer (x{config.decoder_layers})",
    )
    attention_part = "  of which self-attention core (QK^T, softmax, AV)"
    # The core's matmuls alone, forward, over all positions at once: batched (example, head)
    # products with a 64-wide inner dimension. Beside the core's row they tell the matmul
    # libraries' share of its time from that of fusing (or not) the softmax between them.
    scores_part = f"    its QK^T matmul alone, forward ({B}x{heads} of {S}x{d // heads} . {d // heads}x{S})"
    values_part = f"    its PV matmul alone, forward ({B}x{heads} of {S}x{S} . {S}x{d // heads})"
    head_part, update_part = f"output projection ({config.vocab_size}-way) + loss", "AdamW update (all parameters)"
    if ours:
        # log-mel: ours on the device (forward only: no gradient flows into the features).
        log_mel = jax.jit(lambda audio: rs.log_mel(audio, mel_filters))
        audio = jnp.asarray(batch["audio"])
        parts["log-mel from raw audio (ours only; PyTorch gets features)"] = lambda: log_mel(audio).block_until_ready()
        parts[stem_part] = jax_grad_fn(
            rs.Encoder(dims=dataclasses.replace(dims, encoder_layers=0)), features, input_grads=False
        )
        parts[encoder_part] = jax_grad_fn(rs.EncoderLayer(dims=dims, dtype=jnp.float32, deterministic=True), enc_in)
        # value_and_grad: with grad alone XLA would drop the forward pass (its output is not needed).
        attn_grad = jax.jit(jax.value_and_grad(lambda q_, k_, v_: rs.attention(q_, k_, v_).sum(), argnums=(0, 1, 2)))
        dense_grad = jax.jit(
            jax.value_and_grad(
                lambda q_, k_, v_: jax.nn.dot_product_attention(q_, k_, v_, scale=scale).sum(), argnums=(0, 1, 2)
            )
        )
        qj = jnp.asarray(q)
        parts[attention_part] = lambda: jax.block_until_ready(attn_grad(qj, qj, qj))
        parts["  the same, unblocked (jax.nn.dot_product_attention)"] = lambda: jax.block_until_ready(
            dense_grad(qj, qj, qj)
        )
        heads_first = jnp.asarray(q.transpose(0, 2, 1, 3))
        scores_matmul = jax.jit(lambda a: jnp.einsum("bhqd,bhkd->bhqk", a, a))
        probs = jnp.asarray(rng.random((B, heads, S, S), np.float32))
        values_matmul = jax.jit(lambda p_, v_: jnp.einsum("bhqk,bhkd->bhqd", p_, v_))
        parts[scores_part] = lambda: scores_matmul(heads_first).block_until_ready()
        parts[values_part] = lambda: values_matmul(probs, heads_first).block_until_ready()

        class OurDecoderLayer(rs.nn.Module):  # training signature: no cache
            @rs.nn.compact
            def __call__(self, x, enc):
                return rs.DecoderLayer(dims=dims, dtype=jnp.float32, deterministic=True, name="layer")(x, enc, None, 0)[
                    0
                ]

        parts[decoder_part] = jax_grad_fn(OurDecoderLayer(), dec_in, enc_in)

        def our_head(embedding_, x):  # the tied output projection over the whole vocabulary + loss
            logits = jnp.einsum("btd,vd->btv", x, embedding_)
            losses, mask = rs.token_losses(logits, jnp.asarray(labels))
            return losses.sum() / mask.sum()

        head_grad = jax.jit(jax.value_and_grad(our_head, argnums=(0, 1)))
        ej, xj = jnp.asarray(embedding), jnp.asarray(dec_in)
        parts[head_part] = lambda: jax.block_until_ready(head_grad(ej, xj))

        model = rs.build_model(config)
        params = jax.jit(functools.partial(rs.init_params, model))(key)
        optimizer = optax.adamw(1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def update(p, s, g):
            updates, s = optimizer.update(g, s, p)
            return optax.apply_updates(p, updates), s

        grads = jax.tree.map(jnp.ones_like, params)
        box = {"p": params, "s": optimizer.init(params)}

        def our_update():
            box["p"], box["s"] = update(box["p"], box["s"], grads)
            jax.block_until_ready(box["p"])

        parts[update_part] = our_update
    else:

        def torch_stem(module, x):
            h = torch.nn.functional.gelu(module.conv1(x))
            h = torch.nn.functional.gelu(module.conv2(h)).permute(0, 2, 1)
            return module.layer_norm(h + module.embed_positions.weight)

        parts[stem_part] = torch_grad_fn(hf.WhisperEncoder(config), features, call=torch_stem, input_grads=False)
        parts[encoder_part] = torch_grad_fn(
            hf.WhisperEncoderLayer(config), enc_in, call=lambda m, x: m(x, attention_mask=None)
        )
        tq = torch.tensor(q.transpose(0, 2, 1, 3).copy(), requires_grad=True)

        def torch_attention():
            out = torch.nn.functional.scaled_dot_product_attention(tq, tq, tq, scale=scale)
            out.sum().backward()
            tq.grad = None

        parts[attention_part] = torch_attention
        heads_first = torch.tensor(q.transpose(0, 2, 1, 3).copy())
        probs = torch.tensor(rng.random((B, heads, S, S), np.float32))
        parts[scores_part] = lambda: torch.matmul(heads_first, heads_first.transpose(-1, -2))
        parts[values_part] = lambda: torch.matmul(probs, heads_first)
        parts[decoder_part] = torch_grad_fn(
            hf.WhisperDecoderLayer(config, layer_idx=0),
            dec_in,
            enc_in,
            call=lambda m, x, e: m(x, attention_mask=None, encoder_hidden_states=e, use_cache=False),
        )
        te, tx = torch.tensor(embedding, requires_grad=True), torch.tensor(dec_in, requires_grad=True)
        tl = torch.tensor(labels.astype(np.int64))

        def torch_head():
            logits = torch.nn.functional.linear(tx, te)
            torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tl.reshape(-1)).backward()
            te.grad = tx.grad = None

        parts[head_part] = torch_head
        torch_model = hf.WhisperForConditionalGeneration(config)
        for p in torch_model.parameters():
            p.grad = torch.ones_like(p)
        parts[update_part] = torch.optim.AdamW(torch_model.parameters(), lr=1e-5, weight_decay=0.0).step
    return {part: median(timed_each(fn, args.steps)) * 1e3 for part, fn in parts.items()}


# --- input: host pipeline ---


def speech_like(rng, seconds: float, rate: int) -> np.ndarray:
    """A waveform with speech's structure, for decode/resample costs and a realistic FLAC ratio.

    Source-filter synthesis: a glottal pulse train (pitch 90-240 Hz, drifting) through three
    formant resonators that move every syllable (4-6 per second), unvoiced noise bursts for
    fricatives, pauses between phrases, and a quiet room-noise floor."""
    from scipy.signal import lfilter

    n = int(seconds * rate)
    out = np.zeros(n)
    t = 0
    f0 = rng.uniform(90, 240)
    while t < n:
        if rng.random() < 0.12:  # a pause between phrases
            t += int(rng.uniform(0.15, 0.6) * rate)
            continue
        length = min(n - t, int(rng.uniform(0.12, 0.28) * rate))
        if rng.random() < 0.25:  # a fricative: high-band noise
            noise = rng.standard_normal(length)
            segment = lfilter([1, -0.95], [1], noise) * rng.uniform(0.02, 0.08)
        else:  # a voiced syllable: pulse train through moving formants
            f0 = float(np.clip(f0 * rng.uniform(0.9, 1.1), 80, 260))
            pitch = f0 * (1 + 0.05 * np.sin(np.linspace(0, rng.uniform(1, 3), length)))
            phase = np.cumsum(pitch / rate)
            source = np.diff(np.floor(phase), prepend=0.0) + 0.01 * rng.standard_normal(length)
            segment = source
            for formant, bandwidth in (
                (rng.uniform(300, 900), 80),
                (rng.uniform(900, 2400), 120),
                (rng.uniform(2400, 3400), 180),
            ):
                r = np.exp(-np.pi * bandwidth / rate)
                theta = 2 * np.pi * formant / rate
                segment = lfilter([1 - r], [1, -2 * r * np.cos(theta), r * r], segment)
            segment = segment / (np.abs(segment).max() + 1e-9) * rng.uniform(0.2, 0.7)
        envelope = np.sin(np.linspace(0, np.pi, length)) ** 0.5
        out[t : t + length] += segment * envelope
        t += length
    out += 0.003 * rng.standard_normal(n)
    return np.clip(out, -1, 1).astype(np.float32)


def flac_bytes(waveform: np.ndarray, rate: int) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, np.round(waveform * 32767).astype(np.int16), rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


TRANSCRIPT = (
    "Det var en gang en liten gutt som bodde ved havet, og hver morgen gikk han ned til "
    "stranden for å se på båtene."
)  # 118 UTF-8 bytes: 122 label tokens with the byte-level tokenizer


def make_clips(num_clips: int, seconds: float, rate: int, seed: int = 0) -> list[dict]:
    rows = []
    for index in range(num_clips):
        rng = np.random.default_rng([seed, rate, index])
        rows.append(
            {
                "id": f"clip-{index:04d}",
                "text": TRANSCRIPT,
                "audio": {"bytes": flac_bytes(speech_like(rng, seconds, rate), rate), "path": f"clip-{index:04d}.flac"},
            }
        )
    return rows


def numpy_feature_extractor(**kwargs):
    """WhisperFeatureExtractor as transformers runs it where torch is not installed (numpy STFT)."""
    from transformers import WhisperFeatureExtractor

    class NumpyWhisperFeatureExtractor(WhisperFeatureExtractor):
        def _torch_extract_fbank_features(self, waveform, device="cpu"):
            return self._np_extract_fbank_features(waveform, device)

    return NumpyWhisperFeatureExtractor(**kwargs)


def with_host_log_mel(prepare, feature_extractor):
    """prepare_example that also computes log-mel on the host (the 2023 way, for comparison)."""

    def prepare_with_features(row):
        example, reason = prepare(row)
        if example is not None:
            example["input_features"] = feature_extractor(
                example["audio"], sampling_rate=feature_extractor.sampling_rate, return_tensors="np"
            ).input_features[0]
        return example, reason

    return prepare_with_features


def with_host_features(collate_fn, feature_extractor):
    """collate that ships the host's log-mel features instead of the waveform."""

    def collate_with_features(examples):
        batch = collate_fn(examples)
        frames = feature_extractor.n_samples // feature_extractor.hop_length
        features = np.zeros((len(batch["audio"]), feature_extractor.feature_size, frames), np.float32)
        for row, example in enumerate(examples):
            features[row] = example["input_features"]
        del batch["audio"]
        batch["input_features"] = features
        return batch

    return collate_with_features


def bench_input(args):
    import soundfile
    import soxr
    from transformers import WhisperFeatureExtractor

    import make_demo_dataset
    import run_scream as rs

    try:  # transformers' extractor computes with torch when torch is installed: one thread per core
        import torch

        torch.set_num_threads(1)
        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    print(f"## input: host pipeline, examples/s per core ({machine_line()})")
    work = Path(tempfile.mkdtemp(prefix="bench_input_"))
    tokenizer = make_demo_dataset.write_tokenizer(work / "tokenizer")
    tokenizer.set_prefix_tokens(language="no", task="transcribe", predict_timestamps=False)
    n_samples = int(args.chunk_s * SAMPLING_RATE)
    extractors = {"numpy": numpy_feature_extractor(feature_size=80, chunk_length=int(args.chunk_s))}
    if torch_version:
        extractors["torch"] = WhisperFeatureExtractor(feature_size=80, chunk_length=int(args.chunk_s))
    audio_settings = rs.AudioSettings(SAMPLING_RATE, n_samples, 0.0, args.chunk_s)
    text_settings = rs.TextSettings(False, False, args.label_length)
    prepare = functools.partial(
        rs.prepare_example,
        tokenizer=tokenizer,
        audio_settings=audio_settings,
        text_settings=text_settings,
    )
    collate = functools.partial(
        rs.collate,
        batch_size=args.batch_size,
        n_samples=n_samples,
        max_label_length=args.label_length,
        pad_token_id=tokenizer.eos_token_id,
    )
    pipelines = {"ours": (prepare, collate)}
    for backend, extractor in extractors.items():
        pipelines[f"host log-mel ({backend})"] = (
            with_host_log_mel(prepare, extractor),
            with_host_features(collate, extractor),
        )
    titles = {
        "ours": "ours: decode + resample + tokenize + collate (log-mel on device)",
        "host log-mel (numpy)": "host log-mel: the same + WhisperFeatureExtractor, numpy (no torch installed)",
        "host log-mel (torch)": f"host log-mel: the same + WhisperFeatureExtractor, torch {torch_version} backend, 1 thread",
    }

    def per_example_s(rows, pipeline):
        prepare_fn, collate_fn = pipeline
        start = time.perf_counter()
        for i in range(0, len(rows), args.batch_size):
            examples = []
            for row in rows[i : i + args.batch_size]:
                example, reason = prepare_fn(row)
                assert reason is None, reason
                examples.append(example)
            collate_fn(examples)
        return (time.perf_counter() - start) / len(rows)

    def parts_s(rows):
        """Seconds per example of each step, over the clips."""
        spent = dict.fromkeys(["decode", "resample", "tokenize", "collate", *[f"log-mel {b}" for b in extractors]], 0.0)
        examples = []
        for row in rows:
            start = time.perf_counter()
            samples, source_rate = soundfile.read(io.BytesIO(row["audio"]["bytes"]), dtype="float32", always_2d=True)
            samples = samples.mean(axis=1)
            spent["decode"] += time.perf_counter() - start
            start = time.perf_counter()
            if source_rate != SAMPLING_RATE:
                samples = soxr.resample(samples, source_rate, SAMPLING_RATE).astype(np.float32)
            spent["resample"] += time.perf_counter() - start
            start = time.perf_counter()
            tokens = np.asarray(tokenizer(row["text"]).input_ids, np.int32)
            spent["tokenize"] += time.perf_counter() - start
            for backend, extractor in extractors.items():
                start = time.perf_counter()
                extractor(samples, sampling_rate=SAMPLING_RATE, return_tensors="np")
                spent[f"log-mel {backend}"] += time.perf_counter() - start
            examples.append({"audio": samples, "tokens": tokens})
        start = time.perf_counter()
        for i in range(0, len(examples), args.batch_size):
            collate(examples[i : i + args.batch_size])
        spent["collate"] += time.perf_counter() - start
        return {k: v / len(rows) for k, v in spent.items()}

    rows_out, sizes, clips = [], {}, {}
    for rate in args.source_rates:
        clips[rate] = make_clips(args.num_clips, args.chunk_s, rate)
        sizes[rate] = median([len(c["audio"]["bytes"]) for c in clips[rate]]) / (args.chunk_s * rate * 2)
    LOAD_SAMPLES.clear()
    breakdown_rows = []
    for rate in args.source_rates:
        timings = {name: [] for name in pipelines}
        parts = []
        for _ in range(args.rounds):  # alternate the pipelines, then the parts
            sample_load()
            for name, pipeline in pipelines.items():
                timings[name].append(per_example_s(clips[rate], pipeline))
            parts.append(parts_s(clips[rate]))
        ours_s = median(timings["ours"])
        for name, values in timings.items():
            seconds = median(values)
            rows_out.append(
                [
                    titles[name],
                    f"{rate / 1000:g} kHz",
                    seconds * 1e3,
                    1 / seconds,
                    1.0 if name == "ours" else seconds / ours_s,
                ]
            )
        breakdown_rows.append([f"{rate / 1000:g} kHz", *[median([p[k] for p in parts]) * 1e3 for k in parts[0]]])
    table(
        f"Host work per {args.chunk_s:g} s FLAC clip, one thread",
        ["pipeline", "source", "ms/example", "examples/s per core", "time vs ours"],
        rows_out,
        f"{args.num_clips} clips of synthetic speech (pulse train through moving formants, fricatives, pauses), "
        "16-bit mono FLAC in memory; FLAC size / raw PCM: "
        + ", ".join(f"{r / 1000:g} kHz {sizes[r]:.2f}" for r in args.source_rates)
        + f". Medians of {args.rounds} alternating passes over all clips; batches of {args.batch_size}, labels padded "
        f"to {args.label_length}. {load_range()}.",
    )
    table(
        "Where the host time goes (ms per example, one thread)",
        ["source", *list(parts_s(clips[args.source_rates[0]][:1]))],
        breakdown_rows,
    )

    # Scaling: SpeechBatches over a local parquet dataset, worker threads 1, 2, ...
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    data_dir = work / "data" / "data"
    data_dir.mkdir(parents=True)
    schema = make_demo_dataset.FEATURES.arrow_schema
    table_rows = [
        {"id": c["id"], "audio": c["audio"], "text": c["text"], "source": "bench"} for c in clips[args.source_rates[0]]
    ]
    pq.write_table(
        pa.Table.from_pylist(table_rows, schema=schema), data_dir / "train-00000-of-00001.parquet", row_group_size=8
    )
    data_args = rs.DataArguments(dataset_name=str(work / "data"), shuffle_buffer_size=0)
    datasets.disable_progress_bars()

    def examples_per_s(pipeline, workers):
        prepare_fn, collate_fn = pipeline
        make_source = functools.partial(
            rs.load_source,
            data_args,
            "train",
        )
        batches = rs.SpeechBatches(
            lambda epoch: make_source(epoch=epoch),
            prepare_fn,
            batch_size=args.batch_size,
            collate_fn=collate_fn,
            repeat=True,
            num_workers=workers,
            prefetch_batches=4,
        )
        iterator = iter(batches)
        next(iterator)  # start-up (dataset opening, thread pool) is not throughput
        start = time.perf_counter()
        count = 0
        for _ in range(args.scaling_batches):
            count += len(next(iterator)[1])
        elapsed = time.perf_counter() - start
        iterator.close()
        return count / elapsed

    examples_per_s(pipelines["ours"], 1)  # builds datasets' cache of the parquet file
    scaling = {(name, w): [] for name in pipelines for w in args.workers}
    LOAD_SAMPLES.clear()
    for _ in range(args.rounds):
        sample_load()
        for workers in args.workers:
            for name, pipeline in pipelines.items():
                scaling[(name, workers)].append(examples_per_s(pipeline, workers))
    rows_out = []
    for (pipeline, workers), values in scaling.items():
        eps = median(values)
        rows_out.append([pipeline, workers, eps, eps / min(workers, usable_cores())])
    table(
        f"SpeechBatches over a local parquet dataset ({args.source_rates[0] / 1000:g} kHz FLAC), "
        "--preprocessing_num_workers threads",
        ["pipeline", "workers", "examples/s", "examples/s per core used"],
        rows_out,
        f"{args.scaling_batches} batches of {args.batch_size} after the first, medians of {args.rounds} "
        f"alternating runs; {usable_cores()} cores usable. {load_range()}.",
    )


# --- compile ---


def bench_compile(args):
    import jax

    import run_scream as rs

    print(f"## compile: train step lower + compile, unrolled vs scan_layers ({machine_line()})")
    rows = []
    for name in args.models:
        config = whisper_config(name, args.chunk_s)
        mel_filters = mel_filters_for(config, args.chunk_s)
        times = {False: [], True: []}
        lower_times = {False: [], True: []}
        for _ in range(args.rounds if name not in args.single_round_models else 1):
            for scan in (False, True):
                sample_load()
                step, _ = build_our_step(config, mel_filters, dtype=args.dtype, scan_layers=scan, remat=args.remat)
                batch = rs.abstract_batch(
                    args.batch_size,
                    n_samples=int(args.chunk_s * SAMPLING_RATE),
                    max_label_length=args.label_length,
                    sharding=step.data_sharding,
                )
                start = time.perf_counter()
                lowered = step.fn.lower(step.abstract_state, batch)
                lower_times[scan].append(time.perf_counter() - start)
                lowered.compile()
                times[scan].append(time.perf_counter() - start)
                del lowered
        unrolled, scanned = median(times[False]), median(times[True])
        rows.append(
            [
                name,
                f"{config.encoder_layers}+{config.decoder_layers}",
                median(lower_times[False]),
                unrolled,
                median(lower_times[True]),
                scanned,
                unrolled / scanned,
            ]
        )
    table(
        f"Train step compile time on CPU (s): {args.dtype}, remat {args.remat}, batch {args.batch_size}",
        [
            "model",
            "layers",
            "unrolled: lower",
            "unrolled: lower + compile",
            "scan: lower",
            "scan: lower + compile",
            "scan speed-up",
        ],
        rows,
        f"Abstract inputs (jax.ShapeDtypeStruct), no execution; jax {jax.__version__}. Medians of alternating "
        f"rounds ({args.rounds} for small models, 1 for {', '.join(args.single_round_models) or 'none'}). {load_range()}.",
    )


# --- generate: greedy vs beam search ---


def bench_generate(args):
    """run_scream.generate (as eval_step runs it) at each --num_beams: seconds per example and the
    ratio to greedy. <|endoftext|> is suppressed, so every variant decodes all --max_new_tokens
    (random weights would otherwise end at random lengths): the ratio is per decoded token."""
    import jax
    import jax.numpy as jnp

    import run_scream as rs

    print(f"## generate: eval decoding, greedy vs beam search ({machine_line()})")
    beam_counts = [1] + [n for n in args.num_beams if n != 1]  # greedy is the reference row
    rows = []
    for name in args.models:
        config = whisper_config(name, args.chunk_s)
        model = rs.build_model(config, dtype=args.dtype)
        params = jax.jit(functools.partial(rs.init_params, model))(jax.random.PRNGKey(0))
        rng = np.random.default_rng(0)
        frames = 2 * config.max_source_positions
        features = jnp.asarray(rng.standard_normal((args.batch_size, config.num_mel_bins, frames)), jnp.float32)
        prefix = [config.decoder_start_token_id, 1, 2, 3]  # <|startoftranscript|> and three stand-ins
        prompt_ids = jnp.asarray(np.tile(prefix, (args.batch_size, 1)), jnp.int32)
        compiled, compile_s, times = {}, {}, {n: [] for n in beam_counts}
        for beams in beam_counts:
            settings = rs.DecodingSettings(
                prompt_length=len(prefix),
                max_new_tokens=args.max_new_tokens,
                eos_token_id=config.eos_token_id,
                pad_token_id=config.pad_token_id,
                suppress_tokens=(config.eos_token_id,),
                num_beams=beams,
            )
            start = time.perf_counter()
            compiled[beams] = (
                jax.jit(functools.partial(rs.generate, model, settings=settings))
                .lower(params, features, prompt_ids)
                .compile()
            )
            compile_s[beams] = time.perf_counter() - start
        for _ in range(args.rounds):
            for beams in beam_counts:
                sample_load()
                start = time.perf_counter()
                compiled[beams](params, features, prompt_ids).block_until_ready()
                times[beams].append(time.perf_counter() - start)
        greedy = median(times[1]) / args.batch_size
        for beams in beam_counts:
            per_example = median(times[beams]) / args.batch_size
            # Beam search repeats the self-attention cache per beam; the cross-attention cache stays one
            # per row, shared by its beams.
            row_cache = rs.empty_cache(
                model.dims, args.batch_size, len(prefix) + args.max_new_tokens, jnp.dtype(args.dtype)
            )
            cache_bytes = sum(
                x.size * x.dtype.itemsize * (beams if name.startswith("self_") else 1) for name, x in row_cache.items()
            )
            rows.append([name, beams, per_example, per_example / greedy, compile_s[beams], cache_bytes / 2**20])
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


def tpu_compile(
    config,
    mel_filters,
    devices,
    *,
    per_chip_batch: int,
    fsdp_size: int,
    remat: str,
    scan: bool,
    dtype: str,
    label_length: int,
    chunk_s: float,
    param_dtype: str = "float32",
    adam_mu_dtype: str = "float32",
) -> dict:
    """Compile run_scream's train step for the slice; {'bytes', 'fits', 'compile_s'} (bytes None: did not fit)."""
    import run_scream as rs

    step, _ = build_our_step(
        config,
        mel_filters,
        dtype=dtype,
        scan_layers=scan,
        remat=remat,
        devices=devices,
        fsdp_size=fsdp_size,
        param_dtype=param_dtype,
        adam_mu_dtype=adam_mu_dtype,
    )
    batch = rs.abstract_batch(
        per_chip_batch * len(devices),
        n_samples=int(chunk_s * SAMPLING_RATE),
        max_label_length=label_length,
        sharding=step.data_sharding,
    )
    start = time.perf_counter()
    try:
        compiled = step.fn.lower(step.abstract_state, batch).compile()
    except Exception as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return {"bytes": None, "fits": False, "compile_s": time.perf_counter() - start}
    total = rs.compiled_memory(compiled)["total_bytes"]
    return {"bytes": total, "fits": total <= rs.TPU_V4_USABLE_BYTES, "compile_s": time.perf_counter() - start}


def largest_fitting_batch(compile_at, seed_batch: int, max_batch: int, known: dict) -> int:
    """Largest per-chip batch that fits, from few compiles: memory grows about linearly with the
    batch, so extrapolate from two points, then check the guess and the batch above it (and
    bisect if the guess was wrong). `known` maps batch -> compile result and is filled in."""
    import run_scream as rs

    def fits(batch):
        if batch not in known:
            known[batch] = compile_at(batch)
        return known[batch]["fits"]

    lo, hi = 0, max_batch + 1  # lo fits (0: trivially), hi does not
    if fits(seed_batch):
        lo = seed_batch
        probe = min(max_batch, 2 * seed_batch)
        if probe > lo:
            if fits(probe):
                lo = probe
            else:
                hi = probe
        a, b = known[seed_batch]["bytes"], known.get(probe, {}).get("bytes")
        if b and probe != seed_batch and b > a:
            guess = seed_batch + int((rs.TPU_V4_USABLE_BYTES - a) / ((b - a) / (probe - seed_batch)))
            guess = max(lo + 1, min(hi - 1, guess))
            if guess > lo and guess < hi:
                if fits(guess):
                    lo = guess
                    if guess + 1 < hi:
                        if fits(guess + 1):
                            lo = guess + 1
                        else:
                            hi = guess + 1
                else:
                    hi = guess
    else:
        hi = seed_batch
    while hi - lo > 1:  # bisect what is left (rarely more than a step or two)
        middle = (lo + hi) // 2
        if fits(middle):
            lo = middle
        else:
            hi = middle
    return lo


def bench_tpu(args):
    import jax

    import run_scream as rs

    print(f"## tpu: compile-only for TPU v4 slices from this CPU ({machine_line()})")
    print(f"jax {jax.__version__}; usable HBM per v4 chip taken as {rs.TPU_V4_USABLE_BYTES / 2**30:.2f} GiB")
    rows, blocked_rows = [], []
    for spec in args.plans:
        name, slice_name = spec.split("@")
        devices = rs.tpu_topology_devices(slice_name)
        config = whisper_config(name, args.chunk_s)
        mel_filters = mel_filters_for(config, args.chunk_s)
        seed_batch = args.seed_batch.get(name, 8)
        scan = name in args.scan_models
        for fsdp in args.fsdp:
            fsdp_size = len(devices) if fsdp == "all" else int(fsdp)
            for remat, state in itertools.product(args.remats, args.state_dtypes):
                param_dtype, adam_mu_dtype = state.split("/")
                known: dict = {}
                compile_at = functools.partial(
                    tpu_compile,
                    config,
                    mel_filters,
                    devices,
                    fsdp_size=fsdp_size,
                    remat=remat,
                    scan=scan,
                    dtype=args.dtype,
                    label_length=args.label_length,
                    chunk_s=args.chunk_s,
                    param_dtype=param_dtype,
                    adam_mu_dtype=adam_mu_dtype,
                )
                start = time.perf_counter()
                best = largest_fitting_batch(lambda b: compile_at(per_chip_batch=b), seed_batch, args.max_batch, known)
                elapsed = time.perf_counter() - start
                at_seed = known[seed_batch]
                at_best = known.get(best, {}).get("bytes")
                rows.append(
                    [
                        name,
                        f"{slice_name} ({len(devices)} chips)",
                        "data parallel" if fsdp_size == 1 else f"FSDP {fsdp_size}",
                        remat,
                        "on" if scan else "off",
                        state,
                        seed_batch,
                        "does not fit" if at_seed["bytes"] is None else at_seed["bytes"] / 2**30,
                        "yes" if at_seed["fits"] else "no",
                        "none" if not best else f">= {best} (search cap)" if best == args.max_batch else best,
                        "-" if not at_best else at_best / 2**30,
                        ", ".join(f"{b}:{'fits' if r['fits'] else 'no'}" for b, r in sorted(known.items())),
                        elapsed,
                    ]
                )
                print("  progress: | " + " | ".join(map(str, rows[-1])) + " |", flush=True)  # a long run loses nothing
                if (
                    name in args.compare_unblocked
                    and fsdp_size == len(devices)
                    and remat in args.unblocked_remats
                    and best
                ):  # at the largest batch that fits blocked
                    with attention_unblocked():
                        dense = compile_at(per_chip_batch=best)
                    blocked_rows.append(
                        [
                            name,
                            f"{slice_name} ({len(devices)} chips)",
                            f"FSDP {fsdp_size}",
                            remat,
                            best,
                            gib_or_none(known[best]["bytes"]),
                            gib_or_none(dense["bytes"]),
                        ]
                    )
                    print("  progress: | " + " | ".join(map(str, blocked_rows[-1])) + " |", flush=True)
    table(
        f"Per-chip memory of the real train step, compiled for TPU v4 ({args.dtype}, {args.chunk_s:g} s audio, "
        f"{args.label_length}-token labels)",
        [
            "model",
            "slice",
            "sharding",
            "remat",
            "scan",
            "state dtype (params/mu)",
            "seed batch/chip",
            "GiB/chip at seed batch",
            "fits",
            "largest batch/chip",
            "GiB/chip there",
            "batches compiled",
            "compile s",
        ],
        rows,
        "memory = compiled.memory_analysis(): arguments + outputs + temporaries - aliased (donated) buffers. "
        f"Fits: no RESOURCE_EXHAUSTED and at most {rs.TPU_V4_USABLE_BYTES / 2**30:.2f} GiB; searched up to "
        f"{args.max_batch} per chip.",
    )
    if blocked_rows:
        table(
            "Encoder attention in query blocks (run_scream.blocked_attention) vs all at once: GiB per chip",
            ["model", "slice", "sharding", "remat", "batch/chip", "blocked (as trained)", "unblocked"],
            blocked_rows,
            "'does not fit': RESOURCE_EXHAUSTED at compile time.",
        )


def gib_or_none(value):
    return "does not fit" if value is None else value / 2**30


# --- main ---


def parse_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="our jitted train step vs PyTorch + AdamW on this CPU")
    train.add_argument("--models", type=parse_list, default=["tiny", "base"])
    train.add_argument("--batch_size", type=int, default=8)
    train.add_argument("--chunk_s", type=float, default=30.0)
    train.add_argument("--label_length", type=int, default=128)
    train.add_argument("--rounds", type=int, default=5, help="alternating runs of each side")
    train.add_argument("--steps", type=int, default=2, help="steps per run")
    train.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (XLA uses its default)")
    train.add_argument("--matmul_n", type=int, default=2048)
    train.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the parts (conv stem, layers, attention, output projection, optimizer)",
    )
    train.add_argument("--profile_models", type=parse_list, default=["tiny"])
    train.add_argument("--profile_rounds", type=int, default=2, help="fresh processes per side for the part table")

    side = commands.add_parser("train-side", help="one side of `train`, in its own process (used by `train`)")
    side.add_argument("--side", choices=SIDES, required=True)
    side.add_argument("--model", required=True)
    side.add_argument("--parts", action="store_true", help="time the model part by part instead of the whole step")
    for name in ("batch_size", "label_length", "steps", "threads", "matmul_n", "rounds"):
        side.add_argument(f"--{name}", type=int, required=True)
    side.add_argument("--chunk_s", type=float, required=True)

    inputs = commands.add_parser("input", help="host pipeline examples/s per core")
    inputs.add_argument("--num_clips", type=int, default=32)
    inputs.add_argument("--chunk_s", type=float, default=30.0)
    inputs.add_argument("--source_rates", type=lambda s: [int(x) for x in parse_list(s)], default=[16000, 48000])
    inputs.add_argument("--batch_size", type=int, default=8)
    inputs.add_argument("--label_length", type=int, default=128)
    inputs.add_argument("--rounds", type=int, default=3)
    inputs.add_argument("--workers", type=lambda s: [int(x) for x in parse_list(s)], default=[1, 2])
    inputs.add_argument("--scaling_batches", type=int, default=8)

    compile_ = commands.add_parser("compile", help="train step compile time, unrolled vs scan_layers")
    compile_.add_argument("--models", type=parse_list, default=["tiny", "large-v2"])
    compile_.add_argument(
        "--single_round_models",
        type=parse_list,
        default=["large-v2"],
        help="models compiled once per variant (minutes each)",
    )
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
    tpu.add_argument(
        "--seed_batch",
        type=lambda s: {k: int(v) for k, v in (x.split("=") for x in parse_list(s))},
        default={"large-v2": 5, "tiny": 32},
        help="per-chip batch of the 2023 runs, e.g. large-v2=5,tiny=32",
    )
    tpu.add_argument("--max_batch", type=int, default=64)
    tpu.add_argument(
        "--compare_unblocked",
        type=parse_list,
        default=["large-v2"],
        help="models also compiled with attention unblocked (FSDP over all chips, seed batch)",
    )
    tpu.add_argument("--unblocked_remats", type=parse_list, default=["none", "dots"])
    tpu.add_argument(
        "--state_dtypes",
        type=parse_list,
        default=["float32/float32"],
        help="train-state dtypes as params/mu (run_scream's --param_dtype/--adam_mu_dtype; the second moment "
        "follows the params), e.g. float32/float32,float32/bfloat16,bfloat16/bfloat16",
    )
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
        sub.add_argument("--tiny", action="store_true", help="toy sizes that finish in seconds (for the tests)")
    args = parser.parse_args(argv)
    if getattr(args, "tiny", False):  # the same code paths, toy sizes
        toy = {
            "train": dict(
                models=["toy"],
                batch_size=2,
                chunk_s=3.0,
                label_length=16,
                rounds=1,
                steps=1,
                matmul_n=256,
                profile_models=["toy"],
                profile_rounds=1,
            ),
            "input": dict(
                num_clips=4,
                chunk_s=2.0,
                source_rates=[16000, 48000],
                batch_size=2,
                label_length=128,
                rounds=1,
                workers=[1, 2],
                scaling_batches=2,
            ),
            "compile": dict(models=["toy"], single_round_models=[], rounds=1, chunk_s=3.0, label_length=16),
            "tpu": dict(
                plans=["toy@v4-8"],
                scan_models=["toy"],
                seed_batch={"toy": 2},
                max_batch=2,
                chunk_s=3.0,
                label_length=16,
                remats=["dots"],
                state_dtypes=["float32/float32", "bfloat16/bfloat16"],
                compare_unblocked=[],
            ),  # one compile per sharding and state dtype
            "generate": dict(
                models=["toy"], num_beams=[1, 2, 3], batch_size=2, max_new_tokens=6, chunk_s=3.0, rounds=1
            ),
        }[args.command]
        for key, value in toy.items():
            setattr(args, key, value)
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
