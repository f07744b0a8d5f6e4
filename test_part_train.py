"""Issue 4, the main loop: sharding equivalence, accumulation, the exact loss, multi-process runs,
resume after SIGTERM and SIGKILL, the LR schedule, and the files a run leaves behind.

Everything runs on CPU with 8 fake devices, the demo data of make_demo_dataset.py (1-second
clips) and the demo's tiny Whisper (d_model 64, 2+2 layers). Whole runs are launched as
subprocesses of `run_scream.py` (fresh processes are needed for jax.distributed, for SIGKILL and
for the SIGTERM handler main() installs); they share a persistent JAX compilation cache, so only
the first run of each program compiles it.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import make_demo_dataset as demo  # noqa: E402
import run_scream as rs  # noqa: E402

HERE = Path(__file__).resolve().parent
CHUNK_S = 1  # 1-second windows: 100 mel frames, max_source_positions 50
NUM_TRAIN, NUM_EVAL = 40, 12  # 5 steps of 8 per epoch, so a 6-step run starts a second epoch
GLOBAL_BATCH, EVAL_BATCH = 8, 8  # 12 eval examples: the second eval batch is half padding
NUM_STEPS, SAVE_STEPS, SAVE_LIMIT = 6, 2, 2
PEAK_LR, WARMUP = 3e-3, 2
RUN_TIMEOUT_S = 420  # a hung run fails the test instead of blocking the suite
COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds=300"


# --- fixtures ---


@pytest.fixture(scope="session")
def train_demo(tmp_path_factory):
    """A small demo setup: tokenizer, weightless model dir, 40 train (2 shards) + 12 eval clips."""
    root = tmp_path_factory.mktemp("train_demo")
    tokenizer = demo.write_tokenizer(root / "tokenizer")
    demo.write_model_dir(root / "model", tokenizer, CHUNK_S, 80)
    demo.write_dataset(root / "data", NUM_TRAIN, NUM_EVAL, seed=0, chunk_length_s=CHUNK_S, num_shards=2)
    return root


@pytest.fixture(scope="session")
def train_env(tmp_path_factory):
    """Environment of the run_scream.py subprocesses: 8 CPU devices and a shared compilation cache.

    XLA's CPU collectives abort a process whose devices do not all reach a collective within 40 s;
    on a machine loaded by other jobs that happened once in these tests, so the limit is raised
    (a real hang still fails, at RUN_TIMEOUT_S)."""
    env = dict(os.environ)
    env.update({
        "XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {COLLECTIVE_TIMEOUT_FLAG}",
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("train_jax_cache")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(HERE),
    })
    return env


def train_command(demo_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """The one command of the whole-run tests. No shuffle buffer, so that the data order is fixed."""
    return [
        "--config_name", str(demo_dir / "model"), "--dataset_name", str(demo_dir / "data"),
        "--output_dir", str(output_dir), "--do_train", "--do_eval", "--predict_with_generate",
        "--train_batch_size", str(GLOBAL_BATCH), "--eval_batch_size", str(EVAL_BATCH),
        "--num_train_steps", str(NUM_STEPS), "--logging_steps", "1", "--save_steps", str(SAVE_STEPS),
        "--save_total_limit", str(SAVE_LIMIT), "--learning_rate", str(PEAK_LR), "--warmup_steps", str(WARMUP),
        "--weight_decay", "0.01", "--max_label_length", "32", "--shuffle_buffer_size", "0",
        "--preprocessing_num_workers", "2", "--seed", "0", *extra,
    ]


# A launcher that runs run_scream.main with one test hook (TRAIN_HOOK=<kind>:<n>):
#   sigterm_at_call:N   SIGTERM arrives while the N-th train batch of this launch is being put on the
#                       devices (a preemption notice in the middle of a step)
#   hang_at_call:N      at the N-th train batch of this launch, once every checkpoint save started so
#                       far is finalized, write TRAIN_HOOK_MARKER and hang, to be SIGKILLed
#   slow_start:S        sleep S seconds after joining the other processes (a slow host)
HOOKED_MAIN = """
import os, signal, sys, time
from pathlib import Path
import run_scream as rs

