"""The experiment scripts: dry runs show each pins the 2023 runs' and the 2024 release recipe's settings,
copies write elsewhere, and the learning-rate search runs its four settings and tabulates them."""

import contextlib
import functools
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import huggingface_hub
import pytest
from transformers import WhisperConfig, WhisperFeatureExtractor

import make_demo_dataset as demo
import run_scream as rs
from tests.support import REPO, runtime_only_pythonpath

HUB_MODELS = {
    "openai/whisper-tiny": dict(
        d_model=384,
        encoder_layers=4,
        decoder_layers=4,
        encoder_attention_heads=6,
        decoder_attention_heads=6,
        encoder_ffn_dim=1536,
        decoder_ffn_dim=1536,
    ),
    "openai/whisper-large-v2": dict(
        d_model=1280,
        encoder_layers=32,
        decoder_layers=32,
        encoder_attention_heads=20,
        decoder_attention_heads=20,
        encoder_ffn_dim=5120,
        decoder_ffn_dim=5120,
    ),
    "openai/whisper-large-v3": dict(
        d_model=1280,
        encoder_layers=32,
        decoder_layers=32,
        encoder_attention_heads=20,
        decoder_attention_heads=20,
        encoder_ffn_dim=5120,
        decoder_ffn_dim=5120,
        num_mel_bins=128,
        vocab_size=51866,
    ),
}


# The 2023 experiments (the seed's EXPERIMENTS.md): "The five runs" and the v4-8 learning-rate search.
EXPERIMENTS = {
    "run_tiny_nrk.sh": dict(
        model="openai/whisper-tiny",
        dataset="NbAiLab/NCC_speech_nrk_v5",
        global_batch=512,
        effective_learning_rate=2e-5,
        warmup_steps=10000,
        num_train_steps=250000,
        eval_steps=5000,
        eval_batch=512,
        hub_model_id="NbAiLab/scream_tiny_sept_nrk",
    ),
    "run_tiny_all.sh": dict(
        model="openai/whisper-tiny",
        dataset="NbAiLab/NCC_speech_all_v5",
        global_batch=512,
        effective_learning_rate=2e-5,
        warmup_steps=10000,
        num_train_steps=250000,
        eval_steps=5000,
        eval_batch=512,
        hub_model_id="NbAiLab/scream_tiny_sept_all",
    ),
    "run_tiny_1024bs.sh": dict(
        model="openai/whisper-tiny",
        dataset="NbAiLab/NCC_speech_all_v5",
        global_batch=1024,
        effective_learning_rate=2.828e-5,
        warmup_steps=5000,
        num_train_steps=125000,
        eval_steps=2500,
        eval_batch=512,
        hub_model_id="NbAiLab/scream_tiny_sept_all_1024bs",
    ),
    "run_large_2e6.sh": dict(
        model="openai/whisper-large-v2",
        dataset="NbAiLab/NCC_speech_all_v5",
        global_batch=160,
        effective_learning_rate=2e-6,
        warmup_steps=5000,
        num_train_steps=100000,
        eval_steps=2500,
        eval_batch=160,
        hub_model_id="NbAiLab/scream_large_sept_2e6",
    ),
    "run_large_8e6.sh": dict(
        model="openai/whisper-large-v2",
        dataset="NbAiLab/NCC_speech_all_v5",
        global_batch=160,
        effective_learning_rate=8e-6,
        warmup_steps=5000,
        num_train_steps=100000,
        eval_steps=2500,
        eval_batch=160,
        hub_model_id="NbAiLab/scream_large_sept_8e6",
    ),
    # The seed's EXPERIMENTS.md, "The 2024 release recipe" (per-device batch 8 on a v4-64).
    "run_nb_large_v3.sh": dict(
        model="openai/whisper-large-v3",
        dataset="NbAiLab/ncc_speech_v7",
        global_batch=256,
        effective_learning_rate=7e-5,
        warmup_steps=10000,
        num_train_steps=200000,
        eval_steps=5000,
        eval_batch=256,
        hub_model_id="NbAiLab/scream_nb_large_v3",
    ),
}


