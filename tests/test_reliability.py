"""Reliability ("What survives what"): kill -9 at any step or while a checkpoint is written resumes
exactly; a flaky network loses no example and a dead one gives up after bounded retries; a dead peer
stops the survivor; a non-finite loss stops at its step with the checkpoint intact; a misconfiguration
is one paragraph and exit 2, before anything is written or overwritten. (SIGTERM: the smoke test.)"""

import functools
import http.server
import itertools
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import run_scream as rs
from tests.support import (
    NUM_TRAIN,
    REPO,
    RUN_TIMEOUT_S,
    assert_config_error,
    assert_same_exported_params,
    complete_checkpoints,
    finish,
    free_port,
    joined_flags,
    joined_process_env,
    launch,
    logged_steps,
    resumed_step,
    run_and_wait,
    runtime_only_pythonpath,
    train_lines,
    wait_for_step,
)

RELIABILITY_NUM_TRAIN = NUM_TRAIN  # 5 batches of 8 per epoch: 12 steps cross two epoch boundaries


RELIABILITY_NUM_STEPS = 12


RELIABILITY_SAVE_STEPS = 3


# A shuffle buffer below an epoch's 40 rows, so that a resume must restore what it held (the scripts'
# 500 rows: tests/test_resume_shuffle.py); datasets' own buffer lost it on resume.
RELIABILITY_SHUFFLE_BUFFER = 16


def train_flags(
    demo: Path, output_dir: Path, *extra: str, dataset: str | None = None, steps: int = RELIABILITY_NUM_STEPS
):
    """The one command every fault test runs: streaming, as on a pod, and shuffled as the scripts
    shuffle (a buffer that a resume restores exactly)."""
    return [
        "--config_name",
        str(demo / "model"),
        "--dataset_name",
        dataset or str(demo / "data"),
        "--streaming",
        "--output_dir",
        str(output_dir),
        "--do_train",
        "--train_batch_size",
        "8",
        "--num_train_steps",
        str(steps),
        "--learning_rate",
        "3e-3",
        "--warmup_steps",
        "2",
        "--max_label_length",
        "40",
        "--logging_steps",
        "1",
        "--save_steps",
        str(RELIABILITY_SAVE_STEPS),
        "--save_total_limit",
        "10",
        "--shuffle_buffer_size",
        str(RELIABILITY_SHUFFLE_BUFFER),
        "--preprocessing_num_workers",
        "2",
        "--report_to",
        "none",
        *extra,
    ]


def assert_each_step_logged_once_as_in(output_dir: Path, reference_dir: Path):
    """Over all launches each step is logged exactly once (the steps redone after a resume too),
    with the uninterrupted run's numbers. Measured: bit-identical (same executable, state and data
    position)."""
    resumed, reference = train_lines(output_dir), train_lines(reference_dir)
    assert sorted(resumed) == sorted(reference) == list(range(1, RELIABILITY_NUM_STEPS + 1))
    for step in reference:
        for key in ("train/loss", "train/grad_norm", "train/learning_rate", "examples_seen", "train/epoch"):
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-6, abs=0), (step, key)
    assert reference[RELIABILITY_NUM_STEPS]["train/epoch"] == 2  # both runs crossed two epoch boundaries


@pytest.fixture(scope="session")
def reliability_reference(demo_dir, one_device_env, tmp_path_factory):
    """The uninterrupted run every fault test must reproduce exactly."""
    root = tmp_path_factory.mktemp("reliability_reference")
    returncode, stdout, stderr = run_and_wait(one_device_env, train_flags(demo_dir, root / "run"), root, "run")
    assert returncode == 0, stderr[-3000:]
    assert resumed_step(stdout) is None
    assert complete_checkpoints(root / "run") == [3, 6, 9, 12]
    return root / "run"


def batch_ids(demo: Path, num_batches: int, state: dict | None = None) -> list[list[str]]:
    """Example ids of the next `num_batches` training batches, as the run reads them (same source,
    same order), starting fresh or from a checkpoint's data state."""

    data_args = rs.DataArguments(
        dataset_name=str(demo / "data"), streaming=True, shuffle_buffer_size=RELIABILITY_SHUFFLE_BUFFER
    )
    make_source = functools.partial(
        rs.load_source,
        data_args,
        "train",
        shuffle=True,
    )
    batches = rs.SpeechBatches(
        lambda epoch: make_source(epoch=epoch),
        lambda row: ({"id": row["id"]}, None),
        batch_size=8,
        collate_fn=lambda examples: None,
        repeat=True,
        num_workers=1,
        prefetch_batches=1,
        state=state,
    )
    iterator = iter(batches)
    try:
        return [[example["id"] for example in examples] for _, examples in itertools.islice(iterator, num_batches)]
    finally:
        iterator.close()


