"""Benchmarks (bench_scream.py) at toy sizes, blocked attention, and compile-only TPU v4 plans."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# With libtpu installed, a process that starts JAX without this loads libtpu and holds
# /tmp/libtpu_lockfile, and the compile-only TPU subprocesses below could not start.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

# Compile-only TPU work: libtpu must neither look for a TPU nor ask a metadata server, nor wait for
# another process's libtpu lockfile (a parallel test process may hold it).
BENCH_TPU_ENV = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
                     HF_HUB_OFFLINE="1")


def bench_tables(text: str) -> dict[str, list[dict]]:
    """The markdown tables that bench_scream prints: {title: [row as {header: cell}]}."""
    tables, title, headers = {}, None, None
    for line in text.splitlines():
        heading = re.match(r"\*\*(.+?)\*\*", line)
        if heading:
            title, headers = heading.group(1), None
            continue
        if title and line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if headers is None:
                headers = cells
                tables[title] = []
            elif not set(line) <= set("|-"):
                assert len(cells) == len(headers), line
                tables[title].append(dict(zip(headers, cells)))
    return tables


def bench_table(tables: dict, prefix: str) -> list[dict]:
    matches = [rows for title, rows in tables.items() if title.startswith(prefix)]
    assert len(matches) == 1, f"no single table titled {prefix!r} in {list(tables)}"
    return matches[0]


def run_bench(capsys, *argv) -> dict:
    import bench_scream

    assert bench_scream.main(list(argv)) == 0
    return bench_tables(capsys.readouterr().out)


def test_bench_flops_formula_counts_whisper_tiny_and_large_v2():
    """Training FLOPs per example from the dimensions, checked against sums done by hand."""
    import bench_scream

    tiny = bench_scream.whisper_config("tiny")
    parts = bench_scream.forward_flops(tiny, 128)
    assert parts["conv stem"] == 2 * 3000 * 240 * 384 + 2 * 1500 * 1152 * 384
    assert parts["encoder attention QK^T, AV"] == 4 * 4 * 1500 * 1500 * 384
    assert parts["output projection"] == 2 * 128 * 384 * 51865
    assert bench_scream.training_flops_per_example(tiny, 128) == pytest.approx(146.9e9, rel=1e-3)
    large = bench_scream.whisper_config("large-v2")
    assert large.max_source_positions == 1500 and large.vocab_size == 51865
    assert bench_scream.training_flops_per_example(large, 128) == pytest.approx(8.478e12, rel=1e-3)


def test_bench_blocked_attention_matches_dense_attention():
    """The encoder's blocked attention (both layouts: per example on CPU, whole batch per step
    elsewhere) gives dot_product_attention's outputs and gradients."""
    import jax
    import jax.numpy as jnp

    import run_scream

    assert run_scream.query_block_size(1500) == 125
    assert run_scream.query_block_size(150) == 75
    assert run_scream.query_block_size(128) is None and run_scream.query_block_size(131) is None
    rng = np.random.default_rng(0)
    q, k, v, cotangent = (jnp.asarray(rng.normal(size=(2, 300, 3, 16)), jnp.float32) for _ in range(4))

    def loss(attend, q, k, v):
        return (attend(q, k, v) * cotangent).sum()

    def value_and_grads(attend):
        return jax.jit(jax.value_and_grad(functools.partial(loss, attend), argnums=(0, 1, 2)))(q, k, v)

    ref_value, ref_grads = value_and_grads(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=16 ** -0.5))
    assert "while" in jax.jit(run_scream.attention).lower(q, k, v).as_text()  # 300 queries: the blocked path
    variants = [run_scream.attention] + [
        functools.partial(run_scream.query_block_attention, scale=16 ** -0.5, block=100, per_example=per_example)
        for per_example in (True, False)]
    for attend in variants:
        value, grads = value_and_grads(attend)
        np.testing.assert_allclose(value, ref_value, rtol=1e-5)
        for grad, ref in zip(grads, ref_grads):
            np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-5)


def test_bench_train_tiny_prints_both_sides_flops_and_parts(capsys):
    tables = run_bench(capsys, "train", "--tiny")
    rows = bench_table(tables, "Training step throughput")
    assert [r["model"].split(" ")[0] for r in rows] == ["toy", "toy"]
    ours, theirs = rows
    assert "ours" in ours["model"] and "PyTorch" in theirs["model"] and "precomputed" in theirs["model"]
    for row in rows:
        seconds, examples_per_s = float(row["s/step"]), float(row["examples/s"])
        assert seconds > 0 and examples_per_s > 0
        assert seconds * examples_per_s == pytest.approx(2, rel=0.02)  # batch 2
        assert 0 < float(row["fraction of matmul peak"]) < 2
    assert float(ours["vs PyTorch"]) == pytest.approx(float(ours["examples/s"]) / float(theirs["examples/s"]), rel=0.02)
    assert float(theirs["vs PyTorch"]) == 1
    (flops,) = bench_table(tables, "Training FLOPs per example")
    parts = [float(flops[h]) for h in ("conv stem", "encoder projections + MLP", "encoder attention QK^T, AV",
                                       "decoder projections + MLP", "decoder attention QK^T, AV", "output projection")]
    assert all(p > 0 for p in parts)
    assert sum(parts) == pytest.approx(float(flops["formula"]), rel=0.02)
    # XLA's own count of the compiled step adds log-mel and elementwise work: a bit above the formula.
    assert 1.0 <= float(flops["XLA / formula"]) < 1.3
    profile = bench_table(tables, "Where the time goes")
    names = [r["part"] for r in profile]
    for expected in ("log-mel", "conv stem", "encoder layer", "self-attention core", "decoder layer",
                     "output projection", "AdamW"):
        assert any(expected in name for name in names), expected
    assert all(float(r["ours (jit)"]) > 0 for r in profile)