LR_SEARCH = {
    "tiny_8tpu_1e5_constant": (1e-5, "constant_with_warmup"),
    "tiny_8tpu_1e5_linear": (1e-5, "linear"),
    "tiny_8tpu_2e5_linear": (2e-5, "linear"),
    "tiny_8tpu_3e5_linear": (3e-5, "linear"),
}


@pytest.fixture(scope="session")
def scripts_hub_cache(tmp_path_factory):
    """A Hugging Face hub cache holding the two base models' configs, as a machine that once
    downloaded them has it (refs/main -> snapshots/<commit>/...)."""
    cache = tmp_path_factory.mktemp("hub_cache")
    tokenizer = demo.write_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    for index, (repo_id, dims) in enumerate(HUB_MODELS.items()):
        repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
        commit = f"{index + 1:040x}"
        snapshot = repo_dir / "snapshots" / commit
        snapshot.mkdir(parents=True)
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / "main").write_text(commit)
        config = WhisperConfig(
            **{
                "vocab_size": 51865,
                "num_mel_bins": 80,
                "max_source_positions": 1500,
                "max_target_positions": 448,
                "pad_token_id": 50257,
                "bos_token_id": 50257,
                "eos_token_id": 50257,
                "decoder_start_token_id": 50258,
                **dims,
            }
        )
        config.save_pretrained(snapshot)
        tokenizer.save_pretrained(snapshot)
        WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(snapshot)
    return cache


@functools.cache  # several tests read one script's plan: bash runs each script once
def script_arguments(script: Path, *extra: str) -> list[str]:
    """The arguments the script gives run_scream.py: bash runs the script as a user does, with $PYTHON
    a stand-in that writes them down instead of starting Python (a process that imports the
    trainer costs 3 s; the plan comes from run_scream.main in this process)."""
    with tempfile.TemporaryDirectory() as tmp:
        recorder = Path(tmp) / "python"
        recorder.write_text('#!/bin/sh\nprintf "%s\\0" "$@" > "$(dirname "$0")/arguments"\n')
        recorder.chmod(0o755)
        env = dict(os.environ, PYTHON=str(recorder))
        subprocess.run(["bash", str(script), *extra], env=env, capture_output=True, timeout=60, check=True)
        program, *arguments = (Path(tmp) / "arguments").read_text().split("\0")[:-1]
    assert program == "run_scream.py", program
    return arguments


def dry_run(script: Path, cache: Path, *extra: str) -> dict:
    """The plan that `bash SCRIPT [extra] --dry_run --no_dry_run_compile` prints, reading the base
    models' configs from `cache` offline."""
    arguments = script_arguments(script, *extra, "--dry_run", "--no_dry_run_compile")
    printed = io.StringIO()
    with mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True), contextlib.redirect_stdout(printed):
        assert rs.main([*arguments, "--cache_dir", str(cache)]) == 0
    plan_lines = [line for line in printed.getvalue().splitlines() if line.startswith("plan_json: ")]
    assert len(plan_lines) == 1, printed.getvalue()[-3000:]
    return json.loads(plan_lines[0].removeprefix("plan_json: "))


