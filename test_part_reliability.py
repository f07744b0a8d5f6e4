"""Reliability (issue 7): faults and bad input thrown at run_scream.py end to end.

Every fault test runs the real script in a subprocess (so kill -9, SIGTERM and exit codes are
real) on a tiny from-scratch model with 1 s windows, and compares the exported model.safetensors
bit for bit with one uninterrupted run of the same command: an example repeated or skipped, a
wrong checkpoint restored or a lost optimizer step would all change the parameters. The
subprocesses share a JAX compilation cache, so only the first run pays for compiling the step.
Every wait has a timeout, so a hang fails the test instead of blocking the suite.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import functools
import http.server
import itertools
import json
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent
RELIABILITY_NUM_TRAIN = 40  # 5 batches of 8 per epoch: 12 steps cross two epoch boundaries
RELIABILITY_NUM_STEPS = 12
RELIABILITY_SAVE_STEPS = 3
RELIABILITY_TIMEOUT_S = 300  # a hang guard for each subprocess, not a performance bound


# --- fixtures and helpers ---


@pytest.fixture(scope="session")
def reliability_demo(tmp_path_factory):
    """The demo's tokenizer, tiny model (1 s windows) and a 40 + 8 example dataset in 4 train shards."""
    import make_demo_dataset

    root = tmp_path_factory.mktemp("reliability_demo")
    make_demo_dataset.main(["--output_dir", str(root), "--num_train", str(RELIABILITY_NUM_TRAIN), "--num_eval", "8",
                            "--chunk_length_s", "1", "--num_train_shards", "4"])
    return root


@pytest.fixture(scope="session")
def reliability_env(tmp_path_factory):
    """Environment of every subprocess: 1 CPU device, offline, a shared compilation cache."""
    root = tmp_path_factory.mktemp("reliability_env")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", HF_HOME=str(root / "hf_home"), HF_HUB_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.pop("HF_ENDPOINT", None)
    return env


def train_flags(demo: Path, output_dir: Path, *extra: str, dataset: str | None = None, steps: int = RELIABILITY_NUM_STEPS):
    """The one command every fault test runs (streaming, as on a pod; no shuffle buffer, so the
    order of examples is the files' own and a run is reproducible example for example)."""
    return ["--config_name", str(demo / "model"), "--dataset_name", dataset or str(demo / "data"), "--streaming",
            "--output_dir", str(output_dir), "--do_train", "--train_batch_size", "8", "--num_train_steps", str(steps),
            "--learning_rate", "3e-3", "--warmup_steps", "2", "--max_label_length", "40", "--logging_steps", "1",
            "--save_steps", str(RELIABILITY_SAVE_STEPS), "--save_total_limit", "10", "--shuffle_buffer_size", "0",
            "--preprocessing_num_workers", "2", "--report_to", "none", *extra]


def launch(env: dict, flags: list[str], log_dir: Path, name: str, script: str | None = None) -> subprocess.Popen:
    """Start run_scream.py (or a wrapper script around its main) with stdout/stderr in log_dir."""
    log_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-c", script] if script else [sys.executable, str(REPO / "run_scream.py")]
    with open(log_dir / f"{name}.out", "w") as out, open(log_dir / f"{name}.err", "w") as err:
        return subprocess.Popen(command + flags, env=env, cwd=REPO, stdout=out, stderr=err,
                                start_new_session=True)


def finish(process: subprocess.Popen, log_dir: Path, name: str, timeout: float = RELIABILITY_TIMEOUT_S):
    """Wait (bounded) and return (exit code, stdout, stderr)."""
    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"{name} did not finish within {timeout} s:\n{(log_dir / f'{name}.err').read_text()[-3000:]}")
    return returncode, (log_dir / f"{name}.out").read_text(), (log_dir / f"{name}.err").read_text()


def reliability_run(env: dict, flags: list[str], log_dir: Path, name: str, script: str | None = None):
    return finish(launch(env, flags, log_dir, name, script), log_dir, name)


def logged_steps(output_dir: Path) -> list[int]:
    path = output_dir / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):  # a line being written
            pass
    return steps


def wait_for_step(process: subprocess.Popen, output_dir: Path, step: int, timeout: float = RELIABILITY_TIMEOUT_S):
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