kind, n = os.environ["TRAIN_HOOK"].split(":")
n = int(n)
calls, managers = [], []
original_to_global_batch, original_checkpoint_manager = rs.to_global_batch, rs.checkpoint_manager
original_initialise_distributed = rs.initialise_distributed


def checkpoint_manager(*args, **kwargs):
    managers.append(original_checkpoint_manager(*args, **kwargs))
    return managers[-1]


def to_global_batch(host_batch, sharding):
    calls.append(1)
    if len(calls) == n and kind == "sigterm_at_call":
        os.kill(os.getpid(), signal.SIGTERM)
    if len(calls) == n and kind == "hang_at_call":
        managers[0].wait_until_finished()
        Path(os.environ["TRAIN_HOOK_MARKER"]).write_text(str(managers[0].latest_step()))
        time.sleep(3600)
    return original_to_global_batch(host_batch, sharding)


def initialise_distributed(dist):
    original_initialise_distributed(dist)
    if kind == "slow_start":
        time.sleep(n)


rs.checkpoint_manager, rs.to_global_batch = checkpoint_manager, to_global_batch
rs.initialise_distributed = initialise_distributed
sys.exit(rs.main(sys.argv[1:]))
"""


@pytest.fixture(scope="session")
def train_hooked_main(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("train_hooks") / "hooked_main.py"
    path.write_text(HOOKED_MAIN)
    return path


def start_run(args, env, log_path: Path, *, script=None, extra_env=None) -> subprocess.Popen:
    with log_path.open("w") as log:
        return subprocess.Popen([sys.executable, str(script or HERE / "run_scream.py"), *args], cwd=HERE,
                                env={**env, **(extra_env or {})}, stdout=log, stderr=subprocess.STDOUT)


def finish_run(process: subprocess.Popen, log_path: Path, *, expect_rc=0, timeout=RUN_TIMEOUT_S) -> str:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"run timed out after {timeout}s; log:\n{log_path.read_text()[-4000:]}")
    text = log_path.read_text()
    assert process.returncode == expect_rc, f"exit {process.returncode}; log:\n{text[-4000:]}"
    return text


def run_to_end(args, env, log_path: Path, **kwargs) -> str:
    return finish_run(start_run(args, env, log_path, **kwargs), log_path)


def metrics_lines(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def train_lines(output_dir: Path) -> dict[int, dict]:
    lines = [m for m in metrics_lines(output_dir) if "train/loss" in m]
    steps = [m["step"] for m in lines]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {m["step"]: m for m in lines}


def eval_lines(output_dir: Path) -> list[dict]:
    return [m for m in metrics_lines(output_dir) if "eval/loss" in m]


def exported_arrays(output_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(output_dir / "model.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


@pytest.fixture(scope="session")
def train_straight(train_demo, train_env, tmp_path_factory):
    """The reference run: one process, 8 devices, 6 steps straight through."""
    out = tmp_path_factory.mktemp("train_straight") / "out"
    log = run_to_end(train_command(train_demo, out), train_env, out.parent / "log.txt")
    return out, log


# --- 1. the step: sharding, accumulation, the exact loss ---


@pytest.fixture(scope="session")
def train_step_runs(train_demo):
    """Three optimizer steps of `train_step` on the same global batches on several meshes, jitted
    with in/out shardings and donation as run() does. Returns per-run losses, parameters and state."""
    pretrained = rs.load_pretrained(str(train_demo / "model"), weights=False)
    config, tokenizer, feature_extractor = pretrained.config, pretrained.tokenizer, pretrained.feature_extractor
    tokenizer.set_prefix_tokens(language="no", task="transcribe", predict_timestamps=False)
    source = rs.load_source(rs.DataArguments(dataset_name=str(train_demo / "data"), shuffle_buffer_size=0), "train",
                            process_index=0, process_count=1, seed=0, shuffle=False, epoch=0, max_samples=22)
    prepare = functools.partial(
        rs.prepare_example, audio_column="audio", text_column="text", id_column="id", tokenizer=tokenizer,
        audio_settings=rs.AudioSettings(16000, feature_extractor.n_samples, 0.0, CHUNK_S),
        text_settings=rs.TextSettings(False, False, 32))
    examples = [prepare(row)[0] for row in source]
    assert all(e is not None for e in examples)
    collate = functools.partial(rs.collate, batch_size=GLOBAL_BATCH, n_samples=feature_extractor.n_samples,
                                max_label_length=32, pad_token_id=config.pad_token_id)
    # The third batch has 6 examples and 2 padding rows (no labels).
    batches = [collate(examples[0:8]), collate(examples[8:16]), collate(examples[16:22])]

    model = rs.build_model(config)
    train_args = rs.TrainingArguments(learning_rate=1e-3, lr_scheduler_type="constant", weight_decay=0.01,
                                      max_grad_norm=1.0)
    optimizer = rs.make_optimizer(train_args, rs.learning_rate_schedule(1e-3, 0, 100, "constant"))
    mel_filters = np.asarray(feature_extractor.mel_filters, np.float32)
    params = jax.device_get(rs.init_params(model, jax.random.PRNGKey(0)))
    initial = rs.TrainState(np.int32(0), params, jax.device_get(optimizer.init(params)),
                            np.asarray(jax.random.PRNGKey(1)))

    def run(mesh, accumulation_steps):
        sharding = rs.state_shardings(jax.eval_shape(lambda: initial), mesh)
        data_sharding = rs.batch_sharding(mesh)
        step_fn = jax.jit(
            functools.partial(rs.train_step, model=model, optimizer=optimizer, mel_filters=mel_filters,
                              accumulation_steps=accumulation_steps, label_smoothing=0.0, mesh=mesh),
            in_shardings=(sharding, data_sharding), out_shardings=(sharding, None), donate_argnums=0)
        state = jax.device_put(initial, sharding)
        losses = []
        for batch in batches:
            state, metrics = step_fn(state, rs.to_global_batch(batch, data_sharding))
            losses.append(float(metrics["loss"]))
        return {"losses": np.array(losses), "params": jax.device_get(state.params), "state": state}

    devices = jax.devices()
    assert len(devices) == 8, "the tests need XLA_FLAGS=--xla_force_host_platform_device_count=8"
    runs = {
        "one_device": run(rs.make_mesh(1, devices=devices[:1]), 1),
        "data_parallel_8x1": run(rs.make_mesh(1), 1),
        "fsdp_4x2": run(rs.make_mesh(2), 1),
        # 4 micro-batches of 2 rows inside the step
        "accumulate_4_on_1_device": run(rs.make_mesh(1, devices=devices[:1]), 4),
        # ... each micro-batch split over a 1x2 mesh (one row per device), parameters sharded
        "accumulate_4_on_1x2": run(rs.make_mesh(2, devices=devices[:2]), 4),
    }
    return {"runs": runs, "batches": batches, "model": model, "initial": initial, "mel_filters": mel_filters}


# float32: the meshes sum the same numbers in different orders. Measured: losses within 2e-7
# relative; parameters after 3 AdamW steps (LR 1e-3, so each moves up to ~3e-3) within 3.3e-6
# absolute (data parallel 3.2e-6, FSDP 1.4e-6, accumulation 0.5e-6 and 3.0e-6).
LOSS_RTOL = 1e-5
PARAM_ATOL = 3e-5


@pytest.mark.parametrize("name", ["data_parallel_8x1", "fsdp_4x2", "accumulate_4_on_1_device", "accumulate_4_on_1x2"])
def test_train_step_same_loss_and_params_on_every_mesh(train_step_runs, name):
    reference, run = train_step_runs["runs"]["one_device"], train_step_runs["runs"][name]
    np.testing.assert_allclose(run["losses"], reference["losses"], rtol=LOSS_RTOL)
    assert max_abs_diff(rs.flatten_tree(run["params"]), rs.flatten_tree(reference["params"])) < PARAM_ATOL
    # The steps really moved the parameters (far more than the tolerance).
    moved = max_abs_diff(rs.flatten_tree(run["params"]), rs.flatten_tree(train_step_runs["initial"].params))
    assert moved > 20 * PARAM_ATOL


def test_fsdp_really_shards_parameters_and_moments(train_step_runs):
    state = train_step_runs["runs"]["fsdp_4x2"]["state"]
    for tree in (state.params, state.opt_state):
        sharded = [leaf for leaf in jax.tree.leaves(tree)
                   if "fsdp" in str(leaf.sharding.spec) and leaf.addressable_shards[0].data.size * 2 == leaf.size]
        assert sharded, "no leaf is sharded over the fsdp axis"
    embedding = state.params["decoder"]["embed_tokens"]["embedding"]  # (1865, 64): 64 is the divisible one
    assert embedding.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert embedding.addressable_shards[0].data.shape == (1865, 32)
    data_parallel = train_step_runs["runs"]["data_parallel_8x1"]["state"]
    assert all(leaf.addressable_shards[0].data.shape == leaf.shape for leaf in jax.tree.leaves(data_parallel.params))


def test_loss_is_token_mean_over_the_global_batch(train_step_runs):
    """Step 1's loss = sum of token losses / label tokens over all 8 rows, computed here from logits."""
    model, initial = train_step_runs["model"], train_step_runs["initial"]
    batch = train_step_runs["batches"][0]
    features = rs.log_mel(jnp.asarray(batch["audio"]), train_step_runs["mel_filters"])
    logits = np.asarray(model.apply({"params": initial.params}, features, batch["decoder_input_ids"]), np.float64)
    labels = batch["labels"]
    mask = labels != -100
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    token_nll = -np.take_along_axis(log_probs, np.where(mask, labels, 0)[..., None], -1)[..., 0] * mask
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) > 2  # uneven label lengths
    token_mean = token_nll.sum() / mask.sum()
    example_mean = np.mean(token_nll.sum(1) / lengths)
    assert abs(token_mean - example_mean) > 1e-4  # so a per-example average would be caught
    for name, run in train_step_runs["runs"].items():
        assert run["losses"][0] == pytest.approx(token_mean, rel=1e-5), name


