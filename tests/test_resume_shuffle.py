"""A resumed training stream is the uninterrupted one, shuffle buffer and all.

With --shuffle_buffer_size > 0 the rows of an epoch pass through ShuffleBuffer, whose state names
the rows it holds by their position in the source instead of storing them. These tests read the
ids of the training stream as a run reads them (load_source under SpeechBatches, on the demo's
parquet shards, streaming) and resume it from the state a checkpoint would store (JSON) at random
points: the ids that follow must be the uninterrupted run's, in the same order, across epoch
boundaries, on every host, with datasets mixed by probability too.

`python tests/test_resume_shuffle.py` prints the measurements the design rests on: how far the
buffer moves rows (datasets' own buffer of 500 against ours) and what a resume re-reads at 500.
"""

import functools
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import make_demo_dataset  # noqa: E402
import run_scream  # noqa: E402

SEED = 3
BATCH_SIZE = 6  # 40 rows an epoch: the 7th batch spans the epoch boundary


def write_split(directory: Path, rows: list[dict], num_shards: int) -> str:
    """`rows` as a hub-style dataset of `num_shards` parquet files of the train split."""
    (directory / "data").mkdir(parents=True)
    for shard, indices in enumerate(np.array_split(np.arange(len(rows)), num_shards)):
        table = pa.Table.from_pylist([rows[i] for i in indices], schema=make_demo_dataset.FEATURES.arrow_schema)
        pq.write_table(table, directory / "data" / f"train-{shard:05d}-of-{num_shards:05d}.parquet")
    return str(directory)


def id_rows(prefix: str, num: int) -> list[dict]:
    """Rows that only their id tells apart (the stream never decodes audio)."""
    return [{"id": f"{prefix}-{i:06d}", "audio": {"bytes": b"", "path": None}, "text": "hei"} for i in range(num)]


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """40 rows in 4 shards, 30 in 3, and 24 others in 2 (the second dataset of a mix), in a private
    datasets cache; datasets' 5 s pause after each shuffled pass (for apache/arrow#45214 at
    interpreter exit) is dropped here, where every pass ends long before the process."""
    root = tmp_path_factory.mktemp("splits")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(root / "cache"))
        patch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
        yield {
            "four_shards": write_split(root / "four", id_rows("a", 40), 4),
            "three_shards": write_split(root / "three", id_rows("a", 30), 3),
            "other": write_split(root / "other", id_rows("b", 24), 2),
        }


def training_stream(dataset: str, buffer: int, *, state=None, host=0, hosts=1, probabilities=None, wrap=None):
    """This host's SpeechBatches of the train split, wired as make_batches wires a training run,
    each example reduced to its id and epoch; `wrap` wraps each source opened."""
    args = run_scream.DataArguments(
        dataset_name=dataset, streaming=True, shuffle_buffer_size=buffer, dataset_probabilities=probabilities
    )
    make_source = functools.partial(
        run_scream.load_source, args, "train", process_index=host, process_count=hosts, seed=SEED, shuffle=True
    )
    return run_scream.SpeechBatches(
        lambda epoch: (wrap or (lambda source: source))(make_source(epoch=epoch)),
        lambda row: ({"id": row["id"], "epoch": row[run_scream.EPOCH_FIELD]}, None),
        batch_size=BATCH_SIZE,
        collate_fn=lambda examples: None,
        repeat=True,
        num_workers=1,
        prefetch_batches=1,
        state=state,
        read_retry_wait_s=0.0,
    )


def take(batches, num: int) -> list[tuple[list[tuple[str, int]], dict]]:
    """(id, epoch) of each example of the next `num` batches, each batch with the state after it as a
    checkpoint stores it (through JSON)."""
    out = []
    iterator = iter(batches)
    for _, examples in iterator:
        out.append(([(e["id"], e["epoch"]) for e in examples], json.loads(json.dumps(batches.state_dict()))))
        if len(out) == num:
            break
    iterator.close()
    return out


def examples(batches: list) -> list[tuple[str, int]]:
    return [example for batch, _ in batches for example in batch]


def resumed_equals_uninterrupted(dataset: str, buffer: int, reference: list, points: list[int], **stream):
    """From the state after each batch in `points`, the rest of `reference`, batch for batch."""
    for k in points:
        resumed = take(training_stream(dataset, buffer, state=reference[k - 1][1], **stream), len(reference) - k)
        assert [batch for batch, _ in resumed] == [batch for batch, _ in reference[k:]], (buffer, k)