def assert_same_exported_params(output_dir: Path, reference_dir: Path):
    from safetensors.numpy import load_file

    got, want = load_file(output_dir / "model.safetensors"), load_file(reference_dir / "model.safetensors")
    assert sorted(got) == sorted(want)
    different = [name for name in want if not np.array_equal(got[name], want[name])]
    assert not different, f"{len(different)} of {len(want)} tensors differ from the uninterrupted run: {different[:5]}"


def resumed_step(stdout: str) -> int | None:
    match = re.search(r"^resumed from .* \(step (\d+)\)$", stdout, re.MULTILINE)
    return int(match.group(1)) if match else None


@pytest.fixture(scope="session")
def reliability_reference(reliability_demo, reliability_env, tmp_path_factory):
    """The uninterrupted run every fault test must reproduce exactly."""
    root = tmp_path_factory.mktemp("reliability_reference")
    returncode, stdout, stderr = reliability_run(reliability_env, train_flags(reliability_demo, root / "run"), root, "run")
    assert returncode == 0, stderr[-3000:]
    assert resumed_step(stdout) is None
    assert complete_checkpoints(root / "run") == [3, 6, 9, 12]
    return root / "run"


def batch_ids(demo: Path, num_batches: int, state: dict | None = None) -> list[list[str]]:
    """Example ids of the next `num_batches` training batches, as the run reads them (same source,
    same order), starting fresh or from a checkpoint's data state."""
    import run_scream

    data_args = run_scream.DataArguments(dataset_name=str(demo / "data"), streaming=True, shuffle_buffer_size=0)
    make_source = functools.partial(run_scream.load_source, data_args, "train", process_index=0, process_count=1,
                                    seed=0, shuffle=True, max_samples=None)
    batches = run_scream.SpeechBatches(lambda epoch: make_source(epoch=epoch), lambda row: ({"id": row["id"]}, None),
                                       batch_size=8, collate_fn=lambda examples: None, repeat=True, num_workers=1,
                                       prefetch_batches=1, state=state)
    iterator = iter(batches)
    try:
        return [[example["id"] for example in examples] for _, examples in itertools.islice(iterator, num_batches)]
    finally:
        iterator.close()


# --- faults ---


def test_reliability_kill_9_at_a_random_step_resumes_exactly(reliability_demo, reliability_env,
                                                             reliability_reference, tmp_path):
    kill_after = random.Random(7).randint(5, 8)  # seeded: the same step on every run of the suite
    out = tmp_path / "run"
    process = launch(reliability_env, train_flags(reliability_demo, out), tmp_path, "first")
    wait_for_step(process, out, kill_after)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    committed = complete_checkpoints(out)
    assert committed and committed[-1] < RELIABILITY_NUM_STEPS and not (out / "model.safetensors").exists(), committed

    returncode, stdout, stderr = reliability_run(reliability_env, train_flags(reliability_demo, out), tmp_path, "relaunch")
    assert returncode == 0, stderr[-3000:]
    assert resumed_step(stdout) == committed[-1]  # the last complete checkpoint
    assert_same_exported_params(out, reliability_reference)

    # Example ids across that real checkpoint's boundary: the data state it stored continues with
    # exactly the batches an uninterrupted reader gives next, and 12 batches read every example
    # once per epoch.
    meta = json.loads((out / "checkpoints" / str(committed[-1]) / "meta" / "metadata").read_text())
    assert meta["step"] == committed[-1] and meta["examples_seen"] == 8 * committed[-1]
    straight = batch_ids(reliability_demo, RELIABILITY_NUM_STEPS)
    assert batch_ids(reliability_demo, RELIABILITY_NUM_STEPS - committed[-1], meta["data_states"][0]) == straight[committed[-1]:]
    read = [example_id for batch in straight for example_id in batch]
    every_id = [f"train-{i:06d}" for i in range(RELIABILITY_NUM_TRAIN)]
    assert read[:RELIABILITY_NUM_TRAIN] == every_id and read[RELIABILITY_NUM_TRAIN:2 * RELIABILITY_NUM_TRAIN] == every_id
    assert read[2 * RELIABILITY_NUM_TRAIN:] == every_id[:8 * RELIABILITY_NUM_STEPS - 2 * RELIABILITY_NUM_TRAIN]