# --- 2. two processes with jax.distributed ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def train_two_processes(train_demo, train_env, train_hooked_main, tmp_path_factory):
    """The straight run's command on 2 processes x 4 devices, joined through jax.distributed on
    localhost. Process 1 is a slow host: it dawdles 4 s after joining, so that process 0 reaches
    the output directory first (which once made process 1 refuse the run as "not empty")."""
    out = tmp_path_factory.mktemp("train_two_processes") / "out"
    port = free_port()
    env = {**train_env, "XLA_FLAGS": f"--xla_force_host_platform_device_count=4 {COLLECTIVE_TIMEOUT_FLAG}"}
    processes = [
        start_run(train_command(train_demo, out, "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
                                "--process_id", str(i), "--distributed_timeout_s", "120"),
                  env, out.parent / f"log{i}.txt", script=train_hooked_main,
                  extra_env={"TRAIN_HOOK": "slow_start:4" if i == 1 else "none:0"})
        for i in range(2)
    ]
    try:
        logs = [finish_run(p, out.parent / f"log{i}.txt") for i, p in enumerate(processes)]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out, logs


def test_two_processes_give_the_losses_of_one(train_demo, train_straight, train_two_processes):
    # The global batch is host 0's rows, then host 1's. Both layouts must see the same *set* of
    # examples per step, or the losses would differ for a legitimate reason. The train split is
    # iterated as 40 one-row shards; split_dataset_by_node deals them round-robin, so host 0
    # reads examples 0, 2, 4, ... and host 1 reads 1, 3, 5, ...: with 4 rows per host, step k
    # sees examples 8k..8k+7 on one process and on two (in another row order, which the
    # token-summed loss does not care about). This is checked here first.
    data_args = rs.DataArguments(dataset_name=str(train_demo / "data"), shuffle_buffer_size=0)

    def ids(process_index, process_count):
        source = rs.load_source(data_args, "train", process_index=process_index, process_count=process_count,
                                seed=0, shuffle=True, epoch=0, max_samples=None)
        return [row["id"] for row in source]

    one, host0, host1 = ids(0, 1), ids(0, 2), ids(1, 2)
    per_host = GLOBAL_BATCH // 2
    for step in range(NUM_TRAIN // GLOBAL_BATCH):
        two_process_batch = host0[step * per_host:(step + 1) * per_host] + host1[step * per_host:(step + 1) * per_host]
        assert sorted(two_process_batch) == sorted(one[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH])

    straight, _ = train_straight
    out, logs = train_two_processes
    config = json.loads((out / "scream_config.json").read_text())["resolved"]
    assert (config["processes"], config["devices"], config["per_host_batch_size"]) == (2, 8, 4)
    one_process, two_processes = train_lines(straight), train_lines(out)
    assert sorted(two_processes) == list(range(1, NUM_STEPS + 1))  # process 0 wrote each step once
    # Measured: equal to 2e-7 relative (float32 sums in another order).
    for step in range(1, NUM_STEPS + 1):
        assert two_processes[step]["train/loss"] == pytest.approx(one_process[step]["train/loss"], rel=LOSS_RTOL)
        assert two_processes[step]["train/grad_norm"] == pytest.approx(one_process[step]["train/grad_norm"], rel=1e-4)
    # Eval data is split across the hosts; every example counted once.
    (eval_one,), (eval_two,) = eval_lines(straight), eval_lines(out)
    assert eval_two["eval/num_tokens"] == eval_one["eval/num_tokens"]
    assert eval_two["eval/num_examples"] == eval_one["eval/num_examples"] == NUM_EVAL
    assert eval_two["eval/loss"] == pytest.approx(eval_one["eval/loss"], rel=LOSS_RTOL)
    predictions = [json.loads(line) for line in (out / "predictions" / f"step_{NUM_STEPS}.jsonl").read_text().splitlines()]
    assert sorted(row["id"] for row in predictions) == [f"validation-{i:06d}" for i in range(NUM_EVAL)]
    assert max_abs_diff(exported_arrays(out), exported_arrays(straight)) < PARAM_ATOL


# --- 3. resume: SIGTERM, then SIGKILL, then to the end ---


@pytest.fixture(scope="session")
def train_resumed(train_demo, train_env, train_hooked_main, tmp_path_factory):
    """The straight run's command, interrupted twice and relaunched unchanged each time:
    launch 1 gets SIGTERM during step 3 (it saves checkpoint 3 and exits 0); launch 2 resumes from
    3, saves checkpoint 4 on its cadence, logs steps 4 and 5, and is SIGKILLed during step 6 (once
    checkpoint 4 is finalized, so the kill is deterministic); launch 3 resumes from 4, redoes step 5
    and finishes."""
    root = tmp_path_factory.mktemp("train_resumed")
    out = root / "out"
    args = train_command(train_demo, out)

    first = run_to_end(args, train_env, root / "log1.txt", script=train_hooked_main,
                       extra_env={"TRAIN_HOOK": "sigterm_at_call:3"})
    checkpoints_after_first = sorted(int(p.name) for p in (out / "checkpoints").iterdir())

    marker, log2 = root / "hanging", root / "log2.txt"
    process = start_run(args, train_env, log2, script=train_hooked_main,
                        extra_env={"TRAIN_HOOK": "hang_at_call:3", "TRAIN_HOOK_MARKER": str(marker)})
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    hanging = marker.exists() and process.poll() is None
    process.kill()  # SIGKILL
    process.wait()
    assert hanging, f"launch 2 never reached step 6 (exit {process.returncode}); log:\n{log2.read_text()[-4000:]}"
    second = log2.read_text()
    latest_at_kill = int(marker.read_text())
    steps_logged_at_kill = [m["step"] for m in metrics_lines(out) if "train/loss" in m]

    third = run_to_end(args, train_env, root / "log3.txt")
    return {"out": out, "logs": (first, second, third), "checkpoints_after_first": checkpoints_after_first,
            "latest_at_kill": latest_at_kill, "steps_logged_at_kill": steps_logged_at_kill}


def test_resume_after_sigterm_and_sigkill_matches_a_straight_run(train_straight, train_resumed):
    straight, _ = train_straight
    out, (first, second, third) = train_resumed["out"], train_resumed["logs"]
    assert "stopped by SIGTERM after step 3" in first
    assert train_resumed["checkpoints_after_first"] == [2, 3]  # the cadence's 2 and the SIGTERM's 3
    assert "resumed from" in second and "(step 3)" in second
    # Killed during step 6 with steps 4 and 5 logged but only checkpoint 4 on disk.
    assert train_resumed["latest_at_kill"] == 4 and train_resumed["steps_logged_at_kill"] == [1, 2, 3, 4, 5]
    assert "resumed from" in third and "(step 4)" in third
    # Each step logged exactly once over the three launches (step 5, done twice, too), with the
    # straight run's numbers. Measured: bit-identical (same executable, state and data position).
    resumed, reference = train_lines(out), train_lines(straight)
    assert sorted(resumed) == sorted(reference) == list(range(1, NUM_STEPS + 1))
    for step in range(1, NUM_STEPS + 1):
        for key in ("train/loss", "train/grad_norm", "train/learning_rate", "examples_seen", "train/epoch"):
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-6, abs=0), (step, key)
    assert resumed[NUM_STEPS]["train/epoch"] == 1  # the run crossed an epoch boundary
    (eval_resumed,), (eval_reference,) = eval_lines(out), eval_lines(straight)
    assert eval_resumed["eval/loss"] == pytest.approx(eval_reference["eval/loss"], rel=1e-6)
    # Same final parameters, read back from both exported models.
    assert max_abs_diff(exported_arrays(out), exported_arrays(straight)) <= 1e-7
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["4", "6"]