def test_reliability_kill_9_at_a_random_step_resumes_exactly(demo_dir, one_device_env, reliability_reference, tmp_path):
    kill_after = random.Random(7).randint(5, 8)  # seeded: the same step on every run of the suite
    out = tmp_path / "run"
    process = launch(one_device_env, train_flags(demo_dir, out), tmp_path, "first")
    wait_for_step(process, out, kill_after)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    committed = complete_checkpoints(out)
    assert committed and committed[-1] < RELIABILITY_NUM_STEPS and not (out / "model.safetensors").exists(), committed

    returncode, stdout, stderr = run_and_wait(one_device_env, train_flags(demo_dir, out), tmp_path, "relaunch")
    assert returncode == 0, stderr[-3000:]
    assert resumed_step(stdout) == committed[-1]  # the last complete checkpoint
    assert_same_exported_params(out, reliability_reference)
    assert_each_step_logged_once_as_in(out, reliability_reference)

    # Example ids across that real checkpoint's boundary: the data state it stored continues with
    # exactly the batches an uninterrupted reader gives next, and 12 batches read every example
    # once per epoch.
    meta = json.loads((out / "checkpoints" / str(committed[-1]) / "meta" / "metadata").read_text())
    assert meta["step"] == committed[-1] and meta["examples_seen"] == 8 * committed[-1]
    straight = batch_ids(demo_dir, RELIABILITY_NUM_STEPS)
    assert (
        batch_ids(demo_dir, RELIABILITY_NUM_STEPS - committed[-1], meta["data_states"][0]) == straight[committed[-1] :]
    )
    read = [example_id for batch in straight for example_id in batch]
    print("example ids per step:", straight)
    every_id = [f"train-{i:06d}" for i in range(RELIABILITY_NUM_TRAIN)]
    first, second = read[:RELIABILITY_NUM_TRAIN], read[RELIABILITY_NUM_TRAIN : 2 * RELIABILITY_NUM_TRAIN]
    assert sorted(first) == sorted(second) == every_id and first != second  # each epoch once, a new order
    third = read[2 * RELIABILITY_NUM_TRAIN :]
    assert len(third) == 8 * RELIABILITY_NUM_STEPS - 2 * RELIABILITY_NUM_TRAIN and len(set(third)) == len(third)


def test_reliability_kill_9_while_writing_a_checkpoint_uses_the_previous_one(
    demo_dir, one_device_env, reliability_reference, tmp_path
):
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
    for path in data_files[len(data_files) // 2 :]:  # half the array data on disk
        path.unlink()
    lines = (reliability_reference / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:9]))

    returncode, stdout, stderr = run_and_wait(one_device_env, train_flags(demo_dir, out), tmp_path, "relaunch")
    assert returncode == 0, stderr[-3000:]
    assert resumed_step(stdout) == 6
    assert_same_exported_params(out, reliability_reference)
    assert complete_checkpoints(out) == [3, 6, 9, 12] and not partial.exists()


# --- reliability: a flaky or dead network ---