def test_reliability_kill_9_while_writing_a_checkpoint_uses_the_previous_one(reliability_demo, reliability_env,
                                                                              reliability_reference, tmp_path):
    """A process killed while orbax writes step 9 leaves checkpoints/9.orbax-checkpoint-tmp (orbax
    writes there and renames on commit) next to the committed 3 and 6, and metrics up to step 9.
    That state is built here from the reference run's own files, deterministically."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(reliability_reference / "scream_config.json", out)
    (out / "checkpoints").mkdir()
    for step in (3, 6):
        shutil.copytree(reliability_reference / "checkpoints" / str(step), out / "checkpoints" / str(step))
    partial = out / "checkpoints" / "9.orbax-checkpoint-tmp"
    shutil.copytree(reliability_reference / "checkpoints" / "9", partial)
    shutil.rmtree(partial / "meta")  # not written yet
    for path in sorted(partial.rglob("*")):
        if path.is_file() and (path.name == "commit_success.txt" or "manifest" in path.name):
            path.unlink()
    data_files = sorted(p for p in (partial / "state").rglob("*") if p.is_file())
    for path in data_files[len(data_files) // 2:]:  # half the array data on disk
        path.unlink()
    lines = (reliability_reference / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:9]))

    returncode, stdout, stderr = reliability_run(reliability_env, train_flags(reliability_demo, out), tmp_path, "relaunch")
    assert returncode == 0, stderr[-3000:]
    assert resumed_step(stdout) == 6
    assert_same_exported_params(out, reliability_reference)
    assert complete_checkpoints(out) == [3, 6, 9, 12] and not partial.exists()


def test_reliability_sigterm_checkpoints_at_the_next_step_and_resumes(reliability_demo, reliability_env,
                                                                      reliability_reference, tmp_path):
    out = tmp_path / "run"
    process = launch(reliability_env, train_flags(reliability_demo, out), tmp_path, "first")
    wait_for_step(process, out, 4)
    process.send_signal(signal.SIGTERM)
    returncode, stdout, stderr = finish(process, tmp_path, "first")
    assert returncode == 0, stderr[-3000:]
    match = re.search(r"stopped by SIGTERM after step (\d+); checkpoint saved, relaunch to resume", stdout)
    assert match, stdout[-2000:]
    stopped = int(match.group(1))
    assert 4 < stopped < RELIABILITY_NUM_STEPS and complete_checkpoints(out)[-1] == stopped
    assert max(logged_steps(out)) == stopped and not (out / "model.safetensors").exists()

    returncode, stdout, stderr = reliability_run(reliability_env, train_flags(reliability_demo, out), tmp_path, "relaunch")
    assert returncode == 0, stderr[-3000:]
    assert resumed_step(stdout) == stopped
    assert_same_exported_params(out, reliability_reference)


class FlakyHub(http.server.ThreadingHTTPServer):
    """Just enough of the Hugging Face Hub's HTTP API to stream one parquet dataset repository,
    served from a local directory. Every `fail_every`-th request is dropped: reset before any
    response or, for every other dropped GET, cut off half-way through its body. `fail_every=1` is
    a network that is down."""

    daemon_threads = True
    repo_id = "scream-tests/demo"
    sha = "5c" * 20

    def __init__(self, root: Path, fail_every: int):
        self.root, self.fail_every = root, fail_every
        self.requests, self.dropped = 0, []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), FlakyHubHandler)
        threading.Thread(target=self.serve_forever, daemon=True, name="flaky-hub").start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class FlakyHubHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the hub client expects

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.respond(head=True)

    def do_GET(self):
        self.respond(head=False)

    def respond(self, head: bool):
        hub: FlakyHub = self.server
        path = self.path.split("?")[0]
        with hub.lock:
            hub.requests += 1
            drop = hub.requests % hub.fail_every == 0
            cut = drop and not head and sum(d.startswith(("cut GET", "reset GET")) for d in hub.dropped) % 2 == 1
            if drop:
                hub.dropped.append(("cut " if cut else "reset ") + f"{self.command} {path}")
        status, body, headers = self.route(path)
        if drop and not cut:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
            self.close_connection = True
            return
        rng = self.headers.get("range")
        if status == 200 and rng and body is not None:
            start, _, end = rng.removeprefix("bytes=").partition("-")
            start, end = int(start), min(int(end) if end else len(body) - 1, len(body) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(body)}"
            status, body = 206, body[start:end + 1]
        body = body or b""
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body[: len(body) // 2] if cut else body)
        if cut:
            self.close_connection = True

    def route(self, path: str):
        hub: FlakyHub = self.server
        repo = FlakyHub.repo_id
        files = sorted(p for p in hub.root.rglob("*") if p.is_file())
        if path in (f"/api/datasets/{repo}", f"/api/datasets/{repo}/revision/main",
                    f"/api/datasets/{repo}/revision/{hub.sha}"):
            info = {"id": repo, "sha": hub.sha, "private": False, "tags": [], "cardData": {},
                    "siblings": [{"rfilename": str(p.relative_to(hub.root))} for p in files]}
            return 200, json.dumps(info).encode(), {"Content-Type": "application/json"}
        if path.startswith(f"/api/datasets/{repo}/tree/"):
            folder = hub.root / path.removeprefix(f"/api/datasets/{repo}/tree/").partition("/")[2]
            if not folder.is_dir():
                return 404, b"{}", {"Content-Type": "application/json", "X-Error-Code": "EntryNotFound"}
            entries = [{"type": "directory", "path": str(p.relative_to(hub.root)), "oid": "0" * 40, "size": 0}
                       if p.is_dir() else
                       {"type": "file", "path": str(p.relative_to(hub.root)), "oid": "1" * 40, "size": p.stat().st_size}
                       for p in sorted(folder.iterdir())]
            return 200, json.dumps(entries).encode(), {"Content-Type": "application/json"}
        if path.startswith(f"/datasets/{repo}/resolve/"):
            file = hub.root / path.removeprefix(f"/datasets/{repo}/resolve/").partition("/")[2]
            if not file.is_file():
                return 404, b"", {"X-Error-Code": "EntryNotFound"}
            data = file.read_bytes()
            return 200, data, {"ETag": f'"{abs(hash(data)):x}"', "X-Repo-Commit": hub.sha, "Accept-Ranges": "bytes"}
        return 404, b"{}", {"Content-Type": "application/json", "X-Error-Code": "RepoNotFound"}


@pytest.fixture
def reliability_hub_env(reliability_env, tmp_path):
    def hub_env(hub: FlakyHub) -> dict:
        return dict(reliability_env, HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf_home"))
    return hub_env


def test_reliability_dropped_connections_are_retried_without_losing_examples(reliability_demo, reliability_hub_env,
                                                                             reliability_reference, tmp_path):
    """Streams the dataset from a hub that drops every 9th request (the dataset's metadata, file
    listings and parquet byte ranges alike; each epoch opens the dataset anew): the run must go
    on and end with exactly the uninterrupted run's parameters."""
    hub = FlakyHub(reliability_demo / "data", fail_every=9)
    try:
        flags = train_flags(reliability_demo, tmp_path / "run", "--read_retry_wait_s", "0.1", dataset=FlakyHub.repo_id)
        returncode, stdout, stderr = reliability_run(reliability_hub_env(hub), flags, tmp_path, "run")
    finally:
        hub.shutdown()
    assert returncode == 0, stderr[-3000:]
    assert len(hub.dropped) >= 5, hub.dropped
    assert any(d.startswith("cut GET") and "parquet" in d for d in hub.dropped), hub.dropped
    assert any(d.startswith("reset") and "parquet" not in d for d in hub.dropped), hub.dropped
    assert "warning: reading the dataset failed" in stderr  # our retry, from the last row read
    assert_same_exported_params(tmp_path / "run", reliability_reference)