# --- 4. learning-rate schedule ---


def expected_lr(kind: str, step: int, peak: float, warmup: int, total: int) -> float:
    if kind != "constant" and step < warmup:
        return peak * step / warmup
    if kind == "linear":
        return peak * max(0.0, (total - step) / (total - warmup))
    return peak


@pytest.mark.parametrize("kind", ["linear", "constant", "constant_with_warmup"])
@pytest.mark.parametrize("warmup", [0, 10])
def test_learning_rate_schedule_is_the_formula(kind, warmup):
    schedule = rs.learning_rate_schedule(1e-3, warmup, 100, kind)
    for step in (0, 1, 5, 9, 10, 11, 50, 99, 100, 120):
        assert float(schedule(step)) == pytest.approx(expected_lr(kind, step, 1e-3, warmup, 100), rel=1e-5, abs=1e-12), step


def test_effective_learning_rate_scaling():
    def scaled(kind):
        args = rs.TrainingArguments(learning_rate=2e-5, lr_scaling=kind, lr_reference_batch_size=512)
        return rs.effective_learning_rate(args, 1024)

    assert f"{scaled('sqrt'):.4g}" == "2.828e-05"
    assert scaled("linear") == pytest.approx(4e-5)
    assert scaled("none") == 2e-5
    with pytest.raises(rs.ConfigError, match="--lr_reference_batch_size"):
        rs.TrainingArguments(lr_scaling="sqrt")