@pytest.mark.parametrize("buffer", [7, 16, 64])  # less than a shard of 10 rows, more, more than the split
def test_a_resume_at_random_points_continues_the_uninterrupted_order(splits, buffer):
    """Every epoch is its own permutation of the 40 rows; resumed after any batch (in the first
    epoch, at the batch before the one that spans the boundary, in the second epoch), the stream
    yields exactly the uninterrupted run's batches."""
    reference = take(training_stream(splits["four_shards"], buffer), 15)  # 90 rows: into the third epoch
    ids = [example_id for example_id, _ in examples(reference)]
    every_id = [f"a-{i:06d}" for i in range(40)]
    assert sorted(ids[:40]) == sorted(ids[40:80]) == every_id
    assert len({tuple(ids[:40]), tuple(ids[40:80]), tuple(every_id)}) == 3  # shuffled, anew each epoch
    assert [epoch for _, epoch in examples(reference)] == [0] * 40 + [1] * 40 + [2] * 10
    rng = random.Random(buffer)
    resumed_equals_uninterrupted(splits["four_shards"], buffer, reference, [rng.randint(1, 5), 6, rng.randint(8, 12)])


@pytest.mark.parametrize("dataset,rows_per_host", [("four_shards", 20), ("three_shards", 15)])
def test_two_hosts_resumed_read_each_example_once(splits, dataset, rows_per_host):
    """Two hosts (4 shards: two each; 3 shards: each reads all and keeps every other row), each
    with a shuffle buffer larger than its share of a shard: each host resumed mid-epoch continues
    its own uninterrupted order, and the hosts' epochs together hold every example exactly once,
    in each of two epochs."""
    epochs = [[], []]
    for host in range(2):
        reference = take(training_stream(splits[dataset], 16, host=host, hosts=2), 7)  # 42 rows: 2 epochs and more
        pause = random.Random(host).randint(1, rows_per_host // BATCH_SIZE)  # in the first epoch
        resumed = take(
            training_stream(splits[dataset], 16, state=reference[pause - 1][1], host=host, hosts=2), 7 - pause
        )
        read = examples(reference[:pause] + resumed)
        assert read == examples(reference)
        for epoch in range(2):
            epochs[epoch] += [example_id for example_id, e in read if e == epoch]
    num = 40 if dataset == "four_shards" else 30
    for epoch in range(2):
        assert sorted(epochs[epoch]) == [f"a-{i:06d}" for i in range(num)]


def test_datasets_mixed_by_probability_resume_exactly(splits):
    """Two datasets interleaved 70:30 until both are exhausted: the mix's own random choices resume
    with the buffer's, so the resumed stream is the uninterrupted one, across an epoch boundary."""
    mixed = f"{splits['four_shards']},{splits['other']}"
    reference = take(training_stream(mixed, 16, probabilities="0.7,0.3"), 24)
    read = examples(reference)
    first_epoch = [example_id for example_id, epoch in read if epoch == 0]
    assert {i[0] for i in first_epoch} == {"a", "b"} and len(first_epoch) >= 64  # both, the smaller one repeated
    assert {f"a-{i:06d}" for i in range(40)} | {f"b-{i:06d}" for i in range(24)} == set(first_epoch)
    boundary = next(k for k, (batch, _) in enumerate(reference) if batch[-1][1] == 1)
    points = [random.Random(1).randint(1, boundary - 1), boundary, random.Random(2).randint(boundary + 1, 20)]
    resumed_equals_uninterrupted(mixed, 16, reference, points, probabilities="0.7,0.3")


class DropsOnce:
    """A source whose connection drops once, after `rows` rows of the epoch it was opened for."""

    def __init__(self, source, rows: int, dropped: list):
        self.source, self.rows, self.dropped = source, rows, dropped

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state):
        self.source.load_state_dict(state)

    def __iter__(self):
        for number, row in enumerate(self.source, 1):
            yield row
            if number == self.rows and not self.dropped:
                self.dropped.append(number)
                raise ConnectionError("the connection dropped")


def test_a_read_failing_mid_epoch_is_retried_without_losing_or_repeating_examples(splits, capsys):
    """A dropped connection mid-epoch reopens the source at the state after the last row read:
    the shuffle buffer is read again, and the stream goes on exactly as the undisturbed one."""
    reference = examples(take(training_stream(splits["four_shards"], 16), 10))
    dropped = []
    disturbed = training_stream(splits["four_shards"], 16, wrap=lambda source: DropsOnce(source, 23, dropped))
    assert examples(take(disturbed, 10)) == reference
    assert dropped == [23] and "reading the dataset failed (ConnectionError" in capsys.readouterr().err


def mixing(order: list[str]) -> dict[str, float]:
    """How far the shuffle moves rows: mean |emitted position - position in the file| and the mean
    distance between the emitted positions of rows adjacent in the file."""
    emitted_at = np.empty(len(order), int)
    emitted_at[[int(example_id.split("-")[1]) for example_id in order]] = np.arange(len(order))
    return {
        "mean |displacement|": float(np.abs(emitted_at - np.arange(len(order))).mean()),
        "adjacent rows apart": float(np.abs(np.diff(emitted_at)).mean()),
    }