def test_reliability_a_dead_network_gives_up_after_bounded_retries(reliability_demo, reliability_hub_env, tmp_path):
    hub = FlakyHub(reliability_demo / "data", fail_every=1)
    try:
        flags = train_flags(reliability_demo, tmp_path / "run", "--read_retries", "3", "--read_retry_wait_s", "0.1",
                            dataset=FlakyHub.repo_id)
        returncode, stdout, stderr = reliability_run(reliability_hub_env(hub), flags, tmp_path, "run")
    finally:
        hub.shutdown()
    assert returncode == 1
    assert stderr.count("warning: reading the dataset failed") == 3
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "failed 4 times in a row" in errors[0] and "--read_retries" in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert not complete_checkpoints(tmp_path / "run")


def test_reliability_a_dead_peer_process_stops_the_survivor(reliability_demo, reliability_env, tmp_path):
    """Two processes (2 CPU devices each) on localhost; process 1 is killed after training
    started. Process 0 must exit with an error (JAX's coordination service notices the missing
    heartbeats) instead of waiting forever in the next collective."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(reliability_env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = tmp_path / "run"
    processes = [launch(env, train_flags(reliability_demo, out, "--coordinator_address", f"127.0.0.1:{port}",
                                         "--num_processes", "2", "--process_id", str(i), "--distributed_timeout_s", "60",
                                         steps=100000), tmp_path, f"process{i}") for i in range(2)]
    try:
        wait_for_step(processes[0], out, 3)
        os.kill(processes[1].pid, signal.SIGKILL)
        returncode, stdout, stderr = finish(processes[0], tmp_path, "process0", timeout=120)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert returncode != 0
    assert "another task died" in stderr or "unhealthy" in stderr, stderr[-3000:]


NAN_BATCH_SCRIPT = """
import sys
import numpy as np
import run_scream