class FlakyHub(http.server.ThreadingHTTPServer):
    """Just enough of the Hugging Face Hub's HTTP API to stream one parquet dataset repository,
    served from a local directory. Every `fail_every`-th request is dropped: reset before any
    response or, for every other dropped GET, cut off half-way through its body. `fail_every=1` is
    a network that is down. Which requests land on a multiple depends on the reader threads' order,
    so one kind is dropped by rule: the first request for anything but a parquet file once reading
    has begun (an epoch's reopening of the dataset) is reset."""

    daemon_threads = True
    repo_id = "scream-tests/demo"
    sha = "5c" * 20

    def __init__(self, root: Path, fail_every: int):
        self.root, self.fail_every = root, fail_every
        self.requests, self.dropped, self.reading, self.reset_metadata = 0, [], False, False
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
            parquet = path.endswith(".parquet")
            by_rule = hub.reading and not parquet and not hub.reset_metadata
            hub.reading |= parquet and not head
            hub.reset_metadata |= by_rule
            drop = by_rule or hub.requests % hub.fail_every == 0
            cut = drop and not by_rule and not head
            cut = cut and sum(d.startswith(("cut GET", "reset GET")) for d in hub.dropped) % 2 == 1
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
            status, body = 206, body[start : end + 1]
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
        if path in (
            f"/api/datasets/{repo}",
            f"/api/datasets/{repo}/revision/main",
            f"/api/datasets/{repo}/revision/{hub.sha}",
        ):
            info = {
                "id": repo,
                "sha": hub.sha,
                "private": False,
                "tags": [],
                "cardData": {},
                "siblings": [{"rfilename": str(p.relative_to(hub.root))} for p in files],
            }
            return 200, json.dumps(info).encode(), {"Content-Type": "application/json"}
        if path.startswith(f"/api/datasets/{repo}/tree/"):
            folder = hub.root / path.removeprefix(f"/api/datasets/{repo}/tree/").partition("/")[2]
            if not folder.is_dir():
                return 404, b"{}", {"Content-Type": "application/json", "X-Error-Code": "EntryNotFound"}
            entries = [
                {"type": "directory", "path": str(p.relative_to(hub.root)), "oid": "0" * 40, "size": 0}
                if p.is_dir()
                else {"type": "file", "path": str(p.relative_to(hub.root)), "oid": "1" * 40, "size": p.stat().st_size}
                for p in sorted(folder.iterdir())
            ]
            return 200, json.dumps(entries).encode(), {"Content-Type": "application/json"}
        if path.startswith(f"/datasets/{repo}/resolve/"):
            file = hub.root / path.removeprefix(f"/datasets/{repo}/resolve/").partition("/")[2]
            if not file.is_file():
                return 404, b"", {"X-Error-Code": "EntryNotFound"}
            data = file.read_bytes()
            return 200, data, {"ETag": f'"{abs(hash(data)):x}"', "X-Repo-Commit": hub.sha, "Accept-Ranges": "bytes"}
        return 404, b"{}", {"Content-Type": "application/json", "X-Error-Code": "RepoNotFound"}


@pytest.fixture
def reliability_hub_env(one_device_env, tmp_path):
    def hub_env(hub: FlakyHub) -> dict:
        return dict(
            one_device_env,
            HF_ENDPOINT=hub.endpoint,
            HF_HUB_OFFLINE="0",
            HF_DATASETS_OFFLINE="0",
            HF_HOME=str(tmp_path / "hf_home"),
        )

    return hub_env


def test_reliability_dropped_connections_are_retried_without_losing_examples(
    demo_dir, reliability_hub_env, reliability_reference, tmp_path
):
    """Streams the dataset from a hub that drops every 9th request (the dataset's metadata, file
    listings and parquet byte ranges alike; each epoch opens the dataset anew): the run must go
    on and end with exactly the uninterrupted run's parameters."""
    hub = FlakyHub(demo_dir / "data", fail_every=9)
    try:
        flags = train_flags(demo_dir, tmp_path / "run", "--read_retry_wait_s", "0.1", dataset=FlakyHub.repo_id)
        returncode, stdout, stderr = run_and_wait(reliability_hub_env(hub), flags, tmp_path, "run")
    finally:
        hub.shutdown()
    print("dropped:", hub.dropped)
    assert returncode == 0, stderr[-3000:]
    assert len(hub.dropped) >= 5, hub.dropped
    assert any(d.startswith("cut GET") and "parquet" in d for d in hub.dropped), hub.dropped
    assert any(d.startswith("reset") and "parquet" not in d for d in hub.dropped), hub.dropped
    assert "warning: reading the dataset failed" in stderr  # our retry, from the last row read
    assert_same_exported_params(tmp_path / "run", reliability_reference)


def test_reliability_a_dead_network_gives_up_after_bounded_retries(demo_dir, reliability_hub_env, tmp_path):
    hub = FlakyHub(demo_dir / "data", fail_every=1)
    try:
        flags = train_flags(
            demo_dir,
            tmp_path / "run",
            "--read_retries",
            "3",
            "--read_retry_wait_s",
            "0.1",
            dataset=FlakyHub.repo_id,
        )
        returncode, stdout, stderr = run_and_wait(reliability_hub_env(hub), flags, tmp_path, "run")
    finally:
        hub.shutdown()
    assert returncode == 1
    assert stderr.count("warning: reading the dataset failed") == 3
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "failed 4 times in a row" in errors[0] and "--read_retries" in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert not complete_checkpoints(tmp_path / "run")


def test_reliability_a_dead_peer_process_stops_the_survivor(demo_dir, one_device_env, tmp_path):
    """Two processes (2 CPU devices each) on localhost; process 1 is killed after training
    started. Process 0 must exit with an error (JAX's coordination service notices the missing
    heartbeats) instead of waiting forever in the next collective."""
    port = free_port()
    env = joined_process_env(one_device_env, 2)
    out = tmp_path / "run"
    processes = [
        launch(
            env,
            train_flags(demo_dir, out, *joined_flags(port, i, 60), steps=100000),
            tmp_path,
            f"process{i}",
        )
        for i in range(2)
    ]
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
import run_scream as rs