def shuffled_ids(dataset: str, buffer: int, seed: int, *, datasets_buffer: bool) -> list[str]:
    """One epoch's ids through load_source's shuffle, or through datasets' own buffer (what
    load_source did before ShuffleBuffer: IterableDataset.shuffle(seed, buffer) and set_epoch)."""
    args = run_scream.DataArguments(dataset_name=dataset, streaming=True, shuffle_buffer_size=buffer)
    if datasets_buffer:
        source = run_scream.load_source(args, "train", seed=seed).shuffle(seed=seed, buffer_size=buffer)
        source.set_epoch(1)
    else:
        source = run_scream.load_source(args, "train", seed=seed, shuffle=True, epoch=1)
    return [row["id"] for row in source]


def test_mixing_is_as_good_as_datasets_own_buffer(tmp_path, splits):
    """The same algorithm as datasets' buffer, so over 3,000 rows of one shard (nothing but the
    buffer reorders them) at the scripts' 500 it moves rows as far: each measure within 10% of
    datasets' (averaged over 3 seeds)."""
    dataset = write_split(tmp_path / "ids", id_rows("row", 3000), 1)
    ours, theirs = (
        [mixing(shuffled_ids(dataset, 500, seed, datasets_buffer=own)) for seed in range(3)] for own in (False, True)
    )
    for measure in ours[0]:
        mean_ours, mean_theirs = (np.mean([m[measure] for m in runs]) for runs in (ours, theirs))
        print(f"{measure}: ours {mean_ours:.0f}, datasets' {mean_theirs:.0f}")
        assert mean_ours >= 0.9 * mean_theirs, measure


def test_a_resume_rereads_only_from_the_oldest_held_row(tmp_path, splits):
    """At the scripts' buffer of 500 over 10,000 rows: resumed late in the epoch, the stream goes on
    exactly, having read again only the rows from the oldest one the buffer holds on (each round
    keeps a row with probability 1/2, so that is a few thousand rows, not the epoch so far)."""
    dataset = write_split(tmp_path / "ids", id_rows("row", 10_000), 4)
    args = run_scream.DataArguments(dataset_name=dataset, streaming=True, shuffle_buffer_size=500)
    source = run_scream.load_source(args, "train", seed=SEED, shuffle=True)
    reference, states = [], []
    for row in source:
        reference.append(row["id"])
        states.append(source.state_dict())
    for k in (6001, 8765):
        state = json.loads(json.dumps(states[k - 1]))
        reread = state["read"] - min(state["held"])
        print(f"resumed after row {k}: {reread} rows read again")
        assert len(state["held"]) <= reread < 500 * np.log2(500) < k
        resumed = run_scream.load_source(args, "train", seed=SEED, shuffle=True)
        resumed.load_state_dict(state)
        assert [row["id"] for row in resumed] == reference[k:]


def window_shuffled(order: list[str], window: int, seed: int) -> list[str]:
    """The alternative not taken: each window of `window` rows emitted in a random order."""
    rng = np.random.default_rng(seed)
    return [row for i in range(0, len(order), window) for row in rng.permutation(order[i : i + window])]


def measure(num_rows: int = 3000, buffer: int = 500):
    """The figures behind ShuffleBuffer: how far it moves rows against datasets' own buffer and a
    window shuffle, on ids only; what a resume re-reads, in rows and seconds, on demo audio rows."""
    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0  # (see the splits fixture)
    with tempfile.TemporaryDirectory() as root:
        ids = write_split(Path(root) / "ids", id_rows("row", num_rows * 4), 1)
        unshuffled = [f"row-{i:06d}" for i in range(num_rows * 4)]
        orders = {
            f"datasets' buffer {buffer}": lambda seed: shuffled_ids(ids, buffer, seed, datasets_buffer=True),
            f"ShuffleBuffer {buffer}": lambda seed: shuffled_ids(ids, buffer, seed, datasets_buffer=False),
            f"window {buffer}": lambda seed: window_shuffled(unshuffled, buffer, seed),
            f"window {2 * buffer}": lambda seed: window_shuffled(unshuffled, 2 * buffer, seed),
        }
        for name, shuffled in orders.items():
            runs = [mixing(shuffled(seed)) for seed in range(3)]
            print(f"{name}: " + ", ".join(f"{m} {np.mean([r[m] for r in runs]):.0f}" for m in runs[0]))
        audio = Path(root) / "audio"
        make_demo_dataset.write_dataset(audio, num_rows, 1, 0, 3, 4)
        args = run_scream.DataArguments(dataset_name=str(audio), streaming=True, shuffle_buffer_size=buffer)
        source = run_scream.load_source(args, "train", shuffle=True)
        start = time.perf_counter()
        states = [source.state_dict() for _ in source]
        print(f"one pass over {len(states)} demo audio rows: {time.perf_counter() - start:.2f} s")
        for k in range(500, num_rows, 500):
            start = time.perf_counter()
            resumed = run_scream.load_source(args, "train", shuffle=True)
            resumed.load_state_dict(states[k - 1])
            next(iter(resumed))
            reread = states[k - 1]["read"] - min(states[k - 1]["held"], default=states[k - 1]["read"])
            print(
                f"resumed after row {k}: {reread} rows read again, first row out after {time.perf_counter() - start:.2f} s"
            )


if __name__ == "__main__":
    measure()
