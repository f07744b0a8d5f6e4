"""How test_run_scream.py's tests are spread over pytest-xdist workers (`-n 2 --dist loadgroup`).

A session fixture is built once per worker that asks for it, and the expensive ones (a whole
training run, whisper-base read and exported, the three-mesh train steps) take tens of seconds.
So every test that uses one of them is put in that fixture's group, and a group runs on one
worker: each is still built once per suite, while the other worker runs the rest.
"""

import os

import pytest

# fixture -> group; tests sharing a group run on one worker. Fixtures that use another listed
# fixture share its group (train_two_processes' test also reads train_straight).
SHARED_FIXTURE_GROUPS = {
    "whisper_base": "whisper_base",
    "espeak_clips": "whisper_base",
    "tiny_en": "whisper_base",
    "tiny_en_ct2_dir": "whisper_base",
    "train_straight": "train_straight",
    "train_two_processes": "train_straight",
    "train_step_runs": "train_step_runs",
    "evalsets_two_processes": "evalsets_two_processes",
    "reliability_reference": "reliability_reference",
    "model_generation_dir": "model_generation_dir",
    "model_checkpoints": "model_generation_dir",
    "nb_model": "nb_model",
    "scripts_hub_cache": "scripts_hub_cache",
}


def xdist_group_of(fixturenames) -> str | None:
    """The group of the first listed fixture a test uses (directly or through other fixtures)."""
    return next((SHARED_FIXTURE_GROUPS[name] for name in SHARED_FIXTURE_GROUPS if name in fixturenames), None)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # Must run before the xdist worker's own hook, which turns the marks into scheduling groups
    # (an "@group" suffix on each node id); without tryfirst it runs first and sees no marks.
    for item in items:
        group = xdist_group_of(item.fixturenames)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    """Grouping fails silently when xdist cannot rename the node ids (pytest 9.2 with xdist 3.8:
    pytest-dev/pytest-xdist#1386): every group's fixture is then built on both workers. Say so."""
    if node.config.getoption("dist") == "loadgroup" and not any("@" in nodeid for nodeid in ids):
        raise pytest.UsageError(
            "--dist loadgroup received no grouped test ids from the xdist workers, so each shared fixture "
            "would be built on both; install the pytest and pytest-xdist pinned in requirements-dev.txt"
        )


# Entries at most this large in all: the limit turns on JAX's file lock around every cache read and
# write, which two processes writing one entry at once (two workers, two hosts of one run) need.
COMPILATION_CACHE_MAX_BYTES = 8 << 30


@pytest.fixture(scope="session")
def suite_compilation_cache(tmp_path_factory) -> dict:
    """One persistent compilation cache directory per kind of process for the whole suite, shared
    by both xdist workers: a program compiled for a test on one worker then loads on the other.
    (Runs of two joined processes use none: test_run_scream.joined_process_env says why.)
    Without xdist this session's own temporary directory holds it (never an older session's)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this session's directory, above popen-gw0 and popen-gw1
    return {kind: root / f"jax_cache_{kind}" for kind in ("in_process", "subprocess")}


@pytest.fixture(scope="session", autouse=True)
def in_process_compilation_cache(suite_compilation_cache):
    """JAX's persistent compilation cache for the tests that run in this process: many build the
    same step again (a resumed run, float32 then bfloat16 then float32), which then loads instead
    of compiling (measured: 11% off those tests). Whole-run subprocesses have run_env's cache."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(suite_compilation_cache["in_process"]))
    jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_MAX_BYTES)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