def test_bench_input_tiny_compares_pipelines_and_workers(capsys):
    tables = run_bench(capsys, "input", "--tiny")
    rows = bench_table(tables, "Host work per")
    kinds = [(r["pipeline"].split(":")[0], r["source"]) for r in rows]
    assert kinds == [(p, rate) for rate in ("16 kHz", "48 kHz") for p in ("ours", "host log-mel", "host log-mel")]
    assert [("numpy" in r["pipeline"], "torch" in r["pipeline"]) for r in rows[:3]] == [
        (False, False), (True, False), (False, True)]
    for row in rows:
        assert float(row["examples/s per core"]) * float(row["ms/example"]) == pytest.approx(1000, rel=0.02)
    for group in (rows[0:3], rows[3:6]):
        ours_ms = float(group[0]["ms/example"])
        for row in group:
            assert float(row["time vs ours"]) == pytest.approx(float(row["ms/example"]) / ours_ms, rel=0.02)
    parts = bench_table(tables, "Where the host time goes")
    assert [r["source"] for r in parts] == ["16 kHz", "48 kHz"]
    assert float(parts[0]["resample"]) < float(parts[1]["resample"])  # 16 kHz sources are not resampled
    assert all(float(r["decode"]) > 0 and float(r["log-mel numpy"]) > 0 for r in parts)
    scaling = bench_table(tables, "SpeechBatches over a local parquet dataset")
    assert sorted((r["pipeline"], r["workers"]) for r in scaling) == [
        (p, w) for p in ("host log-mel (numpy)", "host log-mel (torch)", "ours") for w in ("1", "2")]
    assert all(float(r["examples/s"]) > 0 for r in scaling)


def test_bench_input_clips_compress_like_speech():
    """The synthetic clips are neither silence nor noise to FLAC: 16-bit speech compresses to ~40-70%."""
    import bench_scream

    clip = bench_scream.make_clips(1, 4.0, 16000)[0]
    ratio = len(clip["audio"]["bytes"]) / (4.0 * 16000 * 2)
    assert 0.25 < ratio < 0.8


def test_bench_compile_tiny_times_unrolled_and_scan(capsys):
    tables = run_bench(capsys, "compile", "--tiny")
    (row,) = bench_table(tables, "Train step compile time")
    assert row["model"] == "toy" and row["layers"] == "2+2"
    unrolled, scanned = float(row["unrolled: lower + compile"]), float(row["scan: lower + compile"])
    assert unrolled > float(row["unrolled: lower"]) > 0 and scanned > float(row["scan: lower"]) > 0
    assert float(row["scan speed-up"]) == pytest.approx(unrolled / scanned, rel=0.02)


def test_bench_tpu_tiny_compiles_for_a_v4_8():
    """bench_scream tpu --tiny: run_scream's real step compiled for a TPU v4-8 from this CPU."""
    result = subprocess.run([sys.executable, str(REPO / "bench_scream.py"), "tpu", "--tiny"], env=BENCH_TPU_ENV,
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = bench_table(bench_tables(result.stdout), "Per-chip memory of the real train step")
    memory = {r["sharding"]: float(r["GiB/chip at seed batch"]) for r in rows}
    assert sorted(memory) == ["FSDP 4", "data parallel"]
    assert all(0 < gib < 1 for gib in memory.values())
    # Sharding parameters and optimizer state over the 4 chips holds less of them per chip.
    assert memory["FSDP 4"] < memory["data parallel"]
    for row in rows:
        assert row["slice"] == "v4-8 (4 chips)" and row["remat"] == "dots" and row["scan"] == "on"
        assert row["fits"] == "yes" and row["largest batch/chip"] == ">= 2 (search cap)"


def test_bench_dry_run_reports_memory_per_chip_on_a_v4_8(tmp_path):
    """run_scream --dry_run --dry_run_topology v4-8 compiles the real step for 4 TPU v4 chips."""
    import make_demo_dataset

    tokenizer = make_demo_dataset.write_tokenizer(tmp_path / "tokenizer")
    make_demo_dataset.write_model_dir(tmp_path / "model", tokenizer, chunk_length_s=3, num_mel_bins=80)
    result = subprocess.run(
        [sys.executable, str(REPO / "run_scream.py"), "--config_name", str(tmp_path / "model"), "--dry_run",
         "--dry_run_topology", "v4-8", "--train_batch_size", "16", "--max_label_length", "32", "--dtype", "bfloat16",
         "--fsdp_size", "-1", "--scan_layers", "--remat", "dots", "--output_dir", str(tmp_path / "out")],
        env=BENCH_TPU_ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    plan_lines = [line for line in result.stdout.splitlines() if line.startswith("plan_json: ")]
    assert len(plan_lines) == 1, result.stdout[-3000:]
    plan = json.loads(plan_lines[0].removeprefix("plan_json: "))
    assert plan["devices"] == 4 and "v4" in plan["device_kind"].lower()
    assert plan["mesh"] == {"data": 1, "fsdp": 4} and plan["per_device_batch"] == 4
    assert plan["memory_per_device_bytes"] > 0 and plan["fits"] is True
    assert "memory_per_device" in result.stdout and "GiB" in result.stdout
