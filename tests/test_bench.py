"""bench_scream.py: the `tpu` and `train` subcommands at toy sizes (first: the slowest, so that pytest-xdist
starts them on different workers), the FLOPs formula the fractions of peak rest on, and the TPU batch search.
`input`, `compile` and `generate` are run by hand: their tables hold timings only."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# With libtpu installed, a process that starts JAX without this loads libtpu and holds its lockfile.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import bench_scream  # noqa: E402
import run_scream as rs  # noqa: E402


def bench_tables(text: str) -> dict[str, list[dict]]:
    """The markdown tables that bench_scream prints: {title: [row as {header: cell}]}."""
    tables, title, headers = {}, None, None
    for line in text.splitlines():
        heading = re.match(r"\*\*(.+?)\*\*", line)
        if heading:
            title, headers = heading.group(1), None
        elif title and line.startswith("|") and not set(line) <= set("|-"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if headers is None:
                headers, tables[title] = cells, []
            else:
                assert len(cells) == len(headers), line
                tables[title].append(dict(zip(headers, cells)))
    return tables


def bench_table(text: str, prefix: str) -> list[dict]:
    tables = bench_tables(text)
    matches = [rows for title, rows in tables.items() if title.startswith(prefix)]
    assert len(matches) == 1, f"no single table titled {prefix!r} in {list(tables)}"
    return matches[0]


# Runs in its own process: compiling for TPU loads libtpu, which must neither look for a TPU nor ask
# a metadata server. Each step the bench compiles is recorded as XLA compiled it (its batch of
# audio, its memory_analysis) and printed after the bench's table.
TPU_SCRIPT = """
import json, bench_scream, run_scream as rs
bench_scream.hide_torch()
compiled_steps, compiled_memory_bytes = [], rs.compiled_memory_bytes

def recorded(compiled):
    analysis, audio = compiled.memory_analysis(), compiled.args_info[0][1]["audio"]
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
    compiled_steps.append({"audio": audio.shape, **{name: getattr(analysis, name) for name in fields}})
    return compiled_memory_bytes(compiled)