collate, calls = rs.collate, []

def collate_with_nan(examples, **kwargs):  # the training batch of step int(argv[1]) gets a NaN sample
    batch = collate(examples, **kwargs)
    calls.append(len(examples))
    if len(calls) == int(sys.argv[1]):
        batch["audio"][0, 100] = np.nan
    return batch

rs.collate = collate_with_nan
sys.exit(rs.main(sys.argv[2:]))
"""


def test_reliability_a_non_finite_loss_stops_at_its_step_and_keeps_the_checkpoint(demo_dir, one_device_env, tmp_path):
    out = tmp_path / "run"
    flags = ["5", *train_flags(demo_dir, out, "--save_steps", "2")]
    returncode, stdout, stderr = run_and_wait(one_device_env, flags, tmp_path, "run", script=NAN_BATCH_SCRIPT)
    assert returncode == 1, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "non-finite loss" in errors[0] and "at step 5" in errors[0], stderr[-3000:]
    assert "last checkpoint (step 4) is intact" in errors[0]
    assert "Traceback" not in stderr
    assert complete_checkpoints(out) == [2, 4] and max(logged_steps(out)) == 4

    # The checkpoint is whole: it restores, and its parameters are finite and not the initial ones.
    with ocp.CheckpointManager(out / "checkpoints", item_names=("state", "meta")) as manager:
        restored = manager.restore(
            4, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
        )
    assert restored["meta"]["step"] == 4 and int(restored["state"]["step"]) == 4
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(restored["state"]["params"])]
    assert leaves and all(np.isfinite(leaf).all() for leaf in leaves)


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--train_batch_size", "12"], ["--train_batch_size 12", "multiple of 8"]),
        (
            ["--text_column_name", "transcript"],
            [
                "--text_column_name 'transcript'",
                "it has: id, audio, text, timestamped_text, previous_text, language, source",
            ],
        ),
        (["--audio_column_name", "speech"], ["--audio_column_name 'speech' is not a column", "it has: id, audio"]),
        (["--language", "klingon"], ["--language 'klingon' is not a Whisper language", "norwegian"]),
        (
            ["--dataset_name", "/nonexistent/scream/data"],
            ["--dataset_name '/nonexistent/scream/data'", "local directory"],
        ),
        (
            ["--config_name", "scream-tests/no-such-whisper"],
            ["'scream-tests/no-such-whisper'", "--config_name", "HF_HUB_OFFLINE"],
        ),
        # flags that used to be accepted and then ignored, or silently divided by
        (["--dry_run_topology", "v4-8"], ["--dry_run_topology v4-8", "add --dry_run"]),
        (["--no_dry_run_compile"], ["--no_dry_run_compile", "add --dry_run"]),
        (["--eval_steps", "0"], ["--eval_steps 0", "at least 1"]),
        (["--save_steps", "0"], ["--save_steps 0", "at least 1"]),
        (["--logging_steps", "0"], ["--logging_steps 0", "at least 1"]),
        (["--wandb_project", "scream"], ["--wandb_project", "--report_to 'none'", "add wandb to --report_to"]),
        (["--wandb_entity", "nb"], ["--wandb_entity", "add wandb to --report_to"]),
        (["--run_description", "a test"], ["--run_description", "add wandb to --report_to"]),
        (
            ["--eval_split_name", "validation,other", "--eval_dataset_name", "a,b,c"],
            ["--eval_dataset_name names 3 datasets for 2 splits in --eval_split_name", "one per split"],
        ),
        (["--do_predict"], ["--do_predict needs --test_split_name"]),
        (
            ["--metric_for_best_model", "eval/validaton/loss"],
            ["--metric_for_best_model eval/validaton/loss", "eval/validation/"],
        ),
        (["--metric_for_best_model", "eval/wer"], ["--metric_for_best_model eval/wer needs --predict_with_generate"]),
    ],
    ids=[
        "batch_not_divisible",
        "missing_text_column",
        "missing_audio_column",
        "unknown_language",
        "no_such_dataset",
        "no_such_model",
        "topology_without_dry_run",
        "no_compile_without_dry_run",
        "eval_steps_0",
        "save_steps_0",
        "logging_steps_0",
        "wandb_project_without_wandb",
        "wandb_entity_without_wandb",
        "run_description_without_wandb",
        "eval_datasets_and_splits_differ_in_number",
        "do_predict_without_test_split",
        "unknown_metric_for_best_model",
        "wer_for_best_model_without_generation",
    ],
)
def test_reliability_misconfiguration_is_one_paragraph_and_status_2(reliability_in_process, tmp_path, flags, needles):
    assert_config_error(*reliability_in_process(*flags), *needles)
    out = tmp_path / "run"
    if flags[0] in ("--text_column_name", "--audio_column_name", "--dataset_name"):
        # found when the data is opened, after the output directory is prepared: start-up files only
        assert (out / "scream_config.json").exists() and {p.name for p in out.iterdir()} <= rs.STARTUP_FILES
    else:
        assert not out.exists()  # found before anything is written


def test_language_code_reads_codes_names_and_tokens():
    assert rs.language_code("norwegian") == rs.language_code("<|no|>") == rs.language_code("no") == "no"


@pytest.mark.parametrize("missing", ["--dataset_name", "--output_dir"])
def test_reliability_dataset_and_output_dir_are_required(demo_dir, capfd, tmp_path, missing):
    """No demo defaults: a script that forgets one must not train on, or write over, the demo's."""

    given = {"--dataset_name": str(demo_dir / "data"), "--output_dir": str(tmp_path / "run")}
    del given[missing]
    capfd.readouterr()
    flags = ["--config_name", str(demo_dir / "model"), "--do_train", "--train_batch_size", "8"]
    returncode = rs.main(flags + [part for pair in given.items() for part in pair])
    assert_config_error(returncode, capfd.readouterr().err, f"{missing} is required", "run_demo.sh")
    assert not (tmp_path / "run").exists()