@pytest.mark.parametrize("script", sorted(EXPERIMENTS))
def test_experiment_script_pins_the_seed_values(script, scripts_hub_cache):
    plan = dry_run(REPO / script, scripts_hub_cache)
    expected = EXPERIMENTS[script]
    assert plan["model_name_or_path"] == expected["model"]
    assert plan["dataset_name"] == expected["dataset"]
    assert plan["language"] == "no" and plan["task"] == "transcribe"
    assert plan["global_batch"] == expected["global_batch"]
    assert plan["eval_batch"] == expected["eval_batch"]
    assert plan["effective_learning_rate"] == pytest.approx(expected["effective_learning_rate"], rel=1e-3)
    assert plan["lr_scheduler_type"] == "linear"
    assert plan["warmup_steps"] == expected["warmup_steps"]
    assert plan["num_train_steps"] == expected["num_train_steps"]
    assert plan["eval_steps"] == expected["eval_steps"]
    assert plan["total_train_examples"] == expected["global_batch"] * expected["num_train_steps"]
    assert plan["hub_model_id"] == expected["hub_model_id"]
    assert plan["dtype"] == "bfloat16"
    assert plan["parameters"] > (1_500_000_000 if "large" in script else 37_000_000)


def test_1024bs_lines_up_with_tiny_all_example_for_example(scripts_hub_cache):
    tiny_all = dry_run(REPO / "run_tiny_all.sh", scripts_hub_cache)
    doubled = dry_run(REPO / "run_tiny_1024bs.sh", scripts_hub_cache)
    for key in ("total_train_examples",):
        assert doubled[key] == tiny_all[key]
    assert doubled["eval_steps"] * doubled["global_batch"] == tiny_all["eval_steps"] * tiny_all["global_batch"]
    assert doubled["warmup_steps"] * doubled["global_batch"] == tiny_all["warmup_steps"] * tiny_all["global_batch"]
    assert doubled["effective_learning_rate"] == pytest.approx(2.828e-5, abs=5e-9)