rs.compiled_memory_bytes = recorded
bench_scream.main(["tpu", "--tiny", "--state_dtypes", "float32/float32", "--fsdp", "all"])
print("compiled: " + json.dumps(compiled_steps))
"""


def test_tpu_tiny_reports_the_memory_per_chip_xla_compiled_for_a_v4_8():
    env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-c", TPU_SCRIPT], env=env, capture_output=True, text=True, timeout=400, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = bench_table(done.stdout, "Per-chip memory of the real train step")
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("compiled: ")]
    (step,) = json.loads(line.removeprefix("compiled: "))  # the seed batch, 2 per chip, is the search's cap
    assert (row["slice"], row["sharding"], row["remat"], row["scan"]) == ("v4-8 (4 chips)", "FSDP 4", "dots", "on")
    assert (row["fits"], row["largest batch/chip"]) == ("yes", ">= 2 (search cap)")
    assert step["audio"] == [4 * 2, 3 * 16000]  # 2 per chip on 4 chips, 3 s at 16 kHz
    per_chip = step["argument_size_in_bytes"] + step["output_size_in_bytes"] + step["temp_size_in_bytes"]
    per_chip -= step["alias_size_in_bytes"]  # the donated state: its input and output are one buffer
    assert float(row["GiB/chip at seed batch"]) == pytest.approx(per_chip / 2**30, rel=5e-3)


def test_train_tiny_times_both_sides_each_in_its_own_process(capsys, monkeypatch):
    # Unoptimised XLA code compiles the toy step in a third of the time; both sides' processes inherit it.
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    assert bench_scream.main(["train", "--tiny"]) == 0
    out = capsys.readouterr().out
    ours, theirs = bench_table(out, "Training step throughput")
    assert ours["model"] == "toy (ours: jit, log-mel in step)"
    assert theirs["model"] == "toy (PyTorch eager, features precomputed)"
    for row in (ours, theirs):
        low, high = (float(x) for x in row["s/step (range)"].split("-"))
        assert 0 < low <= float(row["s/step (median)"]) <= high
        # The formula's FLOPs at the measured speed, against the side's own matmul measured in its
        # process: above 1 only if the formula, the timing or the peak were wrong.
        assert 0 < float(row["fraction of own peak"]) < 1
        assert 0 < float(row["cores busy"]) <= bench_scream.usable_cores() + 0.2
    # Each run of each side was a fresh process of its own (one framework's threads cannot slow the other).
    assert "(alternating which goes first; 2 processes in all, none of them this one)" in out


def test_flops_formula_counts_whisper_tiny_and_large_v2_by_hand():
    """Training FLOPs per example from the dimensions (the numerator of each fraction of peak),
    against each matmul counted by hand for whisper-tiny: d 384, 4 + 4 layers, FFN 1536, 80 mel
    bins, S = 1500 encoder positions, T = 128 decoder positions, V = 51865."""
    d, f, S, T, V = 384, 1536, 1500, 128, 51865
    tiny = rs.WhisperDims.from_config(bench_scream.whisper_config("tiny"))
    parts = rs.forward_flops(tiny, T)
    by_hand = {
        "conv stem": 2 * (2 * S) * (3 * 80) * d + 2 * S * (3 * d) * d,  # 80 mels -> d, then d -> d with stride 2
        "encoder projections + MLP": 4 * (4 * 2 * S * d * d + 2 * 2 * S * d * f),  # q, k, v, out; two FFN matmuls
        "encoder attention QK^T, AV": 4 * 2 * (2 * S * S * d),
        # self q, k, v, out; cross q, out over T; cross k, v over S; two FFN matmuls
        "decoder projections + MLP": 4
        * (4 * 2 * T * d * d + 2 * 2 * T * d * d + 2 * 2 * S * d * d + 2 * 2 * T * d * f),
        "decoder attention QK^T, AV": 4 * 2 * (2 * T * T * d + 2 * T * S * d),
        "output projection": 2 * T * d * V,
    }
    assert parts == by_hand
    assert rs.training_flops_per_example(tiny, T) == 3 * sum(by_hand.values())
    large = bench_scream.whisper_config("large-v2")
    assert (large.max_source_positions, large.vocab_size, large.encoder_layers) == (1500, 51865, 32)
    assert rs.training_flops_per_example(rs.WhisperDims.from_config(large), T) == pytest.approx(8.478e12, rel=1e-3)


@pytest.mark.parametrize(
    "base_gib, per_example_gib, seed, max_batch",
    [(2.0, 0.5, 5, 128), (2.0, 0.5, 80, 128), (1.0, 0.1, 32, 1024), (20.0, 4.0, 8, 64), (40.0, 1.0, 5, 64)],
)
def test_tpu_batch_search_finds_the_boundary_in_few_compiles(base_gib, per_example_gib, seed, max_batch):
    """largest_fitting_batch against memory that grows a little faster than linearly with the
    batch (as compiled steps do): the largest batch within the usable bytes, proven by the batch
    above it not fitting, from a handful of compiles instead of a bisection's seven to ten."""
    usable = bench_scream.v4_usable_bytes()

    def memory(batch):
        return int((base_gib + per_example_gib * batch * (1 + batch / 2000)) * 2**30)

    compiled = []

    def compile_at(batch):
        compiled.append(batch)
        return {"bytes": memory(batch), "fits": memory(batch) <= usable}

    known = {}
    best = bench_scream.largest_fitting_batch(compile_at, seed, max_batch, known)
    expected = max((b for b in range(max_batch + 1) if memory(b) <= usable), default=0)
    assert best == expected
    assert best == 0 or known[best]["fits"]
    assert best == max_batch or not known[best + 1]["fits"]
    assert len(compiled) == len(set(compiled)) <= 6, compiled