collate, calls = run_scream.collate, []

def collate_with_nan(examples, **kwargs):  # the training batch of step int(argv[1]) gets a NaN sample
    batch = collate(examples, **kwargs)
    calls.append(len(examples))
    if len(calls) == int(sys.argv[1]):
        batch["audio"][0, 100] = np.nan
    return batch

run_scream.collate = collate_with_nan
sys.exit(run_scream.main(sys.argv[2:]))
"""


def test_reliability_a_non_finite_loss_stops_at_its_step_and_keeps_the_checkpoint(reliability_demo, reliability_env,
                                                                                   tmp_path):
    out = tmp_path / "run"
    flags = ["5", *train_flags(reliability_demo, out, "--save_steps", "2")]
    returncode, stdout, stderr = reliability_run(reliability_env, flags, tmp_path, "run", script=NAN_BATCH_SCRIPT)
    assert returncode == 1, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "non-finite loss" in errors[0] and "at step 5" in errors[0], stderr[-3000:]
    assert "last checkpoint (step 4) is intact" in errors[0]
    assert "Traceback" not in stderr
    assert complete_checkpoints(out) == [2, 4] and max(logged_steps(out)) == 4

    # The checkpoint is whole: it restores, and its parameters are finite and not the initial ones.
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(out / "checkpoints", item_names=("state", "meta")) as manager:
        restored = manager.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                               meta=ocp.args.JsonRestore()))
    assert restored["meta"]["step"] == 4 and int(restored["state"]["step"]) == 4
    leaves = [np.asarray(leaf) for leaf in __import__("jax").tree.leaves(restored["state"]["params"])]
    assert leaves and all(np.isfinite(leaf).all() for leaf in leaves)


# --- bad input ---


def write_bad_input_dataset(root: Path, demo: Path) -> dict:
    """A parquet train split of good clips and every kind of bad one; returns the expected skip counts."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile

    import make_demo_dataset as demo_data

    def wav(samples, rate=16000, subtype="PCM_16"):
        buffer = io.BytesIO()
        soundfile.write(buffer, samples, rate, format="WAV", subtype=subtype)
        return buffer.getvalue()

    good = [demo_data.make_example(0, "train", i, 1) for i in range(14)]
    rng = np.random.default_rng(0)
    with_nan = good[0][1].copy()
    with_nan[10:20] = np.nan
    stereo_8k = demo_data.synthesize("hei du", rng, sample_rate=8000, max_duration_s=1.0)
    bad = [  # (id, audio bytes, text, skip reason or None when it must be used)
        ("undecodable", b"RIFF\x00\x00 this is not audio", "hei", "undecodable"),
        ("zero_length", wav(np.zeros(0, np.float32)), "hei", "empty_audio"),
        ("nan_samples", wav(with_nan, subtype="FLOAT"), "hei", "non_finite_audio"),
        ("stereo_8khz", wav(np.stack([stereo_8k, 0.5 * stereo_8k], axis=1), rate=8000), "hei du", None),
        ("clip_45s", demo_data.encode_flac(0.1 * rng.standard_normal(45 * 16000).astype(np.float32)), "hei", "too_long"),
        ("empty_text", demo_data.encode_flac(good[1][1]), "", "empty_text"),
        ("none_text", demo_data.encode_flac(good[2][1]), None, "empty_text"),
        ("1000_tokens", demo_data.encode_flac(good[3][1]), "hei " * 250, "too_many_tokens"),
        ("outside_vocab", demo_data.encode_flac(good[4][1]), "Hei ☃ 日本 🙂 done", None),
    ]
    rows = []
    for i, (text, waveform) in enumerate(good):  # a bad row after each good one; the last row is good
        rows.append({"id": f"good-{i}", "audio": {"bytes": demo_data.encode_flac(waveform), "path": f"good-{i}.flac"},
                     "text": text, "source": "demo"})
        if i < len(bad):
            name, audio, text, _ = bad[i]
            rows.append({"id": name, "audio": {"bytes": audio, "path": f"{name}.wav"}, "text": text, "source": "bad"})
    (root / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=demo_data.FEATURES.arrow_schema),
                   root / "data" / "train-00000-of-00001.parquet")
    expected = {}
    for *_, reason in bad:
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    assert len(good) + sum(reason is None for *_, reason in bad) == 16  # two full batches, one epoch
    return expected


