"""How test_run_scream.py's tests are spread over pytest-xdist workers (`-n 2 --dist loadgroup`).

A session fixture is built once per worker that asks for it, and the expensive ones (a whole
training run, whisper-base read and exported, the three-mesh train steps) take tens of seconds.
So every test that uses one of them is put in that fixture's group, and a group runs on one
worker: each is still built once per suite, while the other worker runs the rest.
"""

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


def pytest_collection_modifyitems(config, items):
    # Runs before xdist's own hook (trylast), which turns the marks into scheduling groups.
    for item in items:
        group = xdist_group_of(item.fixturenames)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
