"""How the tests (test_run_scream.py and tests/) are spread over pytest-xdist workers (`-n 2 --dist loadgroup`).

A session fixture is built once per worker that asks for it, and the expensive ones (a whole
training run, whisper-base converted and read, the three-mesh train steps) take tens of seconds.
So every test that uses one of them is put in that fixture's group, and a group runs on one
worker: each is still built once per suite, while the other worker runs the rest.

The harness and the fixtures every test file shares live in tests/support.py, loaded here as a
plugin so that the smoke test at the top and the feature files in tests/ see the same fixtures.
"""

import pytest

pytest_plugins = ["tests.support"]

# fixture -> group; tests sharing a group run on one worker. Fixtures that use another listed
# fixture share its group (train_two_processes' test also reads train_straight). Listed in order
# of precedence: a test is put in the group of the first one it uses.
SHARED_FIXTURE_GROUPS = {
    "whisper_base_dir": "whisper_base",
    "whisper_base": "whisper_base",
    "whisper_base_torch": "whisper_base",
    "whisper_base_joined_dir": "whisper_base",
    "tiny_en_dir": "tiny_en",
    "tiny_en": "tiny_en",
    "train_straight": "train_straight",
    "train_two_processes": "train_straight",
    "train_step_runs": "train_step_runs",
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