def test_logged_learning_rate_is_the_schedule(train_straight):
    straight, _ = train_straight
    lines = train_lines(straight)
    # The line of step s reports the LR of the update that produced step s (optax counts from 0).
    for step, line in lines.items():
        want = expected_lr("linear", step - 1, PEAK_LR, WARMUP, NUM_STEPS)
        assert line["train/learning_rate"] == pytest.approx(want, rel=1e-6, abs=1e-12), step
    assert lines[1]["train/learning_rate"] == 0.0 and lines[WARMUP + 1]["train/learning_rate"] == pytest.approx(PEAK_LR)


# --- 5. what a run leaves behind ---


TRAIN_KEYS = {"step", "examples_seen", "train/loss", "train/learning_rate", "train/grad_norm", "train/examples_per_s",
              "train/data_wait_fraction"}
EVAL_KEYS = {"step", "eval/loss", "eval/wer", "eval/cer", "eval/wer_normalized", "eval/cer_normalized"}


def test_metrics_jsonl(train_straight):
    straight, _ = train_straight
    lines = metrics_lines(straight)
    train, evals = [m for m in lines if "train/loss" in m], [m for m in lines if "eval/loss" in m]
    assert [m["step"] for m in train] == list(range(1, NUM_STEPS + 1))
    assert [m["step"] for m in evals] == [NUM_STEPS]  # eval_steps defaults to the end
    for m in train:
        assert TRAIN_KEYS <= m.keys()
        assert m["examples_seen"] == m["step"] * GLOBAL_BATCH
        assert math.isfinite(m["train/loss"]) and m["train/grad_norm"] > 0 and m["train/examples_per_s"] > 0
        assert 0 <= m["train/data_wait_fraction"] <= 1
    assert train[-1]["train/loss"] < train[0]["train/loss"]
    assert EVAL_KEYS <= evals[0].keys()
    assert all(0 <= evals[0][k] for k in EVAL_KEYS - {"step"})
    assert list((straight / "tensorboard").glob("events.out.tfevents.*"))


