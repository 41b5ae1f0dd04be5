"""Shared fixtures: the real images in ../shared/data (skipped when absent), the `cuda` marker's
skip, and the OpenMP wait policy of the test run. Shared inputs and parameter lists: helpers.py."""
import os
from pathlib import Path

# OpenMP threads that wait for work sleep instead of spinning (read once, when torch loads its
# OpenMP runtime, so this must come before `import torch`). The suite makes thousands of small op
# calls; with spinning waiters, each fork/join on a machine whose cores are busy waits for a
# core: on 2 cores busy with other jobs the default suite took 7-10 min instead of 2 (README, Tests).
# Results are the same either way; set OMP_WAIT_POLICY yourself to choose otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CRFRNN_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data():
    """Path to ../shared/data (VOCdevkit/VOC2012 and densecrf-demo); skips the test when absent."""
    if not (SHARED_DATA / "VOCdevkit" / "VOC2012").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="module")
def keep_thread_count():
    """For modules that run the scripts in-process (``pytestmark = pytest.mark.usefixtures(...)``):
    the scripts pick their CPU thread count; give the rest of the session its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` are skipped, with a reason, on a machine without a CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