def test_reliability_bad_input_is_skipped_and_counted_by_reason(reliability_demo, reliability_env, tmp_path):
    expected = write_bad_input_dataset(tmp_path / "bad_data", reliability_demo)
    out = tmp_path / "run"
    flags = train_flags(reliability_demo, out, dataset=str(tmp_path / "bad_data"), steps=2)
    flags.remove("--streaming")  # the downloaded (Arrow) path, the other way of reading
    returncode, stdout, stderr = reliability_run(reliability_env, flags, tmp_path, "run")
    assert returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == 2 and last["train/epoch"] == 0
    skipped = {key.removeprefix("data/skipped_"): value for key, value in last.items() if key.startswith("data/skipped_")}
    assert skipped == expected  # 8 kHz stereo and characters outside the vocabulary are used, not skipped
    assert (out / "model.safetensors").exists()


def test_reliability_resampled_stereo_and_unusual_characters_are_handled(reliability_demo):
    """The two bad-input rows that are used: 8 kHz stereo becomes 16 kHz mono of the same length,
    and characters outside the byte-level vocabulary's letters round-trip through its bytes."""
    import io

    import soundfile
    import soxr
    from transformers import WhisperTokenizer

    import make_demo_dataset as demo_data
    import run_scream

    tokenizer = WhisperTokenizer.from_pretrained(reliability_demo / "model")
    tokenizer.set_prefix_tokens(language="no", task="transcribe", predict_timestamps=False)
    clip = demo_data.synthesize("hei du", np.random.default_rng(0), sample_rate=8000, max_duration_s=1.0)
    buffer = io.BytesIO()
    soundfile.write(buffer, np.stack([clip, 0.5 * clip], axis=1), 8000, format="WAV", subtype="FLOAT")
    text = "Hei ☃ 日本 🙂 done"
    example, reason = run_scream.prepare_example(
        {"audio": {"bytes": buffer.getvalue()}, "text": text, "id": 7}, audio_column="audio", text_column="text",
        id_column="id", tokenizer=tokenizer,
        audio_settings=run_scream.AudioSettings(16000, 16000, 0.0, 1.0),
        text_settings=run_scream.TextSettings(False, False, 60))
    assert reason is None
    assert example["audio"].ndim == 1 and example["audio"].dtype == np.float32
    np.testing.assert_allclose(example["audio"], soxr.resample(0.75 * clip, 8000, 16000), atol=1e-6)  # mean of channels
    assert len(example["audio"]) == 2 * len(clip)
    assert tokenizer.decode(example["tokens"], skip_special_tokens=True) == text
    assert example["id"] == "7"


# --- misconfigurations ---


@pytest.fixture
def reliability_in_process(reliability_demo, monkeypatch, capfd, tmp_path):
    """run_scream.main in this process, offline; returns (exit code, stderr). SIGTERM's handler is
    put back afterwards."""
    import huggingface_hub

    import run_scream

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    handler = signal.getsignal(signal.SIGTERM)

    def main(*flags: str, output_dir: Path | None = None) -> tuple[int, str]:
        capfd.readouterr()
        args = ["--config_name", str(reliability_demo / "model"), "--dataset_name", str(reliability_demo / "data"),
                "--output_dir", str(output_dir or tmp_path / "run"), "--do_train", "--train_batch_size", "8",
                "--num_train_steps", "2", "--max_label_length", "40", "--report_to", "none", "--streaming",
                "--cache_dir", str(tmp_path / "hub_cache"), *flags]
        try:
            returncode = run_scream.main(args)
        finally:
            signal.signal(signal.SIGTERM, handler)
        return returncode, capfd.readouterr().err

    return main