def test_predictions_each_eval_example_once(train_demo, train_straight):
    straight, _ = train_straight
    rows = [json.loads(line) for line in (straight / "predictions" / f"step_{NUM_STEPS}.jsonl").read_text().splitlines()]
    assert all(row.keys() == {"id", "reference", "prediction"} for row in rows)
    references = {f"validation-{i:06d}": demo.make_example(0, "validation", i, CHUNK_S)[0] for i in range(NUM_EVAL)}
    assert {row["id"]: row["reference"] for row in rows} == references
    assert len(rows) == NUM_EVAL  # 12 examples in batches of 8: the padded rows of the last batch are not counted
    # Eval tokens: every example's label tokens (prefix + text + eot, less the first), padding excluded.
    tokenizer = rs.load_pretrained(str(train_demo / "model"), weights=False).tokenizer
    tokenizer.set_prefix_tokens(language="no", task="transcribe", predict_timestamps=False)
    num_tokens = sum(len(tokenizer(text).input_ids) - 1 for text in references.values())
    (final,) = eval_lines(straight)
    assert final["eval/num_tokens"] == num_tokens and final["eval/num_examples"] == NUM_EVAL
    # WER as jiwer computes it from these very rows.
    wer = rs.transcription_metrics([r["reference"] for r in rows], [r["prediction"] for r in rows])["wer"]
    assert final["eval/wer"] == pytest.approx(wer)