def test_a_copied_script_writes_elsewhere(scripts_hub_cache, tmp_path):
    for name in ("run_scream.py", "run_large_8e6.sh"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copy(REPO / "run_large_8e6.sh", tmp_path / "run_large_8e6_warmup10k.sh")
    original = dry_run(tmp_path / "run_large_8e6.sh", scripts_hub_cache)
    copy = dry_run(tmp_path / "run_large_8e6_warmup10k.sh", scripts_hub_cache)
    assert copy["output_dir"] != original["output_dir"]
    assert copy["hub_model_id"] != original["hub_model_id"]
    assert copy["hub_model_id"] == "NbAiLab/scream_large_8e6_warmup10k"
    assert Path(copy["output_dir"]).name == "scream_large_8e6_warmup10k"


def test_lr_search_runs_the_four_seed_settings(scripts_hub_cache):
    for name, (learning_rate, schedule) in LR_SEARCH.items():
        plan = dry_run(REPO / "run_lr_search_v4-8.sh", scripts_hub_cache, name)
        assert (
            plan["model_name_or_path"] == "openai/whisper-tiny" and plan["dataset_name"] == "NbAiLab/NCC_speech_all_v5"
        )
        assert plan["global_batch"] == 512 and plan["eval_batch"] == 128
        assert plan["effective_learning_rate"] == pytest.approx(learning_rate)
        assert plan["lr_scheduler_type"] == schedule
        assert (plan["warmup_steps"], plan["num_train_steps"], plan["eval_steps"]) == (10000, 100000, 2500)
        assert plan["hub_model_id"] == f"NbAiLab/scream_{name}"


def test_lr_search_table_reports_each_runs_best_wer(tmp_path):
    root = tmp_path / "runs"
    for name, wers in (("tiny_8tpu_2e5_linear", [40.0, 31.5, 33.0]), ("tiny_8tpu_3e5_linear", [35.0])):
        (root / f"scream_{name}").mkdir(parents=True)
        lines = [{"step": 2500 * (i + 1), "eval/wer_normalized": wer} for i, wer in enumerate(wers)]
        (root / f"scream_{name}" / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    env = dict(os.environ, PYTHON=sys.executable, SCREAM_OUTPUT_ROOT=str(root))
    table = subprocess.run(
        ["bash", str(REPO / "run_lr_search_v4-8.sh"), "--table"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "| tiny_8tpu_2e5_linear | 31.50 | 5000 | 3 |" in table
    assert "| tiny_8tpu_3e5_linear | 35.00 | 2500 | 1 |" in table
    assert "| tiny_8tpu_1e5_linear | - | - | 0 |" in table


def test_nb_large_v3_script_pins_the_release_recipe(scripts_hub_cache):
    plan = dry_run(REPO / "run_nb_large_v3.sh", scripts_hub_cache)
    assert (plan["param_dtype"], plan["adam_mu_dtype"], plan["dtype"]) == ("bfloat16", "bfloat16", "bfloat16")
    assert plan["decoder_length"] == 448 and plan["bpe_dropout"] == 0.2  # 120 prompt + 328 label positions
    assert plan["remat"] == "full" and plan["scan_layers"] is True
    script = (REPO / "run_nb_large_v3.sh").read_text()
    for flag in (
        "--adam_beta2 0.98",
        "--adam_epsilon 1e-6",
        "--weight_decay 0.01",
        "--activation_dropout 0.1",
        "--language_column_name language",
        "--timestamp_column_name timestamped_text",
        "--prev_column_name previous_text",
    ):
        assert flag + " \\\n" in script


def script_flags(script: Path) -> dict[str, str | bool]:
    """The flags a run script pins with literal values (`--name value` or a bare `--name`, one per
    line), as the script's author wrote them; values built from shell variables are left out."""
    flags = {}
    for line in script.read_text().splitlines():
        parts = line.strip().rstrip("\\").split()
        if parts and parts[0].startswith("--") and len(parts) <= 2 and not any("$" in p for p in parts):
            flags[parts[0][2:]] = parts[1].strip("'\"") if len(parts) == 2 else True
    return flags


@pytest.mark.parametrize("script", [*sorted(EXPERIMENTS), "run_lr_search_v4-8.sh"])
def test_dry_run_shows_every_value_the_script_pins(script, scripts_hub_cache):
    """The plan of --dry_run holds every flag the script pins, with the script's value (so AdamW's
    beta2, the previous-text length, the probabilities ... are on the page a researcher checks)."""
    extra = ("tiny_8tpu_1e5_constant",) if "lr_search" in script else ()
    plan, flags = dry_run(REPO / script, scripts_hub_cache, *extra), script_flags(REPO / script)
    assert len(flags) >= 20, flags
    for name, value in flags.items():
        if name in ("language",):  # the plan shows the code the run resolved, e.g. norwegian -> no
            assert plan[name] == rs.language_code(value)
        elif value is True:
            assert plan[name] is True, name
        elif isinstance(plan[name], (int, float)) and not isinstance(plan[name], bool):
            assert plan[name] == pytest.approx(float(value)), name
        else:
            assert str(plan[name]) == value, name


def test_dry_run_judges_fit_by_the_topologys_own_memory(demo_dir, tmp_path):
    """--dry_run_topology compiles for that TPU (compile only, libtpu) and judges "fits" against its
    chips' own memory: 16 GiB on a v5e (a v4's 30.75 usable: tests/test_bench.py's v4-8 compile)."""
    topology, kind, usable_gib = "v5e-4", "TPU v5 lite", 16
    env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env.update(PYTHONPATH=runtime_only_pythonpath(), XLA_FLAGS="")
    command = [sys.executable, str(REPO / "run_scream.py"), "--config_name", str(demo_dir / "model")]
    command += ["--dataset_name", str(demo_dir / "data"), "--output_dir", str(tmp_path), "--do_train"]
    command += ["--train_batch_size", "8", "--dry_run", "--dry_run_topology", topology]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("plan_json: "))[11:])
    assert plan["device_kind"] == kind and plan["usable_memory_per_device_gib"] == usable_gib
    assert 0 < plan["memory_per_device_bytes"] and plan["fits"] is (
        plan["memory_per_device_bytes"] <= usable_gib * 2**30
    )