def assert_config_error(returncode: int, stderr: str, *needles: str):
    assert returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    errors = [i for i, line in enumerate(stderr.splitlines()) if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    message = "\n".join(stderr.splitlines()[errors[0]:])
    assert "\n\n" not in message.strip(), message  # one paragraph
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize("flags, needles", [
    (["--train_batch_size", "12"], ["--train_batch_size 12", "multiple of 8"]),
    (["--text_column_name", "transcript"], ["--text_column_name 'transcript'", "it has: "]),
    (["--language", "klingon"], ["--language 'klingon'", "norwegian"]),
    (["--dataset_name", "/nonexistent/scream/data"], ["--dataset_name '/nonexistent/scream/data'", "local directory"]),
    (["--config_name", "scream-tests/no-such-whisper"], ["'scream-tests/no-such-whisper'", "--config_name",
                                                          "HF_HUB_OFFLINE"]),
], ids=["batch_not_divisible", "missing_column", "unknown_language", "no_such_dataset", "no_such_model"])
def test_reliability_misconfiguration_is_one_paragraph_and_status_2(reliability_in_process, tmp_path, flags, needles):
    assert_config_error(*reliability_in_process(*flags), *needles)


def test_reliability_relaunch_after_a_startup_misconfiguration_is_not_refused(reliability_demo, reliability_env,
                                                                              reliability_in_process, tmp_path):
    """A run that stopped at a misconfiguration wrote only its start-up files; the fixed command
    must start there, not be refused as another run's directory."""
    out = tmp_path / "run"
    assert_config_error(*reliability_in_process("--text_column_name", "transcript", output_dir=out), "--text_column_name")
    assert (out / "scream_config.json").exists()
    returncode, stdout, stderr = reliability_run(reliability_env, train_flags(reliability_demo, out, "--warmup_steps", "0", steps=1), tmp_path, "fixed")
    assert returncode == 0, stderr[-3000:]
    assert logged_steps(out) == [1] and (out / "model.safetensors").exists()


def test_reliability_output_dir_with_other_files_is_refused(reliability_in_process, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("someone else's")
    assert_config_error(*reliability_in_process(output_dir=out), f"--output_dir {out}", "--overwrite_output_dir")
    assert (out / "notes.txt").exists() and not (out / "scream_config.json").exists()


@pytest.mark.parametrize("changed", ["dataset", "model"])
def test_reliability_output_dir_with_another_runs_checkpoints_is_refused(reliability_demo, reliability_reference,
                                                                         reliability_in_process, tmp_path, changed):
    out = tmp_path / "run"
    shutil.copytree(reliability_reference, out, ignore=shutil.ignore_patterns("[0-9]", "[0-9][0-9]"))
    shutil.copytree(reliability_reference / "checkpoints" / "3", out / "checkpoints" / "3")
    if changed == "dataset":
        shutil.copytree(reliability_demo / "data", tmp_path / "other_data")
        flags, needle = ["--dataset_name", str(tmp_path / "other_data")], "--dataset_name"
    else:
        shutil.copytree(reliability_demo / "model", tmp_path / "other_model")
        flags, needle = ["--config_name", str(tmp_path / "other_model")], "--config_name"
    saved = (out / "scream_config.json").read_text()
    assert_config_error(*reliability_in_process(*flags, output_dir=out), "another run's checkpoints", needle,
                        "--overwrite_output_dir")
    assert (out / "scream_config.json").read_text() == saved  # nothing of the other run touched


def test_reliability_experiment_script_with_a_typo_in_a_flag(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1", SCREAM_OUTPUT_ROOT=str(tmp_path / "runs"))
    result = subprocess.run(["bash", str(REPO / "run_tiny_all.sh"), "--dry_run", "--learning_rat", "1e-4"], env=env,
                            capture_output=True, text=True, timeout=RELIABILITY_TIMEOUT_S)
    assert_config_error(result.returncode, result.stderr, "--learning_rat", "Did you mean: --learning_rat -> --learning_rate")