def test_checkpoints_config_and_model_card(train_straight):
    straight, _ = train_straight
    # Saved at 2, 4 and 6; --save_total_limit 2 keeps the last two, each complete.
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["4", "6"]
    for step in ("4", "6"):
        assert (straight / "checkpoints" / step / "state").is_dir() and (straight / "checkpoints" / step / "meta").is_dir()
        assert not list((straight / "checkpoints").glob(f"{step}.*tmp*"))
    config = json.loads((straight / "scream_config.json").read_text())
    resolved = config["resolved"]
    assert resolved["devices"] == 8 and resolved["processes"] == 1 and resolved["mesh"] == {"data": 8, "fsdp": 1}
    assert (resolved["global_batch_size"], resolved["per_device_batch_size"], resolved["eval_batch_size"]) == (8, 1, 8)
    assert resolved["effective_learning_rate"] == PEAK_LR
    assert resolved["total_train_examples"] == GLOBAL_BATCH * NUM_STEPS
    assert config["training"]["num_train_steps"] == NUM_STEPS and config["training"]["save_total_limit"] == SAVE_LIMIT
    card = (straight / "README.md").read_text()
    (final,) = eval_lines(straight)
    for key in ("eval/loss", "eval/wer", "eval/cer", "eval/wer_normalized"):
        assert f"- {key}: {final[key]:.4g}" in card
    assert '"num_train_steps": 6' in card