def test_reliability_relaunch_after_a_startup_misconfiguration_is_not_refused(
    demo_dir, one_device_env, reliability_in_process, tmp_path
):
    """A run that stopped at a misconfiguration wrote only its start-up files; the fixed command
    must start there, not be refused as another run's directory."""
    out = tmp_path / "run"
    assert_config_error(
        *reliability_in_process("--text_column_name", "transcript", output_dir=out), "--text_column_name"
    )
    assert (out / "scream_config.json").exists()
    returncode, stdout, stderr = run_and_wait(
        one_device_env, train_flags(demo_dir, out, "--warmup_steps", "0", steps=1), tmp_path, "fixed"
    )
    assert returncode == 0, stderr[-3000:]
    assert logged_steps(out) == [1] and (out / "model.safetensors").exists()


def test_reliability_output_dir_with_other_files_is_refused(reliability_in_process, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("someone else's")
    assert_config_error(*reliability_in_process(output_dir=out), f"--output_dir {out}", "--overwrite_output_dir")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing written, nothing removed
    assert (out / "notes.txt").read_text() == "someone else's"


@pytest.mark.parametrize("changed", ["dataset", "model"])
def test_reliability_output_dir_with_another_runs_checkpoints_is_refused(
    demo_dir, reliability_reference, reliability_in_process, tmp_path, changed
):
    out = tmp_path / "run"
    shutil.copytree(reliability_reference, out, ignore=shutil.ignore_patterns("[0-9]", "[0-9][0-9]"))
    shutil.copytree(reliability_reference / "checkpoints" / "3", out / "checkpoints" / "3")
    if changed == "dataset":
        shutil.copytree(demo_dir / "data", tmp_path / "other_data")
        flags, needle = ["--dataset_name", str(tmp_path / "other_data")], "--dataset_name"
    else:
        shutil.copytree(demo_dir / "model", tmp_path / "other_model")
        flags, needle = ["--config_name", str(tmp_path / "other_model")], "--config_name"
    saved = (out / "scream_config.json").read_text()
    assert_config_error(
        *reliability_in_process(*flags, output_dir=out), "another run's checkpoints", needle, "--overwrite_output_dir"
    )
    assert (out / "scream_config.json").read_text() == saved  # nothing of the other run touched


def test_reliability_experiment_script_with_a_typo_in_a_flag(tmp_path):
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        HF_HUB_OFFLINE="1",
        SCREAM_OUTPUT_ROOT=str(tmp_path / "runs"),
        PYTHONPATH=runtime_only_pythonpath(),
    )
    result = subprocess.run(
        ["bash", str(REPO / "run_tiny_all.sh"), "--dry_run", "--learning_rat", "1e-4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert_config_error(
        result.returncode, result.stderr, "--learning_rat", "Did you mean: --learning_rat -> --learning_rate"
    )