def test_exported_model_loads_in_transformers_with_our_logits(train_demo, train_straight):
    import torch
    from transformers import WhisperForConditionalGeneration

    straight, _ = train_straight
    torch_model = WhisperForConditionalGeneration.from_pretrained(str(straight)).eval()
    ours = rs.load_pretrained(str(straight))
    model = rs.build_model(ours.config)
    rng = np.random.default_rng(0)
    n_samples = ours.feature_extractor.n_samples
    audio = np.stack([np.pad(clip, (0, n_samples - len(clip)))
                      for clip in (demo.make_example(0, "validation", i, CHUNK_S)[1] for i in range(2))])
    features = np.asarray(rs.log_mel(jnp.asarray(audio), np.asarray(ours.feature_extractor.mel_filters, np.float32)))
    decoder_ids = rng.integers(0, ours.config.vocab_size, (2, 12)).astype(np.int32)
    logits = np.asarray(model.apply({"params": ours.params}, features, decoder_ids))
    with torch.no_grad():
        torch_logits = torch_model(input_features=torch.from_numpy(np.array(features)),
                                   decoder_input_ids=torch.from_numpy(decoder_ids).long()).logits.numpy()
    assert np.max(np.abs(logits - torch_logits)) < 1e-4


def test_eval_only_of_the_exported_model(train_demo, train_env, train_straight, tmp_path):
    """--do_eval alone on the exported model: the final eval of training again, and
    --log_max_eval_predictions 3 writes 3 rows."""
    straight, _ = train_straight
    out = tmp_path / "eval"
    run_to_end(["--model_name_or_path", str(straight), "--dataset_name", str(train_demo / "data"),
                "--output_dir", str(out), "--do_eval", "--predict_with_generate", "--train_batch_size", str(GLOBAL_BATCH),
                "--eval_batch_size", str(EVAL_BATCH), "--max_label_length", "32", "--log_max_eval_predictions", "3",
                "--preprocessing_num_workers", "2", "--report_to", "none"], train_env, tmp_path / "log.txt")
    (final,), (again,) = eval_lines(straight), eval_lines(out)
    assert again["eval/loss"] == pytest.approx(final["eval/loss"], rel=1e-5)
    assert again["eval/num_examples"] == NUM_EVAL
    rows = (out / "predictions" / "step_0.jsonl").read_text().splitlines()
    assert len(rows) == 3


def test_refuses_a_non_empty_output_dir_without_checkpoints(train_demo, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("someone's files")
    code = rs.main(train_command(train_demo, tmp_path, "--report_to", "none"))
    message = capsys.readouterr().err
    assert code == 2
    assert "--output_dir" in message and "--overwrite_output_dir" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing written


def test_batch_not_divisible_by_devices(train_demo, tmp_path, capsys):
    code = rs.main(train_command(train_demo, tmp_path / "out", "--train_batch_size", "12"))
    message = capsys.readouterr().err
    assert code == 2
    assert "--train_batch_size 12" in message and "multiple of 8" in message
    assert not (tmp_path / "out").exists()
